//! Stowaway's HTTP endpoints: /livez (the data plane ticks), /readyz (key, socket and
//! first peer table in place), /metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::dataplane::Shared;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    pub shared: Arc<Shared>,
    /// The key is loaded, the socket bound and the peer table built from the first list.
    pub ready: Arc<AtomicBool>,
}

/// Serves /livez, /readyz and /metrics on `address` until the process is told to stop.
pub async fn serve(address: SocketAddr, health: Health) -> std::io::Result<()> {
    let routes = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    gefyra_process::serve_http(address, routes).await
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Alive while the data plane ticks (or before it started: waiting for the key is no fault).
async fn livez(State(health): State<Health>) -> (StatusCode, &'static str) {
    let beat = health.shared.heartbeat();
    if beat == 0 || unix_now().saturating_sub(beat) <= 10 {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the data plane has not ticked for over 10 s",
        )
    }
}

async fn readyz(State(health): State<Health>) -> (StatusCode, &'static str) {
    if health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the server key Secret and the first list of GefyraClients",
        )
    }
}

async fn metrics(State(health): State<Health>) -> impl axum::response::IntoResponse {
    let stats = health.shared.peer_stats();
    gefyra_process::metrics_response(&health.metrics.families(&stats, SystemTime::now()))
}
