//! `/livez`, `/readyz` and `/metrics`, served by the shared process shell.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// The CRD is present and the controller's cache is synced.
    pub ready: Arc<AtomicBool>,
}

pub async fn serve(address: SocketAddr, health: Health) -> std::io::Result<()> {
    let routes = Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    gefyra_process::serve_http(address, routes).await
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    gefyra_process::metrics_response(&health.metrics.families())
}

async fn readyz(State(health): State<Health>) -> (StatusCode, &'static str) {
    if health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the GefyraClient CRD and the cache",
        )
    }
}
