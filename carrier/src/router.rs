//! The data path. Per served port an accept loop; per connection the mode the route table
//! gives when it is accepted (raw to the original, raw to a rule-less bridge, or HTTP); in
//! HTTP mode, per request, the route the table gives then. Bounded: connections by a
//! semaphore, request heads by size and read time (which also ends idle keep-alive
//! connections), HTTP/2 streams per connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::IntCounter;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::proxy::{self, Body};
use crate::routes::{Mode, Route, RouteTable};
use crate::upstream::{Address, Clients, Upstream};

/// The router's bounds.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Connections open at once (all ports); more wait in the listen backlog.
    pub max_connections: u32,
    /// Time to receive a request head; on a keep-alive connection it runs from the end of
    /// the previous response, so it is also the idle timeout.
    pub header_read_timeout: Duration,
    /// The largest request head (HTTP/1 read buffer, HTTP/2 header list), at least 8192.
    pub max_head_bytes: usize,
    /// Time to connect to the original or to Stowaway.
    pub connect_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(30),
            max_head_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Counters resolved once: the raw path stays a few atomic increments.
struct Counters {
    raw: IntCounter,
    http: IntCounter,
    bridge_raw: IntCounter,
    to_bridge: IntCounter,
    to_original: IntCounter,
    original_failed: IntCounter,
    stowaway_failed: IntCounter,
}

struct Shared {
    table: watch::Receiver<Arc<RouteTable>>,
    stowaway: Arc<Upstream>,
    metrics: Arc<Metrics>,
    counters: Counters,
    connect_timeout: Duration,
    connections: Arc<Semaphore>,
    max_connections: u32,
    /// `true` once draining: accept loops stop, HTTP connections close after their
    /// in-flight requests.
    stopping: watch::Sender<bool>,
    http: auto::Builder<TokioExecutor>,
}

/// The router of one mount: clone it freely, every clone is the same router.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
}

impl Router {
    /// A router following `table`, sending bridged traffic to Stowaway's bridge port at
    /// `stowaway`.
    pub fn new(
        settings: &Settings,
        stowaway: Address,
        table: watch::Receiver<Arc<RouteTable>>,
        metrics: Arc<Metrics>,
    ) -> Router {
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_buf_size(settings.max_head_bytes.max(8192));
        http.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(settings.max_head_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(256)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        let counter =
            |family: &prometheus::IntCounterVec, label: &str| family.with_label_values(&[label]);
        let counters = Counters {
            raw: counter(&metrics.connections, "raw"),
            http: counter(&metrics.connections, "http"),
            bridge_raw: counter(&metrics.connections, "bridge_raw"),
            to_bridge: counter(&metrics.requests, "bridge"),
            to_original: counter(&metrics.requests, "original"),
            original_failed: counter(&metrics.upstream_errors, "original"),
            stowaway_failed: counter(&metrics.upstream_errors, "stowaway"),
        };
        let max_connections = settings.max_connections.max(1);
        Router {
            shared: Arc::new(Shared {
                table,
                stowaway: Arc::new(Upstream::new(stowaway, settings.connect_timeout)),
                metrics,
                counters,
                connect_timeout: settings.connect_timeout,
                connections: Arc::new(Semaphore::new(max_connections as usize)),
                max_connections,
                stopping: watch::Sender::new(false),
                http,
            }),
        }
    }

    /// Serves the connections of `listener` as container port `port` (the port bridges'
    /// `portMappings` name), the original being `original`, until [`Router::drain`].
    pub fn serve(&self, listener: TcpListener, port: u16, original: Address) -> JoinHandle<()> {
        let original = Arc::new(Upstream::new(original, self.shared.connect_timeout));
        let port = Arc::new(Port {
            port,
            fallback_authority: original.address().authority().clone(),
            original_clients: Clients::new(Arc::clone(&original), None),
            original,
            bridges: Mutex::new(BridgeClients {
                table: Arc::clone(&self.shared.table.borrow()),
                clients: HashMap::new(),
            }),
            shared: Arc::clone(&self.shared),
        });
        tokio::spawn(port.accept(listener))
    }

    /// Stops accepting, lets every HTTP connection finish its in-flight requests and close,
    /// and waits up to `within` for all connections to end. `false`: some were still open.
    pub async fn drain(&self, within: Duration) -> bool {
        self.shared.stopping.send_replace(true);
        let all = self.shared.max_connections;
        tokio::time::timeout(within, self.shared.connections.acquire_many(all))
            .await
            .is_ok()
    }
}

/// Resolves once the router drains (or is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stopping| *stopping).await;
}

/// The pooled clients of the bridges on one port, kept while their bridge is in the table.
struct BridgeClients {
    /// The table `clients` was last pruned against.
    table: Arc<RouteTable>,
    /// By preamble (one per bridge and port).
    clients: HashMap<Arc<[u8]>, Clients>,
}

struct Port {
    port: u16,
    original: Arc<Upstream>,
    original_clients: Clients,
    /// A request's authority when it has none (HTTP/1.0 without Host).
    fallback_authority: Authority,
    bridges: Mutex<BridgeClients>,
    shared: Arc<Shared>,
}

/// Where a request went, for its error.
enum Target<'r> {
    Original,
    Bridge(&'r Route),
}

/// Counts an open connection while it lives.
struct Open(Arc<Metrics>);

impl Open {
    fn new(metrics: &Arc<Metrics>) -> Open {
        metrics.open_connections.inc();
        Open(Arc::clone(metrics))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open_connections.dec();
    }
}

impl Port {
    async fn accept(self: Arc<Self>, listener: TcpListener) {
        let shared = &self.shared;
        let mut stopping = shared.stopping.subscribe();
        loop {
            // A permit first: at the bound, connections wait in the backlog.
            let permit = tokio::select! {
                biased;
                () = stopped(&mut stopping) => break,
                permit = Arc::clone(&shared.connections).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                biased;
                () = stopped(&mut stopping) => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors or a connection reset before accept: not fatal.
                    tracing::warn!(port = self.port, %error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let mode = shared.table.borrow().mode(self.port);
            tokio::spawn(Arc::clone(&self).handle(stream, mode, permit));
        }
        tracing::info!(port = self.port, "stopped accepting connections");
    }

    async fn handle(self: Arc<Self>, stream: TcpStream, mode: Mode, permit: OwnedSemaphorePermit) {
        let _open = Open::new(&self.shared.metrics);
        let counters = &self.shared.counters;
        match mode {
            Mode::Original => {
                counters.raw.inc();
                self.splice(stream, None).await;
            }
            Mode::BridgeRaw(route) => {
                counters.bridge_raw.inc();
                self.splice(stream, Some(&route)).await;
            }
            Mode::Http => {
                counters.http.inc();
                self.serve_http(stream, Arc::new(permit)).await;
            }
        }
    }

    /// Bytes both ways, untouched, to the original or (after its preamble) to a bridge.
    async fn splice(&self, mut downstream: TcpStream, bridge: Option<&Route>) {
        let upstream = match bridge {
            None => self.original.connect().await,
            Some(route) => self.shared.stowaway.connect_with(&route.preamble).await,
        };
        let mut upstream = match upstream {
            Ok(upstream) => upstream,
            Err(error) => {
                match bridge {
                    None => {
                        self.shared.counters.original_failed.inc();
                        tracing::warn!(port = self.port, %error, "the original did not accept a connection; closing it");
                    }
                    Some(route) => {
                        self.shared.counters.stowaway_failed.inc();
                        tracing::warn!(port = self.port, bridge = %route.bridge, %error, "Stowaway did not accept a bridged connection; closing it");
                    }
                }
                return;
            }
        };
        keep_alive(&downstream);
        keep_alive(&upstream);
        if let Err(error) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
            tracing::debug!(port = self.port, %error, "a raw connection ended with an error");
        }
    }

    async fn serve_http(self: Arc<Self>, stream: TcpStream, permit: Arc<OwnedSemaphorePermit>) {
        let port = Arc::clone(&self);
        let service = service_fn(move |request| {
            let port = Arc::clone(&port);
            let permit = Arc::clone(&permit);
            async move { Ok::<_, Infallible>(port.forward(request, permit).await) }
        });
        let mut stopping = self.shared.stopping.subscribe();
        let connection = self
            .shared
            .http
            .serve_connection_with_upgrades(TokioIo::new(stream), service);
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = stopped(&mut stopping) => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = result {
            tracing::debug!(port = self.port, error = %proxy::chain(&*error), "an HTTP connection ended with an error");
        }
    }

    /// One request: to the first bridge whose rules match it now, else to the original.
    async fn forward(
        self: Arc<Self>,
        mut request: Request<Incoming>,
        permit: Arc<OwnedSemaphorePermit>,
    ) -> Response<Body> {
        let table = Arc::clone(&self.shared.table.borrow());
        let route = table
            .route(self.port, proxy::path_and_query(request.uri()), || {
                request
                    .headers()
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_bytes()))
            })
            .cloned();
        let bridge_clients;
        let (clients, target) = match &route {
            Some(route) => {
                self.shared.counters.to_bridge.inc();
                bridge_clients = self.bridge_clients(&table, route);
                (&bridge_clients, Target::Bridge(route))
            }
            None => {
                self.shared.counters.to_original.inc();
                (&self.original_clients, Target::Original)
            }
        };
        drop(table);

        let protocol = match request.version() {
            Version::HTTP_11 => proxy::upgrade(request.headers()),
            _ => None,
        };
        let downstream_upgrade = protocol.is_some().then(|| hyper::upgrade::on(&mut request));
        proxy::strip_hop_by_hop(request.headers_mut(), protocol);
        *request.uri_mut() = proxy::absolute_uri(&request, &self.fallback_authority);
        let client = if proxy::is_http2(&request) {
            &clients.http2
        } else {
            &clients.http1
        };
        let mut response = match client.request(request).await {
            Ok(response) => response,
            Err(error) => return self.failed(&target, &error),
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(downstream) = downstream_upgrade
        {
            let upstream = hyper::upgrade::on(&mut response);
            let protocol = proxy::upgrade(response.headers());
            proxy::strip_hop_by_hop(response.headers_mut(), protocol);
            tokio::spawn(tunnel(downstream, upstream, permit));
        } else {
            proxy::strip_hop_by_hop(response.headers_mut(), None);
        }
        response.map(Either::Left)
    }

    /// The pooled clients of `route`'s bridge, made on first use; those of bridges no longer
    /// in `table` are dropped (their idle connections with them).
    fn bridge_clients(&self, table: &Arc<RouteTable>, route: &Route) -> Clients {
        let mut bridges = self.bridges.lock().unwrap_or_else(PoisonError::into_inner);
        if !Arc::ptr_eq(&bridges.table, table) {
            let current = table.routes(self.port);
            bridges
                .clients
                .retain(|preamble, _| current.iter().any(|route| route.preamble == *preamble));
            bridges.table = Arc::clone(table);
        }
        bridges
            .clients
            .entry(Arc::clone(&route.preamble))
            .or_insert_with(|| {
                Clients::new(
                    Arc::clone(&self.shared.stowaway),
                    Some(Arc::clone(&route.preamble)),
                )
            })
            .clone()
    }

    /// The 502 naming what failed.
    fn failed(
        &self,
        target: &Target<'_>,
        error: &hyper_util::client::legacy::Error,
    ) -> Response<Body> {
        let cause =
            std::error::Error::source(error).map_or_else(|| error.to_string(), proxy::chain);
        let message = match target {
            Target::Original => {
                self.shared.counters.original_failed.inc();
                let what = if error.is_connect() {
                    "could not connect"
                } else {
                    "no response"
                };
                format!("original {}: {what}: {cause}", self.original.address())
            }
            Target::Bridge(route) => {
                self.shared.counters.stowaway_failed.inc();
                let stowaway = self.shared.stowaway.address();
                if error.is_connect() {
                    format!(
                        "bridge {}: Stowaway at {stowaway} did not accept the connection: {cause}",
                        route.bridge
                    )
                } else {
                    format!(
                        "bridge {}: no response through Stowaway at {stowaway} (it closes the connections of a bridge it does not route, or whose client is not connected): {cause}",
                        route.bridge
                    )
                }
            }
        };
        tracing::warn!(port = self.port, %message, "a request's upstream failed");
        proxy::text(StatusCode::BAD_GATEWAY, message)
    }
}

/// Raw connections have no idle timeout (a database connection may rightly idle for hours);
/// TCP keep-alive ends those whose peer is gone, within about two minutes.
fn keep_alive(stream: &TcpStream) {
    let probes = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    if let Err(error) = SockRef::from(stream).set_tcp_keepalive(&probes) {
        tracing::debug!(%error, "setting TCP keep-alive failed");
    }
}

/// After a 101: the two upgraded connections joined, holding the connection's permit.
async fn tunnel(downstream: OnUpgrade, upstream: OnUpgrade, _permit: Arc<OwnedSemaphorePermit>) {
    match tokio::try_join!(downstream, upstream) {
        Ok((downstream, upstream)) => {
            let (mut downstream, mut upstream) = (TokioIo::new(downstream), TokioIo::new(upstream));
            if let Err(error) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await
            {
                tracing::debug!(%error, "an upgraded connection ended with an error");
            }
        }
        Err(error) => tracing::debug!(%error, "an upgrade did not complete"),
    }
}
