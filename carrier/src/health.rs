//! The router's HTTP endpoints: /livez, /ready (the first list of bridges is in and every
//! port listens; 503 from SIGTERM on, so endpoints drop the Pod while it drains), /metrics.

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
        (StatusCode::OK, "ok")
    }
}

async fn metrics(State(health): State<Health>) -> impl axum::response::IntoResponse {
    gefyra_process::metrics_response(&health.metrics.families())
}
