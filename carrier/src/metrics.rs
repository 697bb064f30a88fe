//! Prometheus metrics, every family named `gefyra_carrier_*`, labels bounded (no bridge or
//! client names: a router serves one mount, its bridges come and go).

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// The prefix of every family the router exports (its `_build_info` too).
pub const PREFIX: &str = "gefyra_carrier";

pub struct Metrics {
    registry: Registry,
    declared: Vec<String>,
    /// HTTP requests by route: bridge, original.
    pub requests: IntCounterVec,
    /// Accepted connections by mode: raw (to the original), http, bridge_raw.
    pub connections: IntCounterVec,
    /// Connections or requests whose upstream failed, by upstream: original, stowaway.
    pub upstream_errors: IntCounterVec,
    pub open_connections: IntGauge,
    /// ACTIVE bridges in the route table.
    pub bridges: IntGauge,
    /// ACTIVE bridges left out (rules or port mappings that do not parse).
    pub skipped_bridges: IntGauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let registry = Registry::new();
        gefyra_process::register_standard_metrics(&registry, PREFIX, env!("CARGO_PKG_VERSION"));
        let counter = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric")
        };
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let metrics = Metrics {
            requests: counter(
                "gefyra_carrier_requests_total",
                "HTTP requests forwarded, by route (bridge: to a developer's machine; original)",
                "route",
            ),
            connections: counter(
                "gefyra_carrier_connections_total",
                "Connections accepted, by mode (raw: bytes to the original; http: requests routed one by one; bridge_raw: bytes to a rule-less bridge)",
                "mode",
            ),
            upstream_errors: counter(
                "gefyra_carrier_upstream_errors_total",
                "Connections or requests whose upstream failed, by upstream (original, stowaway)",
                "upstream",
            ),
            open_connections: gauge(
                "gefyra_carrier_open_connections",
                "Accepted connections open now",
            ),
            bridges: gauge(
                "gefyra_carrier_bridges",
                "ACTIVE bridges in the route table",
            ),
            skipped_bridges: gauge(
                "gefyra_carrier_skipped_bridges",
                "ACTIVE bridges left out of the route table because their rules or port mappings do not parse",
            ),
            declared: Vec::new(),
            registry,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 6] = [
            Box::new(metrics.requests.clone()),
            Box::new(metrics.connections.clone()),
            Box::new(metrics.upstream_errors.clone()),
            Box::new(metrics.open_connections.clone()),
            Box::new(metrics.bridges.clone()),
            Box::new(metrics.skipped_bridges.clone()),
        ];
        let mut declared = Vec::new();
        for collector in collectors {
            declared.extend(collector.desc().iter().map(|desc| desc.fq_name.clone()));
            metrics
                .registry
                .register(collector)
                .expect("each metric registered once");
        }
        Metrics {
            declared,
            ..metrics
        }
    }
}

impl Metrics {
    pub fn families(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The names of the router's own families, whether or not they have a series yet.
    pub fn declared(&self) -> &[String] {
        &self.declared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_shared_naming() {
        let metrics = Metrics::default();
        for (route, mode, upstream) in [
            ("bridge", "raw", "original"),
            ("original", "http", "stowaway"),
        ] {
            metrics.requests.with_label_values(&[route]).inc();
            metrics.connections.with_label_values(&[mode]).inc();
            metrics.upstream_errors.with_label_values(&[upstream]).inc();
        }
        let problems =
            gefyra_process::naming_problems(&metrics.families(), metrics.declared(), PREFIX);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(metrics.declared().len(), 6);
    }
}
