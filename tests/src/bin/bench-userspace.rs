//! `make bench`: `kubectl gefyra connect --userspace` (the tunnel in the CLI process:
//! boringtun over a UDP socket, smoltcp, a SOCKS5 proxy) against a baseline measured in the
//! same run: a wireguard-go peer with a kernel TUN in a network namespace. Both reach the
//! same HTTP server in the lab's cluster namespace through the same Stowaway (release
//! build, unprivileged); both tunnels use MTU 1420.
//!
//! - One TCP stream each way, by curl: a download of `/bytes/N` and an upload (a POST of N
//!   bytes), from the peer's namespace straight to the server (the baseline) and from this
//!   machine through the SOCKS5 proxy of `connect --userspace` (run as nobody, without
//!   capabilities). Throughput, and the CPU seconds per GiB of the client process
//!   (wireguard-go; kubectl-gefyra), alone and with curl's own: user + system from /proc.
//!   The kernel's work in softirq (for the baseline its TUN, routing and TCP; for the proxy
//!   the loopback) is counted for neither. The two alternate, round by round; medians.
//! - Time to first byte: `connect --userspace` spawned with the client WAITING, curl
//!   through its proxy retried until the server answers; from the spawn to the answer.
//!
//! Needs root (network namespaces) and the control plane (`make bench` starts it).

use std::io::BufRead;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use gefyra_api::ClientState;
use gefyra_e2e::lab::{Deployment, Process, cpu_seconds, peak_rss_mib, run, unprivileged};
use gefyra_e2e::{
    Cluster, KubectlGefyra, free_port, kubectl_gefyra_binary, processes_mentioning, wait_for_ready,
};
use serde_json::json;

/// The userspace client's GefyraClient.
const CLIENT: &str = "dev";
/// Both tunnels' MTU (the lab's wireguard-go peers use 1420).
const MTU: u16 = 1420;
/// Throughput rounds, each one transfer per path and direction.
const ROUNDS: usize = 3;
/// Spawns of `connect --userspace` timed to the first byte.
const FIRST_BYTE_RUNS: usize = 5;
/// The transfer that sizes the measured ones (and warms both paths up).
const WARM_UP: u64 = 64 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// curl, then its own CPU time (`times`: the shell's, then its children's) on stderr.
const CURL_TIMED: &str = "curl \"$@\"; status=$?; times >&2; exit $status";

#[tokio::main]
async fn main() -> Result<()> {
    let seconds: f64 = std::env::var("BENCH_IPERF_SECONDS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(5.0);
    let cluster = Cluster::from_env().await?;
    let mut deployment = Deployment::start(&cluster, "bench-userspace", &[]).await?;
    deployment.stowaway.wait_ready().await?;
    let peer = deployment
        .connected_peer("baseline", json!({ "subnet": "172.31.200.0/24" }), true)
        .await?;
    deployment.reaches_the_cluster(&peer.netns).await?;
    let wireguard_go = match processes_mentioning(&peer.interface)[..] {
        [pid] => pid,
        ref found => bail!("one wireguard-go for {}: {found:?}", peer.interface),
    };
    let connect = Connect {
        home: client_home(&cluster, &deployment).await?,
        socks5: ([127, 0, 0, 1], free_port()).into(),
        allowed_ips: deployment.lab.cluster_subnet(),
    };
    let server = deployment.lab.cluster_address();

    let (first_bytes, connected) = first_bytes(&deployment, &connect, server).await?;
    print_first_bytes(&first_bytes);
    let routes = [
        Route {
            netns: Some(&peer.netns),
            socks5: None,
            client: wireguard_go,
        },
        Route {
            netns: None,
            socks5: Some(connect.socks5),
            client: connected.pid(),
        },
    ];
    carried_by_stowaway(&deployment, &routes[1], server).await?;
    let rows = [Direction::Download, Direction::Upload]
        .into_iter()
        .map(|direction| throughput(&deployment.lab.dir, &routes, server, direction, seconds))
        .collect::<Result<Vec<_>>>()
        .with_context(|| deployment.stowaway.process.log_text())?;
    print_throughput(&rows, seconds);
    let memory =
        |pid| peak_rss_mib(pid).map_or("unavailable".to_string(), |mib| format!("{mib:.1} MiB"));
    println!(
        "peak RSS: kubectl-gefyra {}, wireguard-go {}",
        memory(connected.pid()),
        memory(wireguard_go)
    );
    connected.disconnect()?;
    Ok(())
}

/// The developer's home: the client file of a new WAITING client (MTU 1420, Stowaway at
/// 127.0.0.1), owned by nobody.
async fn client_home(cluster: &Cluster, deployment: &Deployment) -> Result<PathBuf> {
    let namespace = deployment.clients.namespace().context("namespaced")?;
    let admin = KubectlGefyra::new(&cluster.kubeconfig, namespace)?;
    admin
        .ok(&["clients", "create", "--client-id", CLIENT])
        .await?;
    admin
        .ok(&[
            "clients",
            "config",
            CLIENT,
            "--host",
            "127.0.0.1",
            "--port",
            &deployment.stowaway.port.to_string(),
            "--mtu",
            &MTU.to_string(),
            "-o",
            "client.json",
        ])
        .await?;
    let home = deployment.lab.dir.join("home");
    std::fs::create_dir_all(&home)?;
    std::fs::copy(admin.workdir.join("client.json"), home.join("client.json"))?;
    run(
        "chown",
        &["-R", "65534:65534", home.to_str().context("a UTF-8 path")?],
    )?;
    wait_for_ready(&deployment.clients, CLIENT).await?;
    Ok(home)
}

/// How `connect --userspace` is started.
struct Connect {
    home: PathBuf,
    socks5: SocketAddr,
    /// The lab's cluster namespace (the host reaches it directly too: only the proxy's
    /// routing sends it through the tunnel).
    allowed_ips: String,
}

impl Connect {
    /// Starts `connect -f client.json --userspace` as nobody, without capabilities; stderr
    /// into `log` in the home, stdout read line by line.
    fn spawn(&self, log: &str) -> Result<Connected> {
        let mut command = unprivileged(&kubectl_gefyra_binary());
        command
            .args(["connect", "-f", "client.json", "--userspace", "--socks5"])
            .arg(self.socks5.to_string())
            .args(["--allowed-ips", &self.allowed_ips])
            .current_dir(&self.home)
            .env_clear()
            .env("HOME", &self.home)
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.home.join(log))?);
        let mut child = command.spawn().context("starting kubectl-gefyra")?;
        let stdout = child.stdout.take().context("a piped stdout")?;
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if sender.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Connected {
            process: Process {
                child,
                log: self.home.join(log),
            },
            lines,
            printed: Vec::new(),
        })
    }
}

/// A running `connect --userspace` (killed on drop) and what it printed, when.
struct Connected {
    process: Process,
    lines: mpsc::Receiver<(Instant, String)>,
    printed: Vec<(Instant, String)>,
}

impl Connected {
    fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// When it printed a line holding `text`, waiting up to a second for its stdout.
    fn printed_at(&mut self, text: &str) -> Option<Instant> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            self.printed.extend(self.lines.try_iter());
            if let Some((at, _)) = self.printed.iter().find(|(_, line)| line.contains(text)) {
                return Some(*at);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Its stdout so far and its stderr.
    fn output(&mut self) -> String {
        self.printed.extend(self.lines.try_iter());
        let stdout: Vec<&str> = self.printed.iter().map(|(_, line)| line.as_str()).collect();
        format!("{}\n{}", stdout.join("\n"), self.process.log_text())
    }

    /// Ctrl-C (SIGINT): it disconnects the client and exits 0.
    fn disconnect(mut self) -> Result<()> {
        run("kill", &["-INT", &self.pid().to_string()])?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Some(status) = self.process.child.try_wait()? {
                ensure!(
                    status.success(),
                    "Ctrl-C exits 0: {status}, {}",
                    self.output()
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("still running 60 s after Ctrl-C: {}", self.output())
    }
}

/// One spawn of `connect --userspace`, timed: when its proxy listened, when the first
/// answer came through it.
struct FirstByte {
    listening: Duration,
    answered: Duration,
    attempts: usize,
}

/// Spawns `connect --userspace` (the client WAITING) and retries a request through its
/// proxy every 10 ms until the server answers; the process stays connected.
fn first_byte(connect: &Connect, server: Ipv4Addr, run: usize) -> Result<(FirstByte, Connected)> {
    let url = format!("http://{server}:8080/");
    let spawned = Instant::now();
    let mut connected = connect.spawn(&format!("connect-{run}.log"))?;
    let mut attempts = 0;
    loop {
        ensure!(
            connected.process.is_running(),
            "connect --userspace ended: {}",
            connected.output()
        );
        ensure!(
            spawned.elapsed() < Duration::from_secs(60),
            "no answer through the SOCKS5 proxy within 60 s: {}",
            connected.output()
        );
        attempts += 1;
        let output = Command::new("curl")
            .args(["--silent", "--fail", "--max-time", "5", "--socks5"])
            .arg(connect.socks5.to_string())
            .arg(&url)
            .stdin(Stdio::null())
            .output()?;
        // The body is a few bytes: curl's end is the first byte's arrival, within a
        // millisecond or two (curl's own start counts against the client).
        let answered = spawned.elapsed();
        if output.status.success() {
            ensure!(
                output.stdout == b"cluster",
                "the cluster's server answers: {:?}",
                String::from_utf8_lossy(&output.stdout)
            );
            let listening = connected
                .printed_at("Press Ctrl-C")
                .with_context(|| format!("answered, but not ready: {}", connected.output()))?
                - spawned;
            let figures = FirstByte {
                listening,
                answered,
                attempts,
            };
            return Ok((figures, connected));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `FIRST_BYTE_RUNS` spawns timed to the first byte, each but the last ended with Ctrl-C
/// (which leaves the client WAITING again); the last one stays connected.
async fn first_bytes(
    deployment: &Deployment,
    connect: &Connect,
    server: Ipv4Addr,
) -> Result<(Vec<FirstByte>, Connected)> {
    let mut runs = Vec::new();
    for run in 1..FIRST_BYTE_RUNS {
        let (figures, connected) = first_byte(connect, server, run)?;
        runs.push(figures);
        connected.disconnect()?;
        let state = deployment.clients.get(CLIENT).await?.state;
        ensure!(
            state == ClientState::Waiting,
            "after Ctrl-C the client is WAITING: {state}"
        );
    }
    let (figures, connected) = first_byte(connect, server, FIRST_BYTE_RUNS)?;
    runs.push(figures);
    Ok((runs, connected))
}

/// A download through the proxy shows up in Stowaway's count of what it sent the client:
/// the proxy carries the cluster's range through the tunnel, not straight from this
/// machine (which reaches the lab's cluster namespace too).
async fn carried_by_stowaway(
    deployment: &Deployment,
    route: &Route<'_>,
    server: Ipv4Addr,
) -> Result<()> {
    let series = format!("gefyra_stowaway_peer_sent_bytes_total{{client=\"{CLIENT}\"}}");
    let size = 16 << 20;
    // Stowaway's data plane refreshes its counts once a second; the counter restarts with a
    // new session (a drop: measure again).
    for _ in 0..3 {
        let before = deployment.stowaway.metric(&series).await?;
        transfer(
            &deployment.lab.dir,
            route,
            server,
            Direction::Download,
            size,
        )?;
        let mut after = before;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            after = deployment.stowaway.metric(&series).await?;
            if after >= before + size as f64 {
                return Ok(());
            }
        }
        ensure!(
            after < before,
            "Stowaway sent the client {} bytes in the 3 s after a download of {size} through the proxy: it bypassed the tunnel",
            after - before
        );
    }
    bail!("Stowaway's count for {CLIENT} kept restarting")
}

/// Where curl runs and which process carries its traffic into the tunnel.
struct Route<'a> {
    /// The namespace curl runs in (`None`: this one).
    netns: Option<&'a str>,
    /// The proxy curl goes through.
    socks5: Option<SocketAddr>,
    /// The client's tunnel process (wireguard-go; kubectl-gefyra).
    client: u32,
}

#[derive(Clone, Copy)]
enum Direction {
    Download,
    Upload,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Download => "download",
            Direction::Upload => "upload",
        }
    }
}

/// One transfer: bytes, seconds (curl's time_total), the client process's CPU seconds
/// meanwhile and curl's own.
struct Transfer {
    bytes: f64,
    seconds: f64,
    client_cpu: f64,
    curl_cpu: f64,
}

/// Downloads `/bytes/SIZE` from, or uploads SIZE bytes (a sparse file) to, the server by
/// `route`.
fn transfer(
    dir: &Path,
    route: &Route,
    server: Ipv4Addr,
    direction: Direction,
    size: u64,
) -> Result<Transfer> {
    let mut args: Vec<String> = [
        "--silent",
        "--show-error",
        "--fail",
        "--max-time",
        "600",
        "-w",
        "\n%{size_download} %{size_upload} %{time_total}",
    ]
    .map(String::from)
    .to_vec();
    if let Some(proxy) = route.socks5 {
        args.extend(["--socks5".to_string(), proxy.to_string()]);
    }
    let upload = dir.join("upload");
    match direction {
        Direction::Download => args.extend([
            "-o".to_string(),
            "/dev/null".to_string(),
            format!("http://{server}:8080/bytes/{size}"),
        ]),
        Direction::Upload => {
            std::fs::File::create(&upload)?.set_len(size)?;
            args.extend(
                [
                    "-T",
                    upload.to_str().context("a UTF-8 path")?,
                    "-X",
                    "POST",
                    // No 100-continue: the lab's server does not send one.
                    "-H",
                    "Expect:",
                ]
                .map(String::from),
            );
            args.push(format!("http://{server}:8080/"));
        }
    }
    let mut command = match route.netns {
        Some(netns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", netns, "sh"]);
            command
        }
        None => Command::new("sh"),
    };
    command
        .args(["-c", CURL_TIMED, "sh"])
        .args(&args)
        .stdin(Stdio::null());
    let before = cpu_seconds(route.client)?;
    let output = command.output().context("running curl")?;
    let client_cpu = cpu_seconds(route.client)? - before;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "curl {args:?} ({}): {stderr}",
        output.status
    );
    let (body, written) = stdout.rsplit_once('\n').context("curl's -w line")?;
    let figures: Vec<f64> = written
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("curl's -w line: {written:?}"))?;
    let [downloaded, uploaded, seconds] = figures[..] else {
        bail!("curl's -w line: {written:?}");
    };
    let bytes = match direction {
        Direction::Download => downloaded,
        Direction::Upload => {
            ensure!(
                body.trim() == size.to_string(),
                "the server received {body:?} of {size} bytes"
            );
            uploaded
        }
    };
    ensure!(
        bytes == size as f64,
        "curl moved {bytes} of {size} bytes ({})",
        direction.name()
    );
    Ok(Transfer {
        bytes,
        seconds,
        client_cpu,
        curl_cpu: children_cpu(&stderr)?,
    })
}

/// The children's user + system seconds from the last line `times` printed
/// (`0m1.23s 0m0.45s`).
fn children_cpu(stderr: &str) -> Result<f64> {
    let line = stderr.lines().last().context("curl's CPU time (times)")?;
    line.split_whitespace()
        .map(|field| {
            let (minutes, seconds) = field
                .strip_suffix('s')
                .and_then(|field| field.split_once('m'))
                .with_context(|| format!("a `times` field: {field:?}"))?;
            Ok(minutes.parse::<f64>()? * 60.0 + seconds.parse::<f64>()?)
        })
        .sum()
}

/// Medians of one path's measured transfers.
struct Figures {
    bits_per_second: f64,
    client_per_gib: f64,
    with_curl_per_gib: f64,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

impl Figures {
    fn of(transfers: &[Transfer]) -> Self {
        let each =
            |figure: &dyn Fn(&Transfer) -> f64| median(transfers.iter().map(figure).collect());
        Self {
            bits_per_second: each(&|t| t.bytes * 8.0 / t.seconds),
            client_per_gib: each(&|t| t.client_cpu / (t.bytes / GIB)),
            with_curl_per_gib: each(&|t| (t.client_cpu + t.curl_cpu) / (t.bytes / GIB)),
        }
    }
}

/// One direction: the baseline's figures and the userspace client's.
struct Row {
    direction: Direction,
    size: [u64; 2],
    figures: [Figures; 2],
}

/// Sizes each path's transfer to about `seconds` by a warm-up, then alternates the two
/// for `ROUNDS` rounds.
fn throughput(
    dir: &Path,
    routes: &[Route; 2],
    server: Ipv4Addr,
    direction: Direction,
    seconds: f64,
) -> Result<Row> {
    let mut size = [0u64; 2];
    for (route, size) in routes.iter().zip(&mut size) {
        let warm = transfer(dir, route, server, direction, WARM_UP)?;
        let rate = warm.bytes / warm.seconds;
        *size = ((rate * seconds) as u64).clamp(WARM_UP, 16 << 30) >> 20 << 20;
    }
    let mut transfers: [Vec<Transfer>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (index, route) in routes.iter().enumerate() {
            transfers[index].push(transfer(dir, route, server, direction, size[index])?);
        }
    }
    Ok(Row {
        direction,
        size,
        figures: transfers.map(|transfers| Figures::of(&transfers)),
    })
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn print_throughput(rows: &[Row], seconds: f64) {
    println!(
        "== One TCP stream by curl (HTTP), {ROUNDS} rounds of ~{seconds} s each way, medians; MTU {MTU} both"
    );
    println!(
        "   baseline: a wireguard-go peer, kernel TUN (in a netns)   userspace: connect --userspace, curl --socks5"
    );
    println!(
        "   CPU-s/GiB: user + system of the client process (wireguard-go; kubectl-gefyra), then with curl's; softirq (the baseline's TUN, routing and TCP; the proxy's loopback) counted for neither"
    );
    for row in rows {
        let [theirs, ours] = &row.figures;
        let throughput = ours.bits_per_second / theirs.bits_per_second;
        let cpu = ours.client_per_gib / theirs.client_per_gib;
        let with_curl = ours.with_curl_per_gib / theirs.with_curl_per_gib;
        println!(
            "{:<9} baseline {:>5.2} Gbit/s {:>5.2} CPU-s/GiB (with curl {:>5.2}; {} MiB)   userspace {:>5.2} Gbit/s {:>5.2} CPU-s/GiB (with curl {:>5.2}; {} MiB)   ratio throughput {throughput:.2} (aim >= 0.8: {})  CPU/GiB {cpu:.2} (aim <= 1.0: {})  with curl {with_curl:.2}",
            row.direction.name(),
            theirs.bits_per_second / 1e9,
            theirs.client_per_gib,
            theirs.with_curl_per_gib,
            row.size[0] >> 20,
            ours.bits_per_second / 1e9,
            ours.client_per_gib,
            ours.with_curl_per_gib,
            row.size[1] >> 20,
            verdict(throughput >= 0.8),
            verdict(cpu <= 1.0),
        );
    }
}

fn print_first_bytes(runs: &[FirstByte]) {
    println!(
        "== Time to first byte: connect --userspace spawned with the client WAITING, a request through its SOCKS5 proxy every 10 ms"
    );
    for (index, run) in runs.iter().enumerate() {
        println!(
            "run {}: proxy listening after {:.3} s (the connect through the API), first answer after {:.3} s ({} attempts)",
            index + 1,
            run.listening.as_secs_f64(),
            run.answered.as_secs_f64(),
            run.attempts
        );
    }
    let answered: Vec<f64> = runs.iter().map(|run| run.answered.as_secs_f64()).collect();
    let worst = answered.iter().copied().fold(0.0, f64::max);
    let over = answered.iter().filter(|seconds| **seconds >= 1.0).count();
    let middle = median(answered);
    println!(
        "first byte: median {middle:.3} s (aim < 1 s: {}), worst {worst:.3} s; {over} of {} runs at 1 s or more",
        verdict(middle < 1.0),
        runs.len()
    );
}
