//! A userspace stack (smoltcp) over the in-memory device, for a set of addresses.

use std::net::IpAddr;

use smoltcp::iface::{Config, Interface};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use crate::device::Queues;

/// A stack holding `addresses` (host routes), its default routes through the first IPv4
/// and the first IPv6 of them (the device is point-to-point: every packet goes into the
/// tunnel). With `any_ip` it also answers for every other destination, as Stowaway does
/// for the whole cluster. At most four addresses.
pub fn new(queues: &mut Queues, addresses: &[IpAddr], any_ip: bool) -> Interface {
    let mut stack = Interface::new(
        Config::new(HardwareAddress::Ip),
        queues,
        smoltcp::time::Instant::ZERO,
    );
    stack.set_any_ip(any_ip);
    stack.update_ip_addrs(|cidrs| {
        for address in addresses {
            let cidr = match address {
                IpAddr::V4(v4) => IpCidr::new(IpAddress::Ipv4(*v4), 32),
                IpAddr::V6(v6) => IpCidr::new(IpAddress::Ipv6(*v6), 128),
            };
            // smoltcp keeps a handful of addresses; more is a programming error upstream.
            let _ = cidrs.push(cidr);
        }
    });
    if let Some(v4) = addresses.iter().find_map(|address| match address {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    }) {
        let _ = stack.routes_mut().add_default_ipv4_route(v4);
    }
    if let Some(v6) = addresses.iter().find_map(|address| match address {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    }) {
        let _ = stack.routes_mut().add_default_ipv6_route(v6);
    }
    stack
}

/// smoltcp's clock from a monotonic instant and the stack's epoch.
pub fn clock(epoch: std::time::Instant, now: std::time::Instant) -> smoltcp::time::Instant {
    let micros = now.saturating_duration_since(epoch).as_micros();
    smoltcp::time::Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}
