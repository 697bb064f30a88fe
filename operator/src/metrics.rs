//! Prometheus metrics with bounded labels: no per-client label.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use gefyra_api::{ClientState, GefyraClient};
use kube::runtime::reflector::Store;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::error::Error;

pub struct Metrics {
    registry: Registry,
    /// The names of this component's own metric families, whether or not they have a
    /// series yet (a vector without label values is left out of /metrics).
    declared: Vec<String>,
    reconciles: IntCounterVec,
    reconcile_errors: IntCounterVec,
    reconcile_duration: HistogramVec,
    clients: IntGaugeVec,
    pool: IntGaugeVec,
    leader: IntGauge,
    api_requests: IntCounterVec,
    store: OnceLock<Store<GefyraClient>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("gefyra_operator_reconciles_total", "Reconciles run"),
            &["result"],
        )
        .expect("valid metric");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "gefyra_operator_reconcile_errors_total",
                "Failed reconciles by error category",
            ),
            &["category"],
        )
        .expect("valid metric");
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "gefyra_operator_reconcile_duration_seconds",
                "Time one reconcile takes",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &[],
        )
        .expect("valid metric");
        let clients = IntGaugeVec::new(
            Opts::new("gefyra_operator_clients", "GefyraClients by state"),
            &["state"],
        )
        .expect("valid metric");
        let pool = IntGaugeVec::new(
            Opts::new(
                "gefyra_operator_ip_pool_addresses",
                "Tunnel addresses by use (`capacity`, `allocated`), as last written",
            ),
            &["use"],
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "gefyra_operator_leader",
            "1 while this replica holds the leader lease and reconciles (always 1 without --leader-elect), 0 while it stands by",
        )
        .expect("valid metric");
        let api_requests = IntCounterVec::new(
            Opts::new(
                "gefyra_operator_api_requests_total",
                "Requests this operator sent to the Kubernetes API server, by verb (watch, get, post, put, patch, delete)",
            ),
            &["verb"],
        )
        .expect("valid metric");
        let mut declared = Vec::new();
        for collector in [
            Box::new(pool.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(api_requests.clone()),
            Box::new(leader.clone()),
            Box::new(reconciles.clone()),
            Box::new(reconcile_errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(clients.clone()),
        ] {
            declared.extend(collector.desc().iter().map(|desc| desc.fq_name.clone()));
            registry
                .register(collector)
                .expect("metric registered once");
        }
        gefyra_process::register_standard_metrics(
            &registry,
            "gefyra_operator",
            env!("CARGO_PKG_VERSION"),
        );
        Self {
            registry,
            declared,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            clients,
            pool,
            leader,
            api_requests,
            store: OnceLock::new(),
        }
    }
}

/// The verb of a request to the API server, from its method and query (bounded).
pub fn api_verb(method: &str, query: Option<&str>) -> &'static str {
    let watching = query.is_some_and(|query| {
        query
            .split('&')
            .any(|pair| pair == "watch=true" || pair == "watch=1")
    });
    match method {
        "GET" if watching => "watch",
        "GET" => "get",
        "POST" => "post",
        "PUT" => "put",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => "other",
    }
}

impl Metrics {
    /// The names of this component's own metric families (see `declared`).
    pub fn declared_families(&self) -> &[String] {
        &self.declared
    }

    /// Counts one request to the API server (see [`api_verb`]).
    pub fn count_api_request(&self, method: &str, query: Option<&str>) {
        self.api_requests
            .with_label_values(&[api_verb(method, query)])
            .inc();
    }

    pub fn watch_store(&self, store: Store<GefyraClient>) {
        let _ = self.store.set(store);
    }

    /// Whether this replica leads (reconciles) or stands by.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn observe_pool(&self, capacity: u128, allocated: usize) {
        let capacity = i64::try_from(capacity).unwrap_or(i64::MAX);
        self.pool.with_label_values(&["capacity"]).set(capacity);
        self.pool
            .with_label_values(&["allocated"])
            .set(allocated as i64);
    }

    pub fn observe_reconcile(&self, duration: Duration, error: Option<&Error>) {
        self.reconcile_duration
            .with_label_values::<&str>(&[])
            .observe(duration.as_secs_f64());
        match error {
            None => self.reconciles.with_label_values(&["ok"]).inc(),
            Some(error) => {
                self.reconciles.with_label_values(&["error"]).inc();
                self.reconcile_errors
                    .with_label_values(&[error.category()])
                    .inc();
            }
        }
    }

    /// The text exposition format; client counts are taken from the cache at scrape time.
    /// Every metric family, the per-state client counts taken from the cache now.
    pub fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        if let Some(store) = self.store.get() {
            let clients = store.state();
            for state in ClientState::ALL {
                let count = clients
                    .iter()
                    .filter(|client| client.state == state)
                    .count();
                self.clients
                    .with_label_values(&[state.as_str()])
                    .set(count as i64);
            }
        }
        self.registry.gather()
    }

    /// The text exposition format of [`Metrics::families`].
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.families(), &mut buffer)
            .expect("text encoding never fails");
        String::from_utf8(buffer).expect("metrics are UTF-8")
    }
}

pub type SharedMetrics = Arc<Metrics>;
