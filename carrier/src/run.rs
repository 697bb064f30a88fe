//! The process: the command line, the listeners, the bridge watch, the health server, and
//! the drain on SIGTERM.

use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::health::{self, Health};
use crate::metrics::Metrics;
use crate::router::{Router, Settings};
use crate::routes::RouteTable;
use crate::upstream::Address;

pub use gefyra_process::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "gefyra-carrier",
    version,
    about = "The router of one GefyraBridgeMount: traffic to the original Pods, or through Stowaway to a developer's machine for what an ACTIVE GefyraBridge takes"
)]
pub struct Cli {
    /// The GefyraBridgeMount whose bridges are routed (they carry the label
    /// gefyra.dev/bridge-mount=NAME).
    #[arg(long, value_parser = label_value)]
    pub mount: String,
    /// The namespace of the GefyraBridges.
    #[arg(long, default_value = gefyra_api::client::DEFAULT_NAMESPACE)]
    pub bridges_namespace: String,
    /// Stowaway's bridge port (HOST:PORT): bridged connections go there, each opened with
    /// the line `GEFYRA-BRIDGE/1 <bridge> <port>`.
    #[arg(long, value_name = "HOST:PORT")]
    pub stowaway: Address,
    /// A container port to serve and its original: listen on 0.0.0.0:REMOTE and forward
    /// what no bridge takes to HOST:PORT (repeatable).
    #[arg(long = "port", value_name = "REMOTE=HOST:PORT", required = true)]
    pub ports: Vec<PortSpec>,
    /// Where /ready, /livez and /metrics are served.
    #[arg(long, default_value = "0.0.0.0:8090")]
    pub health_listen: SocketAddr,
    /// After SIGTERM, seconds in-flight requests and open connections get to finish.
    #[arg(long, default_value_t = 10)]
    pub drain_seconds: u64,
    /// After SIGTERM, seconds /ready answers 503 before the ports stop accepting (for the
    /// endpoints to drop this Pod first).
    #[arg(long, default_value_t = 2)]
    pub shutdown_delay_seconds: u64,
    /// Connections open at once, all ports together.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds to receive a request head, and the idle time of a keep-alive connection.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_seconds: u64,
    /// The largest request head in bytes.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(8192..=1_048_576))]
    pub max_request_head_bytes: u32,
    /// Seconds to connect to the original or to Stowaway.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_seconds: u64,
    #[arg(long, value_enum, env = "GEFYRA_LOG_FORMAT", default_value = "plain")]
    pub log_format: LogFormat,
}

/// `--port REMOTE=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    pub remote: u16,
    pub original: Address,
}

impl FromStr for PortSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<PortSpec, String> {
        let (remote, original) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not REMOTE=HOST:PORT"))?;
        let remote = remote
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| format!("{remote:?} is not a port in 1..=65535"))?;
        Ok(PortSpec {
            remote,
            original: original.parse()?,
        })
    }
}

/// A label value (the mount's name goes into a label selector as is).
fn label_value(text: &str) -> Result<String, String> {
    let alphanumeric = |b: &u8| b.is_ascii_alphanumeric();
    let bytes = text.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(alphanumeric)
        && bytes.last().is_some_and(alphanumeric)
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b));
    valid
        .then(|| text.to_string())
        .ok_or_else(|| format!("{text:?} is not a Kubernetes label value"))
}

pub async fn main(cli: Cli) -> anyhow::Result<()> {
    gefyra_process::init_logging(cli.log_format);
    let mut served: Vec<u16> = cli.ports.iter().map(|spec| spec.remote).collect();
    served.sort_unstable();
    if let Some(twice) = served.windows(2).find(|pair| pair[0] == pair[1]) {
        anyhow::bail!("--port {} is given twice", twice[0]);
    }
    let settings = Settings {
        max_connections: cli.max_connections,
        header_read_timeout: Duration::from_secs(cli.header_read_timeout_seconds),
        max_head_bytes: cli.max_request_head_bytes as usize,
        connect_timeout: Duration::from_secs(cli.connect_timeout_seconds),
    };
    let metrics = Arc::new(Metrics::default());
    let (tables, table) = watch::channel(Arc::new(RouteTable::default()));
    let router = Router::new(&settings, cli.stowaway.clone(), table, Arc::clone(&metrics));
    for spec in &cli.ports {
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, spec.remote))
            .await
            .with_context(|| {
                let hint = if spec.remote < 1024 {
                    " (a port below 1024 needs the sysctl net.ipv4.ip_unprivileged_port_start=0 or NET_BIND_SERVICE)"
                } else {
                    ""
                };
                format!("listening on container port {}{hint}", spec.remote)
            })?;
        router.serve(listener, spec.remote, spec.original.clone());
        tracing::info!(port = spec.remote, original = %spec.original, "serving");
    }

    let listed = Arc::new(AtomicBool::new(false));
    let stopping = Arc::new(AtomicBool::new(false));
    let (stop_health, health_stopped) = oneshot::channel::<()>();
    let mut health_server = tokio::spawn(health::serve(
        cli.health_listen,
        Health {
            metrics: Arc::clone(&metrics),
            listed: Arc::clone(&listed),
            stopping: Arc::clone(&stopping),
            originals: Arc::new(
                cli.ports
                    .iter()
                    .map(|spec| {
                        Arc::new(crate::upstream::Upstream::new(
                            spec.original.clone(),
                            Duration::from_secs(1),
                        ))
                    })
                    .collect(),
            ),
        },
        async move {
            let _ = health_stopped.await;
        },
    ));

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster configuration)")?;
    tracing::info!(mount = %cli.mount, namespace = %cli.bridges_namespace, stowaway = %cli.stowaway, "following the mount's GefyraBridges");
    let (namespace, mount) = (cli.bridges_namespace.clone(), cli.mount.clone());
    tokio::spawn(async move {
        crate::bridges::follow(client, &namespace, &mount, served, tables, listed, metrics).await;
    });

    tokio::select! {
        () = gefyra_process::shutdown_signal() => {}
        ended = &mut health_server => {
            anyhow::bail!("the health server ended: {}", match ended {
                Ok(Ok(())) => "without error".to_string(),
                Ok(Err(error)) => format!("{error} (on {})", cli.health_listen),
                Err(error) => error.to_string(),
            });
        }
    }
    stopping.store(true, Ordering::Relaxed);
    tracing::info!(
        delay_seconds = cli.shutdown_delay_seconds,
        drain_seconds = cli.drain_seconds,
        "stopping: /ready answers 503; the ports stop accepting after the delay, then in-flight requests get the drain time"
    );
    tokio::time::sleep(Duration::from_secs(cli.shutdown_delay_seconds)).await;
    if router.drain(Duration::from_secs(cli.drain_seconds)).await {
        tracing::info!("drained: every connection ended");
    } else {
        tracing::warn!("the drain time is over; closing the connections still open");
    }
    let _ = stop_health.send(());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_parses_and_refuses() {
        let cli = Cli::try_parse_from([
            "gefyra-carrier",
            "--mount",
            "web-mount",
            "--stowaway",
            "gefyra-stowaway-bridge.gefyra.svc:10000",
            "--port",
            "8080=gefyra-original-web-mount.demo.svc:8080",
            "--port",
            "9090=10.0.0.1:9090",
        ])
        .expect("parses");
        assert_eq!(cli.bridges_namespace, "gefyra");
        assert_eq!(cli.health_listen, "0.0.0.0:8090".parse().expect("address"));
        assert_eq!(cli.drain_seconds, 10);
        assert_eq!(cli.ports[1].remote, 9090);
        assert_eq!(cli.ports[1].original.to_string(), "10.0.0.1:9090");

        let base = ["gefyra-carrier", "--stowaway", "s:1", "--port", "80=o:80"];
        for (flag, value) in [
            ("--mount", "a,b"),
            ("--mount", "web mount"),
            ("--mount", "-web"),
            ("--port", "0=o:80"),
            ("--port", "80"),
            ("--port", "80=o"),
            ("--stowaway", "s"),
            ("--max-request-head-bytes", "100"),
            ("--max-connections", "0"),
        ] {
            let mut args = base.to_vec();
            if flag != "--mount" {
                args.extend(["--mount", "m"]);
            }
            args.extend([flag, value]);
            assert!(Cli::try_parse_from(&args).is_err(), "{flag} {value}");
        }
        let mut no_port = vec!["gefyra-carrier", "--mount", "m", "--stowaway", "s:1"];
        assert!(Cli::try_parse_from(&no_port).is_err(), "--port is required");
        no_port.extend(["--port", "80=o:80"]);
        assert!(Cli::try_parse_from(&no_port).is_ok());
    }
}
