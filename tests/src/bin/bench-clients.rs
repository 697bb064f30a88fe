//! `make bench`, through the API: N GefyraClients created → all WAITING (32 at a time), then
//! all connected — `providerParameter` patched → ACTIVE (10 at a time) — through the
//! operator, against the floor: the same API writes done by a plain loop without the
//! operator, in the same run, on the same control plane, with the same concurrency.
//!
//! Environment: GEFYRA_KUBECONFIG (the control plane), GEFYRA_OPERATOR_BINARY (the operator
//! to measure, normally a release build), GEFYRA_BENCH_CLIENTS (default 1000),
//! GEFYRA_BENCH_FLOOR=0 (skip the floor: the operator's figures only).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use gefyra_api::ipam::{Allocation, Pool};
use gefyra_api::{ClientState, GefyraClient};
use gefyra_e2e::{Cluster, Operator, install_crd};
use gefyra_operator::{allocator, connection, credentials, lifecycle};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, ObjectReference, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::collections::BTreeSet;
use tokio::sync::Notify;

const CONCURRENCY: usize = 32;
/// The tunnel-address pool of the operator and the floor: 16,381 addresses (the default
/// /20 holds 4,093), so that N = 10,000 clients can all be ACTIVE.
const TUNNEL_POOL: &str = "192.168.64.0/18";
/// Clients connecting at the same time.
const CONNECTING: usize = 10;

fn new_client(name: &str, namespace: &str) -> Result<GefyraClient> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
        "metadata": {"name": name, "namespace": namespace}, "provider": "stowaway"
    }))?)
}

struct Run {
    wall: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[index]
    }

    fn print(&self, what: &str) {
        println!(
            "{what:<10} {:>6} clients  {:>7.2} s  {:>7.1} clients/s  p50 {:>6} ms  p99 {:>6} ms",
            self.latencies.len(),
            self.wall.as_secs_f64(),
            self.per_second(),
            self.percentile(0.50).as_millis(),
            self.percentile(0.99).as_millis()
        );
    }
}

async fn event(client: &Client, object: &GefyraClient, reason: &str) -> Result<()> {
    let namespace = object.namespace().unwrap_or_default();
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", object.name_any())),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("gefyra.dev/v1".into()),
            kind: Some("gefyraclient".into()),
            name: Some(object.name_any()),
            namespace: Some(namespace.clone()),
            uid: object.uid(),
            ..ObjectReference::default()
        },
        reason: Some(reason.into()),
        type_: Some("Normal".into()),
        ..Event::default()
    };
    Api::<Event>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &event)
        .await?;
    Ok(())
}

/// The `Ready=True` condition the operator writes into the status.
async fn ready(
    api: &Api<GefyraClient>,
    object: &GefyraClient,
    reason: &str,
    message: &str,
) -> Result<()> {
    let condition = lifecycle::ready_condition(
        None,
        true,
        reason,
        message,
        object.metadata.generation,
        Timestamp::now(),
    );
    api.patch_status(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": [condition]}})),
    )
    .await?;
    Ok(())
}

/// What the operator writes for one client, done in a straight line.
async fn floor_one(client: Client, namespace: String, name: String) -> Result<Duration> {
    let start = Instant::now();
    let api: Api<GefyraClient> = Api::namespaced(client.clone(), &namespace);
    let created = api
        .create(&PostParams::default(), &new_client(&name, &namespace)?)
        .await?;
    let merge = PatchParams::default();
    api.patch(
        &name,
        &merge,
        &Patch::Merge(json!({"metadata": {"finalizers": ["gefyra.dev/cleanup"]}})),
    )
    .await?;
    api.patch(
        &name,
        &merge,
        &Patch::Merge(lifecycle::enter(ClientState::Creating, Timestamp::now())),
    )
    .await?;
    event(&client, &created, "StateChanged").await?;
    let apply = PatchParams::apply("gefyra-bench-floor").force();
    let account = credentials::service_account(&created);
    let sa = account.name_any();
    Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .patch(&sa, &apply, &Patch::Apply(&account))
        .await?;
    Api::<Role>::namespaced(client.clone(), &namespace)
        .patch(
            &sa,
            &apply,
            &Patch::Apply(credentials::role(
                &created,
                credentials::ClientRbac::Minimal,
            )),
        )
        .await?;
    Api::<RoleBinding>::namespaced(client.clone(), &namespace)
        .patch(
            &sa,
            &apply,
            &Patch::Apply(credentials::role_binding(&created)),
        )
        .await?;
    // The token minter's three, as the operator applies them for every client.
    let minter = credentials::minter_service_account(&created).name_any();
    Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .patch(
            &minter,
            &apply,
            &Patch::Apply(credentials::minter_service_account(&created)),
        )
        .await?;
    Api::<Role>::namespaced(client.clone(), &namespace)
        .patch(
            &minter,
            &apply,
            &Patch::Apply(credentials::minter_role(&created)),
        )
        .await?;
    Api::<RoleBinding>::namespaced(client.clone(), &namespace)
        .patch(
            &minter,
            &apply,
            &Patch::Apply(credentials::minter_role_binding(&created)),
        )
        .await?;
    let token = {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(365 * 24 * 3600),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
            .create_token_request(&sa, &PostParams::default(), &request)
            .await?
            .status
            .and_then(|status| status.token)
            .context("no token")?
    };
    let ca = Api::<ConfigMap>::namespaced(client.clone(), &namespace)
        .get("kube-root-ca.crt")
        .await?
        .data
        .and_then(|mut data| data.remove("ca.crt"))
        .unwrap_or_default();
    let mut patch = lifecycle::enter(ClientState::Waiting, Timestamp::now());
    patch["serviceAccountName"] = json!(sa);
    patch["serviceAccountData"] = json!(credentials::service_account_data(&token, &ca, &namespace));
    api.patch(&name, &merge, &Patch::Merge(patch)).await?;
    event(&client, &created, "StateChanged").await?;
    ready(
        &api,
        &created,
        "CredentialsIssued",
        "the client's credentials are ready",
    )
    .await?;
    Ok(start.elapsed())
}

/// The writes of one connect — the client's patch, then what the operator writes — done in
/// a straight line. Tunnel addresses are handed out by a counter (no choosing).
async fn floor_connect_one(
    client: Client,
    namespace: String,
    name: String,
    address: std::net::IpAddr,
    server: Arc<connection::KeyPair>,
) -> Result<Duration> {
    let start = Instant::now();
    let api: Api<GefyraClient> = Api::namespaced(client.clone(), &namespace);
    let own = connection::generate_key_pair();
    let merge = PatchParams::default();
    let object = api
        .patch(
            &name,
            &merge,
            &Patch::Merge(json!({"providerParameter": {"publicKey": own.public}})),
        )
        .await?;
    api.patch(
        &name,
        &merge,
        &Patch::Merge(lifecycle::enter(ClientState::Enabling, Timestamp::now())),
    )
    .await?;
    event(&client, &object, "StateChanged").await?;
    let uid = object.uid().unwrap_or_default();
    // No subnet: no route to record (the operator sends nothing for it either).
    Api::<Lease>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &allocator::claim(&object, address))
        .await?;
    let allocation = Allocation {
        uid,
        tunnel: address.into(),
        routed: None,
    };
    let key = |text: &str| text.parse().map_err(anyhow::Error::msg);
    let config = connection::new_config(
        &allocation,
        key(&own.public)?,
        None,
        key(&server.public)?,
        &"gefyra-stowaway-wireguard.gefyra.svc:31820"
            .parse()
            .map_err(anyhow::Error::msg)?,
    );
    let mut patch = lifecycle::enter(ClientState::Active, Timestamp::now());
    patch["providerConfig"] = json!(config.to_map());
    api.patch(&name, &merge, &Patch::Merge(patch)).await?;
    event(&client, &object, "StateChanged").await?;
    ready(&api, &object, "Connected", "connected").await?;
    Ok(start.elapsed())
}

async fn floor_connect(cluster: &Cluster, namespace: &str, n: usize) -> Result<Run> {
    let client = cluster.admin()?;
    let server = Arc::new(connection::generate_key_pair());
    let pool = Pool {
        tunnel: vec![TUNNEL_POOL.parse()?],
        reserved: Vec::new(),
    };
    let mut taken = BTreeSet::new();
    let mut addresses = Vec::new();
    for _ in 0..n {
        let address =
            gefyra_api::ipam::free_tunnel_address(&pool, taken.len(), |a| taken.contains(&a), 0)?;
        taken.insert(address);
        addresses.push(address);
    }
    let start = Instant::now();
    let latencies = futures::stream::iter(addresses.into_iter().enumerate())
        .map(|(i, address)| {
            floor_connect_one(
                client.clone(),
                namespace.to_string(),
                format!("floor-{i:05}"),
                address,
                server.clone(),
            )
        })
        .buffer_unordered(CONNECTING)
        .try_collect()
        .await?;
    Ok(Run {
        wall: start.elapsed(),
        latencies,
    })
}

async fn floor(cluster: &Cluster, n: usize) -> Result<(Run, Run)> {
    let namespace = cluster.namespace("bench-floor").await?;
    let client = cluster.admin()?;
    let start = Instant::now();
    let latencies = futures::stream::iter(0..n)
        .map(|i| floor_one(client.clone(), namespace.clone(), format!("floor-{i:05}")))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let create = Run {
        wall: start.elapsed(),
        latencies,
    };
    let connect = floor_connect(cluster, &namespace, n).await?;
    Ok((create, connect))
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

struct OperatorRuns {
    create: Run,
    connect: Run,
    idle: Idle,
    restart: Restart,
    rss_mib: Option<f64>,
}

/// A new operator taking over the settled fleet (all ACTIVE): until each client has been
/// reconciled once, and what it sent by then and once quiet.
struct Restart {
    settle: Duration,
    operator_requests: BTreeMap<String, f64>,
}

impl Restart {
    fn writes(&self) -> f64 {
        self.operator_requests
            .iter()
            .filter(|(verb, _)| !matches!(verb.as_str(), "get" | "list" | "watch"))
            .map(|(_, count)| count)
            // Not sum(): an empty f64 sum is -0, printed as "-0".
            .fold(0.0, |total, count| total + count)
    }
}

/// Stops `operator` and starts another on the same clients: how long until it has
/// reconciled all `n` of them, and every request it sent until it went quiet.
async fn restart(
    cluster: &Cluster,
    namespace: &str,
    mut operator: Operator,
    n: usize,
) -> Result<Restart> {
    operator.kill().await?;
    let start = Instant::now();
    let operator = Operator::start(
        cluster,
        namespace,
        &["--log-format", "json", "--tunnel-pool", TUNNEL_POOL],
    )?;
    let reconciled = || async {
        gefyra_e2e::metric(
            operator.http_port,
            "gefyra_operator_reconciles_total{result=\"ok\"}",
        )
        .await
        .unwrap_or(0.0)
    };
    while reconciled().await < n as f64 {
        if start.elapsed() > Duration::from_secs(600) {
            bail!("the restarted operator did not reconcile {n} clients in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settle = start.elapsed();
    let mut quiet = operator_requests(&operator).await?;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = operator_requests(&operator).await?;
        if now == quiet {
            break;
        }
        quiet = now;
    }
    Ok(Restart {
        settle,
        operator_requests: quiet,
    })
}

/// One idle minute of the connected fleet: Stowaway's status writes (every client's peer
/// handshaking, `status.wireguard` written every 30 s) against what the operator sent.
struct Idle {
    status_writes: usize,
    /// By verb.
    operator_requests: BTreeMap<String, f64>,
}

/// Every request the operator sent to the API server, by verb, as it counts them.
async fn operator_requests(operator: &Operator) -> Result<BTreeMap<String, f64>> {
    let (_, metrics) = operator.http_get("/metrics").await?;
    Ok(gefyra_e2e::api_requests_by_verb(&metrics))
}

/// Writes `status.wireguard` of every client twice in one minute, spread evenly (as
/// Stowaway does for peers that keep handshaking), once the operator has settled; what the
/// operator sent meanwhile.
async fn idle_minute(
    operator: &Operator,
    api: &Api<GefyraClient>,
    names: &[String],
) -> Result<Idle> {
    let mut settled = operator_requests(operator).await?;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = operator_requests(operator).await?;
        if now == settled {
            break;
        }
        settled = now;
    }
    let start = Instant::now();
    let total = names.len() * 2;
    let pace = Duration::from_secs(60).div_f64(total.max(1) as f64);
    let writes = futures::stream::iter(0..total)
        .map(|i| {
            let api = api.clone();
            let name = names[i % names.len()].clone();
            async move {
                tokio::time::sleep_until((start + pace.mul_f64(i as f64)).into()).await;
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "status": { "wireguard": {
                        "latest_handshake": Timestamp::now().to_string(),
                        "transfer": { "received": i * 1000, "sent": i * 2000 },
                    } } })),
                )
                .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY);
    writes.try_collect::<Vec<()>>().await?;
    tokio::time::sleep_until((start + Duration::from_secs(60)).into()).await;
    let after = operator_requests(operator).await?;
    Ok(Idle {
        status_writes: total,
        operator_requests: after
            .into_iter()
            .map(|(verb, count)| {
                let before = settled.get(&verb).copied().unwrap_or(0.0);
                (verb, count - before)
            })
            .filter(|(_, count)| *count > 0.0)
            .collect(),
    })
}

async fn with_operator(cluster: &Cluster, n: usize) -> Result<OperatorRuns> {
    let namespace = cluster.namespace("bench-operator").await?;
    let operator = Operator::start(
        cluster,
        &namespace,
        &["--log-format", "json", "--tunnel-pool", TUNNEL_POOL],
    )?;
    let pid = operator.child.id().context("operator pid")?;
    let ready = Instant::now();
    while operator
        .http_get("/readyz")
        .await
        .map(|(code, _)| code)
        .ok()
        != Some(200)
    {
        if ready.elapsed() > Duration::from_secs(60) {
            bail!("the operator did not get ready:\n{}", operator.log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let client = cluster.admin()?;
    let api: Api<GefyraClient> = Api::namespaced(client.clone(), &namespace);
    // When each client was first seen WAITING and ACTIVE.
    let waiting: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let active: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let changed = Arc::new(Notify::new());
    let (seen_waiting, seen_active, notify) = (waiting.clone(), active.clone(), changed.clone());
    let watch = tokio::spawn(
        watcher(api.clone(), watcher::Config::default())
            .applied_objects()
            .try_for_each(move |object| {
                let seen = match object.state {
                    ClientState::Waiting => Some(&seen_waiting),
                    ClientState::Active => Some(&seen_active),
                    _ => None,
                };
                if let Some(seen) = seen {
                    seen.lock()
                        .unwrap()
                        .entry(object.name_any())
                        .or_insert_with(Instant::now);
                    notify.notify_waiters();
                }
                futures::future::ready(Ok(()))
            }),
    );

    let start = Instant::now();
    let created: HashMap<String, Instant> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let namespace = namespace.clone();
            async move {
                let name = format!("client-{i:05}");
                let at = Instant::now();
                api.create(&PostParams::default(), &new_client(&name, &namespace)?)
                    .await?;
                anyhow::Ok((name, at))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while waiting.lock().unwrap().len() < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} clients reached WAITING in 10 minutes",
                waiting.lock().unwrap().len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waiting = waiting.lock().unwrap().clone();
    let wall = waiting.values().max().copied().unwrap_or(start) - start;
    let latencies = created
        .iter()
        .map(|(name, at)| waiting[name].saturating_duration_since(*at))
        .collect();
    let create = Run { wall, latencies };

    // Connect, CONNECTING at a time, each with a key of its own as `kubectl gefyra connect`
    // does: from the patch until the watch shows ACTIVE.
    let start = Instant::now();
    let names: Vec<String> = created.keys().cloned().collect();
    let latencies = futures::stream::iter(created.into_keys())
        .map(|name| {
            let (api, active, changed) = (api.clone(), active.clone(), changed.clone());
            async move {
                let own = connection::generate_key_pair();
                let at = Instant::now();
                api.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"providerParameter": {"publicKey": own.public}})),
                )
                .await?;
                let deadline = at + Duration::from_secs(120);
                loop {
                    let notified = changed.notified();
                    if let Some(seen) = active.lock().unwrap().get(&name) {
                        return anyhow::Ok(seen.saturating_duration_since(at));
                    }
                    if tokio::time::timeout_at(deadline.into(), notified)
                        .await
                        .is_err()
                    {
                        bail!("{name} did not become ACTIVE within 2 minutes");
                    }
                }
            }
        })
        .buffer_unordered(CONNECTING)
        .try_collect()
        .await?;
    let connect = Run {
        wall: start.elapsed(),
        latencies,
    };
    watch.abort();
    let idle = idle_minute(&operator, &api, &names).await?;
    let rss_mib = peak_rss_mib(pid);
    let restart = restart(cluster, &namespace, operator, n).await?;
    Ok(OperatorRuns {
        create,
        connect,
        idle,
        restart,
        rss_mib,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let n: usize = std::env::var("GEFYRA_BENCH_CLIENTS")
        .ok()
        .map(|value| value.parse())
        .transpose()
        .context("GEFYRA_BENCH_CLIENTS must be a number")?
        .unwrap_or(1000);
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    // GEFYRA_BENCH_FLOOR=0: the operator's figures only (for a large N, where the floor
    // would double a long run).
    let floor = match std::env::var("GEFYRA_BENCH_FLOOR").as_deref() {
        Ok("0") => None,
        _ => Some(floor(&cluster, n).await?),
    };
    let operator = with_operator(&cluster, n).await?;
    println!("== GefyraClients: create -> WAITING, N = {n}, concurrency {CONCURRENCY}");
    if let Some((floor_create, _)) = &floor {
        floor_create.print("floor");
    }
    operator.create.print("operator");
    if let Some((floor_create, _)) = &floor {
        println!(
            "ratio      {:.2} (operator throughput / floor; aim >= 0.85)",
            operator.create.per_second() / floor_create.per_second()
        );
    }
    println!("== Connect: providerParameter patch -> ACTIVE, N = {n}, {CONNECTING} at a time");
    if let Some((_, floor_connect)) = &floor {
        floor_connect.print("floor");
    }
    operator.connect.print("operator");
    if let Some((_, floor_connect)) = &floor {
        println!(
            "ratio      {:.2} throughput, p50 {:.2}x, p99 {:.2}x (operator / floor)",
            operator.connect.per_second() / floor_connect.per_second(),
            operator.connect.percentile(0.50).as_secs_f64()
                / floor_connect.percentile(0.50).as_secs_f64(),
            operator.connect.percentile(0.99).as_secs_f64()
                / floor_connect.percentile(0.99).as_secs_f64()
        );
    }
    println!(
        "== Idle: N = {n} ACTIVE clients, status.wireguard of each written every 30 s (Stowaway's writes), one minute"
    );
    let requests: f64 = operator
        .idle
        .operator_requests
        .values()
        .fold(0.0, |a, b| a + b);
    println!(
        "stowaway   {} status writes/min\noperator   {requests:.0} requests/min {:?}\nratio      {:.3} (operator requests / status writes; aim 0)",
        operator.idle.status_writes,
        operator.idle.operator_requests,
        requests / operator.idle.status_writes.max(1) as f64
    );
    println!("== Restart: a new operator takes over N = {n} settled ACTIVE clients");
    let requests: f64 = operator
        .restart
        .operator_requests
        .values()
        .fold(0.0, |a, b| a + b);
    println!(
        "operator   all reconciled in {:.2} s; {requests:.0} requests {:?}\nwrites     {:.0} ({:.3} per client; aim 0, only lists and watches)",
        operator.restart.settle.as_secs_f64(),
        operator.restart.operator_requests,
        operator.restart.writes(),
        operator.restart.writes() / n.max(1) as f64
    );
    match operator.rss_mib {
        Some(mib) => println!("operator   peak RSS {mib:.1} MiB"),
        None => println!("operator   peak RSS unavailable"),
    }
    Ok(())
}
