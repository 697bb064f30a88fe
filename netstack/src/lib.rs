//! The userspace network both ends of a Gefyra tunnel are built on: Stowaway (many peers,
//! policy, limits) and `kubectl gefyra connect --userspace` (one peer, a proxy, forwards).
//! Nothing here needs a TUN device, a capability or anything Linux-only.
//!
//! - `session`: one WireGuard session (boringtun): datagrams in, packets out, and back.
//! - `device`: the userspace stack's device: IP packets in memory, between the stack
//!   (smoltcp) and the sessions.
//! - `interface`: a stack for a set of addresses.
//! - `splice`: one TCP connection carried between a stack socket and an ordinary socket.
//! - `packet`: IP packets told apart, and the few built by hand.

pub mod device;
pub mod interface;
pub mod packet;
pub mod session;
pub mod splice;
