//! A network lab in Linux network namespaces: a "cluster" namespace with services, real
//! WireGuard peers (Debian's `wireguard-go` + `wg`) each in a namespace of its own, and
//! Stowaway running in the root namespace as an unprivileged user. Needs root (for `ip
//! netns`); everything made is removed on drop.
//!
//! Addresses of slot K (one slot per lab, taken with an atomic mkdir):
//! - cluster namespace `gfc-K`: 10.77.K.2/24 (root side 10.77.K.1)
//! - peer N in `gfp-K-N`: 10.78.K.(4N+2)/30 (root side 10.78.K.(4N+1))

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use kube::config::Kubeconfig;

use gefyra_api::connection::{ProviderConfig, WireGuardKey};
use gefyra_api::wireguard::{ConfigFormat, TunnelConfig};
use gefyra_api::{ClientState, GefyraClient};
use ipnet::IpNet;
use kube::Api;
use serde_json::{Value, json};

use crate::{
    Cluster, Operator, create_client, eventually, free_port, install_crd, sibling_binary,
    wait_for_ready, wait_for_state,
};

/// The user Stowaway runs as (nobody): no root, no capabilities.
pub const UNPRIVILEGED: u32 = 65_534;
const SLOTS: &str = "/tmp/gefyra-lab-slots";

/// Runs a command to completion; its stdout, or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The `lab` helper binary (services and probes), built with the tests.
pub fn lab_binary() -> PathBuf {
    sibling_binary("lab")
}

/// `program` run as nobody: no groups, no capabilities, and gone with the test, even when
/// the test is killed.
pub fn unprivileged(program: &Path) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args([
            &format!("--reuid={UNPRIVILEGED}"),
            &format!("--regid={UNPRIVILEGED}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--pdeathsig=SIGKILL",
            "--",
        ])
        .arg(program);
    command
}

/// A child process killed (and reaped) on drop.
pub struct Process {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(command: &mut Command, log: PathBuf) -> Result<Self> {
        let file = std::fs::File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        Ok(Self { child, log })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Lab {
    pub slot: u8,
    namespaces: Vec<String>,
    links: Vec<String>,
    processes: Vec<Process>,
    /// WireGuard interfaces whose wireguard-go logs into `dir` (`<interface>.log`).
    wireguard_interfaces: Vec<String>,
    /// /etc/netns/<netns> directories (resolv.conf for `ip netns exec`).
    resolvers: Vec<PathBuf>,
    pub dir: PathBuf,
}

/// One WireGuard peer in its own namespace.
pub struct Peer {
    pub netns: String,
    /// Its WireGuard interface.
    pub interface: String,
    /// Where the peer reaches Stowaway (the root side of its link).
    pub gateway: Ipv4Addr,
    /// The peer's own address on that link (Stowaway sees it as the peer's endpoint).
    pub address: Ipv4Addr,
}

impl Lab {
    pub fn new() -> Result<Self> {
        ensure!(
            run("id", &["-u"])?.trim() == "0",
            "the network lab needs root (ip netns); run the tests as root"
        );
        std::fs::create_dir_all(SLOTS)?;
        let slot = (1..=250u8)
            .find(|slot| std::fs::create_dir(Path::new(SLOTS).join(slot.to_string())).is_ok())
            .context("no free lab slot in /tmp/gefyra-lab-slots")?;
        let dir = std::env::temp_dir().join(format!("gefyra-lab-{slot}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut lab = Self {
            slot,
            namespaces: Vec::new(),
            links: Vec::new(),
            processes: Vec::new(),
            wireguard_interfaces: Vec::new(),
            resolvers: Vec::new(),
            dir,
        };
        let cluster = lab.cluster_netns();
        lab.link(
            &cluster,
            "gfc",
            lab.cluster_gateway(),
            lab.cluster_address(),
            24,
        )?;
        Ok(lab)
    }

    pub fn cluster_netns(&self) -> String {
        format!("gfc-{}", self.slot)
    }

    pub fn cluster_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.slot, 1)
    }

    /// The cluster namespace's address (its services listen here).
    pub fn cluster_address(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.slot, 2)
    }

    pub fn cluster_subnet(&self) -> String {
        format!("10.77.{}.0/24", self.slot)
    }

    /// A namespace `netns` joined to the root namespace by a veth pair (`eth0` inside).
    fn link(
        &mut self,
        netns: &str,
        prefix: &str,
        outside: Ipv4Addr,
        inside: Ipv4Addr,
        length: u8,
    ) -> Result<()> {
        let outer = format!("{prefix}{}x{}", self.slot, self.namespaces.len());
        run("ip", &["netns", "add", netns])?;
        self.namespaces.push(netns.to_string());
        run(
            "ip",
            &[
                "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", netns,
            ],
        )?;
        self.links.push(outer.clone());
        run(
            "ip",
            &["addr", "add", &format!("{outside}/{length}"), "dev", &outer],
        )?;
        run("ip", &["link", "set", &outer, "up"])?;
        run(
            "ip",
            &[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{inside}/{length}"),
                "dev",
                "eth0",
            ],
        )?;
        run("ip", &["-n", netns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", netns, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n",
                netns,
                "route",
                "add",
                "default",
                "via",
                &outside.to_string(),
            ],
        )?;
        Ok(())
    }

    /// A namespace of this lab (removed with it), loopback up.
    pub fn add_netns(&mut self, netns: &str) -> Result<()> {
        run("ip", &["netns", "add", netns])?;
        self.namespaces.push(netns.to_string());
        run("ip", &["-n", netns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A veth pair between two namespaces of this lab, `a`'s end `address_a/length`, `b`'s
    /// end `address_b/length`; the ends are named `name` in both.
    pub fn wire(
        &mut self,
        (a, address_a): (&str, Ipv4Addr),
        (b, address_b): (&str, Ipv4Addr),
        name: &str,
        length: u8,
    ) -> Result<()> {
        let temporary = format!("gft{}x{}", self.slot, self.namespaces.len());
        run(
            "ip",
            &[
                "-n", a, "link", "add", name, "type", "veth", "peer", "name", &temporary, "netns",
                b,
            ],
        )?;
        run("ip", &["-n", b, "link", "set", &temporary, "name", name])?;
        for (netns, address) in [(a, address_a), (b, address_b)] {
            run(
                "ip",
                &[
                    "-n",
                    netns,
                    "addr",
                    "add",
                    &format!("{address}/{length}"),
                    "dev",
                    name,
                ],
            )?;
            run("ip", &["-n", netns, "link", "set", name, "up"])?;
        }
        Ok(())
    }

    /// What a failing test shows of the peer in `netns`: `wg show` and the logs of every
    /// wireguard-go in the lab (verbose: handshakes sent, received and refused).
    pub fn peer_report(&self, netns: &str) -> String {
        let mut report = format!("peer in {netns}:\n");
        match self.exec_in(netns, "wg", &["show"]) {
            Ok(shown) => report.push_str(&shown),
            Err(error) => report.push_str(&format!("wg show failed: {error:#}")),
        }
        for interface in &self.wireguard_interfaces {
            let log = std::fs::read_to_string(self.dir.join(format!("{interface}.log")));
            report.push_str(&format!(
                "\n--- wireguard-go {interface}:\n{}",
                log.unwrap_or_default()
            ));
        }
        report
    }

    /// Starts wireguard-go for `interface` in `netns` and waits for the interface.
    /// Starts wireguard-go for `interface` in `netns`; its process id (for its CPU time).
    pub fn wireguard_go(&mut self, netns: &str, interface: &str) -> Result<u32> {
        let wireguard_go = which("wireguard-go")?;
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig=SIGKILL", "ip", "netns", "exec", netns])
            .arg(&wireguard_go)
            .arg(interface)
            .env("WG_PROCESS_FOREGROUND", "1")
            .env("LOG_LEVEL", "verbose");
        let process = Process::spawn(&mut command, self.dir.join(format!("{interface}.log")))?;
        // setpriv and `ip netns exec` exec into wireguard-go: the child is wireguard-go.
        let pid = process.child.id();
        self.processes.push(process);
        self.wireguard_interfaces.push(interface.to_string());
        for _ in 0..100 {
            if run("ip", &["-n", netns, "link", "show", interface]).is_ok() {
                return Ok(pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("wireguard-go did not create {interface} in {netns}")
    }

    /// Starts a process inside `netns` (as root), kept until the lab is dropped.
    pub fn spawn_in(
        &mut self,
        netns: &str,
        name: &str,
        program: &Path,
        args: &[&str],
    ) -> Result<()> {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(program)
            .args(args);
        let process = Process::spawn(&mut command, self.dir.join(format!("{name}.log")))?;
        self.processes.push(process);
        Ok(())
    }

    /// Programs run in `netns` (by `ip netns exec`) resolve names through `nameserver`, as
    /// a developer's machine does with the tunnel's DNS address; removed with the lab.
    pub fn use_resolver(&mut self, netns: &str, nameserver: IpAddr) -> Result<()> {
        let dir = Path::new("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\n"),
        )?;
        self.resolvers.push(dir);
        Ok(())
    }

    /// Runs a command inside `netns` to completion.
    pub fn exec_in(&self, netns: &str, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", netns, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs the `lab` helper inside `netns`.
    pub fn probe(&self, netns: &str, args: &[&str]) -> Result<String> {
        let lab = lab_binary();
        self.exec_in(netns, lab.to_str().context("a UTF-8 path")?, args)
    }

    /// HTTP (`name` as its body) on :8080 and UDP echo on :7007 at `address` in `netns`.
    pub fn serve(&mut self, netns: &str, address: IpAddr, name: &str) -> Result<()> {
        let http = format!("{address}:8080");
        let udp = format!("{address}:7007");
        self.spawn_in(
            netns,
            &format!("service-{name}"),
            &lab_binary(),
            &["serve", "--http", &http, "--udp-echo", &udp, "--name", name],
        )?;
        let tcp = SocketAddr::new(address, 8080);
        let lab = lab_binary();
        let lab = lab.to_str().context("a UTF-8 path")?.to_string();
        let netns = netns.to_string();
        std::thread::sleep(Duration::from_millis(50));
        for _ in 0..100 {
            if self
                .exec_in(&netns, &lab, &["http", &format!("http://{tcp}/")])
                .is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the service {name} at {tcp} did not come up")
    }

    /// dnsmasq in the cluster namespace on :53, answering `name` with `address`.
    pub fn serve_dns(&mut self, name: &str, address: Ipv4Addr) -> Result<SocketAddr> {
        let listen = self.cluster_address();
        let netns = self.cluster_netns();
        let pid_file = self.dir.join("dnsmasq.pid");
        self.spawn_in(
            &netns,
            "dnsmasq",
            Path::new("dnsmasq"),
            &[
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={listen}"),
                &format!("--address=/{name}/{address}"),
                &format!("--pid-file={}", pid_file.display()),
            ],
        )?;
        Ok(SocketAddr::new(IpAddr::V4(listen), 53))
    }

    /// A namespace with a real WireGuard peer (wireguard-go) configured from a client's
    /// providerConfig and its private key; traffic to the server address and the cluster
    /// subnet goes through the tunnel.
    pub fn peer(&mut self, config: &PeerConfig, stowaway_port: u16) -> Result<Peer> {
        let peer = self.new_peer()?;
        let tunnel = TunnelConfig {
            private_key: config.private_key,
            address: IpNet::from(config.address),
            mtu: None,
            server_public_key: config.server_public_key,
            preshared_key: Some(config.preshared_key),
            endpoint: format!("{}:{stowaway_port}", peer.gateway)
                .parse()
                .map_err(anyhow::Error::msg)?,
            allowed_ips: vec!["0.0.0.0/0".parse()?],
        };
        let file = self.dir.join(format!("{}.conf", peer.netns));
        write_secret(&file, &tunnel.render(ConfigFormat::Wg))?;
        self.configure_peer(&peer, &file, &tunnel.address.to_string())?;
        Ok(peer)
    }

    /// A namespace linked to the root namespace with a WireGuard interface (wireguard-go)
    /// that is not configured yet.
    pub fn new_peer(&mut self) -> Result<Peer> {
        let index = self.namespaces.len() as u8;
        let netns = format!("gfp-{}-{index}", self.slot);
        let gateway = Ipv4Addr::new(10, 78, self.slot, 4 * index + 1);
        let inside = Ipv4Addr::new(10, 78, self.slot, 4 * index + 2);
        self.link(&netns, "gfp", gateway, inside, 30)?;
        // wireguard-go's control socket is /var/run/wireguard/<interface>.sock, shared by
        // every namespace: each peer's interface needs a name of its own.
        let interface = format!("gwg{}x{index}", self.slot);
        self.wireguard_go(&netns, &interface)?;
        Ok(Peer {
            netns,
            interface,
            gateway,
            address: inside,
        })
    }

    /// Configures a peer's interface from a `wg setconf` file, gives it `address` (with its
    /// prefix) and routes the server address and the cluster subnet through it.
    pub fn configure_peer(&self, peer: &Peer, wg_config: &Path, address: &str) -> Result<()> {
        let (netns, interface) = (peer.netns.as_str(), peer.interface.as_str());
        self.exec_in(netns, "wg", &["setconf", interface, path_str(wg_config)?])?;
        run(
            "ip",
            &["-n", netns, "addr", "add", address, "dev", interface],
        )?;
        run(
            "ip",
            &["-n", netns, "link", "set", interface, "mtu", "1420", "up"],
        )?;
        for route in ["192.168.99.1/32".to_string(), self.cluster_subnet()] {
            run(
                "ip",
                &["-n", netns, "route", "add", &route, "dev", interface],
            )?;
        }
        Ok(())
    }

    /// The root-side address of peer link `gateway` is where Stowaway's forwards are
    /// reached from the cluster namespace too (via its default route).
    pub fn kubeconfig_for(&self, cluster: &Cluster, token: &str) -> Result<PathBuf> {
        let mut raw = Kubeconfig::read_from(&cluster.kubeconfig)?;
        for named in &mut raw.clusters {
            if let Some(cluster) = named.cluster.as_mut()
                && let Some(path) = cluster.certificate_authority.take()
            {
                let pem = std::fs::read(&path)?;
                cluster.certificate_authority_data =
                    Some(base64::engine::general_purpose::STANDARD.encode(pem));
            }
        }
        for named in &mut raw.auth_infos {
            named.auth_info = Some(kube::config::AuthInfo {
                token: Some(token.to_string().into()),
                ..kube::config::AuthInfo::default()
            });
        }
        let path = self.dir.join("stowaway.kubeconfig");
        write_secret(&path, &serde_saphyr::to_string(&raw)?)?;
        std::os::unix::fs::chown(&path, Some(UNPRIVILEGED), Some(UNPRIVILEGED))?;
        Ok(path)
    }

    /// Starts Stowaway in the root namespace as an unprivileged user without capabilities,
    /// on WireGuard `port` (a free one if `None`), its bridges port on a free port of every
    /// address (unless `extra` says where).
    pub fn stowaway(
        &mut self,
        kubeconfig: &Path,
        namespace: &str,
        port: Option<u16>,
        extra: &[&str],
    ) -> Result<Stowaway> {
        let port = match port {
            Some(port) => port,
            None => free_udp_port()?,
        };
        let http_port = free_port();
        let bridges_port = free_port();
        let bridges_listen = format!("0.0.0.0:{bridges_port}");
        let mut bridges = vec!["--bridges-listen", bridges_listen.as_str()];
        if extra.contains(&"--bridges-listen") {
            bridges.clear();
        }
        let mut command = unprivileged(&stowaway_binary());
        command
            .args([
                "--namespace",
                namespace,
                "--listen",
                &format!("0.0.0.0:{port}"),
                "--http-address",
                &format!("127.0.0.1:{http_port}"),
            ])
            .args(bridges)
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,stowaway=debug,kube=warn");
        std::fs::set_permissions(
            &self.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let process = Process::spawn(
            &mut command,
            self.dir.join(format!("stowaway-{http_port}.log")),
        )?;
        Ok(Stowaway {
            process,
            port,
            http_port,
            bridges_port,
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.processes.clear();
        for link in &self.links {
            let _ = run("ip", &["link", "del", link]);
        }
        for netns in &self.namespaces {
            let _ = run("ip", &["netns", "del", netns]);
        }
        for resolver in &self.resolvers {
            let _ = std::fs::remove_dir_all(resolver);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir(Path::new(SLOTS).join(self.slot.to_string()));
    }
}

/// A running Stowaway.
pub struct Stowaway {
    pub process: Process,
    /// Its WireGuard UDP port.
    pub port: u16,
    pub http_port: u16,
    /// Its bridges port (TCP, every address), unless the test said otherwise.
    pub bridges_port: u16,
}

impl Stowaway {
    pub async fn http_get(&self, path: &str) -> Result<(u16, String)> {
        crate::http_get(self.http_port, path).await
    }

    /// The value of one metric series (`name{labels}` exactly as exposed), 0 if absent.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        crate::metric(self.http_port, series).await
    }

    pub async fn wait_ready(&mut self) -> Result<()> {
        let log = self.process.log.clone();
        eventually("Stowaway is ready", Duration::from_secs(60), || async {
            let (status, _) = self.http_get("/readyz").await.unwrap_or((0, String::new()));
            Ok((status == 200).then_some(()))
        })
        .await
        .with_context(|| {
            format!(
                "Stowaway log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
    }
}

/// What a peer needs from its client's providerConfig (and its own private key).
pub struct PeerConfig {
    pub private_key: WireGuardKey,
    pub preshared_key: WireGuardKey,
    pub server_public_key: WireGuardKey,
    pub address: IpAddr,
}

impl PeerConfig {
    /// From an ACTIVE client's providerConfig; `private_key` when the client kept its own.
    pub fn of(client: &gefyra_api::GefyraClient, private_key: Option<&str>) -> Result<Self> {
        let config = ProviderConfig::parse(
            client
                .provider_config
                .as_ref()
                .context("an ACTIVE client has a providerConfig")?,
        )?;
        Ok(Self {
            private_key: match private_key {
                Some(key) => key.parse().map_err(anyhow::Error::msg)?,
                None => config
                    .private_key
                    .context("providerConfig has Interface.PrivateKey")?,
            },
            preshared_key: config.preshared_key,
            server_public_key: config.server_public_key,
            address: config.address,
        })
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("a UTF-8 path")
}

/// The CPU time (user + system) process `pid` has spent, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("a /proc stat line")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |field: usize| -> Result<f64> {
        Ok(fields
            .get(field - 3)
            .context("a /proc stat field")?
            .parse::<f64>()?)
    };
    // /proc reports in USER_HZ, 100 on Linux whatever the kernel's tick.
    Ok((ticks(14)? + ticks(15)?) / 100.0)
}

/// The peak resident memory of process `pid`, MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Writes a file only its owner can read.
pub fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn which(program: &str) -> Result<PathBuf> {
    let found = run("sh", &["-c", &format!("command -v {program}")])?;
    Ok(PathBuf::from(found.trim()))
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("0.0.0.0:0")?.local_addr()?.port())
}

/// The Stowaway binary built next to the tests (`make e2e` builds it).
pub fn stowaway_binary() -> PathBuf {
    crate::workspace_binary("stowaway", "stowaway", "GEFYRA_STOWAWAY_BINARY")
}

/// Applies Stowaway's own ServiceAccount, Role and RoleBinding (`stowaway rbac`) in
/// `namespace` and mints a token for it.
pub async fn stowaway_identity(cluster: &Cluster, namespace: &str) -> Result<String> {
    let yaml = run(
        path_str(&stowaway_binary())?,
        &["rbac", "--namespace", namespace],
    )?;
    crate::apply_identity(cluster.admin()?, namespace, &yaml).await?;
    cluster.mint_token(namespace, "gefyra-stowaway", 3600).await
}

pub const DNS_NAME: &str = "web.lab.test";

pub async fn connect(
    api: &Api<GefyraClient>,
    name: &str,
    parameter: Value,
) -> Result<GefyraClient> {
    let disconnect = parameter.is_null();
    crate::set_provider_parameter(api, name, parameter).await?;
    if disconnect {
        wait_for_state(api, name, ClientState::Waiting).await
    } else {
        wait_for_state(api, name, ClientState::Active).await
    }
}

/// A key pair (private, public) whose peer Stowaway's data plane gives worker `worker` of
/// `count`.
pub fn key_pair_of_worker(worker: usize, count: usize) -> Result<(String, String)> {
    for _ in 0..1_000 {
        let (private, public) = key_pair();
        let bytes: [u8; 32] = base64::engine::general_purpose::STANDARD
            .decode(&public)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("a 32-byte key"))?;
        if stowaway::shard::worker_of_key(&bytes, count) == worker {
            return Ok((private, public));
        }
    }
    anyhow::bail!("no key for worker {worker} of {count} in 1,000 tries")
}

/// A fresh key pair, base64: (private, public).
pub fn key_pair() -> (String, String) {
    let pair = gefyra_api::wireguard::generate_key_pair();
    (pair.private, pair.public)
}

/// The whole system in a lab: services (HTTP, UDP echo, DNS) in the cluster namespace, the
/// operator, and Stowaway with its own Role, unprivileged.
pub struct Deployment {
    pub lab: Lab,
    pub clients: Api<GefyraClient>,
    pub stowaway: Stowaway,
    /// How Stowaway was started (for restarts): its kubeconfig and arguments.
    stowaway_kubeconfig: PathBuf,
    stowaway_arguments: Vec<String>,
    pub operator: Operator,
}

impl Deployment {
    /// Starts it all in a fresh namespace named after `test`; `extra` goes to Stowaway.
    pub async fn start(cluster: &Cluster, test: &str, extra: &[String]) -> Result<Self> {
        install_crd(cluster).await?;
        let ns = cluster.namespace(test).await?;
        let admin = cluster.admin()?;
        let mut lab = Lab::new()?;
        let cluster_address = lab.cluster_address();
        let cluster_netns = lab.cluster_netns();
        lab.serve(&cluster_netns, IpAddr::V4(cluster_address), "cluster")?;
        let resolver = lab.serve_dns(DNS_NAME, cluster_address)?;
        let operator = Operator::start(cluster, &ns, &[])?;
        let token = stowaway_identity(cluster, &ns).await?;
        let kubeconfig = lab.kubeconfig_for(cluster, &token)?;
        let mut arguments = vec!["--resolver".to_string(), resolver.to_string()];
        arguments.extend(extra.iter().cloned());
        let borrowed: Vec<&str> = arguments.iter().map(String::as_str).collect();
        let stowaway = lab.stowaway(&kubeconfig, &ns, None, &borrowed)?;
        let clients = Api::namespaced(admin, &ns);
        Ok(Self {
            lab,
            clients,
            stowaway,
            stowaway_kubeconfig: kubeconfig,
            stowaway_arguments: arguments,
            operator,
        })
    }

    /// Kills Stowaway outright and starts it again on the same WireGuard port.
    pub async fn restart_stowaway(&mut self) -> Result<()> {
        let port = self.stowaway.port;
        self.stowaway.process.child.kill()?;
        self.stowaway.process.child.wait()?;
        let namespace = self.clients.namespace().context("namespaced")?.to_string();
        let arguments: Vec<&str> = self.stowaway_arguments.iter().map(String::as_str).collect();
        self.stowaway = self.lab.stowaway(
            &self.stowaway_kubeconfig,
            &namespace,
            Some(port),
            &arguments,
        )?;
        self.stowaway.wait_ready().await
    }

    /// Restarts Stowaway (as `restart_stowaway`) with `flag` set to `value` instead of what
    /// it was given.
    pub async fn restart_stowaway_with(&mut self, flag: &str, value: &str) -> Result<()> {
        let mut arguments = Vec::new();
        let mut given = self.stowaway_arguments.iter();
        while let Some(argument) = given.next() {
            if argument == flag {
                given.next();
            } else {
                arguments.push(argument.clone());
            }
        }
        arguments.extend([flag.to_string(), value.to_string()]);
        self.stowaway_arguments = arguments;
        self.restart_stowaway().await
    }

    /// A client, connected with `parameter` (plus `publicKey` when it keeps its own key),
    /// and its real peer.
    pub async fn connected_peer(
        &mut self,
        name: &str,
        parameter: Value,
        own_key: bool,
    ) -> Result<Peer> {
        self.connected_peer_with_key(name, parameter, own_key.then(key_pair))
            .await
    }

    /// `connected_peer`, keeping this key pair (private, public) when one is given.
    pub async fn connected_peer_with_key(
        &mut self,
        name: &str,
        parameter: Value,
        key_pair: Option<(String, String)>,
    ) -> Result<Peer> {
        let admin = self.clients.clone().into_client();
        let ns = self.clients.namespace().context("namespaced")?.to_string();
        create_client(admin, &ns, name).await?;
        wait_for_ready(&self.clients, name).await?;
        let mut parameter = parameter;
        let private = match key_pair {
            Some((private, public)) => {
                parameter["publicKey"] = json!(public);
                Some(private)
            }
            None => None,
        };
        let active = connect(&self.clients, name, parameter).await?;
        let config = PeerConfig::of(&active, private.as_deref())?;
        let peer = self.lab.peer(&config, self.stowaway.port)?;
        Ok(peer)
    }

    /// The peer reaches 192.168.99.1 (ping, DNS) and the cluster (HTTP, UDP).
    pub async fn reaches_the_cluster(&self, netns: &str) -> Result<()> {
        let lab = &self.lab;
        eventually(
            &format!("{netns} pings 192.168.99.1"),
            Duration::from_secs(30),
            || async {
                Ok(lab
                    .exec_in(netns, "ping", &["-c", "1", "-W", "1", "192.168.99.1"])
                    .ok())
            },
        )
        .await
        .with_context(|| self.stowaway.process.log_text())
        .with_context(|| lab.peer_report(netns))?;
        let resolved = lab.probe(netns, &["dns", "192.168.99.1:53", DNS_NAME])?;
        ensure!(
            resolved == lab.cluster_address().to_string(),
            "{netns} resolves {DNS_NAME} via 192.168.99.1: {resolved}"
        );
        let service = lab.cluster_address();
        let body = lab.probe(netns, &["http", &format!("http://{service}:8080/")])?;
        ensure!(
            body == "cluster",
            "HTTP from the cluster namespace: {body:?}"
        );
        let echoed = lab.probe(netns, &["udp", &format!("{service}:7007"), "hello"])?;
        ensure!(echoed == "hello", "UDP echo: {echoed:?}");
        Ok(())
    }
}
