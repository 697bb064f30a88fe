//! Stowaway: the userspace WireGuard endpoint on UDP 31820.
