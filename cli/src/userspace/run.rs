//! `kubectl gefyra connect -f FILE --userspace`: the tunnel in this process, in the
//! foreground like `kubectl port-forward`. The data plane (`engine`) runs on its own
//! thread; here are the local listeners (SOCKS5, HTTP CONNECT, `-L` forwards), the status
//! line, the watch on the client, Ctrl-C and the exit.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gefyra_api::ClientState;
use gefyra_api::connection::ProviderParameter;
use ipnet::IpNet;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::engine::{self, Handle, Request};
use super::proxy::{
    HttpReply, Socks5Reply, Target, http_connect_handshake, http_connect_reply, socks5_handshake,
    socks5_reply,
};
use super::spec::{Expose, LocalForward};
use crate::args::ConnectArgs;
use crate::connect::Activated;
use crate::error::{CliError, Kind, Result};
use crate::tunnel;
use crate::wait::{self, Goal};

/// A local client gets this long to finish its proxy handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the client's own GefyraClient is read (a deleted client ends the process).
const WATCH_EVERY: Duration = Duration::from_secs(5);
/// After a failed accept (out of descriptors), before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The default MTU of a Gefyra tunnel.
const DEFAULT_MTU: u16 = 1340;

/// Where the proxies and forwards send a connection.
#[derive(Clone)]
struct Router {
    engine: Handle,
    /// What goes through the tunnel (the cluster's ranges).
    tunneled: Arc<Vec<IpNet>>,
    /// Names under this domain (and `*.svc`) are looked up at the cluster's DNS.
    cluster_domain: Arc<str>,
}

/// How a local connection's far end answers the proxy protocol.
#[derive(Clone, Copy)]
enum Protocol {
    Socks5,
    HttpConnect,
    /// A `-L` forward: no protocol, bytes from the first.
    Plain,
}

impl Protocol {
    fn open_reply(self) -> Vec<u8> {
        match self {
            Protocol::Socks5 => socks5_reply(Socks5Reply::Succeeded),
            Protocol::HttpConnect => http_connect_reply(HttpReply::Established),
            Protocol::Plain => Vec::new(),
        }
    }

    fn fail_reply(self, why: &str) -> Vec<u8> {
        match self {
            Protocol::Socks5 => socks5_reply(Socks5Reply::HostUnreachable),
            Protocol::HttpConnect => http_connect_reply(HttpReply::BadGateway(why.to_string())),
            Protocol::Plain => Vec::new(),
        }
    }
}

impl Router {
    /// Whether a name is the cluster's to answer.
    fn is_cluster_name(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        host.ends_with(&format!(".{}", self.cluster_domain)) || host.ends_with(".svc")
    }

    /// The addresses of a target: IPs as they are, cluster names at the cluster's DNS,
    /// other names with this machine's resolver.
    async fn resolve(&self, target: &Target) -> Result<Vec<SocketAddr>, String> {
        match target {
            Target::Address(address) => Ok(vec![*address]),
            Target::Name { host, port } => {
                if let Ok(ip) = host.parse::<IpAddr>() {
                    return Ok(vec![SocketAddr::new(ip, *port)]);
                }
                if self.is_cluster_name(host) {
                    let name = match host.trim_end_matches('.') {
                        svc if svc.ends_with(".svc") => format!("{svc}.{}", self.cluster_domain),
                        full => full.to_string(),
                    };
                    let found = self.engine.resolve(&name).await?;
                    Ok(found
                        .into_iter()
                        .map(|ip| SocketAddr::new(ip, *port))
                        .collect())
                } else {
                    tokio::net::lookup_host((host.as_str(), *port))
                        .await
                        .map(|found| found.collect())
                        .map_err(|error| format!("looking {host} up failed: {error}"))
                }
            }
        }
    }

    fn through_tunnel(&self, address: &SocketAddr) -> bool {
        self.tunneled.iter().any(|net| net.contains(&address.ip()))
    }

    /// Carries `stream` to `target`: through the tunnel for the cluster's addresses,
    /// directly for anything else (a browser using the proxy for everything keeps working).
    async fn carry(&self, mut stream: TcpStream, target: &Target, protocol: Protocol) {
        let addresses = match self.resolve(target).await {
            Ok(addresses) if !addresses.is_empty() => addresses,
            Ok(_) => {
                let why = format!("{target}: no address");
                let _ = stream.write_all(&protocol.fail_reply(&why)).await;
                return;
            }
            Err(why) => {
                let why = format!("{target}: {why}");
                let _ = stream.write_all(&protocol.fail_reply(&why)).await;
                return;
            }
        };
        let address = addresses
            .iter()
            .find(|address| address.is_ipv4())
            .copied()
            .unwrap_or(addresses[0]);
        if self.through_tunnel(&address) {
            let Ok(stream) = stream.into_std() else {
                return;
            };
            let request = Request::Open {
                target: address,
                stream,
                on_open: protocol.open_reply(),
                on_fail: protocol
                    .fail_reply(&format!("{target}: not reachable through the tunnel")),
            };
            if let Err(Request::Open {
                mut stream,
                on_fail,
                ..
            }) = self.engine.send(request)
            {
                use std::io::Write;
                let _ = stream.write_all(&on_fail);
            }
            return;
        }
        match TcpStream::connect(address).await {
            Ok(mut remote) => {
                if stream.write_all(&protocol.open_reply()).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut remote).await;
                }
            }
            Err(error) => {
                let _ = stream
                    .write_all(&protocol.fail_reply(&format!("{target}: {error}")))
                    .await;
            }
        }
    }
}

async fn bind(address: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|error| {
        CliError::new(
            Kind::Usage,
            format!("cannot listen on {address} for the {what}: {error} (choose another address)"),
        )
    })
}

fn serve_proxy(listener: TcpListener, router: Router, protocol: Protocol) {
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                // Out of descriptors, most likely: a pause, not a spin.
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            };
            let router = router.clone();
            tokio::spawn(async move {
                let handshake = async {
                    match protocol {
                        Protocol::Socks5 => socks5_handshake(&mut stream).await,
                        _ => http_connect_handshake(&mut stream).await,
                    }
                };
                if let Ok(Ok(target)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    router.carry(stream, &target, protocol).await;
                }
            });
        }
    });
}

fn serve_forward(listener: TcpListener, router: Router, forward: LocalForward) {
    tokio::spawn(async move {
        let target = Target::Name {
            host: forward.host.clone(),
            port: forward.port,
        };
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            };
            let router = router.clone();
            let target = target.clone();
            tokio::spawn(async move { router.carry(stream, &target, Protocol::Plain).await });
        }
    });
}

/// Runs the userspace tunnel until Ctrl-C, a revoked client or a fatal error.
pub(crate) async fn run(args: &ConnectArgs, activated: Activated) -> Result<()> {
    let Activated {
        api,
        id,
        private_key,
        public_key,
        config,
        endpoint,
        mtu,
    } = activated;
    let IpAddr::V4(address) = config.address else {
        return Err(CliError::new(
            Kind::Failed,
            format!(
                "GefyraClient {id} has an IPv6 tunnel address ({}); --userspace carries IPv4",
                config.address
            ),
        ));
    };
    let IpAddr::V4(dns) = config.dns else {
        return Err(CliError::new(
            Kind::Failed,
            format!("GefyraClient {id}'s DNS address {} is not IPv4", config.dns),
        ));
    };
    let stowaway = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
        .await
        .ok()
        .and_then(|mut found| found.next())
        .ok_or_else(|| {
            CliError::new(
                Kind::BadClientFile,
                format!("the client file's endpoint {endpoint} does not resolve"),
            )
        })?;
    super::spec::check_exposes(&args.expose).map_err(|error| CliError::new(Kind::Usage, error))?;
    let routes = tunnel::routes(&args.allowed_ips, &config);
    let exposes: std::collections::BTreeMap<u16, u16> = args
        .expose
        .iter()
        .map(|Expose { remote, local }| (*remote, *local))
        .collect();
    let engine_config = engine::Config {
        private_key: *private_key.bytes(),
        server_public_key: *config.server_public_key.bytes(),
        preshared_key: Some(*config.preshared_key.bytes()),
        endpoint: stowaway,
        address,
        dns,
        mtu: usize::from(mtu.unwrap_or(DEFAULT_MTU)),
        exposes: exposes.clone(),
    };
    // Listeners first: a taken port fails before the tunnel starts.
    let socks5 = bind(args.socks5, "SOCKS5 proxy").await?;
    let http = match args.http_proxy {
        Some(address) => Some(bind(address, "HTTP CONNECT proxy").await?),
        None => None,
    };
    let mut forwards = Vec::new();
    for forward in &args.forwards {
        forwards.push((bind(forward.bind, "forward").await?, forward.clone()));
    }
    let (engine, thread) = engine::start(engine_config).map_err(|error| {
        CliError::new(
            Kind::Failed,
            format!("starting the tunnel to {stowaway} failed: {error}"),
        )
    })?;
    let router = Router {
        engine: engine.clone(),
        tunneled: Arc::new(routes.nets.clone()),
        cluster_domain: Arc::from(args.cluster_domain.as_str()),
    };
    serve_proxy(socks5, router.clone(), Protocol::Socks5);
    println!(
        "GefyraClient {id} is ACTIVE: tunnel address {address}, in this process (no root, no WireGuard device)"
    );
    println!(
        "  SOCKS5 proxy on {}: curl --socks5-hostname {} http://SERVICE.NAMESPACE.svc.{}/",
        args.socks5, args.socks5, args.cluster_domain
    );
    if let (Some(listener), Some(address)) = (http, args.http_proxy) {
        serve_proxy(listener, router.clone(), Protocol::HttpConnect);
        println!("  HTTP CONNECT proxy on {address}");
    }
    for (listener, forward) in forwards {
        println!(
            "  forwarding {} to {}:{} in the cluster",
            forward.bind, forward.host, forward.port
        );
        serve_forward(listener, router.clone(), forward);
    }
    for (remote, local) in &exposes {
        println!("  the cluster reaches 127.0.0.1:{local} on this machine at {address}:{remote}");
    }
    println!("Press Ctrl-C to disconnect.");

    let outcome = foreground(&api, &id, &public_key, &engine, thread).await;
    engine.stop();
    match outcome {
        Ended::Interrupted => {
            clear_status();
            disconnect_own(&api, &id, &public_key, args.file.timeout).await?;
            println!("GefyraClient {id} is disconnected (state WAITING)");
            Ok(())
        }
        Ended::Failed(error) => {
            clear_status();
            // Leave nothing behind: the client goes back to WAITING if it can.
            let _ = disconnect_own(&api, &id, &public_key, args.file.timeout).await;
            Err(error)
        }
        Ended::Revoked(error) => {
            clear_status();
            Err(error)
        }
    }
}

enum Ended {
    Interrupted,
    Revoked(CliError),
    Failed(CliError),
}

/// Waits for Ctrl-C (or SIGTERM), the tunnel thread's end or the client's; draws the
/// status line meanwhile.
async fn foreground(
    api: &kube::Api<gefyra_api::GefyraClient>,
    id: &str,
    public_key: &gefyra_api::connection::WireGuardKey,
    engine: &Handle,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
) -> Ended {
    let status = std::io::stderr().is_terminal();
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    let mut watch = tokio::time::interval(WATCH_EVERY);
    let thread = tokio::task::spawn_blocking(move || thread.join());
    tokio::pin!(thread);
    let interrupted = interrupted();
    tokio::pin!(interrupted);
    loop {
        tokio::select! {
            () = &mut interrupted => return Ended::Interrupted,
            ended = &mut thread => {
                let why = match ended {
                    Ok(Ok(Ok(()))) => "the tunnel stopped".to_string(),
                    Ok(Ok(Err(error))) => format!("the tunnel failed: {error}"),
                    _ => "the tunnel thread ended unexpectedly".to_string(),
                };
                return Ended::Failed(CliError::new(Kind::Failed, why));
            }
            _ = every_second.tick(), if status => draw_status(engine),
            _ = watch.tick() => {
                if let Some(ended) = check_client(api, id, public_key).await {
                    return ended;
                }
            }
        }
    }
}

async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// `None` while the client is ours and ACTIVE; how the process ends otherwise.
async fn check_client(
    api: &kube::Api<gefyra_api::GefyraClient>,
    id: &str,
    public_key: &gefyra_api::connection::WireGuardKey,
) -> Option<Ended> {
    match api.get(id).await {
        Ok(client) => {
            let ours = client
                .provider_parameter
                .as_ref()
                .and_then(|parameter| ProviderParameter::parse(parameter).ok())
                .and_then(|parameter| parameter.public_key)
                .is_some_and(|key| key == *public_key);
            match client.state {
                ClientState::Terminating => {
                    Some(Ended::Revoked(revoked(id, "it is being deleted")))
                }
                _ if !ours => Some(Ended::Failed(CliError::new(
                    Kind::Conflict,
                    format!(
                        "GefyraClient {id} was disconnected or connected from elsewhere (state {})",
                        client.state
                    ),
                ))),
                ClientState::Error => Some(Ended::Failed(CliError::new(
                    Kind::InError,
                    format!("GefyraClient {id} is in state ERROR: see kubectl gefyra status -f"),
                ))),
                _ => None,
            }
        }
        Err(kube::Error::Api(status)) if matches!(status.code, 401 | 403 | 404) => {
            Some(Ended::Revoked(revoked(
                id,
                &format!("the API server answered {}", status.code),
            )))
        }
        // The API server is unreachable for a moment: the tunnel carries on.
        Err(_) => None,
    }
}

fn revoked(id: &str, why: &str) -> CliError {
    CliError::new(
        Kind::Revoked,
        format!(
            "the credentials of GefyraClient {id} were revoked ({why}): the client was deleted; ask your Gefyra admin for a new client file"
        ),
    )
}

/// Disconnects the client if it is still connected with this process's key (a client file
/// connected again elsewhere is left alone).
async fn disconnect_own(
    api: &kube::Api<gefyra_api::GefyraClient>,
    id: &str,
    public_key: &gefyra_api::connection::WireGuardKey,
    timeout: Duration,
) -> Result<()> {
    if check_client(api, id, public_key).await.is_some() {
        return Ok(());
    }
    let patched = api
        .patch(
            id,
            &PatchParams::default(),
            &Patch::Merge(json!({"providerParameter": Value::Null})),
        )
        .await
        .map_err(|error| CliError::kube(&format!("disconnecting GefyraClient {id}"), error))?;
    let goal = Goal {
        description: "WAITING (disconnected)",
        timeout,
        stale_version: patched.metadata.resource_version.clone(),
    };
    wait::until(api, id, &goal, |client| {
        client.state == ClientState::Waiting
    })
    .await?;
    Ok(())
}

fn draw_status(engine: &Handle) {
    let stats = &engine.stats;
    let handshake = match stats.since_handshake() {
        Some(since) => format!("handshake {}s ago", since.as_secs()),
        None => "no handshake yet".to_string(),
    };
    let line = format!(
        "{handshake} · ↓ {} ↑ {} · {} connection(s)",
        bytes(stats.received.load(Ordering::Relaxed)),
        bytes(stats.sent.load(Ordering::Relaxed)),
        stats.connections.load(Ordering::Relaxed),
    );
    eprint!("\r\x1b[2K{line}");
}

fn clear_status() {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K");
    }
}

fn bytes(count: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{count} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
