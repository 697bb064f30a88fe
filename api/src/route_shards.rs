//! The routes table in shards: one ConfigMap per /16 of IPv4 space (per /32 of IPv6 space),
//! each holding the routes that cover any of its addresses, in the layout of
//! [`ipam::decode_routes`].
//!
//! Two routes that overlap share a shard: one contains the other, so every shard of the
//! smaller is a shard of the larger. Every shard is changed by compare-and-swap only, so the
//! API server still decides exclusivity — across replicas and crashes — as it did for one
//! table, while a connect reads and writes only the shards its own route covers, and no
//! ConfigMap has to hold every route (one is capped at 1 MiB, about 10,000 routes).

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::ipam::{self, IpamError, Route, Routes};

/// The label every shard carries (value `"true"`): the shards are listed and watched by it.
pub const SHARD_LABEL: &str = "gefyra.dev/routes-shard";
pub const SHARD_SELECTOR: &str = "gefyra.dev/routes-shard=true";

/// The one table of earlier versions, moved into shards when the operator starts.
pub const LEGACY_TABLE: &str = "gefyra-routes";

/// How much address space one shard covers.
fn shard_prefix(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => 16,
        IpNet::V6(_) => 32,
    }
}

/// A route may cover at most 2^2 = 4 shards: IPv4 routes of /14 and narrower, IPv6 routes
/// of /30 and narrower. A client's routed range is its local network (Docker's are /16 to
/// /24), and every shard a route covers is a ConfigMap that each change of it reads and
/// writes, and that the operator and Stowaway cache: a /8 was 256 of them.
const MAX_FAN_OUT_BITS: u8 = 2;

/// The most shards one route is recorded in.
pub const MAX_SHARDS_PER_ROUTE: usize = 1 << MAX_FAN_OUT_BITS;

/// The widest prefix a client may route in `net`'s address family.
pub fn widest_routable(net: &IpNet) -> u8 {
    shard_prefix(net) - MAX_FAN_OUT_BITS
}

/// The name of the shard whose address space starts at `net`'s network address.
fn shard_name(net: &IpNet) -> String {
    match net {
        IpNet::V4(net) => {
            let [a, b, _, _] = net.network().octets();
            format!("gefyra-routes-v4-{a}-{b}")
        }
        IpNet::V6(net) => {
            let segments = net.network().segments();
            format!("gefyra-routes-v6-{:04x}-{:04x}", segments[0], segments[1])
        }
    }
}

/// The shards `subnet` is recorded in, in ascending order (the order they are written in).
pub fn shards_of(subnet: &IpNet) -> Result<Vec<String>, IpamError> {
    let shard = shard_prefix(subnet);
    let prefix = subnet.prefix_len();
    if prefix >= shard {
        let covering = IpNet::new(subnet.network(), shard)
            .expect("a shard prefix is valid for its family")
            .trunc();
        return Ok(vec![shard_name(&covering)]);
    }
    if shard - prefix > MAX_FAN_OUT_BITS {
        return Err(IpamError::TooWide {
            subnet: *subnet,
            widest: widest_routable(subnet),
        });
    }
    Ok(subnet
        .trunc()
        .subnets(shard)
        .expect("a shard prefix is longer than the route's")
        .map(|net| shard_name(&net))
        .collect())
}

/// The entry of `client` in a shard's data, if it has a readable one: found without decoding
/// the other entries.
pub fn entry_in(data: &BTreeMap<String, String>, client: &str) -> Option<Route> {
    serde_json::from_str(data.get(client)?).ok()
}

/// Every route of `shards` (their data), each client once: a client recorded in several
/// shards (a route wider than one) has the same route in each, but for a change under way.
/// Then the first shard in `shards`' order shows it.
pub fn merge<'a>(shards: impl IntoIterator<Item = &'a BTreeMap<String, String>>) -> Routes {
    let mut merged = Routes::new();
    for data in shards {
        for (client, route) in ipam::decode_routes(data).0 {
            merged.entry(client).or_insert(route);
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn a_narrow_route_has_one_shard_and_a_wide_one_each_it_covers() {
        assert_eq!(
            shards_of(&net("172.20.5.0/24")).unwrap(),
            ["gefyra-routes-v4-172-20"]
        );
        assert_eq!(
            shards_of(&net("172.18.0.0/15")).unwrap(),
            ["gefyra-routes-v4-172-18", "gefyra-routes-v4-172-19"]
        );
        assert_eq!(shards_of(&net("10.0.0.0/14")).unwrap().len(), 4);
        assert_eq!(
            shards_of(&net("fd00:99::/64")).unwrap(),
            ["gefyra-routes-v6-fd00-0099"]
        );
        assert_eq!(shards_of(&net("fd00::/30")).unwrap().len(), 4);
    }

    #[test]
    fn a_route_wider_than_four_shards_is_refused_by_name() {
        for (too_wide, widest) in [
            ("0.0.0.0/0", 14),
            ("10.0.0.0/8", 14),
            ("172.16.0.0/13", 14),
            ("fd00::/16", 30),
            ("fd00::/29", 30),
        ] {
            let error = shards_of(&net(too_wide)).unwrap_err();
            assert_eq!(
                error,
                IpamError::TooWide {
                    subnet: net(too_wide),
                    widest
                }
            );
            assert!(error.to_string().contains(&format!("/{widest}")), "{error}");
        }
    }

    #[test]
    fn merged_shards_show_each_client_once_and_keep_unreadable_entries_out() {
        let entry = |uid: &str, subnet: &str| {
            serde_json::to_string(&Route {
                uid: uid.into(),
                subnet: net(subnet),
            })
            .unwrap()
        };
        let first = BTreeMap::from([
            ("a".to_string(), entry("ua", "172.18.0.0/15")),
            ("junk".to_string(), "{".to_string()),
        ]);
        let second = BTreeMap::from([
            ("a".to_string(), entry("ua", "172.18.0.0/15")),
            ("b".to_string(), entry("ub", "172.19.1.0/24")),
        ]);
        let merged = merge([&first, &second]);
        assert_eq!(merged.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(entry_in(&second, "b").unwrap().uid, "ub");
        assert_eq!(entry_in(&first, "junk"), None);
    }

    proptest! {
        /// The property exclusivity rests on: overlapping routes share a shard.
        #[test]
        fn overlapping_routes_share_a_shard(
            a in any::<u32>(), a_len in 14u8..=32, b in any::<u32>(), b_len in 14u8..=32,
        ) {
            let a = IpNet::new(std::net::Ipv4Addr::from(a).into(), a_len).unwrap().trunc();
            let b = IpNet::new(std::net::Ipv4Addr::from(b).into(), b_len).unwrap().trunc();
            let (of_a, of_b) = (shards_of(&a).unwrap(), shards_of(&b).unwrap());
            if ipam::overlaps(&a, &b) {
                prop_assert!(of_a.iter().any(|shard| of_b.contains(shard)));
            }
        }

        #[test]
        fn any_subnet_has_shards_or_a_clear_refusal(address in any::<u128>(), len in 0u8..=128) {
            let subnet = IpNet::new(std::net::Ipv6Addr::from(address).into(), len).unwrap();
            match shards_of(&subnet) {
                Ok(shards) => prop_assert!(!shards.is_empty() && shards.len() <= MAX_SHARDS_PER_ROUTE),
                Err(error) => prop_assert!(matches!(error, IpamError::TooWide { .. }), "{}", error),
            }
        }
    }
}
