//! The process around the data plane: the command line and what it starts — the HTTP
//! endpoints (`http`), the data plane, the peer sync and status write-back (`peer_sync`).

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use gefyra_api::GefyraClient;
use gefyra_api::rbac::identity_yaml;
use kube::{Api, Client};

use crate::bridges::{self, Bridges};
use crate::dataplane::{self, DataPlane, Forward, Shared};
use crate::http::{Health, serve};
use crate::metrics::Metrics;
use crate::own_services;
use crate::peer_sync::{keep_peers, server_key, write_status};
use crate::policy::{EgressPolicy, GlobalLimits, PeerLimits, Share};
use crate::rbac::stowaway_rules;

#[derive(Parser, Debug)]
#[command(
    name = "stowaway",
    version,
    about = "Stowaway: a rootless userspace WireGuard endpoint whose peers are the ACTIVE GefyraClients"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print Stowaway's ServiceAccount, Role (read-only on clients and bridges, status
    /// patch, its key Secret) and RoleBinding for --namespace.
    Rbac {
        #[arg(long, default_value = "gefyra-stowaway")]
        name: String,
        #[arg(long, default_value = gefyra_api::client::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Run Stowaway (the default).
    Run,
}

pub use gefyra_process::LogFormat;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The namespace whose GefyraClients are the peers.
    #[arg(long, env = "GEFYRA_NAMESPACE", default_value = gefyra_api::client::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// The WireGuard UDP socket.
    #[arg(long, env = "STOWAWAY_LISTEN", default_value = "0.0.0.0:31820")]
    pub listen: SocketAddr,
    /// Where /livez, /readyz and /metrics are served.
    #[arg(long, env = "STOWAWAY_HTTP_ADDRESS", default_value = "0.0.0.0:8081")]
    pub http_address: SocketAddr,
    /// Export the per-peer series (bytes each way, last handshake), labelled with client
    /// names: three series per ACTIVE client; `false` for a fleet too large for that.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub per_client_metrics: bool,
    /// Where DNS queries to 192.168.99.1 go (ADDRESS or ADDRESS:PORT); default: the first
    /// nameserver in --resolv-conf.
    #[arg(long, env = "STOWAWAY_RESOLVER")]
    pub resolver: Option<String>,
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// A TCP port on the cluster side whose connections go through the tunnel to an
    /// address inside a client's range: PORT=ADDRESS:PORT (repeatable).
    #[arg(long = "forward")]
    pub forwards: Vec<Forward>,
    /// The bridges port: routers send the connections of the GefyraBridges here, each
    /// preceded by the line `GEFYRA-BRIDGE/1 <bridge> <port>`; an empty value: none.
    #[arg(long, env = "STOWAWAY_BRIDGES_LISTEN", default_value = "0.0.0.0:8082")]
    pub bridges_listen: OptionalAddress,
    /// The tunnel MTU.
    #[arg(long, default_value_t = 1420)]
    pub mtu: usize,
    /// Seconds a UDP flow lives without traffic.
    #[arg(long, default_value_t = 60)]
    pub udp_idle_timeout: u64,
    /// Seconds to reach a peer's destination before its connection is reset.
    #[arg(long, default_value_t = 10)]
    pub dial_timeout: u64,
    /// Seconds between writes of `status.wireguard`.
    #[arg(long, default_value_t = 30)]
    pub status_interval: u64,
    /// Data-plane workers (threads), peers shared out among them; 0: one per CPU this
    /// process may use, at most 8.
    #[arg(long, env = "STOWAWAY_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// Handshakes per second (all peers together) before cookies are required.
    #[arg(long, default_value_t = 100)]
    pub handshakes_per_second: u64,
    /// A range peers may never reach (repeatable), on top of the metadata services. Loopback,
    /// unspecified, link-local, multicast, broadcast and Stowaway's own addresses and
    /// Services are refused whatever is given.
    #[arg(long = "deny", value_name = "CIDR")]
    pub deny: Vec<IpNet>,
    /// Deny the cloud metadata services outside link-local (100.100.100.200,
    /// fd00:ec2::254, 168.63.129.16); `false` opens them.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub deny_metadata_services: bool,
    /// With any: peers may reach only these ranges (repeatable); `--deny` still applies.
    #[arg(long = "allow", value_name = "CIDR")]
    pub allow: Vec<IpNet>,
    /// TCP flows one peer may hold at once.
    #[arg(long, default_value_t = 256)]
    pub peer_max_tcp_flows: usize,
    /// TCP connections of one peer whose cluster-side dial may be under way at once.
    #[arg(long, default_value_t = 64)]
    pub peer_max_dials: usize,
    /// UDP flows (source, destination pairs, each a socket) one peer may hold at once.
    #[arg(long, default_value_t = 256)]
    pub peer_max_udp_flows: usize,
    /// Buffer space one peer's TCP flows may reserve (about 1.06 MiB each).
    #[arg(long, default_value_t = 128 << 20)]
    pub peer_max_buffer_bytes: usize,
    /// TCP and UDP flows of all peers together; 0: the descriptor limit less 256.
    #[arg(long, default_value_t = 0)]
    pub max_flows: usize,
    /// Buffer space all peers' TCP flows may reserve together.
    #[arg(long, default_value_t = 384 << 20)]
    pub max_buffer_bytes: usize,
    /// Each peer may hold only its share of --max-flows and --max-buffer-bytes (divided by
    /// the peers with a handshake in the last 5 minutes), but never less than this many
    /// flows (and the buffer space of as many TCP flows).
    #[arg(long, default_value_t = 16)]
    pub peer_min_share_flows: usize,
    /// Seconds a TCP flow lives while its peer sends nothing; keep-alives go out every 30 s,
    /// so a live peer (an idle SSH session too) always answers within that.
    #[arg(long, default_value_t = 300)]
    pub tcp_idle_timeout: u64,
    /// Seconds a TCP flow lives while no payload moves either way, even though its peer
    /// answers the keep-alives (so idle connections cannot hold their peer's share for
    /// ever).
    #[arg(long, default_value_t = 1_800)]
    pub tcp_inactive_timeout: u64,
    /// Seconds a TCP connection may take to be established.
    #[arg(long, default_value_t = 10)]
    pub tcp_handshake_timeout: u64,
    #[arg(long, value_enum, env = "GEFYRA_LOG_FORMAT", default_value = "plain")]
    pub log_format: LogFormat,
}

/// A listen address, or none (given as an empty value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddress(pub Option<SocketAddr>);

impl std::str::FromStr for OptionalAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(Self(None));
        }
        text.parse()
            .map(|address| Self(Some(address)))
            .map_err(|_| format!("{text:?} is not ADDRESS:PORT (nor empty, for none)"))
    }
}

/// The bridges port and the watch of the GefyraBridges it serves, if `listen` is given;
/// the port is bound here, so that a taken one fails the start.
async fn start_bridges(
    listen: Option<SocketAddr>,
    client: &Client,
    namespace: &str,
    handle: &dataplane::Handle,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let Some(listen) = listen else {
        tracing::info!("no bridges port (--bridges-listen is empty)");
        return Ok(Vec::new());
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the bridges port --bridges-listen {listen}"))?;
    tracing::info!(listen = %listener.local_addr()?, "bridges port listening");
    let known = Bridges::default();
    Ok(vec![
        tokio::spawn(bridges::keep_bridges(
            client.clone(),
            namespace.to_string(),
            known.clone(),
        )),
        tokio::spawn(bridges::serve(
            listener,
            known,
            handle.clone(),
            metrics.clone(),
        )),
    ])
}

/// The addresses of this network namespace's interfaces (the pod's): peers never reach
/// them, so neither Stowaway's own ports nor a sidecar's are open to the tunnel.
fn own_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let interfaces = nix::ifaddrs::getifaddrs()
        .map_err(|error| anyhow::anyhow!("listing this pod's addresses (getifaddrs): {error}"))?;
    let mut own: Vec<IpAddr> = interfaces
        .filter_map(|interface| {
            let address = interface.address?;
            address
                .as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect();
    own.sort();
    own.dedup();
    Ok(own)
}

/// Flows all peers may hold together when `--max-flows` is 0: the soft descriptor limit
/// less 256 for everything else (each flow holds one descriptor).
fn descriptor_budget() -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    usize::try_from(soft.saturating_sub(256))
        .unwrap_or(usize::MAX)
        .max(256)
}

/// The first `nameserver` of a resolv.conf.
pub fn first_nameserver(resolv_conf: &str) -> Option<IpAddr> {
    resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

fn resolver(args: &RunArgs) -> anyhow::Result<SocketAddr> {
    if let Some(text) = &args.resolver {
        return text
            .parse::<SocketAddr>()
            .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
            .with_context(|| format!("--resolver {text:?} is neither ADDRESS nor ADDRESS:PORT"));
    }
    let text = std::fs::read_to_string(&args.resolv_conf).with_context(|| {
        format!(
            "reading {} for the DNS resolver; pass --resolver",
            args.resolv_conf.display()
        )
    })?;
    let address = first_nameserver(&text).with_context(|| {
        format!(
            "{} names no nameserver; pass --resolver",
            args.resolv_conf.display()
        )
    })?;
    Ok(SocketAddr::new(address, 53))
}

pub async fn main(cli: Cli) -> anyhow::Result<()> {
    let args = cli.run;
    match cli.command {
        Some(Command::Rbac { name, namespace }) => {
            print!(
                "{}",
                identity_yaml(&name, &namespace, "gefyra-stowaway", stowaway_rules())
            );
            return Ok(());
        }
        Some(Command::Run) | None => {}
    }
    gefyra_process::init_logging(args.log_format);
    let config = dataplane::Config {
        listen: args.listen,
        resolver: resolver(&args)?,
        forwards: args.forwards.clone(),
        mtu: args.mtu,
        udp_idle: Duration::from_secs(args.udp_idle_timeout),
        dial_timeout: Duration::from_secs(args.dial_timeout),
        tcp_idle: Duration::from_secs(args.tcp_idle_timeout),
        tcp_inactive: Duration::from_secs(args.tcp_inactive_timeout),
        tcp_handshake: Duration::from_secs(args.tcp_handshake_timeout),
        handshakes_per_second: args.handshakes_per_second,
        egress: EgressPolicy::new(
            EgressPolicy::deny_list(&args.deny, args.deny_metadata_services),
            args.allow.clone(),
            own_addresses()?,
        ),
        peer_limits: PeerLimits {
            tcp_flows: args.peer_max_tcp_flows,
            dials: args.peer_max_dials,
            udp_flows: args.peer_max_udp_flows,
            buffer_bytes: args.peer_max_buffer_bytes,
        },
        global_limits: GlobalLimits {
            flows: match args.max_flows {
                0 => descriptor_budget(),
                flows => flows,
            },
            buffer_bytes: args.max_buffer_bytes,
            share_floor: Share {
                flows: args.peer_min_share_flows,
                buffer_bytes: args
                    .peer_min_share_flows
                    .saturating_mul(dataplane::TCP_FLOW_BUFFERS),
            },
        },
    };
    tracing::info!(
        deny = ?args.deny,
        deny_metadata_services = args.deny_metadata_services,
        allow = ?args.allow,
        own = ?config.egress.own(),
        peer_limits = ?config.peer_limits,
        global_limits = ?config.global_limits,
        "egress policy and limits"
    );
    let client = Client::try_default().await.map_err(|error| {
        anyhow::anyhow!(
            "cannot reach the Kubernetes API ({error}); set KUBECONFIG or run in-cluster"
        )
    })?;
    let metrics = Arc::new(Metrics::new(args.per_client_metrics));
    let workers = match args.workers {
        0 => crate::shard::default_workers(),
        workers => workers,
    };
    let shared = Arc::new(Shared::new(workers));
    let ready = Arc::new(AtomicBool::new(false));
    let health = Health {
        metrics: metrics.clone(),
        shared: shared.clone(),
        ready: ready.clone(),
    };
    let server = tokio::spawn(serve(args.http_address, health));

    let key = server_key(&client, &args.namespace).await?;
    // Refused from the first packet on if the API answers now; else as soon as it does.
    let own_services = own_services::fetch(&client, &args.namespace)
        .await
        .unwrap_or_default();
    tracing::info!(addresses = ?own_services, "Stowaway's own Services; their addresses are refused");
    let mut config = config;
    config.egress.set_own_services(own_services.clone());
    let (planes, handle) = DataPlane::bind(
        config.clone(),
        key,
        workers,
        shared.clone(),
        metrics.clone(),
    )?;
    tracing::info!(
        listen = %planes[0].local_addr()?,
        workers,
        resolver = %config.resolver,
        forwards = ?config.forwards,
        "WireGuard endpoint listening"
    );
    let mut plane = tokio::task::JoinSet::new();
    for worker in planes {
        plane.spawn_blocking(move || worker.run());
    }

    let clients: Api<GefyraClient> = Api::namespaced(client.clone(), &args.namespace);
    let peers_task = tokio::spawn(keep_peers(
        client.clone(),
        args.namespace.clone(),
        handle.clone(),
        metrics.clone(),
        ready,
    ));
    let services_task = tokio::spawn(own_services::keep_own_services(
        client.clone(),
        args.namespace.clone(),
        handle.clone(),
        own_services,
    ));
    let bridge_tasks = start_bridges(
        args.bridges_listen.0,
        &client,
        &args.namespace,
        &handle,
        &metrics,
    )
    .await?;
    let status_task = tokio::spawn(write_status(
        clients,
        shared,
        Duration::from_secs(args.status_interval.max(1)),
    ));

    let outcome = tokio::select! {
        _ = gefyra_process::shutdown_signal() => {
            tracing::info!("shutting down");
            handle.stop();
            while plane.join_next().await.is_some() {}
            Ok(())
        }
        // One worker ending ends the data plane.
        Some(ended) = plane.join_next() => match ended {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(anyhow::anyhow!("a data-plane worker failed: {error}")),
            Err(error) => Err(anyhow::anyhow!("a data-plane worker panicked: {error}")),
        },
        served = server => Err(anyhow::anyhow!("the HTTP server ended: {served:?}")),
    };
    peers_task.abort();
    services_task.abort();
    status_task.abort();
    for task in bridge_tasks {
        task.abort();
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resolver_is_the_first_nameserver() {
        let text = "# generated\nsearch gefyra.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver 10.96.0.11\noptions ndots:5\n";
        assert_eq!(first_nameserver(text), Some("10.96.0.10".parse().unwrap()));
        assert_eq!(first_nameserver("search x\n"), None);
    }

    #[test]
    fn the_bridges_port_is_an_address_or_none() {
        let cli = Cli::try_parse_from(["stowaway"]).unwrap();
        assert_eq!(
            cli.run.bridges_listen.0,
            Some("0.0.0.0:8082".parse().unwrap())
        );
        let cli = Cli::try_parse_from(["stowaway", "--bridges-listen", ""]).unwrap();
        assert_eq!(cli.run.bridges_listen.0, None);
        let cli = Cli::try_parse_from(["stowaway", "--bridges-listen", "127.0.0.1:9"]).unwrap();
        assert_eq!(
            cli.run.bridges_listen.0,
            Some("127.0.0.1:9".parse().unwrap())
        );
        assert!(Cli::try_parse_from(["stowaway", "--bridges-listen", "8082"]).is_err());
    }

    #[test]
    fn forwards_parse_and_name_what_is_wrong() {
        let forward: Forward = "18080=192.168.200.1:8080".parse().unwrap();
        assert_eq!(forward.listen, "0.0.0.0:18080".parse().unwrap());
        assert_eq!(forward.target, "192.168.200.1:8080".parse().unwrap());
        let forward: Forward = "127.0.0.1:9=10.0.0.1:80".parse().unwrap();
        assert_eq!(forward.listen, "127.0.0.1:9".parse().unwrap());
        assert!(
            "8080"
                .parse::<Forward>()
                .unwrap_err()
                .contains("PORT=ADDRESS:PORT"),
            "missing target"
        );
        assert!("x=10.0.0.1:80".parse::<Forward>().is_err());
        assert!(
            "1=[fd00::1]:80"
                .parse::<Forward>()
                .unwrap_err()
                .contains("IPv6")
        );
    }
}
