//! Stowaway: the userspace WireGuard endpoint on UDP 31820.

pub mod endpoint;
pub mod peers;
