//! The router's HTTP endpoints: /livez, /ready (the first list of bridges is in, every port
//! listens and every original accepts a connection — so a mount switches its Services only
//! to a router that reaches the original Pods; 503 from SIGTERM on, so endpoints drop the
//! Pod while it drains), /metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// The first list of bridges arrived (every port was bound before this is served).
    pub listed: Arc<AtomicBool>,
    /// SIGTERM arrived: the router drains.
    pub stopping: Arc<AtomicBool>,
    /// Each port's original, which must accept a TCP connection for /ready.
    pub originals: Arc<Vec<Arc<crate::upstream::Upstream>>>,
}

pub fn routes(health: Health) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(health)
}

/// Serves the endpoints on `address` until `stop` resolves.
pub async fn serve(
    address: SocketAddr,
    health: Health,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    gefyra_process::serve_http_until(address, routes(health), stop).await
}

async fn ready(State(health): State<Health>) -> (StatusCode, &'static str) {
    if health.stopping.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: the router is stopping",
        )
    } else if !health.listed.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first list of GefyraBridges",
        )
    } else {
        for original in health.originals.iter() {
            if original.connect().await.is_err() {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: an original does not accept connections yet",
                );
            }
        }
        (StatusCode::OK, "ok")
    }
}

async fn metrics(State(health): State<Health>) -> impl axum::response::IntoResponse {
    gefyra_process::metrics_response(&health.metrics.families())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_after_the_first_list_until_stopping() {
        let health = Health {
            metrics: Arc::new(Metrics::default()),
            listed: Arc::new(AtomicBool::new(false)),
            stopping: Arc::new(AtomicBool::new(false)),
            originals: Arc::new(Vec::new()),
        };
        let status = || async { ready(State(health.clone())).await.0 };
        assert_eq!(status().await, StatusCode::SERVICE_UNAVAILABLE);
        health.listed.store(true, Ordering::Relaxed);
        assert_eq!(status().await, StatusCode::OK);
        health.stopping.store(true, Ordering::Relaxed);
        assert_eq!(status().await, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn ready_only_while_every_original_accepts_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let original = Arc::new(crate::upstream::Upstream::new(
            address.to_string().parse().unwrap(),
            std::time::Duration::from_secs(1),
        ));
        let health = Health {
            metrics: Arc::new(Metrics::default()),
            listed: Arc::new(AtomicBool::new(true)),
            stopping: Arc::new(AtomicBool::new(false)),
            originals: Arc::new(vec![original]),
        };
        let status = || async { ready(State(health.clone())).await.0 };
        assert_eq!(
            status().await,
            StatusCode::SERVICE_UNAVAILABLE,
            "the original refuses"
        );
        let _listening = tokio::net::TcpListener::bind(address).await.unwrap();
        assert_eq!(status().await, StatusCode::OK, "the original accepts");
    }

    #[tokio::test]
    async fn the_endpoints_are_served() {
        let health = Health {
            metrics: Arc::new(Metrics::default()),
            listed: Arc::new(AtomicBool::new(true)),
            stopping: Arc::new(AtomicBool::new(false)),
            originals: Arc::new(Vec::new()),
        };
        health.metrics.connections.with_label_values(&["raw"]).inc();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, routes(health)).await });
        for (path, expected) in [
            ("/ready", "HTTP/1.1 200"),
            ("/livez", "HTTP/1.1 200"),
            (
                "/metrics",
                "gefyra_carrier_connections_total{mode=\"raw\"} 1",
            ),
        ] {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(address)
                .await
                .expect("connect");
            let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.expect("read");
            assert!(answer.contains(expected), "{path}: {answer}");
        }
    }
}
