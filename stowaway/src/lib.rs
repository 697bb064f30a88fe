//! Stowaway: the userspace WireGuard endpoint on UDP 31820.

pub mod bridges;
pub mod dataplane;
pub mod endpoint;
pub mod http;
pub mod metrics;
pub mod own_services;
/// Packets (moved to the shared `gefyra_netstack`; named here for the fuzz target).
pub use gefyra_netstack::packet;
pub mod peer_sync;
pub mod peers;
pub mod policy;
pub mod rbac;
pub mod run;
pub mod shard;
pub mod status;
