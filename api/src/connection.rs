//! The connection contract between a client, the operator and Stowaway, in Gefyra's wire
//! layout: what a client asks for (`providerParameter`) and the WireGuard configuration the
//! operator publishes (`providerConfig`, flat keys such as `Interface.Address`). Parsed and
//! validated here, once; nobody reads these keys by string anywhere else.
//!
//! Every value is hostile until parsed: keys are 32 bytes of base64, addresses and networks
//! are parsed as such, and an endpoint is `HOST:PORT` with a host name or an IP address —
//! so no value can smuggle a newline into a WireGuard configuration file.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ipnet::IpNet;
use serde_json::{Map, Value};

use crate::ipam::{Pool, SERVER_ADDRESS};

/// The port Gefyra writes as `Interface.ListenPort`.
pub const CLIENT_LISTEN_PORT: u16 = 51820;

/// What is wrong with a field of `providerParameter` or `providerConfig`, naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object}.{key} {problem}")]
pub struct ContractError {
    /// `providerParameter` or `providerConfig`.
    pub object: &'static str,
    pub key: &'static str,
    pub problem: String,
}

/// A WireGuard key (public, private or pre-shared): 32 bytes, written as base64.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WireGuardKey(pub [u8; 32]);

impl WireGuardKey {
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for WireGuardKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bytes: [u8; 32] = STANDARD
            .decode(text)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| {
                "is not a WireGuard key (base64 of 32 bytes, as `wg pubkey` prints)".to_string()
            })?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for WireGuardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for WireGuardKey {
    /// Shows only a prefix: a key in a debug line may be a private or pre-shared one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WireGuardKey({}…)", &self.to_string()[..6])
    }
}

/// `HOST:PORT` of a WireGuard endpoint: a DNS name or an IP address (IPv6 in brackets),
/// and a port other than 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid =
            || format!("{text:?} is not HOST:PORT (a host name or IP address and a port)");
        let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(invalid)?;
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => match v6.parse::<IpAddr>() {
                Ok(IpAddr::V6(_)) => v6.to_string(),
                _ => return Err(invalid()),
            },
            // An IPv6 address goes in brackets; unbracketed, its colons are ambiguous.
            None if host.parse::<std::net::Ipv4Addr>().is_ok() || is_dns_name(host) => {
                host.to_string()
            }
            None => return Err(invalid()),
        };
        Ok(Self { host, port })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => write!(f, "[{}]:{}", self.host, self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// A DNS name: dot-separated labels of letters, digits and inner hyphens, each at most 63
/// characters, at most 253 in all (a trailing dot allowed).
pub fn is_dns_name(text: &str) -> bool {
    let name = text.strip_suffix('.').unwrap_or(text);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Reads `key` of a flat map as text: `Ok(None)` when absent or null.
fn text<'a>(
    object: &'static str,
    map: &'a Map<String, Value>,
    key: &'static str,
) -> Result<Option<&'a str>, ContractError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value)),
        Some(other) => Err(ContractError {
            object,
            key,
            problem: format!("must be a string, not {}", kind_of(other)),
        }),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses `key` with `T::from_str`; the error names the field and quotes (escaped) the value.
fn parsed<T: FromStr>(
    object: &'static str,
    map: &Map<String, Value>,
    key: &'static str,
) -> Result<Option<T>, ContractError>
where
    T::Err: fmt::Display,
{
    text(object, map, key)?
        .map(|value| {
            value.parse::<T>().map_err(|error| ContractError {
                object,
                key,
                problem: format!("{:?}: {error}", truncated(value)),
            })
        })
        .transpose()
}

/// At most 80 characters of a hostile value, for an error message.
fn truncated(value: &str) -> String {
    value.chars().take(80).collect()
}

fn required<T>(
    object: &'static str,
    key: &'static str,
    value: Option<T>,
) -> Result<T, ContractError> {
    value.ok_or(ContractError {
        object,
        key,
        problem: "is missing".into(),
    })
}

/// What a client asks for when it sets `providerParameter` (other keys are ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderParameter {
    /// The range the client routes through the tunnel (its local network); exclusive to it.
    pub subnet: Option<IpNet>,
    /// The client's own public key; without it the operator generates a key pair.
    pub public_key: Option<WireGuardKey>,
}

const PARAMETER: &str = "providerParameter";

impl ProviderParameter {
    pub fn parse(map: &Map<String, Value>) -> Result<Self, ContractError> {
        let subnet = text(PARAMETER, map, "subnet")?
            .filter(|value| !value.is_empty())
            .map(|value| {
                value.parse::<IpNet>().map_err(|_| ContractError {
                    object: PARAMETER,
                    key: "subnet",
                    problem: format!("{:?} is not a CIDR such as 172.20.0.0/16", truncated(value)),
                })
            })
            .transpose()?;
        Ok(Self {
            subnet,
            public_key: parsed(PARAMETER, map, "publicKey")?,
        })
    }

    /// The wire form. `subnet` is always there (empty: none): Gefyra's CLI reads the
    /// subnet of every ACTIVE client when it picks its own, and fails on a client without.
    pub fn to_map(&self) -> Map<String, Value> {
        let mut map = Map::new();
        let subnet = self
            .subnet
            .map(|subnet| subnet.to_string())
            .unwrap_or_default();
        map.insert("subnet".into(), subnet.into());
        if let Some(key) = self.public_key {
            map.insert("publicKey".into(), key.to_string().into());
        }
        map
    }
}

/// The WireGuard configuration the operator publishes for an ACTIVE client.
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    /// `Interface.Address`: the client's tunnel address.
    pub address: IpAddr,
    /// `Interface.PrivateKey`: only when the operator generated the client's key pair.
    pub private_key: Option<WireGuardKey>,
    /// `Interface.DNS`: the server's tunnel address.
    pub dns: IpAddr,
    /// `Interface.ListenPort` (a string on the wire).
    pub listen_port: u16,
    /// `Interface.PublicKey`: the client's public key.
    pub public_key: WireGuardKey,
    /// `Peer.PublicKey`: the server's public key.
    pub server_public_key: WireGuardKey,
    /// `Peer.PresharedKey`.
    pub preshared_key: WireGuardKey,
    /// `Peer.Endpoint`: where the operator says Stowaway is (clients use their file's).
    pub endpoint: Endpoint,
    /// `Peer.AllowedIPs`: what Gefyra's clients route through the tunnel (`, `-separated):
    /// everything, as Gefyra 2.x publishes it.
    pub allowed_ips: Vec<IpNet>,
    /// `Cluster.AllowedIPs` (ours; Gefyra's clients do not read it): the cluster's ranges
    /// (see [`cluster_ranges`]), what a split tunnel on a developer's machine routes. Empty
    /// when absent (an operator that does not publish it).
    pub cluster_ranges: Vec<IpNet>,
}

impl fmt::Debug for ProviderConfig {
    /// Never prints the private or pre-shared key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("address", &self.address)
            .field("public_key", &self.public_key.to_string())
            .field("server_public_key", &self.server_public_key.to_string())
            .field("endpoint", &self.endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .field("cluster_ranges", &self.cluster_ranges)
            .finish_non_exhaustive()
    }
}

const CONFIG: &str = "providerConfig";

/// The key of [`ProviderConfig::cluster_ranges`].
pub const CLUSTER_RANGES_KEY: &str = "Cluster.AllowedIPs";

/// What a client must route to reach the cluster and nothing else: the server's tunnel
/// address (Gefyra's DNS server), the tunnel pool (other clients, replies) and the reserved
/// ranges (the cluster's Service and Pod CIDRs). A range inside another is left out.
pub fn cluster_ranges(pool: &Pool) -> Vec<IpNet> {
    let server = IpNet::from(SERVER_ADDRESS);
    let mut ranges: Vec<IpNet> = Vec::new();
    for net in std::iter::once(&server)
        .chain(&pool.tunnel)
        .chain(&pool.reserved)
    {
        let net = net.trunc();
        ranges.retain(|kept| !net.contains(kept));
        if !ranges.iter().any(|kept| kept.contains(&net)) {
            ranges.push(net);
        }
    }
    ranges
}

/// `0.0.0.0/0, ::/0` and the like.
pub fn parse_allowed_ips(text: &str) -> Result<Vec<IpNet>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.parse::<IpNet>()
                .map_err(|_| format!("{:?} is not a network in CIDR notation", truncated(part)))
        })
        .collect()
}

pub fn format_allowed_ips(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

struct AllowedIps(Vec<IpNet>);

impl FromStr for AllowedIps {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        parse_allowed_ips(text).map(Self)
    }
}

impl ProviderConfig {
    /// The configuration for a client at `address`: `Peer.AllowedIPs` is everything, as
    /// Gefyra's clients expect; `cluster_ranges` is what a split tunnel routes.
    pub fn new(
        address: IpAddr,
        public_key: WireGuardKey,
        private_key: Option<WireGuardKey>,
        server_public_key: WireGuardKey,
        preshared_key: WireGuardKey,
        endpoint: Endpoint,
        cluster_ranges: Vec<IpNet>,
    ) -> Self {
        let everything = ["0.0.0.0/0", "::/0"].map(|net| net.parse::<IpNet>().expect("a CIDR"));
        let allowed_ips = match address {
            IpAddr::V4(_) => everything.to_vec(),
            IpAddr::V6(_) => everything.into_iter().rev().collect(),
        };
        Self {
            address,
            private_key,
            dns: SERVER_ADDRESS,
            listen_port: CLIENT_LISTEN_PORT,
            public_key,
            server_public_key,
            preshared_key,
            endpoint,
            allowed_ips,
            cluster_ranges,
        }
    }

    pub fn parse(map: &Map<String, Value>) -> Result<Self, ContractError> {
        Ok(Self {
            address: required(
                CONFIG,
                "Interface.Address",
                parsed(CONFIG, map, "Interface.Address")?,
            )?,
            private_key: parsed(CONFIG, map, "Interface.PrivateKey")?,
            dns: required(
                CONFIG,
                "Interface.DNS",
                parsed(CONFIG, map, "Interface.DNS")?,
            )?,
            listen_port: required(
                CONFIG,
                "Interface.ListenPort",
                parsed(CONFIG, map, "Interface.ListenPort")?,
            )?,
            public_key: required(
                CONFIG,
                "Interface.PublicKey",
                parsed(CONFIG, map, "Interface.PublicKey")?,
            )?,
            server_public_key: required(
                CONFIG,
                "Peer.PublicKey",
                parsed(CONFIG, map, "Peer.PublicKey")?,
            )?,
            preshared_key: required(
                CONFIG,
                "Peer.PresharedKey",
                parsed(CONFIG, map, "Peer.PresharedKey")?,
            )?,
            endpoint: required(
                CONFIG,
                "Peer.Endpoint",
                parsed(CONFIG, map, "Peer.Endpoint")?,
            )?,
            allowed_ips: required(
                CONFIG,
                "Peer.AllowedIPs",
                parsed::<AllowedIps>(CONFIG, map, "Peer.AllowedIPs")?,
            )?
            .0,
            cluster_ranges: parsed::<AllowedIps>(CONFIG, map, CLUSTER_RANGES_KEY)?
                .map(|ranges| ranges.0)
                .unwrap_or_default(),
        })
    }

    /// Only `Interface.PublicKey` of a configuration in wire form (the client's key), without
    /// parsing the rest: read for every ACTIVE client when a connecting one's key is checked.
    pub fn public_key_in(map: &Map<String, Value>) -> Option<WireGuardKey> {
        parsed(CONFIG, map, "Interface.PublicKey").ok().flatten()
    }

    /// The wire form, in Gefyra's flat-key layout (all values strings).
    pub fn to_map(&self) -> Map<String, Value> {
        let mut map = Map::new();
        let mut put = |key: &str, value: String| {
            map.insert(key.to_string(), Value::String(value));
        };
        put("Interface.Address", self.address.to_string());
        if let Some(private) = self.private_key {
            put("Interface.PrivateKey", private.to_string());
        }
        put("Interface.DNS", self.dns.to_string());
        put("Interface.ListenPort", self.listen_port.to_string());
        put("Interface.PublicKey", self.public_key.to_string());
        put("Peer.PublicKey", self.server_public_key.to_string());
        put("Peer.PresharedKey", self.preshared_key.to_string());
        put("Peer.Endpoint", self.endpoint.to_string());
        put("Peer.AllowedIPs", format_allowed_ips(&self.allowed_ips));
        if !self.cluster_ranges.is_empty() {
            put(CLUSTER_RANGES_KEY, format_allowed_ips(&self.cluster_ranges));
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn key(byte: u8) -> WireGuardKey {
        WireGuardKey([byte; 32])
    }

    fn config() -> ProviderConfig {
        ProviderConfig::new(
            "192.168.96.2".parse().unwrap(),
            key(1),
            Some(key(2)),
            key(3),
            key(4),
            "203.0.113.7:31820".parse().unwrap(),
            cluster_ranges(&Pool {
                tunnel: vec!["192.168.96.0/20".parse().unwrap()],
                reserved: vec!["10.96.0.0/12".parse().unwrap()],
            }),
        )
    }

    #[test]
    fn the_config_has_gefyras_flat_keys_and_reads_back() {
        let map = config().to_map();
        assert_eq!(map["Interface.Address"], "192.168.96.2");
        assert_eq!(map["Interface.DNS"], "192.168.99.1");
        assert_eq!(map["Interface.ListenPort"], "51820");
        assert_eq!(map["Peer.AllowedIPs"], "0.0.0.0/0, ::/0");
        assert_eq!(map["Cluster.AllowedIPs"], "192.168.96.0/20, 10.96.0.0/12");
        assert_eq!(map["Peer.Endpoint"], "203.0.113.7:31820");
        assert_eq!(ProviderConfig::parse(&map).unwrap(), config());
        // Gefyra's operator writes no Cluster.AllowedIPs: none is read, none written back.
        let mut gefyras = map.clone();
        gefyras.remove("Cluster.AllowedIPs");
        let parsed = ProviderConfig::parse(&gefyras).unwrap();
        assert!(parsed.cluster_ranges.is_empty());
        assert_eq!(parsed.to_map(), gefyras);
        let debug = format!("{:?}", config());
        assert!(!debug.contains(&key(2).to_string()) && !debug.contains(&key(4).to_string()));
    }

    #[test]
    fn cluster_ranges_are_the_server_the_pool_and_the_reserved_ranges_once() {
        let nets = |text: &str| parse_allowed_ips(text).unwrap();
        let pool = |tunnel: &str, reserved: &str| Pool {
            tunnel: nets(tunnel),
            reserved: nets(reserved),
        };
        // The default pool holds the server's address.
        assert_eq!(
            cluster_ranges(&pool("192.168.96.0/20", "10.244.0.0/16, 10.96.0.0/12")),
            nets("192.168.96.0/20, 10.244.0.0/16, 10.96.0.0/12")
        );
        assert_eq!(
            cluster_ranges(&pool("192.168.96.0/20", "")),
            nets("192.168.96.0/20")
        );
        // A pool elsewhere, an IPv6 pool, a reserved range inside another, host bits set.
        assert_eq!(
            cluster_ranges(&pool(
                "10.200.0.0/16, fd00:99::/64",
                "10.96.0.0/12, 10.96.3.7/24"
            )),
            nets("192.168.99.1/32, 10.200.0.0/16, fd00:99::/64, 10.96.0.0/12")
        );
        assert_eq!(
            cluster_ranges(&pool("10.200.0.0/16", "10.96.0.0/24, 10.0.0.0/8")),
            nets("192.168.99.1/32, 10.0.0.0/8")
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        let mut map = config().to_map();
        map.insert(
            "Interface.Address".into(),
            json!("192.168.96.2\nPostUp = sh"),
        );
        let error = ProviderConfig::parse(&map).unwrap_err();
        assert_eq!(error.key, "Interface.Address");
        assert!(
            error
                .to_string()
                .starts_with("providerConfig.Interface.Address"),
            "{error}"
        );
        let mut map = config().to_map();
        map.insert(
            "Peer.Endpoint".into(),
            json!("evil\nPostUp = rm -rf /:31820"),
        );
        assert_eq!(
            ProviderConfig::parse(&map).unwrap_err().key,
            "Peer.Endpoint"
        );
        let mut map = config().to_map();
        map.remove("Peer.PresharedKey");
        assert_eq!(
            ProviderConfig::parse(&map).unwrap_err().to_string(),
            "providerConfig.Peer.PresharedKey is missing"
        );
        let error =
            ProviderParameter::parse(json!({"subnet": 7}).as_object().unwrap()).unwrap_err();
        assert_eq!(
            error.to_string(),
            "providerParameter.subnet must be a string, not a number"
        );
        let error =
            ProviderParameter::parse(json!({"publicKey": "abc"}).as_object().unwrap()).unwrap_err();
        assert!(error.to_string().contains("wg pubkey"), "{error}");
    }

    #[test]
    fn a_parameter_always_records_a_subnet_in_the_form_gefyras_cli_reads() {
        let none = ProviderParameter {
            subnet: None,
            public_key: Some(key(1)),
        };
        let map = none.to_map();
        assert_eq!(map["subnet"], "");
        assert_eq!(ProviderParameter::parse(&map).unwrap(), none);
        let some = ProviderParameter {
            subnet: Some("172.20.0.0/16".parse().unwrap()),
            public_key: None,
        };
        assert_eq!(some.to_map()["subnet"], "172.20.0.0/16");
        assert_eq!(ProviderParameter::parse(&some.to_map()).unwrap(), some);
    }

    #[test]
    fn endpoints_are_host_names_or_addresses_with_a_port() {
        for good in [
            "203.0.113.7:31820",
            "[fd00::1]:31820",
            "stowaway.example.com:1",
            "localhost:9",
        ] {
            let endpoint: Endpoint = good.parse().unwrap();
            assert_eq!(endpoint.to_string(), good);
        }
        for bad in [
            "",
            ":1",
            "host",
            "host:0",
            "host:65536",
            "fd00::1:31820",
            "a b:1",
            "a\nb:1",
            "-a:1",
            "a..b:1",
            "[1.2.3.4]:1",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        /// Whatever a client or an admin writes, parsing never panics, and what parses
        /// renders without a line break or control character (so it cannot add a line to a
        /// WireGuard configuration file).
        #[test]
        fn hostile_values_never_panic_nor_reach_a_config_file_raw(
            values in proptest::collection::vec(any::<String>(), 10),
        ) {
            let keys = ["Interface.Address", "Interface.PrivateKey", "Interface.DNS",
                "Interface.ListenPort", "Interface.PublicKey", "Peer.PublicKey",
                "Peer.PresharedKey", "Peer.Endpoint", "Peer.AllowedIPs", "Cluster.AllowedIPs"];
            let map: Map<String, Value> = keys.iter().zip(&values)
                .map(|(key, value)| (key.to_string(), Value::String(value.clone()))).collect();
            if let Ok(config) = ProviderConfig::parse(&map) {
                for value in config.to_map().values() {
                    prop_assert!(!value.as_str().unwrap().chars().any(char::is_control));
                }
            }
            let parameter: Map<String, Value> = [("subnet", &values[0]), ("publicKey", &values[1])]
                .into_iter().map(|(k, v)| (k.to_string(), Value::String(v.clone()))).collect();
            let _ = ProviderParameter::parse(&parameter);
            if let Ok(endpoint) = values[7].parse::<Endpoint>() {
                prop_assert!(!endpoint.to_string().chars().any(|c| c.is_control() || c == ' '));
            }
        }
    }
}
