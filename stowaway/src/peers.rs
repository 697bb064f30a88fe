//! The peer table, derived from GefyraClients (pure): who may connect, with which keys,
//! from which ranges; what changed between two views (so live updates leave every other
//! peer's session alone); and where a packet for an address goes (longest-prefix match).

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine;
use gefyra_api::connection::ProviderConfig;
use gefyra_api::ipam::Routes;
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

/// What the operator decided, read from the objects only it writes: the tunnel-address
/// claims (Leases: address → holder uid) and the routes table (client name → uid, subnet).
/// A client's own fields (`providerConfig`, `providerParameter`) must agree with these, or
/// the client is no peer: whoever could write them cannot take another client's range.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decisions {
    /// Tunnel address → the uid of the client whose claim holds it.
    pub claims: BTreeMap<IpAddr, String>,
    pub routes: Routes,
}

/// Why a client that asks to be a peer is not one (a closed set: a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// `providerConfig` does not parse.
    InvalidConfig,
    /// The tunnel address is not held by this client's claim.
    AddressNotClaimed,
    /// Another client has the same public key.
    DuplicateKey,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [
        Self::InvalidConfig,
        Self::AddressNotClaimed,
        Self::DuplicateKey,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::InvalidConfig => "invalid_config",
            Self::AddressNotClaimed => "address_not_claimed",
            Self::DuplicateKey => "duplicate_key",
        }
    }
}

/// A client that is not admitted: why, and what to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: Refusal,
    pub message: String,
}

/// The peer an ACTIVE client is, if the operator's decisions back it: its tunnel address
/// must be held by its own claim; its routed subnet is the one the routes table records for
/// it (whatever its `providerParameter` says). `Ok(None)` for clients that are not ACTIVE.
pub fn spec_of(client: &GefyraClient, decisions: &Decisions) -> Result<Option<PeerSpec>, Refused> {
    if client.state != ClientState::Active {
        return Ok(None);
    }
    let name = client.metadata.name.clone().unwrap_or_default();
    let Some(config) = client.provider_config.as_ref() else {
        return Ok(None);
    };
    let config = ProviderConfig::parse(config).map_err(|error| Refused {
        reason: Refusal::InvalidConfig,
        message: format!("client {name}: {error}"),
    })?;
    let uid = client.metadata.uid.clone().unwrap_or_default();
    if decisions.claims.get(&config.address) != Some(&uid) {
        return Err(Refused {
            reason: Refusal::AddressNotClaimed,
            message: format!(
                "client {name}: providerConfig.Interface.Address {} is not held by this client's tunnel-address claim; not admitted",
                config.address
            ),
        });
    }
    let mut ranges = vec![IpNet::from(config.address)];
    ranges.extend(
        decisions
            .routes
            .get(&name)
            .filter(|route| route.uid == uid)
            .map(|route| route.subnet),
    );
    Ok(Some(PeerSpec {
        client: name,
        public_key: *config.public_key.bytes(),
        preshared_key: *config.preshared_key.bytes(),
        ranges,
    }))
}

/// Every peer the clients describe and the operator's decisions back, by public key, and
/// the clients refused. Two clients with the same public key: neither is a peer (the
/// operator refuses the later one; this holds while it has not yet).
pub fn desired<'a>(
    clients: impl IntoIterator<Item = &'a GefyraClient>,
    decisions: &Decisions,
) -> (BTreeMap<Key, PeerSpec>, Vec<Refused>) {
    let mut peers: BTreeMap<Key, PeerSpec> = BTreeMap::new();
    let mut duplicates: BTreeMap<Key, Vec<String>> = BTreeMap::new();
    let mut refused = Vec::new();
    for client in clients {
        match spec_of(client, decisions) {
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
            Err(refusal) => refused.push(refusal),
        }
    }
    for (key, clients) in duplicates {
        peers.remove(&key);
        refused.push(Refused {
            reason: Refusal::DuplicateKey,
            message: format!(
                "clients {} share the public key {}; none of them may connect",
                clients.join(", "),
                encode_key(&key)
            ),
        });
    }
    (peers, refused)
}

/// How to get from the current peer table to the desired one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub add: Vec<PeerSpec>,
    /// Same public key, client and preshared key, other ranges: the peer keeps its session
    /// (a routed subnet arriving after the connect must not cost a handshake).
    pub update: Vec<PeerSpec>,
    /// Same public key, other client or preshared key: the peer's session starts anew.
    pub replace: Vec<PeerSpec>,
    pub remove: Vec<Key>,
}

pub fn plan(current: &BTreeMap<Key, PeerSpec>, desired: &BTreeMap<Key, PeerSpec>) -> Plan {
    let mut plan = Plan::default();
    for (key, spec) in desired {
        match current.get(key) {
            None => plan.add.push(spec.clone()),
            Some(existing) if existing == spec => {}
            Some(existing)
                if existing.client == spec.client
                    && existing.preshared_key == spec.preshared_key =>
            {
                plan.update.push(spec.clone())
            }
            Some(_) => plan.replace.push(spec.clone()),
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
            "metadata": {"name": name, "namespace": "gefyra", "uid": format!("uid-{name}")},
            "provider": "stowaway",
            "state": state,
            "providerParameter": parameter,
            "providerConfig": {
                "Interface.Address": address,
                "Interface.DNS": "192.168.99.1",
                "Interface.ListenPort": "51820",
                "Interface.PublicKey": key(public),
                "Peer.PublicKey": key(100),
                "Peer.PresharedKey": key(200),
                "Peer.Endpoint": "203.0.113.7:31820",
                "Peer.AllowedIPs": "0.0.0.0/0, ::/0",
            }
        }))
        .unwrap()
    }

    /// The operator's decisions for `clients` as they describe themselves.
    fn decided(clients: &[GefyraClient]) -> Decisions {
        let mut decisions = Decisions::default();
        for client in clients {
            let name = client.metadata.name.clone().unwrap();
            let uid = client.metadata.uid.clone().unwrap();
            if let Some(Ok(address)) = client
                .provider_config
                .as_ref()
                .map(|c| c["Interface.Address"].as_str().unwrap().parse())
            {
                decisions.claims.insert(address, uid.clone());
            }
            if let Some(subnet) = client
                .provider_parameter
                .as_ref()
                .and_then(|p| p.get("subnet"))
            {
                let subnet = subnet.as_str().unwrap().parse().unwrap();
                decisions
                    .routes
                    .insert(name, gefyra_api::ipam::Route { uid, subnet });
            }
        }
        decisions
    }

    fn desired_of(clients: &[GefyraClient]) -> (BTreeMap<Key, PeerSpec>, Vec<Refused>) {
        desired(clients, &decided(clients))
    }

    #[test]
    fn only_active_clients_with_a_valid_config_are_peers() {
        let clients = [
            client("a", "ACTIVE", 1, "192.168.96.2", Some("10.1.0.0/16")),
            client("b", "WAITING", 2, "192.168.96.3", None),
            client("c", "ACTIVE", 3, "192.168.96.4", None),
        ];
        let mut decisions = decided(&clients);
        let mut broken = clients[2].clone();
        broken
            .provider_config
            .as_mut()
            .unwrap()
            .insert("Interface.Address".into(), json!("not-an-address"));
        let clients = [clients[0].clone(), clients[1].clone(), broken];
        decisions.claims.remove(&"192.168.96.4".parse().unwrap());
        let (peers, refused) = desired(&clients, &decisions);
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
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].reason, Refusal::InvalidConfig);
        assert!(
            refused[0]
                .message
                .starts_with("client c: providerConfig.Interface.Address"),
            "{:?}",
            refused[0]
        );
        assert!(
            !format!("{a:?}").contains(&key(200)),
            "no preshared key in Debug"
        );
    }

    #[test]
    fn a_forged_config_or_subnet_takes_nothing_from_another_client() {
        let a = client("a", "ACTIVE", 1, "192.168.96.2", Some("10.1.0.0/16"));
        let honest_b = client("b", "ACTIVE", 2, "192.168.96.3", None);
        let decisions = decided(&[a.clone(), honest_b]);
        // b claims a's tunnel address: not admitted, a unaffected.
        let b = client("b", "ACTIVE", 2, "192.168.96.2", None);
        let (peers, refused) = desired(&[a.clone(), b], &decisions);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[&[1; 32]].client, "a");
        assert_eq!(refused[0].reason, Refusal::AddressNotClaimed);
        // b asks for a's subnet in its providerParameter: it gets only what the routes table
        // records for it (nothing), and a keeps its subnet.
        let b = client("b", "ACTIVE", 2, "192.168.96.3", Some("10.1.0.0/16"));
        let (peers, _) = desired(&[a, b], &decisions);
        assert_eq!(
            peers[&[2; 32]].ranges,
            ["192.168.96.3/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(peers[&[1; 32]].ranges.len(), 2);
    }

    #[test]
    fn a_shared_public_key_admits_nobody() {
        let clients = [
            client("a", "ACTIVE", 1, "192.168.96.2", None),
            client("b", "ACTIVE", 1, "192.168.96.3", None),
        ];
        let (peers, refused) = desired_of(&clients);
        assert!(peers.is_empty());
        assert_eq!(refused[0].reason, Refusal::DuplicateKey);
        assert!(
            refused[0]
                .message
                .contains("clients a, b share the public key")
        );
    }

    #[test]
    fn plans_touch_only_what_changed() {
        let before = desired_of(&[
            client("a", "ACTIVE", 1, "192.168.96.2", None),
            client("b", "ACTIVE", 2, "192.168.96.3", None),
        ])
        .0;
        let after = desired_of(&[
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
            plan.update
                .iter()
                .map(|p| p.client.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        assert!(plan.replace.is_empty());
        assert!(plan.remove.is_empty());
        // Another preshared key or another client for the same key: a new session.
        let mut rekeyed = after.clone();
        rekeyed.get_mut(&[1; 32]).unwrap().preshared_key = [9; 32];
        rekeyed.get_mut(&[2; 32]).unwrap().client = "b2".to_string();
        let plan = super::plan(&after, &rekeyed);
        assert_eq!(plan.replace.len(), 2);
        assert!(plan.add.is_empty() && plan.update.is_empty() && plan.remove.is_empty());
        let gone = super::plan(&after, &BTreeMap::new());
        assert_eq!(gone.remove.len(), 3);
    }

    #[test]
    fn sources_are_checked_and_routes_take_the_longest_prefix() {
        let (peers, _) = desired_of(&[
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
