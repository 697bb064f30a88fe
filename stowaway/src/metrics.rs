//! Prometheus metrics, every family named `gefyra_stowaway_*` (the operator's are
//! `gefyra_operator_*`). Counters and gauges are updated by the data plane as things happen;
//! per-peer figures (one series per connected client, unless `--per-client-metrics false`)
//! are taken from its last published stats at scrape time, so a removed peer's series
//! disappears with it.

use std::collections::BTreeMap;
use std::time::SystemTime;

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::bridges;
use crate::endpoint::PeerStats;
use crate::peers::{Refusal, Refused};

/// The prefix of every family Stowaway exports (its `_build_info` too).
pub const PREFIX: &str = "gefyra_stowaway";

pub struct Metrics {
    registry: Registry,
    /// The names of this component's own metric families, whether or not they have a
    /// series yet (a vector without label values is left out of /metrics).
    declared: Vec<String>,
    /// Whether the per-peer families (labelled with client names) are exported: one series
    /// each per ACTIVE client, which a fleet of thousands may not want.
    per_client: bool,
    pub peers: IntGauge,
    /// Peers with a recent handshake: the global flow bounds are shared among them.
    pub live_peers: IntGauge,
    /// Handshake initiations by result: completed, cookie_required, unknown_peer, rejected.
    pub handshakes: IntCounterVec,
    /// Dropped datagrams and packets by reason.
    pub dropped: IntCounterVec,
    /// Open flows by protocol.
    pub open_flows: IntGaugeVec,
    /// Flows by protocol and result: opened, refused.
    pub flows_total: IntCounterVec,
    /// Flows ended by a timeout (or to fit their peer's shrunk share), by protocol and
    /// timeout.
    pub expiries: IntCounterVec,
    /// ACTIVE clients not admitted as peers right now, by reason.
    pub refused_clients: IntGaugeVec,
    /// Data-plane workers.
    pub workers: IntGauge,
    /// What one worker handed another, by kind: datagram (an initiation, or one the
    /// kernel did not steer), forward (a forward's connection).
    pub handoffs: IntCounterVec,
    /// Connections on the bridges port that went on into their client's tunnel.
    pub bridge_connections: IntCounter,
    /// Connections on the bridges port closed instead, by reason.
    pub bridge_refused: IntCounterVec,
}

/// The per-peer families (made afresh for each scrape from the data plane's stats).
fn per_peer_collectors() -> (IntGaugeVec, IntCounterVec, IntCounterVec) {
    let last_handshake = gauge(
        "gefyra_stowaway_peer_last_handshake_timestamp_seconds",
        "Unix time of the peer's last completed handshake",
        &["client"],
    );
    // Counters that restart from 0 with the peer's session, as Prometheus expects of a
    // counter reset.
    let received = counter(
        "gefyra_stowaway_peer_received_bytes_total",
        "Bytes received from the peer in its current session",
        &["client"],
    );
    let sent = counter(
        "gefyra_stowaway_peer_sent_bytes_total",
        "Bytes sent to the peer in its current session",
        &["client"],
    );
    (last_handshake, received, sent)
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

impl Default for Metrics {
    /// With the per-peer families (Stowaway's default).
    fn default() -> Self {
        Self::new(true)
    }
}

impl Metrics {
    /// Every family registered; the per-peer ones only if `per_client`.
    pub fn new(per_client: bool) -> Self {
        let registry = Registry::new();
        let peers = IntGauge::new("gefyra_stowaway_peers", "Peers configured (ACTIVE clients)")
            .expect("valid metric");
        let live_peers = IntGauge::new(
            "gefyra_stowaway_live_peers",
            "Peers with a handshake in the last 5 minutes; each may hold its share of the flow bounds (they divided by these, at least --peer-min-share-flows)",
        )
        .expect("valid metric");
        let handshakes = counter(
            "gefyra_stowaway_handshakes_total",
            "Handshake initiations received, by result",
            &["result"],
        );
        let dropped = counter(
            "gefyra_stowaway_dropped_packets_total",
            "Datagrams and packets dropped, by reason",
            &["reason"],
        );
        // Not `gefyra_stowaway_flows`: under OpenMetrics that is the counter below's name.
        let open_flows = gauge(
            "gefyra_stowaway_open_flows",
            "Forwarded flows open now, by protocol",
            &["protocol"],
        );
        let flows_total = counter(
            "gefyra_stowaway_flows_total",
            "Forwarded flows by protocol and result",
            &["protocol", "result"],
        );
        let expiries = counter(
            "gefyra_stowaway_flow_expiries_total",
            "Flows ended by a timeout or to fit their peer's share, by protocol and timeout (idle, inactive, handshake, dial, over_share)",
            &["protocol", "timeout"],
        );
        let refused_clients = gauge(
            "gefyra_stowaway_refused_clients",
            "ACTIVE clients not admitted as peers, by reason (their providerConfig disagrees with the operator's decisions, or is invalid, or their key is shared)",
            &["reason"],
        );
        for reason in Refusal::ALL {
            refused_clients.with_label_values(&[reason.label()]).set(0);
        }
        let workers = IntGauge::new("gefyra_stowaway_workers", "Data-plane workers (threads)")
            .expect("valid metric");
        let handoffs = counter(
            "gefyra_stowaway_handoffs_total",
            "Datagrams and connections one data-plane worker handed the worker of their peer, by kind (datagram, forward)",
            &["kind"],
        );
        for kind in ["datagram", "forward"] {
            handoffs.with_label_values(&[kind]).inc_by(0);
        }
        let bridge_connections = IntCounter::new(
            "gefyra_stowaway_bridge_connections_total",
            "Connections on the bridges port that went on through the tunnel to their bridge's client",
        )
        .expect("valid metric");
        let bridge_refused = counter(
            "gefyra_stowaway_bridge_connections_refused_total",
            "Connections on the bridges port closed instead of bridged, by reason",
            &["reason"],
        );
        for reason in bridges::Refusal::ALL {
            bridge_refused
                .with_label_values(&[reason.label()])
                .inc_by(0);
        }
        let mut declared = Vec::new();
        for collector in [
            Box::new(peers.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(live_peers.clone()),
            Box::new(refused_clients.clone()),
            Box::new(handshakes.clone()),
            Box::new(dropped.clone()),
            Box::new(open_flows.clone()),
            Box::new(flows_total.clone()),
            Box::new(expiries.clone()),
            Box::new(workers.clone()),
            Box::new(handoffs.clone()),
            Box::new(bridge_connections.clone()),
            Box::new(bridge_refused.clone()),
        ] {
            declared.extend(collector.desc().iter().map(|desc| desc.fq_name.clone()));
            registry
                .register(collector)
                .expect("metric registered once");
        }
        if per_client {
            let (last_handshake, received, sent) = per_peer_collectors();
            let per_peer: [&dyn prometheus::core::Collector; 3] =
                [&last_handshake, &received, &sent];
            for collector in per_peer {
                declared.extend(collector.desc().iter().map(|desc| desc.fq_name.clone()));
            }
        }
        gefyra_process::register_standard_metrics(&registry, PREFIX, env!("CARGO_PKG_VERSION"));
        Self {
            registry,
            declared,
            per_client,
            peers,
            live_peers,
            handshakes,
            dropped,
            open_flows,
            flows_total,
            expiries,
            refused_clients,
            workers,
            handoffs,
            bridge_connections,
            bridge_refused,
        }
    }

    /// The names of this component's own metric families (see `declared`).
    pub fn declared_families(&self) -> &[String] {
        &self.declared
    }

    /// Sets `gefyra_stowaway_refused_clients` from the latest refusals.
    pub fn observe_refused(&self, refused: &[Refused]) {
        for reason in Refusal::ALL {
            let count = refused.iter().filter(|r| r.reason == reason).count();
            self.refused_clients
                .with_label_values(&[reason.label()])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Every metric family, with one series per peer from `stats` if per-client.
    pub fn families(
        &self,
        stats: &BTreeMap<String, PeerStats>,
        now: SystemTime,
    ) -> Vec<prometheus::proto::MetricFamily> {
        if !self.per_client {
            return self.registry.gather();
        }
        let (last_handshake, received, sent) = per_peer_collectors();
        for (client, peer) in stats {
            if let Some(at) = peer.since_handshake.and_then(|ago| now.checked_sub(ago)) {
                let unix = at
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                last_handshake
                    .with_label_values(&[client])
                    .set(unix.as_secs() as i64);
            }
            received.with_label_values(&[client]).inc_by(peer.received);
            sent.with_label_values(&[client]).inc_by(peer.sent);
        }
        let mut families = self.registry.gather();
        let per_peer: [&dyn prometheus::core::Collector; 3] = [&last_handshake, &received, &sent];
        for collector in per_peer {
            // A family without series (no peers yet) cannot be encoded: leave it out.
            families.extend(
                collector
                    .collect()
                    .into_iter()
                    .filter(|family| !family.get_metric().is_empty()),
            );
        }
        families
    }

    /// The text exposition format of [`Metrics::families`].
    pub fn render(&self, stats: &BTreeMap<String, PeerStats>, now: SystemTime) -> String {
        let families = self.families(stats, now);
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buffer)
            .expect("text encoding never fails");
        String::from_utf8(buffer).expect("metrics are UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn one_peer() -> BTreeMap<String, PeerStats> {
        BTreeMap::from([(
            "a".to_string(),
            PeerStats {
                since_handshake: Some(Duration::from_secs(10)),
                received: 5,
                sent: 7,
                endpoint: None,
            },
        )])
    }

    #[test]
    fn renders_with_and_without_peers() {
        let metrics = Metrics::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let empty = metrics.render(&BTreeMap::new(), now);
        assert!(empty.contains("\ngefyra_stowaway_peers 0\n"), "{empty}");
        let text = metrics.render(&one_peer(), now);
        assert!(
            text.contains(
                "gefyra_stowaway_peer_last_handshake_timestamp_seconds{client=\"a\"} 990"
            ),
            "{text}"
        );
        assert!(text.contains("gefyra_stowaway_peer_received_bytes_total{client=\"a\"} 5"));
        assert!(text.contains("gefyra_stowaway_peer_sent_bytes_total{client=\"a\"} 7"));
        assert!(
            text.contains("# TYPE gefyra_stowaway_peer_sent_bytes_total counter"),
            "{text}"
        );
        assert!(
            text.contains("gefyra_stowaway_build_info{version="),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn per_client_series_can_be_turned_off() {
        let metrics = Metrics::new(false);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let text = metrics.render(&one_peer(), now);
        assert!(!text.contains("client="), "{text}");
        assert!(text.contains("\ngefyra_stowaway_peers 0\n"), "{text}");
        assert!(
            metrics
                .declared_families()
                .iter()
                .all(|name| !name.starts_with("gefyra_stowaway_peer_")),
            "{:?}",
            metrics.declared_families()
        );
    }

    /// One prefix, `_total` on counters only, and no two families one name under
    /// OpenMetrics (which drops a counter's `_total` from its family name).
    #[test]
    fn names_follow_prometheus_naming() {
        let metrics = Metrics::default();
        let problems = gefyra_process::naming_problems(
            &metrics.families(&one_peer(), SystemTime::now()),
            metrics.declared_families(),
            "gefyra_stowaway_",
        );
        assert!(problems.is_empty(), "{problems:?}");
    }
}
