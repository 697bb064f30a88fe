//! `status.wireguard` of each client, from its peer's counters (pure).

use jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

use crate::endpoint::PeerStats;

/// What was (or would be) written for one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub latest_handshake: Option<Timestamp>,
    pub received: u64,
    pub sent: u64,
    pub endpoint: Option<std::net::SocketAddr>,
}

impl PeerStatus {
    pub fn of(stats: &PeerStats, now: Timestamp) -> Self {
        let latest_handshake = stats.since_handshake.and_then(|ago| {
            let ago = SignedDuration::try_from(ago).ok()?;
            now.checked_sub(ago).ok()?.round(jiff::Unit::Second).ok()
        });
        Self {
            latest_handshake,
            received: stats.received,
            sent: stats.sent,
            endpoint: stats.endpoint,
        }
    }

    /// `status.wireguard` (Gefyra's CLI shows `latest_handshake` as it is).
    pub fn to_json(&self) -> Value {
        let mut status = json!({
            "transfer": { "received": self.received, "sent": self.sent },
        });
        if let Some(at) = self.latest_handshake {
            status["latest_handshake"] = json!(at.to_string());
        }
        if let Some(endpoint) = self.endpoint {
            status["endpoint"] =
                json!({ "host": endpoint.ip().to_string(), "port": endpoint.port() });
        }
        status
    }

    /// Whether this differs from what was written enough to write again: other counters,
    /// endpoint or handshake (the handshake time is derived from "time since", so a second
    /// or two of difference is the same handshake).
    pub fn differs_from(&self, written: &PeerStatus) -> bool {
        let same_handshake = match (self.latest_handshake, written.latest_handshake) {
            (Some(a), Some(b)) => a.duration_since(b).abs() <= SignedDuration::from_secs(2),
            (None, None) => true,
            _ => false,
        };
        !same_handshake
            || self.received != written.received
            || self.sent != written.sent
            || self.endpoint != written.endpoint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn status_carries_handshake_time_transfer_and_endpoint() {
        let now: Timestamp = "2026-11-22T10:00:30Z".parse().unwrap();
        let stats = PeerStats {
            since_handshake: Some(Duration::from_millis(30_200)),
            received: 1024,
            sent: 2048,
            endpoint: Some("198.51.100.7:40000".parse().unwrap()),
        };
        let status = PeerStatus::of(&stats, now);
        assert_eq!(
            status.to_json(),
            json!({
                "latest_handshake": "2026-11-22T10:00:00Z",
                "transfer": { "received": 1024, "sent": 2048 },
                "endpoint": { "host": "198.51.100.7", "port": 40000 },
            })
        );
        // The same handshake seen a second later is not a change; new bytes are.
        let later = PeerStatus::of(
            &PeerStats {
                since_handshake: Some(Duration::from_millis(31_700)),
                ..stats
            },
            now,
        );
        assert!(!later.differs_from(&status));
        assert!(
            PeerStatus::of(
                &PeerStats {
                    received: 1025,
                    ..stats
                },
                now
            )
            .differs_from(&status)
        );
        let never = PeerStatus::of(&PeerStats::default(), now);
        assert_eq!(
            never.to_json(),
            json!({ "transfer": { "received": 0, "sent": 0 } })
        );
        assert!(never.differs_from(&status));
    }
}
