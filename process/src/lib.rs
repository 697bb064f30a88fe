//! The process shell the operator and Stowaway share (the way Linkerd's binaries share
//! kubert's runtime): logging, shutdown signals, and the server of `/livez`, `/readyz` and
//! `/metrics` with Prometheus' conventions (process metrics, a `*_build_info` series, the
//! text format's versioned content type). No Kubernetes here; `gefyra-api` stays free of I/O.

use std::net::SocketAddr;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use prometheus::{Encoder, IntGaugeVec, Opts, Registry, TextEncoder};

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

/// Logs to stdout in `format`, filtered by `RUST_LOG` (default `info,kube=warn`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,kube=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Plain => builder.init(),
    }
}

/// Resolves on SIGTERM (how Kubernetes stops a Pod) or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// Registers in `registry` what every component exports besides its own metrics:
/// `process_*` (CPU seconds, resident memory, open and maximum file descriptors, start
/// time) and `<prefix>_build_info{version} 1`.
pub fn register_standard_metrics(registry: &Registry, prefix: &str, version: &str) {
    let build_info = IntGaugeVec::new(
        Opts::new(
            format!("{prefix}_build_info"),
            "Always 1; the version of the running binary as a label",
        ),
        &["version"],
    )
    .expect("valid metric");
    build_info.with_label_values(&[version]).set(1);
    registry
        .register(Box::new(build_info))
        .expect("build_info registered once");
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process metrics registered once");
}

/// Where `families` (as served) and `declared` (every family a component may serve) break
/// the naming both components follow: every name starts with `prefix` (or is a standard
/// `process_*` one), `_total` ends counters and nothing else, and no two declared families
/// share a name under OpenMetrics (which drops a counter's `_total`). Empty: none.
pub fn naming_problems(
    families: &[prometheus::proto::MetricFamily],
    declared: &[String],
    prefix: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    for family in families {
        let name = family.name();
        if !(name.starts_with(prefix) || name.starts_with("process_")) {
            problems.push(format!("{name} does not start with {prefix}"));
        }
        let counter = family.get_field_type() == prometheus::proto::MetricType::COUNTER;
        if counter != name.ends_with("_total") {
            problems.push(format!("{name}: `_total` ends counters and nothing else"));
        }
    }
    let mut openmetrics = std::collections::BTreeSet::new();
    for name in declared {
        if !openmetrics.insert(name.strip_suffix("_total").unwrap_or(name)) {
            problems.push(format!(
                "{name} shares its OpenMetrics name with another family"
            ));
        }
    }
    problems
}

/// `families` in the Prometheus text format, as an HTTP response with its versioned
/// content type (`text/plain; version=0.0.4`).
pub fn metrics_response(families: &[prometheus::proto::MetricFamily]) -> impl IntoResponse + use<> {
    let encoder = TextEncoder::new();
    let mut buffer = Vec::new();
    encoder
        .encode(families, &mut buffer)
        .expect("text encoding never fails");
    ([(CONTENT_TYPE, encoder.format_type().to_string())], buffer)
}

/// Serves `routes` (the component's `/livez`, `/readyz`, `/metrics`) on `address` until
/// the process is told to stop.
pub async fn serve_http(address: SocketAddr, routes: Router) -> std::io::Result<()> {
    serve_http_until(address, routes, shutdown_signal()).await
}

/// Serves `routes` on `address` until `stop` resolves: for a component whose readiness
/// must still answer (503) while it drains after SIGTERM.
pub async fn serve_http_until(
    address: SocketAddr,
    routes: Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(%address, "serving health and metrics");
    axum::serve(listener, routes)
        .with_graceful_shutdown(stop)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_metrics_follow_prometheus_conventions() {
        let registry = Registry::new();
        register_standard_metrics(&registry, "demo", "1.2.3");
        let families = registry.gather();
        let mut text = Vec::new();
        TextEncoder::new().encode(&families, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("demo_build_info{version=\"1.2.3\"} 1"),
            "{text}"
        );
        for series in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        let response = metrics_response(&families).into_response();
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/plain; version=0.0.4"
        );
    }

    #[test]
    fn names_against_the_naming_are_named() {
        let registry = Registry::new();
        let gauge =
            prometheus::IntGauge::new("app_open_total", "a gauge named as a counter").unwrap();
        let counter =
            prometheus::IntCounter::new("app_requests", "a counter without _total").unwrap();
        let stray = prometheus::IntGauge::new("other_things", "another prefix").unwrap();
        for collector in [
            Box::new(gauge) as Box<dyn prometheus::core::Collector>,
            Box::new(counter),
            Box::new(stray),
        ] {
            registry.register(collector).unwrap();
        }
        let declared = ["app_flows", "app_flows_total"].map(String::from);
        let problems = naming_problems(&registry.gather(), &declared, "app_");
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(
            naming_problems(&[], &["app_flows".to_string()], "app_").is_empty(),
            "nothing served, nothing wrong"
        );
    }
}
