//! `make bench`, through the API: the routes-table step of a connect and of a disconnect —
//! recording and removing a client's routed subnet as the operator does
//! (`RouteTables::set_route` / `remove_route`, compare-and-swap on the shards) — with
//! 10,000 routes already recorded, against the same steps with none, on the same control
//! plane in the same run.
//!
//! Two layouts of the 10,000 routes, each at every other slot so that the measured clients
//! take the slots between them, in the same shards: /24s of 10.0.0.0/8 (Docker-network
//! sized, 128 in each /16 shard) and, the worst case, /28s of 172.16.0.0/12 (2,048 in each).
//!
//! Environment: GEFYRA_KUBECONFIG (the control plane), GEFYRA_BENCH_ROUTES (default 10000).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use gefyra_api::ipam::{Pool, Route, Routes};
use gefyra_api::route_shards::{self, SHARD_LABEL};
use gefyra_e2e::Cluster;
use gefyra_operator::routes::{RouteTables, encode_shard};
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

/// Clients recording their route at the same time (as many as bench-clients connects).
const CONCURRENTLY: usize = 10;
/// Routes recorded and removed per measurement.
const MEASURED: usize = 300;

/// Where the routes of a layout lie: /`prefix`s from `base`.
#[derive(Clone, Copy)]
struct Layout {
    base: std::net::Ipv4Addr,
    prefix: u8,
}

const LAYOUTS: [Layout; 2] = [
    Layout {
        base: std::net::Ipv4Addr::new(10, 0, 0, 0),
        prefix: 24,
    },
    Layout {
        base: std::net::Ipv4Addr::new(172, 16, 0, 0),
        prefix: 28,
    },
];

impl Layout {
    /// The `2i`-th subnet of the layout (`odd`: the one after it).
    fn routed_of(self, i: usize, odd: bool) -> IpNet {
        let size = 1u32 << (32 - self.prefix);
        let slot = 2 * i as u32 + u32::from(odd);
        let network = std::net::Ipv4Addr::from(u32::from(self.base) + slot * size);
        IpNet::V4(Ipv4Net::new(network, self.prefix).expect("a valid prefix"))
    }
}

fn uid_of(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

/// Writes `routes` recorded routes into the shards of `namespace`, as the operator would
/// have written them one by one.
async fn preload(
    cluster: &Cluster,
    namespace: &str,
    routes: usize,
    layout: Layout,
) -> Result<(usize, usize)> {
    let mut shards: BTreeMap<String, Routes> = BTreeMap::new();
    for i in 0..routes {
        let route = Route {
            uid: uid_of(i),
            subnet: layout.routed_of(i, false),
        };
        for shard in route_shards::shards_of(&route.subnet)? {
            shards
                .entry(shard)
                .or_default()
                .insert(format!("live-{i:05}"), route.clone());
        }
    }
    let api: Api<ConfigMap> = Api::namespaced(cluster.admin()?, namespace);
    let mut largest = 0;
    let most = shards.values().map(Routes::len).max().unwrap_or_default();
    for (shard, routes) in &shards {
        let data = encode_shard(routes, &BTreeMap::new());
        largest = largest.max(data.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>());
        let object = ConfigMap {
            metadata: ObjectMeta {
                name: Some(shard.clone()),
                labels: Some(BTreeMap::from([(
                    SHARD_LABEL.to_string(),
                    "true".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        };
        api.create(&PostParams::default(), &object)
            .await
            .with_context(|| format!("writing shard {shard}"))?;
    }
    Ok((largest, most))
}

struct Latencies(Vec<Duration>);

impl Latencies {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.0.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted.get(index).copied().unwrap_or_default()
    }
}

/// Records, then removes, a route for `MEASURED` new clients, `CONCURRENTLY` at a time.
async fn measure(
    cluster: &Cluster,
    namespace: &str,
    layout: Layout,
) -> Result<(Latencies, Latencies)> {
    let tables = Arc::new(RouteTables::new(cluster.admin()?, namespace));
    let pool = Arc::new(Pool::default());
    let timed = |remove: bool| {
        let (tables, pool) = (tables.clone(), pool.clone());
        futures::stream::iter(0..MEASURED)
            .map(move |i| {
                let (tables, pool) = (tables.clone(), pool.clone());
                async move {
                    let name = format!("new-{i:05}");
                    let start = Instant::now();
                    if remove {
                        tables.remove_route(&name).await?;
                    } else {
                        tables
                            .set_route(
                                &pool,
                                &name,
                                &uid_of(100_000 + i),
                                layout.routed_of(i, true),
                            )
                            .await??;
                    }
                    anyhow::Ok(start.elapsed())
                }
            })
            .buffer_unordered(CONCURRENTLY)
            .try_collect::<Vec<_>>()
    };
    let record = Latencies(timed(false).await?);
    let remove = Latencies(timed(true).await?);
    Ok((record, remove))
}

#[tokio::main]
async fn main() -> Result<()> {
    let routes: usize = std::env::var("GEFYRA_BENCH_ROUTES")
        .ok()
        .map(|value| value.parse())
        .transpose()
        .context("GEFYRA_BENCH_ROUTES must be a number")?
        .unwrap_or(10_000);
    let cluster = Cluster::from_env().await?;
    for layout in LAYOUTS {
        let empty = cluster.namespace("bench-routes-none").await?;
        let full = cluster.namespace("bench-routes-full").await?;
        let (largest, most) = preload(&cluster, &full, routes, layout).await?;
        let (record_none, remove_none) = measure(&cluster, &empty, layout).await?;
        let (record_full, remove_full) = measure(&cluster, &full, layout).await?;
        println!(
            "== Routes table through the API: {MEASURED} clients routing /{}s, {CONCURRENTLY} at a time, with {routes} routes recorded vs none (the measured shards hold {most} routes, {:.0} KiB)",
            layout.prefix,
            largest as f64 / 1024.0
        );
        for (what, none, full) in [
            ("record (connect)", &record_none, &record_full),
            ("remove (disconnect)", &remove_none, &remove_full),
        ] {
            let ms = |latency: Duration| latency.as_secs_f64() * 1000.0;
            println!(
                "{what:<20} none p50 {:>6.1} ms p99 {:>6.1} ms   {routes} routes p50 {:>6.1} ms p99 {:>6.1} ms   ratio p50 {:.2}x (aim <= 2)",
                ms(none.percentile(0.5)),
                ms(none.percentile(0.99)),
                ms(full.percentile(0.5)),
                ms(full.percentile(0.99)),
                full.percentile(0.5).as_secs_f64() / none.percentile(0.5).as_secs_f64().max(1e-9),
            );
        }
    }
    Ok(())
}
