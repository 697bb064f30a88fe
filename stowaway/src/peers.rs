//! The peer table, derived from GefyraClients (pure): who may connect, with which keys,
//! from which ranges; what changed between two views (so live updates leave every other
//! peer's session alone); and where a packet for an address goes (longest-prefix match).

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine;
use gefyra_api::{ClientState, GefyraClient};
use ipnet::IpNet;

/// A 32-byte WireGuard key.
pub type Key = [u8; 32];

/// One peer as the operator published it for an ACTIVE client.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// The GefyraClient's name (for status write-back, logs and metrics).
    pub client: String,
    pub public_key: Key,
    pub preshared_key: Key,
    /// The tunnel address (a host prefix) and the routed subnet, if any: the only sources
    /// the peer may send from, and the only destinations routed to it.
    pub ranges: Vec<IpNet>,
}

impl std::fmt::Debug for PeerSpec {
    /// Never prints the preshared key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSpec")
            .field("client", &self.client)
            .field("public_key", &encode_key(&self.public_key))
            .field("preshared_key", &"<redacted>")
            .field("ranges", &self.ranges)
            .finish()
    }
}

pub fn decode_key(text: &str) -> Option<Key> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()?
        .try_into()
        .ok()
}

pub fn encode_key(key: &Key) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("client {client}: providerConfig has no valid {key}")]
    Missing { client: String, key: &'static str },
    #[error("client {client}: providerParameter.subnet {subnet:?} is not a CIDR")]
    Subnet { client: String, subnet: String },
}

/// The peer an ACTIVE client describes; `Ok(None)` for clients that are not ACTIVE.
pub fn spec_of(client: &GefyraClient) -> Result<Option<PeerSpec>, SpecError> {
    if client.state != ClientState::Active {
        return Ok(None);
    }
    let name = client.metadata.name.clone().unwrap_or_default();
    let Some(config) = client.provider_config.as_ref() else {
        return Ok(None);
    };
    let text = |key: &'static str| {
        config
            .get(key)
            .and_then(|value| value.as_str())
            .ok_or_else(|| SpecError::Missing {
                client: name.clone(),
                key,
            })
    };
    let key = |key: &'static str| {
        text(key).and_then(|value| {
            decode_key(value).ok_or_else(|| SpecError::Missing {
                client: name.clone(),
                key,
            })
        })
    };
    let public_key = key("Interface.PublicKey")?;
    let preshared_key = key("Peer.PresharedKey")?;
    let address: IpAddr = text("Interface.Address")?
        .parse()
        .map_err(|_| SpecError::Missing {
            client: name.clone(),
            key: "Interface.Address",
        })?;
    let mut ranges = vec![IpNet::from(address)];
    let subnet = client
        .provider_parameter
        .as_ref()
        .and_then(|parameter| parameter.get("subnet"))
        .and_then(|subnet| subnet.as_str());
    if let Some(subnet) = subnet {
        ranges.push(subnet.parse().map_err(|_| SpecError::Subnet {
            client: name.clone(),
            subnet: subnet.to_string(),
        })?);
    }
    Ok(Some(PeerSpec {
        client: name,
        public_key,
        preshared_key,
        ranges,
    }))
}

/// Every peer the clients describe, by public key, and the problems of those that could
/// not be read. Two clients with the same public key: neither is a peer (reported).
pub fn desired<'a>(
    clients: impl IntoIterator<Item = &'a GefyraClient>,
) -> (BTreeMap<Key, PeerSpec>, Vec<String>) {
    let mut peers: BTreeMap<Key, PeerSpec> = BTreeMap::new();
    let mut duplicates: BTreeMap<Key, Vec<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for client in clients {
        match spec_of(client) {
            Ok(Some(spec)) => {
                if let Some(first) = peers.get(&spec.public_key) {
                    duplicates
                        .entry(spec.public_key)
                        .or_insert_with(|| vec![first.client.clone()])
                        .push(spec.client.clone());
                } else {
                    peers.insert(spec.public_key, spec);
                }
            }
            Ok(None) => {}
            Err(error) => problems.push(error.to_string()),
        }
    }
    for (key, clients) in duplicates {
        peers.remove(&key);
        problems.push(format!(
            "clients {} share the public key {}; none of them may connect",
            clients.join(", "),
            encode_key(&key)
        ));
    }
    (peers, problems)
}

/// How to get from the current peer table to the desired one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub add: Vec<PeerSpec>,
    /// Same public key, other preshared key or ranges: the peer's session starts anew.
    pub replace: Vec<PeerSpec>,
    pub remove: Vec<Key>,
}

pub fn plan(current: &BTreeMap<Key, PeerSpec>, desired: &BTreeMap<Key, PeerSpec>) -> Plan {
    let mut plan = Plan::default();
    for (key, spec) in desired {
        match current.get(key) {
            None => plan.add.push(spec.clone()),
            Some(existing) if existing != spec => plan.replace.push(spec.clone()),
            Some(_) => {}
        }
    }
    plan.remove = current
        .keys()
        .filter(|key| !desired.contains_key(*key))
        .copied()
        .collect();
    plan
}

/// Whether `spec`'s peer may send from `source`.
pub fn may_send_from(spec: &PeerSpec, source: IpAddr) -> bool {
    spec.ranges.iter().any(|range| range.contains(&source))
}

/// The peer whose range holds `destination` most specifically (longest prefix).
pub fn route<'a>(
    peers: impl IntoIterator<Item = &'a PeerSpec>,
    destination: IpAddr,
) -> Option<&'a PeerSpec> {
    peers
        .into_iter()
        .flat_map(|spec| spec.ranges.iter().map(move |range| (range, spec)))
        .filter(|(range, _)| range.contains(&destination))
        .max_by_key(|(range, _)| range.prefix_len())
        .map(|(_, spec)| spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(byte: u8) -> String {
        encode_key(&[byte; 32])
    }

    fn client(
        name: &str,
        state: &str,
        public: u8,
        address: &str,
        subnet: Option<&str>,
    ) -> GefyraClient {
        let mut parameter = json!({"publicKey": key(public)});
        if let Some(subnet) = subnet {
            parameter["subnet"] = json!(subnet);
        }
        serde_json::from_value(json!({
            "apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
            "metadata": {"name": name, "namespace": "gefyra"},
            "provider": "stowaway",
            "state": state,
            "providerParameter": parameter,
            "providerConfig": {
                "Interface.Address": address,
                "Interface.PublicKey": key(public),
                "Peer.PresharedKey": key(200),
            }
        }))
        .unwrap()
    }

    #[test]
    fn only_active_clients_with_a_valid_config_are_peers() {
        let clients = [
            client("a", "ACTIVE", 1, "192.168.96.2", Some("10.1.0.0/16")),
            client("b", "WAITING", 2, "192.168.96.3", None),
            client("c", "ACTIVE", 3, "not-an-address", None),
        ];
        let (peers, problems) = desired(&clients);
        assert_eq!(peers.len(), 1);
        let a = &peers[&[1; 32]];
        assert_eq!(a.client, "a");
        assert_eq!(
            a.ranges,
            [
                "192.168.96.2/32".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap()
            ]
        );
        assert_eq!(
            problems,
            ["client c: providerConfig has no valid Interface.Address"]
        );
        assert!(
            !format!("{a:?}").contains(&key(200)),
            "no preshared key in Debug"
        );
    }

    #[test]
    fn a_shared_public_key_admits_nobody() {
        let clients = [
            client("a", "ACTIVE", 1, "192.168.96.2", None),
            client("b", "ACTIVE", 1, "192.168.96.3", None),
        ];
        let (peers, problems) = desired(&clients);
        assert!(peers.is_empty());
        assert!(problems[0].contains("clients a, b share the public key"));
    }

    #[test]
    fn plans_touch_only_what_changed() {
        let before = desired(&[
            client("a", "ACTIVE", 1, "192.168.96.2", None),
            client("b", "ACTIVE", 2, "192.168.96.3", None),
        ])
        .0;
        let after = desired(&[
            client("a", "ACTIVE", 1, "192.168.96.2", None),
            client("b", "ACTIVE", 2, "192.168.96.3", Some("10.2.0.0/16")),
            client("c", "ACTIVE", 3, "192.168.96.4", None),
        ])
        .0;
        let plan = plan(&before, &after);
        assert_eq!(
            plan.add
                .iter()
                .map(|p| p.client.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(
            plan.replace
                .iter()
                .map(|p| p.client.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert!(plan.remove.is_empty());
        let gone = super::plan(&after, &BTreeMap::new());
        assert_eq!(gone.remove.len(), 3);
    }

    #[test]
    fn sources_are_checked_and_routes_take_the_longest_prefix() {
        let (peers, _) = desired(&[
            client("a", "ACTIVE", 1, "192.168.96.2", Some("10.0.0.0/8")),
            client("b", "ACTIVE", 2, "192.168.96.3", Some("10.5.0.0/16")),
        ]);
        let a = &peers[&[1; 32]];
        assert!(may_send_from(a, "192.168.96.2".parse().unwrap()));
        assert!(may_send_from(a, "10.9.9.9".parse().unwrap()));
        assert!(!may_send_from(a, "192.168.96.3".parse().unwrap()));
        let to = |address: &str| {
            route(peers.values(), address.parse().unwrap()).map(|p| p.client.as_str())
        };
        assert_eq!(to("10.5.1.1"), Some("b"));
        assert_eq!(to("10.6.1.1"), Some("a"));
        assert_eq!(to("192.168.96.3"), Some("b"));
        assert_eq!(to("172.16.0.1"), None);
    }
}
