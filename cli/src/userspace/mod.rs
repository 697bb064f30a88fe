//! `kubectl gefyra connect -f FILE --userspace`: the tunnel in this process, without root,
//! Docker or a WireGuard device. `engine` is the data plane (on `gefyra_netstack`, like
//! Stowaway); `proxy` and `spec` the local protocols and flags; `run` the foreground
//! process around them.
pub mod engine;
pub mod proxy;
mod run;
pub mod spec;

pub(crate) use run::run;
