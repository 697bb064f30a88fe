//! `make bench`: Stowaway against baselines measured in the same run.
//!
//! - Throughput: one and four TCP streams (iperf3, BENCH_IPERF_SECONDS each) from a
//!   wireguard-go peer to a server in the cluster namespace and back (`-R`): through
//!   Stowaway (release build, unprivileged, userspace TCP termination), and through a
//!   baseline of a wireguard-go server with kernel forwarding (namespaces only; the peer
//!   side is the same wireguard-go); with the CPU time each endpoint process spent per GiB
//!   carried (user + system, from /proc; the baseline's kernel forwarding runs in softirq
//!   and is not counted — it favours the baseline).
//! - Handshakes per second on one core: through Stowaway's endpoint (the initiator looked up
//!   among N peers by its static key) against boringtun alone (each initiation straight to
//!   its peer's tunnel).
//! - Memory: the endpoint with 10,000 peers configured, then after a handshake each.
//! - Fairness: a quiet peer's request latency and download alone and while another peer
//!   floods Stowaway (UDP without a rate limit; four TCP streams), as ratios to alone.
//! - Workers: two peers at once (one stream each, both ways), through Stowaway with two
//!   data-plane workers (one peer on each), with one, and through the baseline.
//!
//! Needs root (network namespaces) and the control plane (`make bench` starts it).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use gefyra_e2e::Cluster;
use gefyra_e2e::lab::{
    Deployment, Lab, cpu_seconds, key_pair_of_worker, peak_rss_mib, run, write_secret,
};
use serde_json::json;
use stowaway::endpoint::Endpoint;
use stowaway::peers::{self, PeerSpec};

const HANDSHAKE_PEERS: usize = 2_000;
const MEMORY_PEERS: usize = 10_000;
const PSK: [u8; 32] = [9; 32];

fn main() -> Result<()> {
    let seconds: u64 = std::env::var("BENCH_IPERF_SECONDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(5);
    handshakes()?;
    memory()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(throughput(seconds))
}

fn key() -> [u8; 32] {
    rand::random()
}

fn public_of(private: [u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(private)).to_bytes()
}

fn spec(index: usize, public_key: [u8; 32]) -> PeerSpec {
    let address = Ipv4Addr::from(0x0a40_0000 + index as u32 + 1);
    PeerSpec {
        client: format!("{index:032x}"),
        public_key,
        preshared_key: PSK,
        ranges: vec![ipnet::IpNet::from(std::net::IpAddr::V4(address))],
    }
}

fn initiation(client: [u8; 32], server: [u8; 32], index: u32) -> Result<Vec<u8>> {
    let mut tunnel = Tunn::new(
        StaticSecret::from(client),
        PublicKey::from(server),
        Some(PSK),
        None,
        index,
        None,
    );
    let mut buffer = vec![0u8; 256];
    match tunnel.format_handshake_initiation(&mut buffer, false) {
        TunnResult::WriteToNetwork(packet) => Ok(packet.to_vec()),
        _ => bail!("boringtun made no initiation"),
    }
}

fn handshakes() -> Result<()> {
    let server = key();
    let clients: Vec<[u8; 32]> = (0..HANDSHAKE_PEERS).map(|_| key()).collect();
    let initiations: Vec<Vec<u8>> = clients
        .iter()
        .enumerate()
        .map(|(index, client)| initiation(*client, public_of(server), index as u32))
        .collect::<Result<_>>()?;
    let from: SocketAddr = "198.51.100.7:51820".parse()?;

    // Stowaway's endpoint: every client a peer, no cookie requirement (measures the work).
    let mut endpoint = Endpoint::with_handshake_rate(server, u64::MAX);
    let desired: BTreeMap<_, _> = clients
        .iter()
        .enumerate()
        .map(|(index, client)| (public_of(*client), spec(index, public_of(*client))))
        .collect();
    endpoint.apply(peers::plan(&BTreeMap::new(), &desired));
    let started = Instant::now();
    let mut completed = 0;
    for datagram in &initiations {
        if endpoint
            .handle_datagram(from, datagram)
            .handshake_with
            .is_some()
        {
            completed += 1;
        }
    }
    let endpoint_rate = completed as f64 / started.elapsed().as_secs_f64();
    if completed != HANDSHAKE_PEERS {
        bail!("only {completed} of {HANDSHAKE_PEERS} handshakes completed");
    }

    // boringtun alone: one server tunnel per client, made beforehand.
    let mut tunnels: Vec<Tunn> = clients
        .iter()
        .enumerate()
        .map(|(index, client)| {
            Tunn::new(
                StaticSecret::from(server),
                PublicKey::from(public_of(*client)),
                Some(PSK),
                None,
                index as u32,
                None,
            )
        })
        .collect();
    let mut buffer = vec![0u8; 2048];
    let started = Instant::now();
    let mut answered = 0;
    for (tunnel, datagram) in tunnels.iter_mut().zip(&initiations) {
        if let TunnResult::WriteToNetwork(_) =
            tunnel.decapsulate(Some(from.ip()), datagram, &mut buffer)
        {
            answered += 1;
        }
    }
    let raw_rate = answered as f64 / started.elapsed().as_secs_f64();
    println!("== Handshakes, one core, {HANDSHAKE_PEERS} peers configured");
    println!("boringtun alone (tunnel known)      {raw_rate:>10.0}/s");
    println!(
        "stowaway endpoint (lookup by key)   {endpoint_rate:>10.0}/s   ratio {:.2}",
        endpoint_rate / raw_rate
    );
    Ok(())
}

/// Resident memory of this process, KiB.
fn rss_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .context("VmRSS in /proc/self/status")
}

fn memory() -> Result<()> {
    let before = rss_kib()?;
    // No handshake limit here: every peer below handshakes once, at once.
    let mut endpoint = Endpoint::with_handshake_rate(key(), u64::MAX);
    let server = endpoint.public_key();
    let privates: Vec<[u8; 32]> = (0..MEMORY_PEERS).map(|_| key()).collect();
    let desired: BTreeMap<_, _> = privates
        .iter()
        .enumerate()
        .map(|(index, private)| {
            let public = public_of(*private);
            (public, spec(index, public))
        })
        .collect();
    endpoint.apply(peers::plan(&BTreeMap::new(), &desired));
    drop(desired);
    let configured = rss_kib()?.saturating_sub(before);
    println!("== Memory, endpoint with {MEMORY_PEERS} peers");
    let per_peer = |grown: u64| {
        format!(
            "{:.1} MiB ({:.1} KiB a peer)",
            grown as f64 / 1024.0,
            grown as f64 / MEMORY_PEERS as f64
        )
    };
    println!("configured, none connected yet   {}", per_peer(configured));
    // Each peer's first handshake makes its tunnel (the client side is dropped at once).
    let from: SocketAddr = "198.51.100.7:51820".parse()?;
    for (index, private) in privates.iter().enumerate() {
        let init = initiation(*private, server, index as u32)?;
        let handled = endpoint.handle_datagram(from, &init);
        if handled.handshake_with.is_none() {
            bail!(
                "peer {index}'s handshake did not complete: {:?}",
                handled.dropped
            );
        }
    }
    let handshaken = rss_kib()?.saturating_sub(before);
    println!("each after one handshake         {}", per_peer(handshaken));
    std::hint::black_box(&endpoint);
    Ok(())
}

/// One stream count and direction of the throughput table.
#[derive(Clone, Copy)]
struct Run {
    streams: u32,
    reverse: bool,
}

/// The iperf3 server's port a run goes to (the flood's server is the second one).
const IPERF_PORT: &str = "5201";

/// Throughput (bits per second), the CPU seconds per GiB that process `endpoint` spent on
/// it, and the datagrams its network namespace's UDP receive buffers dropped meanwhile.
struct Measured {
    bits_per_second: f64,
    cpu_per_gib: f64,
    receive_buffer_drops: u64,
}

/// `RcvbufErrors` of the UDP counters of the network namespace process `pid` is in.
fn receive_buffer_drops(pid: u32) -> Result<u64> {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp"))?;
    let mut udp = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let (names, values) = (
        udp.next().context("a Udp: header")?,
        udp.next().context("a Udp: line")?,
    );
    let index = names
        .split_whitespace()
        .position(|name| name == "RcvbufErrors")
        .context("RcvbufErrors among the UDP counters")?;
    Ok(values
        .split_whitespace()
        .nth(index)
        .context("a RcvbufErrors value")?
        .parse()?)
}

impl Measured {
    /// From throughput, bytes carried and the CPU seconds spent carrying them.
    fn of(bits_per_second: f64, bytes: f64, cpu_seconds: f64, receive_buffer_drops: u64) -> Self {
        Self {
            receive_buffer_drops,
            bits_per_second,
            cpu_per_gib: cpu_seconds / (bytes / f64::from(1u32 << 30)).max(f64::MIN_POSITIVE),
        }
    }
}

/// [`iperf`] with `run`'s streams, and the CPU time of `endpoint` meanwhile.
fn measured(
    lab: &Lab,
    netns: &str,
    server: Ipv4Addr,
    seconds: u64,
    run: Run,
    endpoint: u32,
) -> Result<Measured> {
    let (before, dropped_before) = (cpu_seconds(endpoint)?, receive_buffer_drops(endpoint)?);
    let (bits_per_second, bytes) = iperf(lab, netns, server, seconds, run)?;
    let spent = cpu_seconds(endpoint)? - before;
    let dropped = receive_buffer_drops(endpoint)?.saturating_sub(dropped_before);
    Ok(Measured::of(bits_per_second, bytes, spent, dropped))
}

/// One iperf3 run from `netns` to `server`: bits per second and bytes received at the far
/// end (upload) or, with `reverse`, at the peer (download).
fn iperf(lab: &Lab, netns: &str, server: Ipv4Addr, seconds: u64, run: Run) -> Result<(f64, f64)> {
    iperf_to(lab, netns, server, IPERF_PORT, seconds, run)
}

/// [`iperf`] to the server on `port`.
fn iperf_to(
    lab: &Lab,
    netns: &str,
    server: Ipv4Addr,
    port: &str,
    seconds: u64,
    run: Run,
) -> Result<(f64, f64)> {
    let Run { streams, reverse } = run;
    let streams = streams.to_string();
    let seconds = seconds.to_string();
    let server = server.to_string();
    let limit = (seconds.parse::<u64>()? * 4 + 20).to_string();
    let mut args = vec![
        limit.as_str(),
        "iperf3",
        "-c",
        server.as_str(),
        "-t",
        seconds.as_str(),
        "-J",
        "--connect-timeout",
        "5000",
        "-p",
        port,
        "-P",
        streams.as_str(),
    ];
    if reverse {
        args.push("-R");
    }
    let output = lab
        .exec_in(netns, "timeout", &args)
        .with_context(|| format!("iperf3 from {netns} to {server} (reverse: {reverse})"))?;
    let report: serde_json::Value = serde_json::from_str(&output)?;
    let received = &report["end"]["sum_received"];
    let figure = |key: &str| {
        received[key]
            .as_f64()
            .with_context(|| format!("iperf3 reported no {key}: {output}"))
    };
    Ok((figure("bits_per_second")?, figure("bytes")?))
}

/// The baseline: peer namespace -> wireguard-go server with kernel forwarding -> service.
/// Returns (peer namespace, service address).
fn baseline(lab: &mut Lab) -> Result<Baseline> {
    let slot = lab.slot;
    let (peer, noisy, gateway, service) = (
        format!("gfb-{slot}-peer"),
        format!("gfb-{slot}-noisy"),
        format!("gfb-{slot}-gw"),
        format!("gfb-{slot}-svc"),
    );
    for netns in [&peer, &noisy, &gateway, &service] {
        lab.add_netns(netns)?;
    }
    let address = |last: u8| Ipv4Addr::new(10, 79, slot, last);
    lab.wire((&peer, address(2)), (&gateway, address(1)), "bl0", 30)?;
    lab.wire((&gateway, address(5)), (&service, address(6)), "bl1", 30)?;
    lab.wire((&noisy, address(10)), (&gateway, address(9)), "bl2", 30)?;
    run(
        "ip",
        &[
            "-n",
            &service,
            "route",
            "add",
            "default",
            "via",
            &address(5).to_string(),
        ],
    )?;
    lab.exec_in(&gateway, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    let (server_key, client_key, noisy_key) = (key(), key(), key());
    let encode = |bytes: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let server_file = lab.dir.join("baseline-server.key");
    let client_file = lab.dir.join("baseline-client.key");
    let noisy_file = lab.dir.join("baseline-noisy.key");
    write_secret(&server_file, &encode(server_key))?;
    write_secret(&client_file, &encode(client_key))?;
    write_secret(&noisy_file, &encode(noisy_key))?;
    let (server_if, client_if, noisy_if) = (
        format!("gwbs{slot}"),
        format!("gwbc{slot}"),
        format!("gwbn{slot}"),
    );
    let server_pid = lab.wireguard_go(&gateway, &server_if)?;
    lab.wireguard_go(&peer, &client_if)?;
    lab.wireguard_go(&noisy, &noisy_if)?;
    let path = |file: &std::path::Path| file.to_str().map(str::to_string).context("a UTF-8 path");
    lab.exec_in(
        &gateway,
        "wg",
        &[
            "set",
            &server_if,
            "private-key",
            &path(&server_file)?,
            "listen-port",
            "51820",
            "peer",
            &encode(public_of(client_key)),
            "allowed-ips",
            "192.168.99.2/32",
            "peer",
            &encode(public_of(noisy_key)),
            "allowed-ips",
            "192.168.99.3/32",
        ],
    )?;
    for (netns, interface, file, gateway_address) in [
        (&peer, &client_if, &client_file, address(1)),
        (&noisy, &noisy_if, &noisy_file, address(9)),
    ] {
        lab.exec_in(
            netns,
            "wg",
            &[
                "set",
                interface,
                "private-key",
                &path(file)?,
                "peer",
                &encode(public_of(server_key)),
                "endpoint",
                &format!("{gateway_address}:51820"),
                "allowed-ips",
                "0.0.0.0/0",
                "persistent-keepalive",
                "21",
            ],
        )?;
    }
    for (netns, interface, own) in [
        (&gateway, &server_if, "192.168.99.1/24"),
        (&peer, &client_if, "192.168.99.2/32"),
        (&noisy, &noisy_if, "192.168.99.3/32"),
    ] {
        run("ip", &["-n", netns, "addr", "add", own, "dev", interface])?;
        run(
            "ip",
            &["-n", netns, "link", "set", interface, "mtu", "1420", "up"],
        )?;
    }
    for (netns, interface) in [(&peer, &client_if), (&noisy, &noisy_if)] {
        for route in ["192.168.99.1/32".to_string(), format!("{}/30", address(4))] {
            run(
                "ip",
                &["-n", netns, "route", "add", &route, "dev", interface],
            )?;
        }
    }
    let iperf3 = std::path::Path::new("iperf3");
    let service_address = address(6).to_string();
    lab.spawn_in(
        &service,
        "baseline-iperf3",
        iperf3,
        &["-s", "-B", &service_address],
    )?;
    lab.spawn_in(
        &service,
        "baseline-iperf3-flood",
        iperf3,
        &["-s", "-B", &service_address, "-p", FLOOD_PORT],
    )?;
    lab.serve(&service, std::net::IpAddr::V4(address(6)), "baseline")?;
    Ok(Baseline {
        quiet: peer,
        noisy,
        service: address(6),
        server_pid,
    })
}

/// The baseline's namespaces: two wireguard-go peers of one wireguard-go server with kernel
/// forwarding, and the service behind it.
struct Baseline {
    quiet: String,
    noisy: String,
    service: Ipv4Addr,
    /// The wireguard-go server's process.
    server_pid: u32,
}

/// The port of the flood's iperf3 server.
const FLOOD_PORT: &str = "5202";
/// Requests per latency measurement.
const REQUESTS: &str = "300";

/// A quiet peer's request latency (p50, p99 in ms; a new connection per request) and
/// download throughput.
fn quiet_figures(
    lab: &Lab,
    quiet: &str,
    service: Ipv4Addr,
    seconds: u64,
) -> Result<(f64, f64, f64)> {
    let url = format!("http://{service}:8080/");
    let lab_binary = gefyra_e2e::lab::lab_binary();
    let latency = lab.exec_in(
        quiet,
        lab_binary.to_str().context("a UTF-8 path")?,
        &["latency", &url, REQUESTS],
    )?;
    let mut parts = latency.split_whitespace().map(str::parse::<f64>);
    let p50 = parts.next().context("p50")??;
    let p99 = parts.next().context("p99")??;
    let (download, _) = iperf(
        lab,
        quiet,
        service,
        seconds,
        Run {
            streams: 1,
            reverse: true,
        },
    )?;
    Ok((p50, p99, download))
}

/// Fairness: the quiet peer alone, then while the noisy peer floods Stowaway at line rate
/// (UDP without a rate limit; four TCP upload streams), measured back to back.
fn fairness(
    through: &str,
    lab: &Lab,
    noisy: &str,
    quiet: &str,
    service: Ipv4Addr,
    seconds: u64,
) -> Result<()> {
    let alone = quiet_figures(lab, quiet, service, seconds)?;
    let flood_seconds = (seconds * 3 + 10).to_string();
    let server = service.to_string();
    let mut rows = vec![("quiet peer alone", alone)];
    for (name, extra) in [
        (
            "noisy peer: UDP, no rate limit",
            &["-u", "-b", "0", "-l", "1300"][..],
        ),
        ("noisy peer: 4 TCP streams up", &["-P", "4"][..]),
    ] {
        let mut flood = std::process::Command::new("ip")
            .args([
                "netns", "exec", noisy, "iperf3", "-c", &server, "-p", FLOOD_PORT,
            ])
            .args(["-t", &flood_seconds])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_secs(2));
        let measured = quiet_figures(lab, quiet, service, seconds);
        let _ = flood.kill();
        let _ = flood.wait();
        rows.push((name, measured?));
        // Let the flood's server take the next test.
        std::thread::sleep(Duration::from_secs(2));
    }
    println!(
        "== Fairness through {through}: a quiet peer's requests ({REQUESTS}, a connection each) and download"
    );
    println!(
        "                                   p50 ms   p99 ms   download Gbit/s   vs alone (p50, p99, download)"
    );
    for (name, (p50, p99, download)) in &rows {
        println!(
            "{name:<34} {p50:>7.2}  {p99:>7.2}   {:>7.2}           {:>5.2}x {:>5.2}x {:>5.2}x",
            download / 1e9,
            p50 / alone.0,
            p99 / alone.1,
            download / alone.2
        );
    }
    Ok(())
}

/// Waits until `netns` reaches `address` (handshake done, server listening).
fn reachable(lab: &Lab, netns: &str, address: Ipv4Addr) -> Result<()> {
    for _ in 0..60 {
        if lab
            .exec_in(netns, "ping", &["-c", "1", "-W", "1", &address.to_string()])
            .is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("{netns} cannot reach {address}")
}

async fn throughput(seconds: u64) -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let mut deployment = Deployment::start(
        &cluster,
        "bench-stowaway",
        &["--workers".to_string(), "2".to_string()],
    )
    .await?;
    deployment.stowaway.wait_ready().await?;
    // One peer on each of the two workers.
    let peer = deployment
        .connected_peer_with_key(
            "bench",
            json!({ "subnet": "172.31.200.0/24" }),
            Some(key_pair_of_worker(0, 2)?),
        )
        .await?;
    let quiet = deployment
        .connected_peer_with_key(
            "quiet",
            json!({ "subnet": "172.30.200.0/24" }),
            Some(key_pair_of_worker(1, 2)?),
        )
        .await?;
    let service = deployment.lab.cluster_address();
    let cluster_netns = deployment.lab.cluster_netns();
    deployment.lab.spawn_in(
        &cluster_netns,
        "iperf3",
        std::path::Path::new("iperf3"),
        &["-s", "-B", &service.to_string()],
    )?;
    // A second server: the noisy peer's flood (one iperf3 server runs one test at a time).
    deployment.lab.spawn_in(
        &cluster_netns,
        "iperf3-flood",
        std::path::Path::new("iperf3"),
        &["-s", "-B", &service.to_string(), "-p", FLOOD_PORT],
    )?;
    // Stowaway answers ICMP echo only at its own tunnel address.
    reachable(&deployment.lab, &peer.netns, Ipv4Addr::new(192, 168, 99, 1))?;
    let base = baseline(&mut deployment.lab)?;
    let (baseline_peer, baseline_service) = (base.quiet.clone(), base.service);
    reachable(&deployment.lab, &baseline_peer, baseline_service)?;
    reachable(&deployment.lab, &base.noisy, baseline_service)?;
    // Let both iperf3 servers listen.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let lab = &deployment.lab;
    let stowaway_pid = deployment.stowaway.process.child.id();
    let runs = [
        (
            "1 stream up",
            Run {
                streams: 1,
                reverse: false,
            },
        ),
        (
            "1 stream down",
            Run {
                streams: 1,
                reverse: true,
            },
        ),
        (
            "4 streams up",
            Run {
                streams: 4,
                reverse: false,
            },
        ),
        (
            "4 streams down",
            Run {
                streams: 4,
                reverse: true,
            },
        ),
    ];
    let mut table = Vec::new();
    for (what, run) in runs {
        let theirs = measured(
            lab,
            &baseline_peer,
            baseline_service,
            seconds,
            run,
            base.server_pid,
        )?;
        let ours =
            measured(lab, &peer.netns, service, seconds, run, stowaway_pid).map_err(|error| {
                let log = deployment.stowaway.process.log_text();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                error.context(format!("Stowaway's log ends:\n{}", tail.join("\n")))
            })?;
        table.push((what, theirs, ours));
    }
    println!(
        "== Throughput (iperf3, {seconds} s each), wireguard-go peer <-> cluster; CPU of the endpoint process per GiB carried"
    );
    println!(
        "                 baseline: wireguard-go + kernel fwd   stowaway: userspace, unprivileged   ratio (stowaway / baseline)   UDP receive-buffer drops (baseline, stowaway)"
    );
    for (what, theirs, ours) in &table {
        println!(
            "{what:<16} {:>7.2} Gbit/s {:>7.2} CPU-s/GiB   {:>7.2} Gbit/s {:>7.2} CPU-s/GiB     throughput {:>5.2}  CPU/GiB {:>5.2}   {:>8} {:>8}",
            theirs.bits_per_second / 1e9,
            theirs.cpu_per_gib,
            ours.bits_per_second / 1e9,
            ours.cpu_per_gib,
            ours.bits_per_second / theirs.bits_per_second,
            ours.cpu_per_gib / theirs.cpu_per_gib.max(f64::MIN_POSITIVE),
            theirs.receive_buffer_drops,
            ours.receive_buffer_drops,
        );
    }
    fairness(
        "baseline: wireguard-go + kernel forwarding",
        lab,
        &base.noisy,
        &base.quiet,
        baseline_service,
        seconds,
    )?;
    fairness("Stowaway", lab, &peer.netns, &quiet.netns, service, seconds)?;
    match peak_rss_mib(deployment.stowaway.process.child.id()) {
        Some(mib) => println!("stowaway peak RSS {mib:.1} MiB"),
        None => println!("stowaway peak RSS unavailable"),
    }

    // Two peers at once: two workers (one peer each), then one worker, then the baseline.
    let pair = [peer.netns.as_str(), quiet.netns.as_str()];
    let two_workers = both_ways(lab, pair, service, seconds, stowaway_pid)?;
    deployment.restart_stowaway_with("--workers", "1").await?;
    let lab = &deployment.lab;
    for netns in pair {
        reachable(lab, netns, Ipv4Addr::new(192, 168, 99, 1))?;
    }
    let one_worker = both_ways(
        lab,
        pair,
        service,
        seconds,
        deployment.stowaway.process.child.id(),
    )?;
    let baseline_pair = [base.quiet.as_str(), base.noisy.as_str()];
    let theirs = both_ways(
        lab,
        baseline_pair,
        baseline_service,
        seconds,
        base.server_pid,
    )?;
    println!(
        "== Two peers at once (iperf3, one stream each, {seconds} s), summed; CPU of the endpoint process per GiB carried"
    );
    println!(
        "                       baseline            Stowaway, 1 worker     Stowaway, 2 workers    2 workers / 1 worker    2 workers / baseline"
    );
    for (index, direction) in ["up", "down"].into_iter().enumerate() {
        let (theirs, one, two) = (&theirs[index], &one_worker[index], &two_workers[index]);
        let figures = |measured: &Measured| {
            format!(
                "{:>5.2} Gbit/s {:>5.2} CPU-s/GiB {:>6} drops",
                measured.bits_per_second / 1e9,
                measured.cpu_per_gib,
                measured.receive_buffer_drops
            )
        };
        let ratio = |ours: &Measured, theirs: &Measured| {
            format!(
                "{:>4.2} thr {:>4.2} CPU",
                ours.bits_per_second / theirs.bits_per_second,
                ours.cpu_per_gib / theirs.cpu_per_gib.max(f64::MIN_POSITIVE)
            )
        };
        println!(
            "{direction:<6} {}   {}   {}   {}   {}",
            figures(theirs),
            figures(one),
            figures(two),
            ratio(two, one),
            ratio(two, theirs)
        );
    }
    Ok(())
}

/// Two peers at once, one stream each (the first to the usual iperf3 server, the second to
/// the flood's), up then down: summed throughput and the CPU of `endpoint` per GiB of both.
fn both_ways(
    lab: &Lab,
    peers: [&str; 2],
    service: Ipv4Addr,
    seconds: u64,
    endpoint: u32,
) -> Result<[Measured; 2]> {
    let mut both = Vec::new();
    for reverse in [false, true] {
        let run = Run {
            streams: 1,
            reverse,
        };
        let (before, dropped_before) = (cpu_seconds(endpoint)?, receive_buffer_drops(endpoint)?);
        let results = std::thread::scope(|scope| {
            let first = scope.spawn(|| iperf_to(lab, peers[0], service, IPERF_PORT, seconds, run));
            let second = scope.spawn(|| iperf_to(lab, peers[1], service, FLOOD_PORT, seconds, run));
            [first.join(), second.join()]
        });
        let spent = cpu_seconds(endpoint)? - before;
        let dropped = receive_buffer_drops(endpoint)?.saturating_sub(dropped_before);
        let (mut bits_per_second, mut bytes) = (0.0, 0.0);
        for result in results {
            let (bits, carried) =
                result.map_err(|_| anyhow::anyhow!("an iperf3 thread panicked"))??;
            bits_per_second += bits;
            bytes += carried;
        }
        both.push(Measured::of(bits_per_second, bytes, spent, dropped));
    }
    let [up, down]: [Measured; 2] = both
        .try_into()
        .map_err(|_| anyhow::anyhow!("two directions"))?;
    Ok([up, down])
}
