//! Stowaway: the userspace WireGuard endpoint on UDP 31820.

pub mod dataplane;
pub mod endpoint;
pub mod metrics;
pub mod packet;
pub mod peers;
pub mod policy;
pub mod run;
pub mod status;
