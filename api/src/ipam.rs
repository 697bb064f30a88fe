//! IP-range math: the tunnel-address pool and exclusive routed ranges. Pure functions; the
//! operator keeps their inputs in the API server, which decides exclusivity: one claim
//! object per tunnel address (created by unique name, 409 = taken) and a routes table changed
//! only by compare-and-swap — never an in-process lock.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The server's tunnel address; Gefyra's clients hard-code it (ping probe and DNS).
pub const SERVER_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 99, 1));

/// Selects the tunnel-address claims (Leases) among the namespace's Leases.
pub const CLAIM_SELECTOR: &str = "app.kubernetes.io/component=gefyra-tunnel-address";
/// The claim's label naming the uid of the client holding it.
pub const CLIENT_UID_LABEL: &str = "gefyra.dev/client-uid";
/// The claim's annotation naming the address it holds.
pub const ADDRESS_ANNOTATION: &str = "gefyra.dev/tunnel-address";

/// The address a tunnel-address claim holds, and the uid of the client holding it.
pub fn claimed(lease: &k8s_openapi::api::coordination::v1::Lease) -> Option<(IpAddr, &str)> {
    let metadata = &lease.metadata;
    let address = metadata
        .annotations
        .as_ref()?
        .get(ADDRESS_ANNOTATION)?
        .parse::<IpNet>()
        .ok()?
        .addr();
    let uid = metadata.labels.as_ref()?.get(CLIENT_UID_LABEL)?;
    Some((address, uid.as_str()))
}

/// The routes table as stored (the ConfigMap's `data`): the routes that parse, and the
/// entries that do not (kept as they are by whoever rewrites the table: nothing is lost).
pub fn decode_routes(data: &BTreeMap<String, String>) -> (Routes, BTreeMap<String, String>) {
    let mut routes = Routes::new();
    let mut unreadable = BTreeMap::new();
    for (client, value) in data {
        match serde_json::from_str::<Route>(value) {
            Ok(route) => {
                routes.insert(client.clone(), route);
            }
            Err(_) => {
                unreadable.insert(client.clone(), value.clone());
            }
        }
    }
    (routes, unreadable)
}

/// The Secret holding the server's WireGuard key pair (`privateKey`, `publicKey`: base64
/// text): created by the operator, read by Stowaway.
pub const SERVER_KEY_SECRET: &str = "gefyra-stowaway-key";

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

/// The offsets (from the network address) of the addresses of `net` a client may get:
/// never the network address; for IPv4 below /31 never the broadcast address either.
fn host_offsets(net: &IpNet) -> (u128, u128) {
    match net {
        IpNet::V4(v4) => {
            let all = 1u128 << (32 - v4.prefix_len());
            if v4.prefix_len() < 31 {
                (1, all - 1)
            } else {
                (1, all)
            }
        }
        IpNet::V6(v6) => {
            let all = 1u128
                .checked_shl(128 - u32::from(v6.prefix_len()))
                .unwrap_or(u128::MAX);
            (1, all)
        }
    }
}

fn at_offset(net: &IpNet, offset: u128) -> IpAddr {
    match net {
        IpNet::V4(v4) => IpAddr::V4(Ipv4Addr::from(
            u32::from(v4.network()).wrapping_add(offset as u32),
        )),
        IpNet::V6(v6) => IpAddr::V6(Ipv6Addr::from(
            u128::from(v6.network()).wrapping_add(offset),
        )),
    }
}

impl Pool {
    /// How many client addresses the pool holds.
    pub fn capacity(&self) -> u128 {
        self.tunnel
            .iter()
            .map(|net| {
                let (first, end) = host_offsets(net);
                let server = u128::from(net.contains(&SERVER_ADDRESS));
                end.saturating_sub(first).saturating_sub(server)
            })
            .fold(0u128, u128::saturating_add)
    }

    /// Why this pool cannot work, if it cannot: tunnel ranges that overlap each other or a
    /// reserved range, or no address to give out.
    pub fn validate(&self) -> Result<(), String> {
        for (i, a) in self.tunnel.iter().enumerate() {
            if let Some(b) = self.tunnel[i + 1..].iter().find(|b| overlaps(a, b)) {
                return Err(format!("tunnel pool ranges {a} and {b} overlap"));
            }
            if let Some(reserved) = self.reserved.iter().find(|r| overlaps(a, r)) {
                return Err(format!(
                    "tunnel pool range {a} overlaps the reserved range {reserved}"
                ));
            }
        }
        if self.capacity() == 0 {
            return Err("the tunnel pool has no address to give out".into());
        }
        Ok(())
    }

    /// Whether `address` is one the pool gives out.
    pub fn gives_out(&self, address: IpAddr) -> bool {
        address != SERVER_ADDRESS
            && self.tunnel.iter().any(|net| {
                let (first, end) = host_offsets(net);
                let offset = match (net, address) {
                    (IpNet::V4(net), IpAddr::V4(address)) if net.contains(&address) => {
                        u128::from(u32::from(address) - u32::from(net.network()))
                    }
                    (IpNet::V6(net), IpAddr::V6(address)) if net.contains(&address) => {
                        u128::from(address) - u128::from(net.network())
                    }
                    _ => return false,
                };
                (first..end).contains(&offset)
            })
    }
}

/// What one client holds: its tunnel address and the routed range it asked for, if any.
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

/// One client's routed range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The client object's uid.
    pub uid: String,
    pub subnet: IpNet,
}

/// Every routed range, by client name: the table the operator changes by compare-and-swap.
pub type Routes = BTreeMap<String, Route>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("the tunnel-address pool is exhausted ({capacity} addresses, all in use)")]
    PoolExhausted { capacity: u128 },
    /// The message names what kind of range is in the way, never another client: a client
    /// reads it in its own status (see [`Occupant`]).
    #[error("subnet {subnet} overlaps {occupant}")]
    Overlap { subnet: IpNet, occupant: Occupant },
    #[error(
        "subnet {subnet} is an {family} range, but this cluster's tunnel pool has no {family} addresses; route an {pool_family} range"
    )]
    WrongFamily {
        subnet: IpNet,
        family: &'static str,
        pool_family: &'static str,
    },
    #[error("subnet {subnet} is not a network address (did you mean {}?)", subnet.trunc())]
    NotNetworkAddress { subnet: IpNet },
    #[error(
        "subnet {subnet} is wider than /{widest}, the widest range a client may route; route narrower subnets"
    )]
    TooWide { subnet: IpNet, widest: u8 },
}

pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Why `subnet` may not be routed to `client`, if it may not. Tunnel addresses all lie in
/// the pool, so checking the pool covers every client's tunnel address.
pub fn check_routed(
    pool: &Pool,
    routes: &Routes,
    client: &str,
    subnet: IpNet,
) -> Result<(), IpamError> {
    if subnet.trunc() != subnet {
        return Err(IpamError::NotNetworkAddress { subnet });
    }
    let widest = crate::route_shards::widest_routable(&subnet);
    if subnet.prefix_len() < widest {
        return Err(IpamError::TooWide { subnet, widest });
    }
    if !pool.tunnel.iter().any(|net| family(net) == family(&subnet)) {
        let pool_family = pool.tunnel.first().map_or("IPv4", family);
        return Err(IpamError::WrongFamily {
            subnet,
            family: family(&subnet),
            pool_family,
        });
    }
    let conflict = |occupant: Occupant| Err(IpamError::Overlap { subnet, occupant });
    let server = IpNet::from(SERVER_ADDRESS);
    if overlaps(&subnet, &server) {
        return conflict(Occupant::Server);
    }
    if let Some(tunnel) = pool.tunnel.iter().find(|net| overlaps(&subnet, net)) {
        return conflict(Occupant::TunnelPool(*tunnel));
    }
    if let Some(reserved) = pool.reserved.iter().find(|net| overlaps(&subnet, net)) {
        return conflict(Occupant::Reserved(*reserved));
    }
    match routes
        .iter()
        .find(|(other, route)| *other != client && overlaps(&subnet, &route.subnet))
    {
        Some((other, route)) => conflict(Occupant::Client {
            name: other.clone(),
            subnet: route.subnet,
        }),
        None => Ok(()),
    }
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    }
}

/// What holds a range a client asked for. Its message says what *kind* of range that is:
/// the client reads it in its own status, and must not learn another client's name or
/// route from it ([`Occupant::other_client`] gives those to the admin: log, Event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Occupant {
    /// The server's tunnel address.
    Server,
    /// The tunnel-address pool.
    TunnelPool(IpNet),
    /// A range the admin reserved (the cluster's own addresses).
    Reserved(IpNet),
    /// Another client's exclusive range.
    Client { name: String, subnet: IpNet },
}

impl Occupant {
    /// The other client and its range, for the admin; `None` for anything else.
    pub fn other_client(&self) -> Option<(&str, IpNet)> {
        match self {
            Self::Client { name, subnet } => Some((name, *subnet)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Occupant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Server => write!(f, "the server's tunnel address {SERVER_ADDRESS}"),
            Self::TunnelPool(pool) => write!(f, "the tunnel pool {pool}"),
            Self::Reserved(range) => write!(f, "the reserved range {range} (the cluster's own)"),
            Self::Client { .. } => write!(f, "another client's range"),
        }
    }
}

/// Records `client`'s routed range (`None`: it routes nothing). Idempotent; a rejected
/// request changes nothing.
pub fn route(
    pool: &Pool,
    routes: &mut Routes,
    client: &str,
    uid: &str,
    subnet: Option<IpNet>,
) -> Result<(), IpamError> {
    match subnet {
        Some(subnet) => {
            check_routed(pool, routes, client, subnet)?;
            routes.insert(
                client.to_string(),
                Route {
                    uid: uid.to_string(),
                    subnet,
                },
            );
        }
        None => {
            routes.remove(client);
        }
    }
    Ok(())
}

/// A free client address of the pool, searching from the `start`-th one onwards (wrapping),
/// so that concurrent claimers spread out: never the network or broadcast address, never
/// the server's, never one `is_taken` says is taken. `in_use` is at least the number of
/// taken addresses (an over-estimate only makes an exhausted pool take longer to tell).
/// Costs a lookup per taken address passed over, not a scan of every address in use.
pub fn free_tunnel_address(
    pool: &Pool,
    in_use: usize,
    is_taken: impl Fn(IpAddr) -> bool,
    start: u128,
) -> Result<IpAddr, IpamError> {
    let spans: Vec<(IpNet, u128, u128)> = pool
        .tunnel
        .iter()
        .map(|net| {
            let (first, end) = host_offsets(net);
            (*net, first, end.saturating_sub(first))
        })
        .collect();
    let total = spans
        .iter()
        .fold(0u128, |sum, (_, _, len)| sum.saturating_add(*len));
    // The pool's ranges do not overlap (`validate`), so among any in_use + 2 consecutive
    // candidates at most in_use are taken and one is the server's: one is free, if any is.
    let bound = (in_use as u128).saturating_add(2).min(total);
    let mut index = start % total.max(1);
    for _ in 0..bound {
        let mut rest = index;
        for (net, first, len) in &spans {
            if rest < *len {
                let address = at_offset(net, first + rest);
                if address != SERVER_ADDRESS && !is_taken(address) {
                    return Ok(address);
                }
                break;
            }
            rest -= len;
        }
        index = (index + 1) % total;
    }
    Err(IpamError::PoolExhausted {
        capacity: pool.capacity(),
    })
}

/// Removes routes whose client no longer exists (by uid); the names removed. Only routes
/// in `seen` (read before `live_uids` was listed) that are unchanged since are candidates:
/// a route recorded after the list belongs to a client the list may not show yet.
pub fn sweep(routes: &mut Routes, seen: &Routes, live_uids: &BTreeSet<String>) -> Vec<String> {
    let stale: Vec<String> = seen
        .iter()
        .filter(|(name, route)| {
            !live_uids.contains(&route.uid) && routes.get(name.as_str()) == Some(*route)
        })
        .map(|(name, _)| name.clone())
        .collect();
    for name in &stale {
        routes.remove(name);
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Claims addresses one by one as the operator does, each from a different start.
    fn claim_all(pool: &Pool, starts: impl Iterator<Item = u128>) -> BTreeSet<IpAddr> {
        let mut taken = BTreeSet::new();
        for start in starts {
            match free_tunnel_address(pool, taken.len(), |a| taken.contains(&a), start) {
                Ok(address) => assert!(taken.insert(address), "{address} given twice"),
                Err(IpamError::PoolExhausted { .. }) => break,
                Err(other) => panic!("{other}"),
            }
        }
        taken
    }

    #[test]
    fn the_default_pool_holds_4000_peers_and_never_gives_out_edges_or_the_server() {
        let pool = Pool::default();
        assert_eq!(pool.capacity(), 4093);
        let taken = claim_all(&pool, (0..5000u128).map(|i| i * 7919));
        assert_eq!(taken.len(), 4093);
        assert!(!taken.contains(&SERVER_ADDRESS));
        assert!(!taken.contains(&ip("192.168.96.0")));
        assert!(!taken.contains(&ip("192.168.111.255")));
        assert!(taken.iter().all(|address| pool.gives_out(*address)));
        assert_eq!(
            free_tunnel_address(&pool, taken.len(), |a| taken.contains(&a), 0),
            Err(IpamError::PoolExhausted { capacity: 4093 })
        );
        let mut taken = taken;
        taken.remove(&ip("192.168.96.8"));
        assert_eq!(
            free_tunnel_address(&pool, taken.len(), |a| taken.contains(&a), 12345),
            Ok(ip("192.168.96.8"))
        );
    }

    #[test]
    fn pools_that_cannot_work_are_refused() {
        let pool = |tunnel: &[&str], reserved: &[&str]| Pool {
            tunnel: tunnel.iter().map(|t| net(t)).collect(),
            reserved: reserved.iter().map(|r| net(r)).collect(),
        };
        assert_eq!(Pool::default().validate(), Ok(()));
        assert_eq!(
            pool(&["10.0.0.0/16", "10.0.8.0/24"], &[]).validate(),
            Err("tunnel pool ranges 10.0.0.0/16 and 10.0.8.0/24 overlap".into())
        );
        assert!(pool(&["10.0.0.0/16"], &["10.0.0.0/8"]).validate().is_err());
        assert!(pool(&["10.0.0.1/32"], &[]).validate().is_err());
        assert_eq!(
            pool(&["fd00::/120", "192.168.96.0/20"], &[]).validate(),
            Ok(())
        );
    }

    #[test]
    fn the_search_starts_where_asked_and_wraps() {
        let pool = Pool {
            tunnel: vec![net("10.0.0.0/29")],
            reserved: vec![],
        };
        assert_eq!(pool.capacity(), 6);
        assert_eq!(
            free_tunnel_address(&pool, 0, |_| false, 0),
            Ok(ip("10.0.0.1"))
        );
        assert_eq!(
            free_tunnel_address(&pool, 0, |_| false, 5),
            Ok(ip("10.0.0.6"))
        );
        assert_eq!(
            free_tunnel_address(&pool, 0, |_| false, 6),
            Ok(ip("10.0.0.1"))
        );
        let taken = BTreeSet::from([ip("10.0.0.6"), ip("10.0.0.1")]);
        assert_eq!(
            free_tunnel_address(&pool, taken.len(), |a| taken.contains(&a), 5),
            Ok(ip("10.0.0.2"))
        );
        // Addresses outside the pool (an older pool's) do not count as in use.
        let taken = BTreeSet::from([ip("10.9.0.1")]);
        assert_eq!(
            free_tunnel_address(&pool, taken.len(), |a| taken.contains(&a), 0),
            Ok(ip("10.0.0.1"))
        );
    }

    #[test]
    fn ipv6_pools_give_out_every_address_but_the_first() {
        let pool = Pool {
            tunnel: vec![net("fd00:99::/126")],
            reserved: vec![],
        };
        assert_eq!(pool.capacity(), 3);
        let taken = claim_all(&pool, 0..10);
        assert_eq!(
            taken,
            BTreeSet::from([ip("fd00:99::1"), ip("fd00:99::2"), ip("fd00:99::3")])
        );
        let big = Pool {
            tunnel: vec![net("fd00:99::/64"), net("192.168.96.0/20")],
            reserved: vec![],
        };
        assert_eq!(big.capacity(), (1u128 << 64) - 1 + 4093);
        let address = free_tunnel_address(&big, 0, |_| false, u128::MAX).unwrap();
        assert!(big.gives_out(address));
    }

    #[test]
    fn conflicts_name_the_kind_of_range_they_overlap_and_never_another_client() {
        let pool = Pool {
            tunnel: vec![net("192.168.96.0/20")],
            reserved: vec![net("10.96.0.0/12")],
        };
        let mut routes = Routes::new();
        route(&pool, &mut routes, "a", "ua", Some(net("172.20.0.0/16"))).unwrap();
        let error = route(&pool, &mut routes, "b", "ub", Some(net("172.20.4.0/24"))).unwrap_err();
        assert_eq!(
            error.to_string(),
            "subnet 172.20.4.0/24 overlaps another client's range"
        );
        // The admin still learns whose (the operator logs it and tells the other client).
        let IpamError::Overlap { occupant, .. } = &error else {
            panic!("{error:?}")
        };
        assert_eq!(occupant.other_client(), Some(("a", net("172.20.0.0/16"))));
        let error = check_routed(&pool, &routes, "b", net("10.100.0.0/16")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "subnet 10.100.0.0/16 overlaps the reserved range 10.96.0.0/12 (the cluster's own)"
        );
        assert_eq!(
            check_routed(&pool, &routes, "b", net("fd00:20::/64"))
                .unwrap_err()
                .to_string(),
            "subnet fd00:20::/64 is an IPv6 range, but this cluster's tunnel pool has no IPv6 addresses; route an IPv4 range"
        );
        let error = check_routed(&pool, &routes, "b", net("192.168.100.0/24")).unwrap_err();
        assert!(error.to_string().contains("tunnel pool"), "{error}");
        let error = check_routed(&pool, &routes, "b", net("192.168.99.0/30")).unwrap_err();
        assert!(error.to_string().contains("192.168.99.1"), "{error}");
        let error = check_routed(&pool, &routes, "b", net("172.21.0.1/16")).unwrap_err();
        assert!(
            error.to_string().contains("did you mean 172.21.0.0/16"),
            "{error}"
        );
        // The client itself may keep or change its own range, or drop it.
        route(&pool, &mut routes, "a", "ua", Some(net("172.20.0.0/24"))).unwrap();
        assert!(
            !routes.contains_key("b"),
            "a rejected client changes nothing"
        );
        route(&pool, &mut routes, "a", "ua", None).unwrap();
        assert!(routes.is_empty());
    }

    #[test]
    fn stale_routes_are_swept() {
        let pool = Pool::default();
        let mut routes = Routes::new();
        route(&pool, &mut routes, "a", "u1", Some(net("10.1.0.0/16"))).unwrap();
        route(&pool, &mut routes, "b", "u2", Some(net("10.2.0.0/16"))).unwrap();
        let seen = routes.clone();
        // A route recorded (or changed) after the list of clients is never swept.
        route(&pool, &mut routes, "c", "u3", Some(net("10.3.0.0/16"))).unwrap();
        let swept = sweep(&mut routes, &seen, &BTreeSet::from(["u2".to_string()]));
        assert_eq!(swept, ["a"]);
        assert_eq!(routes.keys().collect::<Vec<_>>(), ["b", "c"]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Connect {
            client: u8,
            routed: Option<(u8, u8)>,
            start: u16,
        },
        Disconnect {
            client: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                0u8..24,
                proptest::option::of((0u8..16, 20u8..=28)),
                any::<u16>()
            )
                .prop_map(|(client, routed, start)| Op::Connect {
                    client,
                    routed,
                    start
                }),
            (0u8..24).prop_map(|client| Op::Disconnect { client }),
        ]
    }

    proptest! {
        /// Connect and disconnect as the operator does: the route first (compare-and-swap),
        /// then a tunnel address claim; disconnect releases both.
        #[test]
        fn random_sequences_never_yield_overlapping_live_ranges(ops in proptest::collection::vec(op(), 1..200)) {
            // A small pool (10.99.0.0/29: 6 addresses) so exhaustion and reuse happen.
            let pool = Pool { tunnel: vec![net("10.99.0.0/29")], reserved: vec![net("172.16.12.0/22")] };
            let mut routes = Routes::new();
            let mut tunnels: BTreeMap<String, IpAddr> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Connect { client, routed, start } => {
                        let routed = routed.map(|(third, prefix)| IpNet::new(
                            IpAddr::V4(Ipv4Addr::new(172, 16, third, 0)), prefix).unwrap().trunc());
                        let before = routes.clone();
                        let name = format!("c{client}");
                        match route(&pool, &mut routes, &name, "uid", routed) {
                            Ok(()) => prop_assert_eq!(routes.get(&name).map(|r| r.subnet), routed),
                            Err(IpamError::Overlap { .. } | IpamError::NotNetworkAddress { .. } | IpamError::TooWide { .. } | IpamError::WrongFamily { .. }) => {
                                prop_assert_eq!(&routes, &before, "a rejected request changes nothing");
                                continue;
                            }
                            Err(error @ IpamError::PoolExhausted { .. }) => prop_assert!(false, "{error}"),
                        }
                        if tunnels.contains_key(&name) {
                            continue;
                        }
                        let taken: BTreeSet<IpAddr> = tunnels.values().copied().collect();
                        match free_tunnel_address(&pool, taken.len(), |a| taken.contains(&a), u128::from(start)) {
                            Ok(address) => {
                                prop_assert!(pool.gives_out(address));
                                tunnels.insert(name, address);
                            }
                            Err(IpamError::PoolExhausted { .. }) => prop_assert_eq!(tunnels.len(), 6),
                            Err(error) => prop_assert!(false, "{error}"),
                        }
                    }
                    Op::Disconnect { client } => {
                        let name = format!("c{client}");
                        route(&pool, &mut routes, &name, "uid", None).unwrap();
                        tunnels.remove(&name);
                        // What was released is allocatable again.
                        if tunnels.len() < 6 {
                            let taken: BTreeSet<IpAddr> = tunnels.values().copied().collect();
                            prop_assert!(free_tunnel_address(&pool, taken.len(), |a| taken.contains(&a), 0).is_ok());
                        }
                    }
                }
                let live: Vec<(String, IpNet)> = tunnels.iter()
                    .map(|(name, address)| (name.clone(), IpNet::from(*address)))
                    .chain(routes.iter().map(|(name, route)| (name.clone(), route.subnet)))
                    .collect();
                for (i, (owner_a, a)) in live.iter().enumerate() {
                    prop_assert!(a.addr() != SERVER_ADDRESS);
                    for (owner_b, b) in &live[i + 1..] {
                        prop_assert!(!overlaps(a, b), "{owner_a} {a} overlaps {owner_b} {b}");
                    }
                }
            }
        }
    }
}
