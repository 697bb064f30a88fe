//! `make bench`: bridging's cost, against baselines measured in the same run.
//!
//! A real Stowaway (release build) with a real wireguard-go peer (the developer's laptop,
//! answering HTTP at its tunnel address), the router (`gefyra-carrier`, release build) for
//! mount `web` with a header bridge of that developer ACTIVE, and the original workload (an
//! HTTP server beside it). Each request is HTTP/1.0 on a new connection, as a Pod without
//! keep-alive sends it; the same requests:
//! - to the developer through the router (the header matches) against straight to the
//!   developer's address through Stowaway without the router (Stowaway's bridges port);
//! - to the original through the router while a colleague's bridge is ACTIVE (the header
//!   does not match: HTTP mode) and while no bridge is (raw splice), against straight to
//!   the original.
//!
//! p50/p99 of sequential requests, requests/s of 8 concurrent senders; then how long the
//! router takes to route an ACTIVE bridge written to the API server, and to stop routing a
//! deleted one. (Create → ACTIVE through the operator needs a node: the node test prints it.)
//!
//! Needs root (network namespaces) and the control plane (`make bench` starts it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gefyra_e2e::lab::{Deployment, Process, lab_binary};
use gefyra_e2e::{Cluster, free_port, workspace_binary};
use kube::Api;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SEQUENTIAL: usize = 2_000;
const CONCURRENT: usize = 8;
const PER_SENDER: usize = 500;

/// One request on a new connection: `preamble` first if any, then the request; the body.
async fn request(to: SocketAddr, preamble: Option<&[u8]>, header: Option<&str>) -> Result<Vec<u8>> {
    let mut stream = tokio::net::TcpStream::connect(to).await?;
    stream.set_nodelay(true)?;
    let mut bytes = Vec::with_capacity(128);
    if let Some(preamble) = preamble {
        bytes.extend_from_slice(preamble);
    }
    bytes.extend_from_slice(b"GET / HTTP/1.0\r\nHost: web\r\n");
    if let Some(header) = header {
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    stream.write_all(&bytes).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .context("no answer within 10 s")??;
    let body = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|at| response[at + 4..].to_vec())
        .with_context(|| {
            format!(
                "not an HTTP response: {:?}",
                String::from_utf8_lossy(&response)
            )
        })?;
    Ok(body)
}

struct Figures {
    p50: Duration,
    p99: Duration,
    per_second: f64,
}

/// Sequential latency and concurrent rate of requests that must all answer `expected`.
async fn measure(
    to: SocketAddr,
    preamble: Option<&[u8]>,
    header: Option<&str>,
    expected: &[u8],
) -> Result<Figures> {
    for _ in 0..50 {
        request(to, preamble, header).await?;
    }
    let mut samples = Vec::with_capacity(SEQUENTIAL);
    for _ in 0..SEQUENTIAL {
        let started = Instant::now();
        let body = request(to, preamble, header).await?;
        samples.push(started.elapsed());
        if body != expected {
            bail!(
                "{to}: answered {:?}, not {:?}",
                String::from_utf8_lossy(&body),
                String::from_utf8_lossy(expected)
            );
        }
    }
    samples.sort();
    let started = Instant::now();
    let senders: Vec<_> = (0..CONCURRENT)
        .map(|_| {
            let preamble = preamble.map(<[u8]>::to_vec);
            let header = header.map(str::to_string);
            tokio::spawn(async move {
                for _ in 0..PER_SENDER {
                    request(to, preamble.as_deref(), header.as_deref()).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for sender in senders {
        sender.await??;
    }
    let elapsed = started.elapsed();
    Ok(Figures {
        p50: samples[samples.len() / 2],
        p99: samples[samples.len() * 99 / 100],
        per_second: (CONCURRENT * PER_SENDER) as f64 / elapsed.as_secs_f64(),
    })
}

fn row(what: &str, figures: &Figures, baseline: Option<&Figures>) {
    let ratio = baseline.map_or(String::new(), |base| {
        format!(
            "  p50 {:.2}×  p99 {:.2}×  req/s {:.2}×",
            figures.p50.as_secs_f64() / base.p50.as_secs_f64(),
            figures.p99.as_secs_f64() / base.p99.as_secs_f64(),
            figures.per_second / base.per_second
        )
    });
    println!(
        "{what:<58} p50 {:>7.3} ms  p99 {:>7.3} ms  {:>7.0} req/s{ratio}",
        figures.p50.as_secs_f64() * 1e3,
        figures.p99.as_secs_f64() * 1e3,
        figures.per_second
    );
}

/// How long until `check` answers true, polled every millisecond.
async fn until(what: &str, check: impl AsyncFn() -> bool) -> Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if check().await {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    bail!("{what}: not within 30 s")
}

fn bridge(
    name: &str,
    client: &str,
    address: &str,
    remote: u16,
    header: &str,
) -> Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "gefyra.dev/v1", "kind": "gefyrabridge",
        "metadata": {"name": name, "labels": {"gefyra.dev/client": client, "gefyra.dev/bridge-mount": "web"}},
        "provider": "carrier2", "client": client, "destinationIP": address,
        "target": "web", "portMappings": [format!("8080:{remote}")],
        "providerParameter": {"rules": [{"match": [{"matchHeader": {"name": "x-gefyra", "value": header, "type": "exact"}}]}]},
        "state": "ACTIVE",
    }))?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let mut setup = Deployment::start(&cluster, "bench-bridge", &[]).await?;
    setup.stowaway.wait_ready().await?;
    let dev = setup
        .connected_peer("dev", json!({"subnet": "172.28.200.0/24"}), true)
        .await?;
    setup.reaches_the_cluster(&dev.netns).await?;
    let client = setup.clients.get("dev").await?;
    let address = client
        .provider_config
        .as_ref()
        .and_then(|config| config.get("Interface.Address"))
        .and_then(|value| value.as_str())
        .context("dev's tunnel address")?
        .to_string();
    setup.lab.serve(&dev.netns, address.parse()?, "dev")?;
    // The bridges here are written ACTIVE by the admin (no node, no mount): the operator,
    // which would find their mount missing, is stopped once the peer is connected.
    setup.operator.kill().await?;

    // The original workload: the same server, on this machine.
    let original_port = free_port();
    let original: SocketAddr = ([127, 0, 0, 1], original_port).into();
    let _original = Process::spawn(
        std::process::Command::new(lab_binary()).args([
            "serve",
            "--http",
            &original.to_string(),
            "--udp-echo",
            &format!("127.0.0.1:{}", free_port()),
            "--name",
            "web",
        ]),
        setup.lab.dir.join("original.log"),
    )?;
    until("the original answers", async || {
        request(original, None, None).await.is_ok()
    })
    .await?;

    // The router of mount `web`: one port, the original behind it.
    let namespace = setup.clients.namespace().context("namespaced")?.to_string();
    let remote = free_port();
    let router: SocketAddr = ([127, 0, 0, 1], remote).into();
    let stowaway: SocketAddr = ([127, 0, 0, 1], setup.stowaway.bridges_port).into();
    let carrier = workspace_binary("gefyra-carrier", "gefyra-carrier", "GEFYRA_CARRIER_BINARY");
    let _router = Process::spawn(
        std::process::Command::new(carrier)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .args([
                "--mount",
                "web",
                "--bridges-namespace",
                &namespace,
                "--stowaway",
                &stowaway.to_string(),
                "--port",
                &format!("{remote}={original}"),
                "--health-listen",
                &format!("127.0.0.1:{}", free_port()),
            ]),
        setup.lab.dir.join("carrier.log"),
    )?;
    until("the router answers", async || {
        request(router, None, None).await.is_ok()
    })
    .await?;

    let bridges: Api<DynamicObject> = Api::namespaced_with(
        setup.clients.clone().into_client(),
        &namespace,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gefyra.dev", "v1", "gefyrabridge"),
            "gefyrabridges",
        ),
    );

    println!(
        "Bridging: {SEQUENTIAL} sequential requests (p50, p99), then {CONCURRENT}×{PER_SENDER} concurrent (req/s); HTTP/1.0, a connection each"
    );
    let raw_original = measure(original, None, None, b"web").await?;
    let raw_router = measure(router, None, None, b"web").await?;
    bridges
        .create(
            &PostParams::default(),
            &bridge("dev", "dev", &address, remote, "dev")?,
        )
        .await?;
    let routed = until("the router routes dev's header to dev", async || {
        request(router, None, Some("x-gefyra: dev"))
            .await
            .is_ok_and(|body| body == b"dev")
    })
    .await?;
    let preamble = gefyra_api::bridge_wire::preamble("dev", remote)
        .map_err(|error| anyhow::anyhow!("{error:?}"))?;
    let direct = measure(stowaway, Some(preamble.as_bytes()), None, b"dev").await?;
    let bridged = measure(router, None, Some("x-gefyra: dev"), b"dev").await?;
    let unmatched = measure(router, None, Some("x-gefyra: someone-else"), b"web").await?;
    row(
        "to the developer through Stowaway, no router (baseline)",
        &direct,
        None,
    );
    row(
        "to the developer through the router (header matches)",
        &bridged,
        Some(&direct),
    );
    row("to the original, straight (baseline)", &raw_original, None);
    row(
        "to the original through the router, no bridge (splice)",
        &raw_router,
        Some(&raw_original),
    );
    row(
        "to the original through the router, a colleague's bridge",
        &unmatched,
        Some(&raw_original),
    );

    bridges.delete("dev", &DeleteParams::default()).await?;
    let back = until("dev's header goes to the original again", async || {
        request(router, None, Some("x-gefyra: dev"))
            .await
            .is_ok_and(|body| body == b"web")
    })
    .await?;
    println!(
        "an ACTIVE bridge written → routed by the router: {:.0} ms; deleted → its traffic back to the original: {:.0} ms",
        routed.as_secs_f64() * 1e3,
        back.as_secs_f64() * 1e3,
    );
    Ok(())
}
