//! gefyra-carrier: the router of one GefyraBridgeMount. It listens on the workload's
//! container ports and forwards every connection to the original Pods, except what an
//! ACTIVE GefyraBridge takes: all of a port's traffic (a bridge without rules, raw TCP) or
//! the HTTP requests its rules match, sent to Stowaway with a preamble naming the bridge.
//!
//! `routes` (the pure route table) decides, `router` carries bytes and requests, `bridges`
//! watches the GefyraBridges, `run` is the process.

pub mod bridges;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod router;
pub mod routes;
pub mod run;
pub mod upstream;
