//! The command line and the process around the controller: logging, the HTTP endpoints,
//! waiting for the CRD, leader election, shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use gefyra_api::GefyraClient;
use kube::api::ListParams;
use kube::{Api, Client};
use tracing::{info, warn};

use crate::context::{Context, Settings};
use crate::controller;
use crate::credentials::ClientRbac;
use crate::http::{self, Health};
use crate::leader::{LeaderElection, LeaseTiming};
use crate::metrics::Metrics;

#[derive(Parser, Debug)]
#[command(
    name = "gefyra-operator",
    version,
    about = "The Gefyra operator: GefyraClients to credentials, RBAC and WireGuard peers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

const DEFAULT_LEASE_NAME: &str = "gefyra-operator-leader";

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the GefyraClient CRD as YAML.
    Crd {
        /// Print the GefyraBridge and GefyraBridgeMount CRDs instead.
        #[arg(long)]
        bridges: bool,
    },
    /// Print the operator's own ServiceAccount, Role and RoleBinding for --namespace.
    Rbac {
        /// Name of the ServiceAccount, Role and RoleBinding.
        #[arg(long, default_value = "gefyra-operator")]
        name: String,
        /// The namespace the operator manages (its Role lives there).
        #[arg(long, default_value = gefyra_api::client::DEFAULT_NAMESPACE)]
        namespace: String,
        /// The Lease the operator uses for leader election.
        #[arg(long, default_value = DEFAULT_LEASE_NAME)]
        lease_name: String,
        /// Print instead the operator's rights for bridging in this namespace (a Role and
        /// RoleBinding there).
        #[arg(long, conflicts_with = "bridging_cluster_wide")]
        bridging_namespace: Option<String>,
        /// Print instead the operator's rights for bridging in every namespace (a
        /// ClusterRole and ClusterRoleBinding).
        #[arg(long)]
        bridging_cluster_wide: bool,
    },
    /// Print the ValidatingAdmissionPolicy and binding that restrict what a client's own
    /// identity may change in its GefyraClient (providerParameter only) in --namespace.
    AdmissionPolicy {
        #[arg(long, default_value = gefyra_api::client::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Print the ValidatingWebhookConfiguration of the subnet webhook (gefyra-compat mode)
    /// for the clients of --namespace, reaching the operator through Service
    /// gefyra-operator-webhook (the operator fills in its caBundle), the ClusterRole and
    /// binding that let the operator patch it, and the ValidatingAdmissionPolicy and binding
    /// that keep that patch to the caBundle.
    WebhookConfiguration {
        #[arg(long, default_value = gefyra_api::client::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// Wait until every URL answers with a success status (the chart's `helm test`: the
    /// operator's and Stowaway's /readyz); exit 1 naming the first that does not.
    CheckReady {
        /// How long to wait for all of them.
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u64,
        #[arg(required = true, value_name = "URL")]
        urls: Vec<hyper::Uri>,
    },
    /// Run the operator (the default; its options go before or after `run`).
    Run(Box<RunArgs>),
}

pub use gefyra_process::LogFormat;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The namespace whose GefyraClients this operator manages.
    #[arg(long, env = "GEFYRA_NAMESPACE", default_value = gefyra_api::client::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// What a client's Role grants: `minimal` (its own GefyraClient only) or
    /// `gefyra-compat` (also `list` on all GefyraClients, which Gefyra's CLI needs).
    #[arg(
        long,
        value_enum,
        env = "GEFYRA_CLIENT_RBAC",
        default_value = "minimal"
    )]
    pub client_rbac: ClientRbac,
    /// Token lifetime in seconds; default: until the client's sunset, else 365 days.
    #[arg(long, env = "GEFYRA_TOKEN_LIFETIME")]
    pub token_lifetime: Option<u64>,
    /// Renew a client's token this many seconds before it expires; default: after 80 % of
    /// its lifetime.
    #[arg(long, env = "GEFYRA_TOKEN_RENEW_BEFORE")]
    pub token_renew_before: Option<u64>,
    /// Tunnel-address pool(s), comma-separated CIDRs (IPv4 and/or IPv6). 192.168.99.1 is
    /// the server's and never given out.
    #[arg(
        long,
        env = "GEFYRA_TUNNEL_POOL",
        value_delimiter = ',',
        default_value = "192.168.96.0/20"
    )]
    pub tunnel_pool: Vec<ipnet::IpNet>,
    /// Ranges no client may route, comma-separated CIDRs (the cluster's pod and service
    /// CIDRs). Published to clients, with the tunnel pool, as `Cluster.AllowedIPs` in their
    /// providerConfig: what `kubectl gefyra connect` routes by default (a split tunnel).
    #[arg(long, env = "GEFYRA_RESERVED_RANGES", value_delimiter = ',')]
    pub reserved_ranges: Vec<ipnet::IpNet>,
    /// `Peer.Endpoint` in each client's providerConfig (Gefyra's clients take the endpoint
    /// from their client file instead); default: the Stowaway Service in --namespace.
    #[arg(long, env = "GEFYRA_WIREGUARD_ENDPOINT")]
    pub wireguard_endpoint: Option<String>,
    /// Disconnect ACTIVE clients after this many seconds unless a client sets its own
    /// maxConnectionAge.
    #[arg(long, env = "GEFYRA_MAX_CONNECTION_AGE")]
    pub max_connection_age: Option<u64>,
    /// Serve the subnet webhook on this address (e.g. 0.0.0.0:9443): Gefyra's own CLI
    /// (gefyra-compat mode) retries with another subnet when a taken one is refused there
    /// with HTTP 500. Every replica serves it.
    #[arg(long, env = "GEFYRA_WEBHOOK_ADDRESS")]
    pub webhook_address: Option<SocketAddr>,
    /// The ValidatingWebhookConfiguration whose caBundle the operator publishes; default
    /// gefyra-client-subnets-<namespace>.
    #[arg(long)]
    pub webhook_configuration: Option<String>,
    /// A host name or IP address the webhook's certificate is valid for (repeatable);
    /// default: the Service gefyra-operator-webhook's names, localhost and 127.0.0.1.
    #[arg(long = "webhook-name")]
    pub webhook_names: Vec<String>,
    /// Reconcile only while holding the Lease (for more than one replica).
    #[arg(long, env = "GEFYRA_LEADER_ELECT")]
    pub leader_elect: bool,
    /// The Lease's name, in --namespace.
    #[arg(long, default_value = DEFAULT_LEASE_NAME)]
    pub lease_name: String,
    /// How long the leader's Lease lasts without renewal: a crashed leader is replaced
    /// after this (a leader that stops cleanly releases it at once).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub lease_duration_seconds: u64,
    /// The leader renews this long before its Lease expires; also the longest a renewal
    /// request may take and the clock skew tolerated between replicas.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3599))]
    pub lease_renew_before_seconds: u64,
    /// This process's identity in the Lease (default: POD_NAME, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Where /livez, /readyz and /metrics are served.
    #[arg(long, env = "GEFYRA_HTTP_ADDRESS", default_value = "0.0.0.0:8080")]
    pub http_address: SocketAddr,
    /// The image the bridge routers run (`gefyra-carrier` in it): the operator's own image.
    #[arg(
        long,
        env = "GEFYRA_CARRIER_IMAGE",
        default_value = "gefyra-operator:latest"
    )]
    pub carrier_image: String,
    /// Stowaway's Service (in --namespace) and port for the routers' bridged connections.
    #[arg(long, default_value = "gefyra-stowaway-bridges")]
    pub stowaway_bridges_service: String,
    #[arg(long, default_value_t = 8082)]
    pub stowaway_bridges_port: u16,
    /// Release a bridge when its client's last WireGuard handshake is older than this many
    /// seconds (a vanished laptop); 0 keeps bridges of idle clients.
    #[arg(long, env = "GEFYRA_BRIDGE_IDLE_TIMEOUT", default_value_t = 600)]
    pub bridge_idle_timeout: u64,
    /// Clients reconciled at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: u16,
    #[arg(long, value_enum, env = "GEFYRA_LOG_FORMAT", default_value = "plain")]
    pub log_format: LogFormat,
}

/// The client of the API server (kubeconfig or in-cluster), every request it sends counted
/// in `gefyra_operator_api_requests_total`.
async fn api_client(metrics: Arc<Metrics>) -> Result<Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&crate::metrics::CountApiRequestsLayer(metrics))
        .build())
}

pub async fn main(cli: Cli) -> anyhow::Result<()> {
    let (command, args) = match cli.command {
        Some(Command::Run(args)) => (None, *args),
        command => (command, cli.run),
    };
    match command {
        Some(Command::Crd { bridges }) => {
            if bridges {
                print!("{}", gefyra_api::bridge::crds_yaml());
            } else {
                print!("{}", gefyra_api::crd::crd_yaml());
            }
            return Ok(());
        }
        Some(Command::Rbac {
            name,
            namespace,
            lease_name,
            bridging_namespace,
            bridging_cluster_wide,
        }) => {
            let yaml = if bridging_cluster_wide || bridging_namespace.is_some() {
                crate::rbac::bridging_rbac_yaml(&name, &namespace, bridging_namespace.as_deref())
            } else {
                crate::rbac::operator_rbac_yaml(&name, &namespace, &lease_name)
            };
            print!("{yaml}");
            return Ok(());
        }
        Some(Command::AdmissionPolicy { namespace }) => {
            print!("{}", gefyra_api::admission::policy_yaml(&namespace));
            return Ok(());
        }
        Some(Command::WebhookConfiguration { namespace }) => {
            print!(
                "{}",
                crate::webhook::install_yaml(&namespace, "gefyra-operator")
            );
            return Ok(());
        }
        Some(Command::CheckReady {
            timeout_seconds,
            urls,
        }) => {
            return crate::ready::check_ready(&urls, Duration::from_secs(timeout_seconds)).await;
        }
        Some(Command::Run(_)) | None => {}
    }
    gefyra_process::init_logging(args.log_format);
    let wireguard_endpoint = args
        .wireguard_endpoint
        .clone()
        .unwrap_or_else(|| format!("gefyra-stowaway-wireguard.{}.svc:31820", args.namespace));
    let pool = gefyra_api::ipam::Pool {
        tunnel: args.tunnel_pool.clone(),
        reserved: args.reserved_ranges.clone(),
    };
    pool.validate().map_err(|problem| {
        anyhow::anyhow!("--tunnel-pool / --reserved-ranges: {problem}; choose other ranges")
    })?;
    let metrics = Arc::new(Metrics::default());
    let client = api_client(metrics.clone()).await.map_err(|error| {
        anyhow::anyhow!(
            "cannot reach the Kubernetes API ({error}); set KUBECONFIG or run in-cluster"
        )
    })?;
    let ready = Arc::new(AtomicBool::new(false));
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let server = tokio::spawn(http::serve(args.http_address, health));

    let settings = Settings {
        namespace: args.namespace.clone(),
        client_rbac: args.client_rbac,
        token_lifetime: args
            .token_lifetime
            .map(|seconds| jiff::SignedDuration::from_secs(seconds as i64)),
        renew_before: args
            .token_renew_before
            .map(|seconds| jiff::SignedDuration::from_secs(seconds as i64)),
        concurrency: args.concurrency,
        pool,
        wireguard_endpoint: wireguard_endpoint
            .parse()
            .map_err(|problem| anyhow::anyhow!("--wireguard-endpoint {problem}"))?,
        max_connection_age: args
            .max_connection_age
            .map(|seconds| jiff::SignedDuration::from_secs(seconds as i64)),
        bridging: crate::bridging::BridgingSettings {
            carrier_image: args.carrier_image.clone(),
            stowaway_service: args.stowaway_bridges_service.clone(),
            stowaway_port: args.stowaway_bridges_port,
            idle_timeout:
                (args.bridge_idle_timeout > 0).then(|| {
                    jiff::SignedDuration::from_secs(
                        args.bridge_idle_timeout.min(i64::MAX as u64) as i64
                    )
                }),
        },
    };
    let webhook = args.webhook_address.map(|address| {
        let names = if args.webhook_names.is_empty() {
            crate::webhook::default_names(&args.namespace)
        } else {
            args.webhook_names.clone()
        };
        tokio::spawn(crate::webhook::run(
            client.clone(),
            args.namespace.clone(),
            settings.pool.clone(),
            address,
            args.webhook_configuration
                .clone()
                .unwrap_or_else(|| crate::webhook::configuration_name(&args.namespace)),
            names,
        ))
    });
    let ctx = Arc::new(Context::new(client.clone(), metrics, settings));

    let election = match args.leader_elect {
        false => None,
        true => {
            let timing =
                LeaseTiming::new(args.lease_duration_seconds, args.lease_renew_before_seconds)
                    .map_err(anyhow::Error::msg)?;
            let identity = args
                .identity
                .clone()
                .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
            Some(LeaderElection::new(
                lease_client(timing).await?,
                client.clone(),
                &args.namespace,
                &args.lease_name,
                identity,
                timing,
            ))
        }
    };
    // The lease manager while this process leads: released on shutdown.
    let leading = tokio::sync::OnceCell::new();
    let work = async {
        wait_for_crd(&client, &args.namespace).await;
        if let Err(error) = ctx.server_key().await {
            warn!(%error, "creating the Stowaway key Secret failed; retried on the first connect");
        }
        let set_ready = {
            let ready = ready.clone();
            move || {
                info!("cache synced; ready");
                ready.store(true, Ordering::Relaxed);
            }
        };
        match &election {
            None => {
                ctx.metrics.set_leader(true);
                controller::run(ctx.clone(), set_ready).await
            }
            Some(election) => {
                // A standby is ready (it serves the webhook and takes over when the leader
                // goes): readiness never waits for the lease, or a rolling update of two
                // replicas could not finish. Leadership is the gefyra_operator_leader gauge.
                info!("standing by for the leader lease; ready");
                ready.store(true, Ordering::Relaxed);
                ctx.metrics.set_leader(false);
                let manager = leading.get_or_init(|| election.acquire()).await;
                ctx.metrics.set_leader(true);
                tokio::select! {
                    _ = controller::run(ctx.clone(), set_ready) => {},
                    _ = election.keep(manager) => {
                        // Exiting is the only safe reaction: a new leader may already reconcile.
                        anyhow::bail!("lost the leader lease; exiting so that only one operator reconciles");
                    }
                }
            }
        }
        Ok(())
    };
    let webhook_failed = async {
        match webhook {
            Some(task) => match task.await {
                Ok(Err(error)) => anyhow::anyhow!("the subnet webhook failed: {error:#}"),
                Ok(Ok(())) => anyhow::anyhow!("the subnet webhook stopped"),
                Err(error) => anyhow::anyhow!("the subnet webhook panicked: {error}"),
            },
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = work => result?,
        error = webhook_failed => return Err(error),
        _ = gefyra_process::shutdown_signal() => info!("shutting down"),
    }
    if let (Some(election), Some(manager)) = (&election, leading.get()) {
        ctx.metrics.set_leader(false);
        election.release(manager).await;
    }
    server.abort();
    Ok(())
}

/// The client the lease manager renews with: every request times out within the renewal
/// window, so that a hung renewal cannot outlive the lease.
async fn lease_client(timing: LeaseTiming) -> anyhow::Result<Client> {
    let mut config = kube::Config::infer().await?;
    let timeout = (timing.renew_before / 2).max(Duration::from_secs(1));
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    Ok(Client::try_from(config)?)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "gefyra-operator".into())
}

/// Waits until the GefyraClient CRD is served, saying so every 10 s.
async fn wait_for_crd(client: &Client, namespace: &str) {
    let api: Api<GefyraClient> = Api::namespaced(client.clone(), namespace);
    let mut waited = 0u64;
    loop {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => return,
            Err(error) => {
                if waited.is_multiple_of(10) {
                    warn!(%error, "waiting for the GefyraClient CRD (apply crds/gefyraclients.yaml)");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        waited += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_takes_its_options_after_the_subcommand_as_the_chart_passes_them() {
        let cli = Cli::try_parse_from([
            "gefyra-operator",
            "run",
            "--namespace=other",
            "--http-address=0.0.0.0:8080",
            "--log-format=json",
        ])
        .expect("the chart's arguments parse");
        let Some(Command::Run(args)) = cli.command else {
            panic!("the run subcommand");
        };
        assert_eq!(args.namespace, "other");
        // And before it, or without it.
        let cli = Cli::try_parse_from(["gefyra-operator", "--namespace=before"]).unwrap();
        assert_eq!(cli.run.namespace, "before");
    }
}
