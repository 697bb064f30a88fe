//! The router's core on real sockets: an original and a stand-in Stowaway on 127.0.0.1 (the
//! stand-in reads the preamble with the api's parser and answers as "the developer"), a
//! route table set by the test, requests over HTTP/1.1, h2c and raw TCP.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gefyra_api::bridge_wire::{parse_preamble, preamble_end};
use gefyra_carrier::metrics::Metrics;
use gefyra_carrier::router::{Router, Settings};
use gefyra_carrier::routes::RouteTable;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use kube::core::DynamicObject;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The container port the bridges map (the router's listener is elsewhere on 127.0.0.1).
const PORT: u16 = 8080;

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .expect("the test step finished in time")
}

/// An HTTP server (HTTP/1.1 and h2c) answering `<label> <version> <path> x-gefyra=<value>`.
/// `/slow` answers after a second; `Upgrade: echo` switches to echoing bytes.
async fn http_server(listener: TcpListener, label: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let label = label.clone();
        tokio::spawn(serve_http(stream, label));
    }
}

async fn serve_http(stream: TcpStream, label: String) {
    let service = service_fn(move |mut request: Request<Incoming>| {
        let label = label.clone();
        async move {
            if request.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if request
                .headers()
                .get("upgrade")
                .is_some_and(|v| v == "echo")
            {
                let upgraded = hyper::upgrade::on(&mut request);
                tokio::spawn(async move {
                    if let Ok(upgraded) = upgraded.await {
                        let mut io = TokioIo::new(upgraded);
                        let mut buffer = [0u8; 64];
                        while let Ok(read) = io.read(&mut buffer).await {
                            if read == 0 || io.write_all(&buffer[..read]).await.is_err() {
                                break;
                            }
                        }
                    }
                });
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                response
                    .headers_mut()
                    .insert("connection", "upgrade".parse().expect("value"));
                response
                    .headers_mut()
                    .insert("upgrade", "echo".parse().expect("value"));
                return Ok::<_, Infallible>(response);
            }
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                    .unwrap_or_default()
            };
            let text = format!(
                "{label} {:?} {} x-gefyra={} connection={}",
                request.version(),
                request.uri().path(),
                header("x-gefyra"),
                header("connection"),
            );
            Ok(Response::new(Full::new(Bytes::from(text))))
        }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await;
}

/// A TCP server echoing what it reads, after `hello from <label>\n`.
async fn echo_server(listener: TcpListener, label: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(echo(stream, format!("hello from {label}\n")));
    }
}

async fn echo(mut stream: TcpStream, greeting: String) {
    if stream.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let (mut reader, mut writer) = stream.split();
    let _ = tokio::io::copy(&mut reader, &mut writer).await;
}

async fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    (listener, address)
}

/// A port nothing listens on.
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// The stand-in Stowaway: reads the preamble (byte by byte, so nothing after it is
/// consumed), records it, closes on a malformed one or a bridge named `refused-*`; a bridge
/// named `raw-*` gets an echo, any other an HTTP server labelled `bridge <name>`.
#[derive(Clone, Default)]
struct Stowaway {
    seen: Arc<Mutex<Vec<(String, u16)>>>,
}

impl Stowaway {
    async fn start() -> (Stowaway, SocketAddr) {
        let (listener, address) = listen().await;
        let stowaway = Stowaway::default();
        let seen = Arc::clone(&stowaway.seen);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(Stowaway::connection(stream, Arc::clone(&seen)));
            }
        });
        (stowaway, address)
    }

    async fn connection(mut stream: TcpStream, seen: Arc<Mutex<Vec<(String, u16)>>>) {
        let mut line = Vec::new();
        let end = loop {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte).await {
                Ok(1) => line.push(byte[0]),
                _ => return,
            }
            match preamble_end(&line) {
                Ok(Some(end)) => break end,
                Ok(None) => continue,
                Err(_) => return,
            }
        };
        let Ok((bridge, port)) = parse_preamble(&line[..end]) else {
            return;
        };
        seen.lock().expect("lock").push((bridge.clone(), port));
        if bridge.starts_with("refused-") {
            return;
        }
        if bridge.starts_with("raw-") {
            echo(stream, format!("hello from {bridge}\n")).await;
        } else {
            serve_http(stream, format!("bridge {bridge}")).await;
        }
    }

    fn seen(&self) -> Vec<(String, u16)> {
        self.seen.lock().expect("lock").clone()
    }
}

fn bridge(name: &str, created_second: u32, ports: &[&str], parameter: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "gefyra.dev/v1",
        "kind": "gefyrabridge",
        "metadata": {
            "name": name,
            "namespace": "gefyra",
            "creationTimestamp": format!("2026-01-01T00:00:{created_second:02}Z"),
        },
        "provider": "carrier2",
        "state": "ACTIVE",
        "portMappings": ports,
        "providerParameter": parameter,
    }))
    .expect("a bridge object")
}

fn header_rule(value: &str) -> Value {
    json!({"rules": [{"match": [{"matchHeader": {"name": "x-gefyra", "value": value, "type": "exact"}}]}]})
}

fn table(bridges: &[DynamicObject]) -> Arc<RouteTable> {
    let (table, skipped) = RouteTable::build(bridges);
    assert!(skipped.is_empty(), "{skipped:?}");
    Arc::new(table)
}

/// A router serving PORT on 127.0.0.1 in front of `original`, with a stand-in Stowaway.
struct Harness {
    router: Router,
    tables: watch::Sender<Arc<RouteTable>>,
    metrics: Arc<Metrics>,
    stowaway: Stowaway,
    stowaway_address: SocketAddr,
    address: SocketAddr,
}

impl Harness {
    async fn start(original: SocketAddr, bridges: &[DynamicObject]) -> Harness {
        let (stowaway, stowaway_address) = Stowaway::start().await;
        Harness::with_stowaway(original, bridges, stowaway, stowaway_address).await
    }

    async fn with_stowaway(
        original: SocketAddr,
        bridges: &[DynamicObject],
        stowaway: Stowaway,
        stowaway_address: SocketAddr,
    ) -> Harness {
        let (tables, table_receiver) = watch::channel(table(bridges));
        let metrics = Arc::new(Metrics::default());
        let settings = Settings {
            header_read_timeout: Duration::from_secs(5),
            ..Settings::default()
        };
        let router = Router::new(
            &settings,
            stowaway_address.to_string().parse().expect("address"),
            table_receiver,
            Arc::clone(&metrics),
        );
        let (listener, address) = listen().await;
        router.serve(
            listener,
            PORT,
            original.to_string().parse().expect("address"),
        );
        Harness {
            router,
            tables,
            metrics,
            stowaway,
            stowaway_address,
            address,
        }
    }

    fn set(&self, bridges: &[DynamicObject]) {
        self.tables.send_replace(table(bridges));
    }

    fn counter(&self, family: &str, label: &str) -> u64 {
        let vec = match family {
            "requests" => &self.metrics.requests,
            "connections" => &self.metrics.connections,
            _ => &self.metrics.upstream_errors,
        };
        vec.with_label_values(&[label]).get()
    }
}

async fn original_http() -> SocketAddr {
    let (listener, address) = listen().await;
    tokio::spawn(http_server(listener, "original".to_string()));
    address
}

type Http1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// One HTTP/1.1 connection (kept alive across requests).
async fn http1(address: SocketAddr) -> Http1 {
    let stream = TcpStream::connect(address).await.expect("connect");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection.with_upgrades());
    sender
}

fn request(path: &str, headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
    let mut builder = Request::get(path).header("host", "web.demo");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Empty::new()).expect("request")
}

async fn text(response: Response<Incoming>) -> (StatusCode, String) {
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn get(sender: &mut Http1, path: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    sender.ready().await.expect("connection ready");
    let response = sender
        .send_request(request(path, headers))
        .await
        .expect("response");
    text(response).await
}

/// Writes `bytes` on a new connection and reads until `expected` bytes arrived (or EOF).
async fn raw_exchange(address: SocketAddr, bytes: &[u8], expected: usize) -> Vec<u8> {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while received.len() < expected {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => received.extend_from_slice(&buffer[..read]),
        }
    }
    received
}

#[tokio::test]
async fn without_bridges_bytes_go_to_the_original_untouched() {
    within(async {
        let (listener, original) = listen().await;
        tokio::spawn(echo_server(listener, "original".to_string()));
        let harness = Harness::start(original, &[]).await;
        // Not HTTP at all: only a raw splice passes it.
        let payload = b"\x00\x01 not http\r\n\r\n";
        let received = raw_exchange(harness.address, payload, 20 + payload.len()).await;
        assert_eq!(received, [&b"hello from original\n"[..], payload].concat());
        assert_eq!(harness.counter("connections", "raw"), 1);
        assert!(harness.stowaway.seen().is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_header_rule_takes_its_requests_and_leaves_the_rest_on_one_connection() {
    within(async {
        let harness = Harness::start(
            original_http().await,
            &[bridge("b1", 0, &["8080:8080"], header_rule("dev"))],
        )
        .await;
        let mut connection = http1(harness.address).await;
        for round in 0..2 {
            let (status, body) = get(&mut connection, "/api", &[("x-gefyra", "dev")]).await;
            assert_eq!(status, StatusCode::OK);
            assert!(
                body.starts_with("bridge b1 HTTP/1.1 /api x-gefyra=dev"),
                "round {round}: {body}"
            );
            let (status, body) = get(&mut connection, "/api", &[("x-gefyra", "prod")]).await;
            assert_eq!(status, StatusCode::OK);
            assert!(
                body.starts_with("original HTTP/1.1 /api x-gefyra=prod"),
                "round {round}: {body}"
            );
            let (_, body) = get(&mut connection, "/", &[]).await;
            assert!(body.starts_with("original"), "{body}");
        }
        // Header names are case-insensitive on the wire as in the rules.
        let (_, body) = get(&mut connection, "/", &[("X-Gefyra", "dev")]).await;
        assert!(body.starts_with("bridge b1"), "{body}");
        assert_eq!(harness.stowaway.seen()[0], ("b1".to_string(), PORT));
        assert_eq!(
            harness.counter("connections", "http"),
            1,
            "one keep-alive connection"
        );
        assert_eq!(harness.counter("requests", "bridge"), 3);
        assert_eq!(harness.counter("requests", "original"), 4);
    })
    .await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    within(async {
        let harness = Harness::start(
            original_http().await,
            &[bridge("b1", 0, &["8080:8080"], header_rule("dev"))],
        )
        .await;
        let mut connection = http1(harness.address).await;
        let (_, body) = get(
            &mut connection,
            "/",
            &[("connection", "x-gefyra"), ("x-gefyra", "dev")],
        )
        .await;
        // `Connection: x-gefyra` makes x-gefyra hop-by-hop: it routes here, then is dropped.
        assert!(
            body.starts_with("bridge b1 HTTP/1.1 / x-gefyra= "),
            "{body}"
        );
    })
    .await;
}

#[tokio::test]
async fn two_bridges_each_get_their_own_requests() {
    within(async {
        let harness = Harness::start(
            original_http().await,
            &[
                bridge("alice", 0, &["8000:8080"], header_rule("alice")),
                bridge("bob", 1, &["8001:8080"], header_rule("bob")),
            ],
        )
        .await;
        let mut connection = http1(harness.address).await;
        for (value, expected) in [
            ("alice", "bridge alice"),
            ("bob", "bridge bob"),
            ("carol", "original"),
            ("bob", "bridge bob"),
        ] {
            let (_, body) = get(&mut connection, "/", &[("x-gefyra", value)]).await;
            assert!(body.starts_with(expected), "{value}: {body}");
        }
        let mut seen = harness.stowaway.seen();
        seen.sort();
        assert_eq!(
            seen,
            [("alice".to_string(), PORT), ("bob".to_string(), PORT)],
            "one pooled connection each"
        );
    })
    .await;
}

#[tokio::test]
async fn a_rule_less_bridge_takes_the_port_as_raw_tcp() {
    within(async {
        let harness = Harness::start(
            original_http().await,
            &[
                bridge("raw-all", 1, &["9000:8080"], json!(null)),
                bridge("b1", 0, &["8000:8080"], header_rule("dev")),
            ],
        )
        .await;
        let payload = b"\x16\x03\x01 a TLS-like hello, not HTTP";
        let greeting = b"hello from raw-all\n";
        let received = raw_exchange(harness.address, payload, greeting.len() + payload.len()).await;
        assert_eq!(received, [&greeting[..], payload].concat());
        assert_eq!(harness.stowaway.seen(), [("raw-all".to_string(), PORT)]);
        assert_eq!(harness.counter("connections", "bridge_raw"), 1);
    })
    .await;
}

#[tokio::test]
async fn h2c_requests_are_routed_and_stay_http2() {
    within(async {
        let harness = Harness::start(
            original_http().await,
            &[bridge("b1", 0, &["8080:8080"], header_rule("dev"))],
        )
        .await;
        let stream = TcpStream::connect(harness.address).await.expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2c handshake");
        tokio::spawn(connection);
        for (value, expected) in [
            ("dev", "bridge b1 HTTP/2.0 /grpc"),
            ("prod", "original HTTP/2.0 /grpc"),
            ("dev", "bridge b1 HTTP/2.0 /grpc"),
        ] {
            let request = Request::post("http://web.demo/grpc")
                .header("x-gefyra", value)
                .header("te", "trailers")
                .body(Empty::<Bytes>::new())
                .expect("request");
            sender.ready().await.expect("ready");
            let (status, body) = text(sender.send_request(request).await.expect("response")).await;
            assert_eq!(status, StatusCode::OK);
            assert!(body.starts_with(expected), "{value}: {body}");
        }
        assert_eq!(harness.counter("connections", "http"), 1);
    })
    .await;
}

#[tokio::test]
async fn a_table_change_applies_to_the_next_request() {
    within(async {
        let harness = Harness::start(
            original_http().await,
            &[bridge("b1", 0, &["8080:8080"], header_rule("dev"))],
        )
        .await;
        let mut connection = http1(harness.address).await;
        let (_, body) = get(&mut connection, "/", &[("x-gefyra", "dev")]).await;
        assert!(body.starts_with("bridge b1"), "{body}");

        // b1 now wants another value; b2 takes "dev": the same connection follows.
        harness.set(&[
            bridge("b1", 0, &["8080:8080"], header_rule("other")),
            bridge("b2", 1, &["8080:8080"], header_rule("dev")),
        ]);
        let (_, body) = get(&mut connection, "/", &[("x-gefyra", "dev")]).await;
        assert!(body.starts_with("bridge b2"), "{body}");
        let (_, body) = get(&mut connection, "/", &[("x-gefyra", "other")]).await;
        assert!(body.starts_with("bridge b1"), "{body}");

        // Every bridge gone: this connection still routes (to the original) and a new one
        // is a raw splice.
        harness.set(&[]);
        let (_, body) = get(&mut connection, "/", &[("x-gefyra", "dev")]).await;
        assert!(body.starts_with("original"), "{body}");
        let mut fresh = http1(harness.address).await;
        let (_, body) = get(&mut fresh, "/", &[("x-gefyra", "dev")]).await;
        assert!(body.starts_with("original"), "{body}");
        assert_eq!(harness.counter("connections", "raw"), 1);
    })
    .await;
}

#[tokio::test]
async fn garbage_and_oversized_heads_get_4xx() {
    within(async {
        let harness = Harness::start(
            original_http().await,
            &[bridge("b1", 0, &["8080:8080"], header_rule("dev"))],
        )
        .await;
        let address = harness.address;
        let status_of = |bytes: Vec<u8>| async move {
            let received = raw_exchange(address, &bytes, 12).await;
            String::from_utf8_lossy(&received).into_owned()
        };
        for garbage in [
            b"GARBAGE\r\n\r\n".to_vec(),
            b"GET / HTTP/1.1\r\nbad header line\r\n\r\n".to_vec(),
            b"\x00\xff\xfe\xfd\r\n\r\n".to_vec(),
            b"GET /\x01 HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        ] {
            let answer = status_of(garbage.clone()).await;
            assert!(
                answer.starts_with("HTTP/1.1 400"),
                "{:?}: {answer}",
                String::from_utf8_lossy(&garbage)
            );
        }
        let mut oversized = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec();
        oversized.extend(std::iter::repeat_n(b'a', 200 * 1024));
        oversized.extend(b"\r\n\r\n");
        let answer = status_of(oversized).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        // The router is unharmed.
        let mut connection = http1(harness.address).await;
        let (status, body) = get(&mut connection, "/", &[("x-gefyra", "dev")]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.starts_with("bridge b1"), "{body}");
    })
    .await;
}

#[tokio::test]
async fn failed_upstreams_answer_502_naming_what_failed() {
    within(async {
        // The original is down.
        let original = closed_port();
        let harness = Harness::start(
            original,
            &[
                bridge("b1", 0, &["8080:8080"], header_rule("dev")),
                bridge("refused-b", 1, &["8080:8080"], header_rule("refused")),
            ],
        )
        .await;
        let mut connection = http1(harness.address).await;
        let (status, body) = get(&mut connection, "/", &[]).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(body.starts_with(&format!("original {original}: could not connect: connecting to {original}: ")), "{body}");

        // Stowaway closes the connection of a bridge it refuses.
        let (status, body) = get(&mut connection, "/", &[("x-gefyra", "refused")]).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(
            body.starts_with(&format!("bridge refused-b: no response through Stowaway at {}", harness.stowaway_address)),
            "{body}"
        );
        assert_eq!(harness.counter("upstream_errors", "original"), 1);
        assert_eq!(harness.counter("upstream_errors", "stowaway"), 1);

        // Stowaway is down.
        let stowaway = closed_port();
        let harness = Harness::with_stowaway(
            original_http().await,
            &[bridge("b1", 0, &["8080:8080"], header_rule("dev"))],
            Stowaway::default(),
            stowaway,
        )
        .await;
        let mut connection = http1(harness.address).await;
        let (status, body) = get(&mut connection, "/", &[("x-gefyra", "dev")]).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(
            body.starts_with(&format!("bridge b1: Stowaway at {stowaway} did not accept the connection: connecting to {stowaway}: ")),
            "{body}"
        );
        let (status, _) = get(&mut connection, "/", &[]).await;
        assert_eq!(status, StatusCode::OK, "the original still answers");

        // Raw mode: the connection is closed.
        harness.set(&[bridge("raw-all", 0, &["1:8080"], json!(null))]);
        assert!(raw_exchange(harness.address, b"hello", 1).await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn an_upgrade_is_carried_through_http_mode() {
    within(async {
        let harness = Harness::start(
            original_http().await,
            &[bridge("b1", 0, &["8080:8080"], header_rule("dev"))],
        )
        .await;
        for (headers, greeting) in [
            (vec![], "original"),
            (vec![("x-gefyra", "dev")], "bridge b1"),
        ] {
            let mut connection = http1(harness.address).await;
            let mut all = vec![("connection", "upgrade"), ("upgrade", "echo")];
            all.extend(headers);
            connection.ready().await.expect("ready");
            let response = connection
                .send_request(request("/ws", &all))
                .await
                .expect("response");
            assert_eq!(
                response.status(),
                StatusCode::SWITCHING_PROTOCOLS,
                "{greeting}"
            );
            let mut io = TokioIo::new(hyper::upgrade::on(response).await.expect("upgraded"));
            io.write_all(b"ping").await.expect("write");
            let mut pong = [0u8; 4];
            io.read_exact(&mut pong).await.expect("echo");
            assert_eq!(&pong, b"ping");
        }
    })
    .await;
}

#[tokio::test]
async fn a_drain_finishes_the_in_flight_request_then_stops_accepting() {
    within(async {
        let harness = Harness::start(
            original_http().await,
            &[bridge("b1", 0, &["8080:8080"], header_rule("dev"))],
        )
        .await;
        let mut connection = http1(harness.address).await;
        let mut idle = http1(harness.address).await;
        let (_, body) = get(&mut idle, "/", &[]).await;
        assert!(body.starts_with("original"), "{body}");

        let slow = tokio::spawn(async move { get(&mut connection, "/slow", &[]).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        assert!(
            harness.router.drain(Duration::from_secs(10)).await,
            "every connection ended"
        );
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(500),
            "the drain waited for the slow request"
        );
        // Well before the 5 s idle timeout: the idle connection was closed by the drain.
        assert!(took < Duration::from_secs(3), "the drain took {took:?}");
        let (status, body) = slow.await.expect("the slow request");
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("original HTTP/1.1 /slow"), "{body}");
        let after = async {
            idle.ready().await?;
            idle.send_request(request("/", &[])).await
        };
        assert!(
            after.await.is_err(),
            "the idle keep-alive connection was closed"
        );
        assert!(
            TcpStream::connect(harness.address).await.is_err(),
            "no longer listening"
        );
    })
    .await;
}

#[tokio::test]
async fn a_drain_gives_up_after_its_time() {
    within(async {
        let (listener, original) = listen().await;
        tokio::spawn(echo_server(listener, "original".to_string()));
        let harness = Harness::start(original, &[]).await;
        // A raw connection that stays open.
        let mut stream = TcpStream::connect(harness.address).await.expect("connect");
        let mut greeting = [0u8; 20];
        stream.read_exact(&mut greeting).await.expect("greeting");
        assert!(!harness.router.drain(Duration::from_millis(300)).await);
    })
    .await;
}
