//! IP-range math: the tunnel-address pool and exclusive routed ranges. Pure functions over
//! the allocation table; the operator stores that table in the API server and decides
//! exclusivity there (compare-and-swap), never in process.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The server's tunnel address; Gefyra's clients hard-code it (ping probe and DNS).
pub const SERVER_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 99, 1));

/// Where tunnel addresses come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Tunnel-address ranges (IPv4 and/or IPv6).
    pub tunnel: Vec<IpNet>,
    /// Ranges nobody may route (the cluster's pod and service CIDRs, ...).
    pub reserved: Vec<IpNet>,
}

impl Default for Pool {
    /// `192.168.96.0/20`: 4,093 client addresses around the server's `192.168.99.1`.
    fn default() -> Self {
        Self {
            tunnel: vec!["192.168.96.0/20".parse().expect("a valid CIDR")],
            reserved: Vec::new(),
        }
    }
}

impl Pool {
    /// How many client addresses the pool holds.
    pub fn capacity(&self) -> u128 {
        self.tunnel
            .iter()
            .map(|net| {
                let all = match net {
                    IpNet::V4(net) => 1u128 << (32 - net.prefix_len()),
                    IpNet::V6(net) => 1u128
                        .checked_shl(128 - u32::from(net.prefix_len()))
                        .unwrap_or(u128::MAX),
                };
                let edges = if matches!(net, IpNet::V4(_)) && net.prefix_len() < 31 {
                    2
                } else {
                    1
                };
                let server = u128::from(net.contains(&SERVER_ADDRESS));
                all.saturating_sub(edges + server)
            })
            .sum()
    }
}

/// One client's exclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The client object's uid: an entry whose client is gone (or was re-created) is stale.
    pub uid: String,
    /// The tunnel address, as a host prefix (`/32` or `/128`).
    pub tunnel: IpNet,
    /// The routed range the client asked for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed: Option<IpNet>,
}

impl Allocation {
    pub fn ranges(&self) -> impl Iterator<Item = IpNet> + '_ {
        std::iter::once(self.tunnel).chain(self.routed)
    }
}

/// Every live allocation, by client name.
pub type Allocations = BTreeMap<String, Allocation>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("the tunnel-address pool is exhausted ({capacity} addresses, all in use)")]
    PoolExhausted { capacity: u128 },
    #[error("subnet {subnet} overlaps {what}")]
    Overlap { subnet: IpNet, what: String },
    #[error("subnet {subnet} is not a network address (did you mean {}?)", subnet.trunc())]
    NotNetworkAddress { subnet: IpNet },
}

pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Why `subnet` may not be routed to `client`, if it may not.
pub fn check_routed(
    pool: &Pool,
    allocations: &Allocations,
    client: &str,
    subnet: IpNet,
) -> Result<(), IpamError> {
    if subnet.trunc() != subnet {
        return Err(IpamError::NotNetworkAddress { subnet });
    }
    let conflict = |what: String| Err(IpamError::Overlap { subnet, what });
    let server = IpNet::from(SERVER_ADDRESS);
    if overlaps(&subnet, &server) {
        return conflict(format!("the server's tunnel address {SERVER_ADDRESS}"));
    }
    if let Some(tunnel) = pool.tunnel.iter().find(|net| overlaps(&subnet, net)) {
        return conflict(format!("the tunnel pool {tunnel}"));
    }
    if let Some(reserved) = pool.reserved.iter().find(|net| overlaps(&subnet, net)) {
        return conflict(format!("the reserved range {reserved}"));
    }
    for (other, allocation) in allocations {
        if other == client {
            continue;
        }
        if let Some(range) = allocation.ranges().find(|range| overlaps(&subnet, range)) {
            return conflict(format!("{range} of client {other}"));
        }
    }
    Ok(())
}

fn host_prefix(address: IpAddr) -> IpNet {
    IpNet::from(address)
}

/// The first free client address of the pool: never the network or broadcast address,
/// never the server's.
pub fn free_tunnel_address(pool: &Pool, allocations: &Allocations) -> Result<IpAddr, IpamError> {
    let mut taken: Vec<IpAddr> = allocations.values().map(|a| a.tunnel.addr()).collect();
    taken.sort_unstable();
    for net in &pool.tunnel {
        // Walk the pool's hosts and the sorted taken addresses side by side: O(n).
        let mut next_taken = taken
            .iter()
            .skip_while(|address| !net.contains(*address))
            .peekable();
        for address in net.hosts() {
            while next_taken.next_if(|taken| **taken < address).is_some() {}
            if next_taken.peek() == Some(&&address) || address == SERVER_ADDRESS {
                continue;
            }
            return Ok(address);
        }
    }
    Err(IpamError::PoolExhausted {
        capacity: pool.capacity(),
    })
}

/// Allocates (or confirms) `client`'s ranges in `allocations`. Idempotent: a client that
/// already holds an allocation for the same uid and subnet keeps it.
pub fn allocate(
    pool: &Pool,
    allocations: &mut Allocations,
    client: &str,
    uid: &str,
    routed: Option<IpNet>,
) -> Result<Allocation, IpamError> {
    if let Some(routed) = routed {
        check_routed(pool, allocations, client, routed)?;
    }
    if let Some(existing) = allocations.get_mut(client)
        && existing.uid == uid
        && pool
            .tunnel
            .iter()
            .any(|net| net.contains(&existing.tunnel.addr()))
    {
        existing.routed = routed;
        return Ok(existing.clone());
    }
    allocations.remove(client);
    let allocation = Allocation {
        uid: uid.to_string(),
        tunnel: host_prefix(free_tunnel_address(pool, allocations)?),
        routed,
    };
    allocations.insert(client.to_string(), allocation.clone());
    Ok(allocation)
}

/// Releases `client`'s ranges; true if it held any.
pub fn release(allocations: &mut Allocations, client: &str) -> bool {
    allocations.remove(client).is_some()
}

/// Removes allocations whose client no longer exists (by uid); the names removed.
pub fn sweep(allocations: &mut Allocations, live_uids: &BTreeSet<String>) -> Vec<String> {
    let stale: Vec<String> = allocations
        .iter()
        .filter(|(_, allocation)| !live_uids.contains(&allocation.uid))
        .map(|(name, _)| name.clone())
        .collect();
    for name in &stale {
        allocations.remove(name);
    }
    stale
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn the_default_pool_holds_4000_peers_and_never_gives_out_edges_or_the_server() {
        let pool = Pool::default();
        assert_eq!(pool.capacity(), 4093);
        let mut allocations = Allocations::new();
        let mut given = BTreeSet::new();
        for i in 0..4093 {
            let a = allocate(&pool, &mut allocations, &format!("c{i}"), "u", None).unwrap();
            assert!(given.insert(a.tunnel.addr()));
        }
        assert!(!given.contains(&SERVER_ADDRESS));
        assert!(!given.contains(&"192.168.96.0".parse::<IpAddr>().unwrap()));
        assert!(!given.contains(&"192.168.111.255".parse::<IpAddr>().unwrap()));
        assert_eq!(
            allocate(&pool, &mut allocations, "one-more", "u", None),
            Err(IpamError::PoolExhausted { capacity: 4093 })
        );
        release(&mut allocations, "c7");
        assert_eq!(
            allocate(&pool, &mut allocations, "one-more", "u", None)
                .unwrap()
                .tunnel,
            net("192.168.96.8/32")
        );
    }

    #[test]
    fn conflicts_name_what_they_overlap() {
        let pool = Pool {
            tunnel: vec![net("192.168.96.0/20")],
            reserved: vec![net("10.96.0.0/12")],
        };
        let mut allocations = Allocations::new();
        allocate(
            &pool,
            &mut allocations,
            "a",
            "ua",
            Some(net("172.20.0.0/16")),
        )
        .unwrap();
        let error = allocate(
            &pool,
            &mut allocations,
            "b",
            "ub",
            Some(net("172.20.4.0/24")),
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "subnet 172.20.4.0/24 overlaps 172.20.0.0/16 of client a"
        );
        let error = check_routed(&pool, &allocations, "b", net("10.100.0.0/16")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "subnet 10.100.0.0/16 overlaps the reserved range 10.96.0.0/12"
        );
        let error = check_routed(&pool, &allocations, "b", net("192.168.100.0/24")).unwrap_err();
        assert!(error.to_string().contains("tunnel pool"), "{error}");
        let error = check_routed(&pool, &allocations, "b", net("172.21.0.1/16")).unwrap_err();
        assert!(
            error.to_string().contains("did you mean 172.21.0.0/16"),
            "{error}"
        );
        // The client itself may keep or change its own range.
        allocate(
            &pool,
            &mut allocations,
            "a",
            "ua",
            Some(net("172.20.0.0/24")),
        )
        .unwrap();
        assert!(
            !allocations.contains_key("b"),
            "a rejected client changes nothing"
        );
    }

    #[test]
    fn an_allocation_is_stable_for_its_uid_and_stale_ones_are_swept() {
        let pool = Pool::default();
        let mut allocations = Allocations::new();
        let first = allocate(&pool, &mut allocations, "a", "u1", None).unwrap();
        assert_eq!(
            allocate(&pool, &mut allocations, "a", "u1", None).unwrap(),
            first
        );
        allocate(&pool, &mut allocations, "b", "u2", None).unwrap();
        let swept = sweep(&mut allocations, &BTreeSet::from(["u2".to_string()]));
        assert_eq!(swept, ["a"]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate {
            client: u8,
            routed: Option<(u8, u8)>,
        },
        Release {
            client: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..24, proptest::option::of((0u8..16, 20u8..=28)))
                .prop_map(|(client, routed)| Op::Allocate { client, routed }),
            (0u8..24).prop_map(|client| Op::Release { client }),
        ]
    }

    proptest! {
        #[test]
        fn random_sequences_never_yield_overlapping_live_ranges(ops in proptest::collection::vec(op(), 1..200)) {
            // A small pool (10.99.0.0/29: 6 addresses) so exhaustion and reuse happen.
            let pool = Pool { tunnel: vec![net("10.99.0.0/29")], reserved: vec![net("172.16.12.0/22")] };
            let mut allocations = Allocations::new();
            for op in ops {
                match op {
                    Op::Allocate { client, routed } => {
                        let routed = routed.map(|(third, prefix)| IpNet::new(
                            IpAddr::V4(Ipv4Addr::new(172, 16, third, 0)), prefix).unwrap().trunc());
                        let before = allocations.clone();
                        let name = format!("c{client}");
                        match allocate(&pool, &mut allocations, &name, "uid", routed) {
                            Ok(allocation) => prop_assert_eq!(allocations.get(&name), Some(&allocation)),
                            Err(IpamError::Overlap { .. }) | Err(IpamError::NotNetworkAddress { .. }) =>
                                prop_assert_eq!(&allocations, &before, "a rejected request changes nothing"),
                            Err(IpamError::PoolExhausted { .. }) => {
                                prop_assert!(allocations.len() >= 6 || before.contains_key(&name));
                            }
                        }
                    }
                    Op::Release { client } => {
                        let name = format!("c{client}");
                        release(&mut allocations, &name);
                        prop_assert!(!allocations.contains_key(&name));
                        // What was released is allocatable again.
                        if allocations.len() < 6 {
                            let mut probe = allocations.clone();
                            prop_assert!(allocate(&pool, &mut probe, "probe", "p", None).is_ok());
                        }
                    }
                }
                let live: Vec<(String, IpNet)> = allocations.iter()
                    .flat_map(|(name, a)| a.ranges().map(move |r| (name.clone(), r)))
                    .collect();
                for (i, (owner_a, a)) in live.iter().enumerate() {
                    prop_assert!(pool.tunnel.iter().any(|t| t.contains(a)) || !pool.tunnel.iter().any(|t| overlaps(t, a)));
                    prop_assert!(a.addr() != SERVER_ADDRESS);
                    for (owner_b, b) in &live[i + 1..] {
                        prop_assert!(!overlaps(a, b), "{owner_a} {a} overlaps {owner_b} {b}");
                    }
                }
            }
        }
    }
}
