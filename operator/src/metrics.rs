//! Prometheus metrics with bounded labels: no per-client label. Every family is named
//! `gefyra_operator_*` (Stowaway's are `gefyra_stowaway_*`).

use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http;
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
    pool_capacity: IntGauge,
    pool_allocated: IntGauge,
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
        let pool_capacity = IntGauge::new(
            "gefyra_operator_tunnel_pool_capacity_addresses",
            "Addresses the tunnel pool (--tunnel-pool) holds for clients",
        )
        .expect("valid metric");
        let pool_allocated = IntGauge::new(
            "gefyra_operator_tunnel_pool_allocated_addresses",
            "Addresses of the tunnel pool claimed by clients, as last written",
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
                "Requests this operator sent to the Kubernetes API server, by verb (watch, get, post, put, patch, delete) and the response's status code (`error`: no response)",
            ),
            &["verb", "code"],
        )
        .expect("valid metric");
        let mut declared = Vec::new();
        for collector in [
            Box::new(pool_capacity.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(pool_allocated.clone()),
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
            pool_capacity,
            pool_allocated,
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

    /// Counts one request to the API server by verb (see [`api_verb`]) and the response's
    /// status code, `None` if there was no response.
    pub fn count_api_request(&self, verb: &str, status: Option<http::StatusCode>) {
        let code = status.as_ref().map_or("error", http::StatusCode::as_str);
        self.api_requests.with_label_values(&[verb, code]).inc();
    }

    pub fn watch_store(&self, store: Store<GefyraClient>) {
        let _ = self.store.set(store);
    }

    /// Whether this replica leads (reconciles) or stands by.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    pub fn observe_pool(&self, capacity: u128, allocated: usize) {
        self.pool_capacity
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
        self.pool_allocated
            .set(i64::try_from(allocated).unwrap_or(i64::MAX));
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

/// Counts every request of the kube client it wraps in
/// `gefyra_operator_api_requests_total{verb,code}` once its response (or failure) is in.
#[derive(Clone)]
pub struct CountApiRequestsLayer(pub SharedMetrics);

impl<S> tower::Layer<S> for CountApiRequestsLayer {
    type Service = CountApiRequests<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountApiRequests {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CountApiRequests<S> {
    inner: S,
    metrics: SharedMetrics,
}

impl<S, RequestBody, ResponseBody> tower::Service<http::Request<RequestBody>>
    for CountApiRequests<S>
where
    S: tower::Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let verb = api_verb(request.method().as_str(), request.uri().query());
        let metrics = self.metrics.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            metrics.count_api_request(verb, response.as_ref().ok().map(http::Response::status));
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    #[tokio::test]
    async fn api_requests_are_counted_by_verb_and_status_code() {
        let metrics = Arc::new(Metrics::default());
        let mut api = CountApiRequestsLayer(metrics.clone()).layer(tower::service_fn(
            |request: http::Request<()>| async move {
                match request.method().as_str() {
                    "PATCH" => Ok(http::Response::builder().status(409).body(()).unwrap()),
                    "GET" => Ok(http::Response::new(())),
                    _ => Err("connection refused"),
                }
            },
        ));
        for (method, uri) in [
            ("PATCH", "/apis/gefyra.dev/v1/x"),
            ("GET", "/api/v1/secrets?watch=true"),
            ("GET", "/api/v1/secrets"),
            ("DELETE", "/api/v1/secrets/x"),
        ] {
            let request = http::Request::builder()
                .method(method)
                .uri(uri)
                .body(())
                .unwrap();
            let _ = api.ready().await.unwrap().call(request).await;
        }
        let text = metrics.render();
        for series in [
            r#"gefyra_operator_api_requests_total{code="409",verb="patch"} 1"#,
            r#"gefyra_operator_api_requests_total{code="200",verb="watch"} 1"#,
            r#"gefyra_operator_api_requests_total{code="200",verb="get"} 1"#,
            r#"gefyra_operator_api_requests_total{code="error",verb="delete"} 1"#,
        ] {
            assert!(text.lines().any(|line| line == series), "{series}:\n{text}");
        }
    }

    /// One prefix, `_total` on counters only, and no two families one name under
    /// OpenMetrics (which drops a counter's `_total` from its family name).
    #[test]
    fn names_follow_prometheus_naming() {
        let metrics = Metrics::default();
        metrics.observe_pool(254, 3);
        let problems = gefyra_process::naming_problems(
            &metrics.families(),
            metrics.declared_families(),
            "gefyra_operator_",
        );
        assert!(problems.is_empty(), "{problems:?}");
        let text = metrics.render();
        assert!(text.contains("\ngefyra_operator_tunnel_pool_capacity_addresses 254\n"));
        assert!(text.contains("\ngefyra_operator_tunnel_pool_allocated_addresses 3\n"));
    }
}
