//! `make bench`, in process: how many allocations per second the IP-range logic makes with
//! 10,000 live ranges, against the same work with nothing allocated, in the same run.
//!
//! Two steps, each what the operator does in process for one connect (the API round trips
//! are measured by `bench-clients`):
//! - tunnel claim: the claimed addresses from the watch cache of claims, then a free one;
//! - route: decode the routes table's shard the route goes to, check the overlap and record
//!   the route, encode it.
//!
//! Environment: GEFYRA_BENCH_LIVE_RANGES (default 10000).

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use gefyra_api::GefyraClient;
use gefyra_api::ipam::{self, Pool, Routes};
use gefyra_api::route_shards;
use gefyra_operator::allocator::{claim, free_address_in};
use gefyra_operator::routes::{decode_shard, encode_shard};
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use serde_json::json;

/// Long enough for stable figures, short enough for `make bench`.
const RUN_FOR: Duration = Duration::from_secs(2);

/// 65,533 tunnel addresses: room for 10,000 live clients and more.
fn pool() -> Pool {
    Pool {
        tunnel: vec!["10.64.0.0/16".parse().expect("a valid CIDR")],
        reserved: vec!["10.96.0.0/12".parse().expect("a valid CIDR")],
    }
}

/// A client as Gefyra names them (32 hex digits) with a UUID.
fn client_of(i: usize) -> Result<GefyraClient> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
        "metadata": {
            "name": format!("{i:032x}"), "namespace": "gefyra",
            "uid": format!("00000000-0000-4000-8000-{i:012x}")
        },
        "provider": "stowaway"
    }))?)
}

/// The `2i`-th /28 of 172.16.0.0/12 (`odd`: the one after it): distinct for every `i` below
/// 32,768, dense — 2,048 in each /16 shard, with room for as many more beside them.
fn routed_of(i: usize, odd: bool) -> IpNet {
    let base = u32::from(std::net::Ipv4Addr::new(172, 16, 0, 0));
    let network = std::net::Ipv4Addr::from(base + (2 * i as u32 + u32::from(odd)) * 16);
    IpNet::V4(Ipv4Net::new(network, 28).expect("prefix 28 is valid"))
}

/// `live` clients connected (claims in a watch cache as the operator keeps them), each
/// routing a subnet of its own.
fn connected(live: usize) -> Result<(Store<Lease>, Routes)> {
    let pool = pool();
    let (store, mut writer) = reflector::store();
    let mut routes = Routes::new();
    writer.apply_watcher_event(&watcher::Event::Init);
    let mut taken = std::collections::BTreeSet::new();
    for i in 0..live {
        let client = client_of(i)?;
        // Spread over the pool as the operator's random starts spread them.
        let start = (i as u128).wrapping_mul(0x2545_f491_4f6c_dd1d);
        let address = ipam::free_tunnel_address(&pool, taken.len(), |a| taken.contains(&a), start)?;
        taken.insert(address);
        writer.apply_watcher_event(&watcher::Event::InitApply(claim(&client, address)));
        let uid = format!("00000000-0000-4000-8000-{i:012x}");
        ipam::route(
            &pool,
            &mut routes,
            &format!("{i:032x}"),
            &uid,
            Some(routed_of(i, false)),
        )
        .with_context(|| format!("filling the routes: client {i}"))?;
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    Ok((store, routes))
}

/// Runs `step` for `RUN_FOR`; steps per second.
fn rate(mut step: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    let mut steps = 0;
    while start.elapsed() < RUN_FOR {
        step(steps)?;
        steps += 1;
    }
    Ok(steps as f64 / start.elapsed().as_secs_f64())
}

struct Figures {
    claim: f64,
    route: f64,
    claims: usize,
    /// The largest shard: its routes and bytes.
    shard_routes: usize,
    shard_bytes: usize,
}

fn measure(live: usize) -> Result<Figures> {
    let pool = pool();
    let (claims, routes) = connected(live)?;
    let claim = rate(|step| {
        let start = (step as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        black_box(free_address_in(
            &claims,
            "gefyra",
            &pool,
            &Default::default(),
            start,
        )?);
        Ok(())
    })?;
    // The shards as stored: each route in the shard of its /16.
    let mut shards: std::collections::BTreeMap<String, Routes> = Default::default();
    for (name, route) in routes {
        for shard in route_shards::shards_of(&route.subnet)? {
            shards
                .entry(shard)
                .or_default()
                .insert(name.clone(), route.clone());
        }
    }
    let stored: std::collections::BTreeMap<String, _> = shards
        .iter()
        .map(|(shard, routes)| (shard.clone(), encode_shard(routes, &Default::default())))
        .collect();
    let bytes = |data: &std::collections::BTreeMap<String, String>| -> usize {
        data.iter()
            .map(|(key, value)| key.len() + value.len())
            .sum()
    };
    let (shard_routes, shard_bytes) = stored
        .values()
        .map(|data| (data.len(), bytes(data)))
        .max()
        .unwrap_or_default();
    let no_shard = Default::default();
    let route = rate(|step| {
        // New clients route the gaps beside the live ones, in the shards they fill.
        let i = step % live.max(1);
        let subnet = routed_of(i, true);
        let [shard] = <[String; 1]>::try_from(route_shards::shards_of(&subnet)?)
            .map_err(|_| anyhow::anyhow!("a /28 is in one shard"))?;
        let data = stored.get(&shard).unwrap_or(&no_shard);
        let (mut decoded, unreadable) = decode_shard(&shard, data);
        let i = 60_000 + i;
        let uid = format!("00000000-0000-4000-8000-{i:012x}");
        ipam::route(
            &pool,
            &mut decoded,
            &format!("{i:032x}"),
            &uid,
            Some(subnet),
        )?;
        black_box(encode_shard(&decoded, &unreadable));
        Ok(())
    })?;
    Ok(Figures {
        claim,
        route,
        claims: claims.len(),
        shard_routes,
        shard_bytes,
    })
}

fn main() -> Result<()> {
    let live: usize = std::env::var("GEFYRA_BENCH_LIVE_RANGES")
        .ok()
        .map(|value| value.parse())
        .transpose()
        .context("GEFYRA_BENCH_LIVE_RANGES must be a number")?
        .unwrap_or(10_000);
    println!("== IP allocation in process (one core): {live} live clients vs none");
    let empty = measure(0)?;
    let full = measure(live)?;
    for (what, empty, full) in [
        ("tunnel claim", empty.claim, full.claim),
        ("route (CAS step)", empty.route, full.route),
    ] {
        println!(
            "{what:<17} none {empty:>10.0}/s   {live} live {full:>9.0}/s   ratio {:.3}",
            full / empty
        );
    }
    println!(
        "stored state      {} claims (one Lease each); {live} routes in /16 shards, the largest \
         {} routes in {:.0} KiB (a ConfigMap holds at most 1 MiB)",
        full.claims,
        full.shard_routes,
        full.shard_bytes as f64 / 1024.0,
    );
    Ok(())
}
