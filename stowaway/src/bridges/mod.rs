//! Bridges: a router in a bridged workload's namespace opens a TCP connection to the bridges
//! port, names a GefyraBridge and a port in a one-line preamble (`preamble`), and the
//! connection goes on through the tunnel to the developer's machine, as a forward's would.
//!
//! Whatever a GefyraBridge object says, it leads only into the tunnel of its own client's
//! peer: `authorize` (pure) serves a bridge only if it is ACTIVE, maps the port asked for,
//! and its destination lies within the ranges of the connected peer of its `client` (and is
//! routed to that peer). The data plane checks the holder once more when it takes the
//! connection (`dataplane::Bridged`). The bridges come from the API (`source`); the port is
//! served by `listener`.

pub mod listener;
pub mod preamble;
pub mod source;

use std::net::{IpAddr, SocketAddr};

use crate::peers::{self, PeerSpec};

pub use listener::serve;
pub use source::{Bridges, keep_bridges};

/// The state in which a bridge is served (the operator sets it).
pub const ACTIVE: &str = "ACTIVE";
/// The states in which Stowaway serves a bridge: from CREATING on (the operator holds a
/// bridge there for a moment before ACTIVE, when routers start sending to it), so that
/// Stowaway, which follows the bridges by a watch of its own, is ready before any router.
pub const SERVED: [&str; 2] = ["CREATING", ACTIVE];

pub use gefyra_api::bridge_rules::PortMapping;

/// A bridge's `portMappings`, each `"<local>:<remote>"`, by the one parser of the wire
/// format (`gefyra_api::bridge_rules`).
pub fn port_mappings(texts: &[String]) -> Result<Vec<PortMapping>, String> {
    gefyra_api::bridge_rules::port_mappings(texts).map_err(|error| error.to_string())
}

/// What Stowaway knows of one GefyraBridge (nothing else of the object is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    /// `state` is one Stowaway serves ([`SERVED`]: CREATING or ACTIVE).
    pub active: bool,
    /// The owning GefyraClient's name.
    pub client: String,
    /// Where it leads, or why its fields do not say.
    pub destination: Result<Destination, String>,
}

/// Where a bridge leads: `destinationIP` and the ports mapped there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub address: IpAddr,
    pub ports: Vec<PortMapping>,
}

/// Why a connection on the bridges port was closed (a closed set: a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// As many connections as allowed were still sending their preamble.
    TooManyPending,
    /// The preamble did not arrive in time.
    PreambleTimeout,
    /// The preamble is not `GEFYRA-BRIDGE/1 <bridge> <port>` (or the connection ended first).
    MalformedPreamble,
    /// No newline within the preamble's bound.
    OversizedPreamble,
    UnknownBridge,
    /// The bridge is not in a served state (CREATING or ACTIVE), nor was within the last
    /// moments.
    NotActive,
    /// The bridge's client, destinationIP or portMappings do not parse.
    InvalidBridge,
    /// The bridge maps no port to the one asked for.
    UnmappedPort,
    /// No connected peer is the bridge's client.
    ClientNotConnected,
    /// The destination is not (or no longer) routed to the bridge's client's peer.
    ForeignDestination,
    /// The data plane's queue for that peer is full, or the data plane stopped.
    DataPlaneBusy,
    /// The peer's flow limits refused one more flow.
    FlowRefused,
}

impl Refusal {
    pub const ALL: [Refusal; 12] = [
        Self::TooManyPending,
        Self::PreambleTimeout,
        Self::MalformedPreamble,
        Self::OversizedPreamble,
        Self::UnknownBridge,
        Self::NotActive,
        Self::InvalidBridge,
        Self::UnmappedPort,
        Self::ClientNotConnected,
        Self::ForeignDestination,
        Self::DataPlaneBusy,
        Self::FlowRefused,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::TooManyPending => "too_many_pending",
            Self::PreambleTimeout => "preamble_timeout",
            Self::MalformedPreamble => "malformed_preamble",
            Self::OversizedPreamble => "oversized_preamble",
            Self::UnknownBridge => "unknown_bridge",
            Self::NotActive => "not_active",
            Self::InvalidBridge => "invalid_bridge",
            Self::UnmappedPort => "unmapped_port",
            Self::ClientNotConnected => "client_not_connected",
            Self::ForeignDestination => "foreign_destination",
            Self::DataPlaneBusy => "data_plane_busy",
            Self::FlowRefused => "flow_refused",
        }
    }
}

/// Where a connection for `remote_port` of `bridge` goes: the bridge's destination at the
/// mapped local port, if the bridge is ACTIVE, maps that port, and its destination is
/// routed to the peer of its own client (within that peer's ranges, and no other peer's
/// narrower range holds it). Anything else is refused, whatever the object says.
pub fn authorize<'a>(
    bridge: Option<&Bridge>,
    remote_port: u16,
    peers: impl IntoIterator<Item = &'a PeerSpec> + Clone,
) -> Result<SocketAddr, Refusal> {
    let bridge = bridge.ok_or(Refusal::UnknownBridge)?;
    if !bridge.active {
        return Err(Refusal::NotActive);
    }
    let destination = bridge
        .destination
        .as_ref()
        .map_err(|_| Refusal::InvalidBridge)?;
    let mapping = destination
        .ports
        .iter()
        .find(|mapping| mapping.remote == remote_port)
        .ok_or(Refusal::UnmappedPort)?;
    if !peers
        .clone()
        .into_iter()
        .any(|peer| peer.client == bridge.client)
    {
        return Err(Refusal::ClientNotConnected);
    }
    match peers::route(peers, destination.address) {
        Some(holder) if holder.client == bridge.client => {
            Ok(SocketAddr::new(destination.address, mapping.local))
        }
        _ => Err(Refusal::ForeignDestination),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(client: &str, key: u8, ranges: &[&str]) -> PeerSpec {
        PeerSpec {
            client: client.into(),
            public_key: [key; 32],
            preshared_key: [0; 32],
            ranges: ranges.iter().map(|range| range.parse().unwrap()).collect(),
        }
    }

    fn bridge(client: &str, address: &str, mappings: &[&str], state: &str) -> Bridge {
        let mappings: Vec<String> = mappings.iter().map(|text| text.to_string()).collect();
        Bridge {
            active: state == ACTIVE,
            client: client.into(),
            destination: Ok(Destination {
                address: address.parse().unwrap(),
                ports: if mappings.is_empty() {
                    Vec::new()
                } else {
                    port_mappings(&mappings).unwrap()
                },
            }),
        }
    }

    #[test]
    fn port_mappings_are_local_colon_remote() {
        let texts = |list: &[&str]| list.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        assert_eq!(
            port_mappings(&texts(&["8080:80", "1:65535"])).unwrap(),
            [
                PortMapping {
                    local: 8080,
                    remote: 80
                },
                PortMapping {
                    local: 1,
                    remote: 65535
                }
            ]
        );
        assert!(
            port_mappings(&[]).is_err(),
            "a bridge maps at least one port"
        );
        for bad in [
            "80", "0:80", "80:0", "80:65536", ":80", "80:", "+80:80", "80: 80", "a:b", "8:8:8",
        ] {
            assert!(port_mappings(&texts(&[bad])).is_err(), "{bad:?}");
        }
    }

    /// Attack first: whatever a bridge object says, only its own client's peer is reached.
    #[test]
    fn a_bridge_reaches_only_its_own_clients_peer() {
        let dev = peer("dev", 1, &["192.168.99.2/32", "172.31.0.0/24"]);
        let other = peer("other", 2, &["192.168.99.3/32", "172.31.0.128/25"]);
        let peers = [dev.clone(), other.clone()];
        let ok = |address: &str, port: u16| Ok(SocketAddr::new(address.parse().unwrap(), port));
        type Case = (
            &'static str,
            Option<Bridge>,
            u16,
            Result<SocketAddr, Refusal>,
        );
        let cases: Vec<Case> = vec![
            (
                "the client's tunnel address",
                Some(bridge("dev", "192.168.99.2", &["8080:80"], "ACTIVE")),
                80,
                ok("192.168.99.2", 8080),
            ),
            (
                "its routed subnet, the second mapping",
                Some(bridge(
                    "dev",
                    "172.31.0.7",
                    &["8080:80", "9443:443"],
                    "ACTIVE",
                )),
                443,
                ok("172.31.0.7", 9443),
            ),
            (
                "another client's tunnel address",
                Some(bridge("dev", "192.168.99.3", &["8080:80"], "ACTIVE")),
                80,
                Err(Refusal::ForeignDestination),
            ),
            (
                "another client's narrower range inside this client's subnet",
                Some(bridge("dev", "172.31.0.200", &["8080:80"], "ACTIVE")),
                80,
                Err(Refusal::ForeignDestination),
            ),
            (
                "an arbitrary cluster address",
                Some(bridge("dev", "10.96.0.1", &["443:443"], "ACTIVE")),
                443,
                Err(Refusal::ForeignDestination),
            ),
            (
                "the server address",
                Some(bridge("dev", "192.168.99.1", &["53:53"], "ACTIVE")),
                53,
                Err(Refusal::ForeignDestination),
            ),
            (
                "a client that is not connected",
                Some(bridge("gone", "192.168.99.2", &["8080:80"], "ACTIVE")),
                80,
                Err(Refusal::ClientNotConnected),
            ),
            (
                "no client at all",
                Some(bridge("", "192.168.99.2", &["8080:80"], "ACTIVE")),
                80,
                Err(Refusal::ClientNotConnected),
            ),
            (
                "REQUESTED",
                Some(bridge("dev", "192.168.99.2", &["8080:80"], "REQUESTED")),
                80,
                Err(Refusal::NotActive),
            ),
            (
                "ERROR",
                Some(bridge("dev", "192.168.99.2", &["8080:80"], "ERROR")),
                80,
                Err(Refusal::NotActive),
            ),
            (
                "an unmapped port",
                Some(bridge("dev", "192.168.99.2", &["8080:80"], "ACTIVE")),
                8080,
                Err(Refusal::UnmappedPort),
            ),
            (
                "no mappings",
                Some(bridge("dev", "192.168.99.2", &[], "ACTIVE")),
                80,
                Err(Refusal::UnmappedPort),
            ),
            (
                "fields that do not parse",
                Some(Bridge {
                    active: true,
                    client: "dev".into(),
                    destination: Err("destinationIP \"x\" is no address".into()),
                }),
                80,
                Err(Refusal::InvalidBridge),
            ),
            ("an unknown bridge", None, 80, Err(Refusal::UnknownBridge)),
        ];
        for (what, bridge, port, expected) in cases {
            assert_eq!(authorize(bridge.as_ref(), port, &peers), expected, "{what}");
        }
        // The client's peer gone, its address not reassigned: nothing is reached.
        let only_other = [other];
        assert_eq!(
            authorize(
                Some(&bridge("dev", "192.168.99.2", &["8080:80"], "ACTIVE")),
                80,
                &only_other
            ),
            Err(Refusal::ClientNotConnected)
        );
    }

    #[test]
    fn refusal_labels_are_distinct() {
        let mut labels: Vec<&str> = Refusal::ALL.iter().map(|reason| reason.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Refusal::ALL.len());
    }
}
