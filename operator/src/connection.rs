//! Connecting a client: what it asked for (`providerParameter`), the WireGuard keys, and
//! the `providerConfig` Gefyra's clients read. Pure functions; the controller does the I/O.

use std::net::IpAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use gefyra_api::ipam::{Allocation, SERVER_ADDRESS};
pub use gefyra_api::wireguard::{
    KeyPair, generate_key_pair, generate_preshared_key, public_key_of,
};
use ipnet::IpNet;
use serde_json::{Map, Value, json};

/// What a client asked for when it set `providerParameter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The client keeps its private key and sent only this.
    pub public_key: Option<String>,
    /// The range the client routes through the tunnel (its local network).
    pub subnet: Option<IpNet>,
}

/// Reads `providerParameter`; the error says what is wrong and how to fix it.
pub fn parse_request(parameter: &Map<String, Value>) -> Result<ConnectRequest, String> {
    let text = |key: &str| -> Result<Option<&str>, String> {
        match parameter.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(value)) => Ok(Some(value.as_str())),
            Some(other) => Err(format!(
                "providerParameter.{key} must be a string, not {other}"
            )),
        }
    };
    let public_key = match text("publicKey")? {
        None => None,
        Some(key) => match STANDARD.decode(key) {
            Ok(bytes) if bytes.len() == 32 => Some(key.to_string()),
            _ => {
                return Err(format!(
                    "providerParameter.publicKey {key:?} is not a WireGuard public key (base64 of 32 bytes, as `wg pubkey` prints)"
                ));
            }
        },
    };
    let subnet = match text("subnet")? {
        None => None,
        Some(subnet) => Some(subnet.parse::<IpNet>().map_err(|_| {
            format!("providerParameter.subnet {subnet:?} is not a CIDR such as 172.20.0.0/16")
        })?),
    };
    Ok(ConnectRequest { public_key, subnet })
}

/// Everything `providerConfig` is made of.
pub struct ConfigInputs<'a> {
    pub allocation: &'a Allocation,
    /// The client's public key, and its private key only if the operator generated it.
    pub client_public: &'a str,
    pub client_private: Option<&'a str>,
    pub server_public: &'a str,
    pub preshared_key: &'a str,
    pub endpoint: &'a str,
}

/// `providerConfig` in Gefyra's flat-key layout.
pub fn provider_config(inputs: &ConfigInputs) -> Map<String, Value> {
    let address = inputs.allocation.tunnel.addr();
    let mut config = json!({
        "Interface.Address": address.to_string(),
        "Interface.DNS": SERVER_ADDRESS.to_string(),
        "Interface.ListenPort": "51820",
        "Interface.PublicKey": inputs.client_public,
        "Peer.PublicKey": inputs.server_public,
        "Peer.PresharedKey": inputs.preshared_key,
        "Peer.Endpoint": inputs.endpoint,
        "Peer.AllowedIPs": allowed_ips(address),
    });
    if let Some(private) = inputs.client_private {
        config["Interface.PrivateKey"] = json!(private);
    }
    match config {
        Value::Object(map) => map,
        _ => unreachable!("a JSON object literal"),
    }
}

/// Everything goes through the tunnel, as Gefyra's clients expect.
fn allowed_ips(address: IpAddr) -> &'static str {
    match address {
        IpAddr::V4(_) => "0.0.0.0/0, ::/0",
        IpAddr::V6(_) => "::/0, 0.0.0.0/0",
    }
}

/// Whether a stored `providerConfig` still describes `allocation` and `request` (then it is
/// kept as it is: reconnecting peers keep their keys).
pub fn config_matches(
    config: &Map<String, Value>,
    allocation: &Allocation,
    request: &ConnectRequest,
) -> bool {
    let get = |key: &str| config.get(key).and_then(Value::as_str);
    let address_ok = get("Interface.Address") == Some(&allocation.tunnel.addr().to_string());
    let key_ok = match &request.public_key {
        Some(public) => {
            get("Interface.PublicKey") == Some(public) && get("Interface.PrivateKey").is_none()
        }
        None => get("Interface.PrivateKey")
            .and_then(public_key_of)
            .is_some_and(|public| get("Interface.PublicKey") == Some(public.as_str())),
    };
    address_ok && key_ok && get("Peer.PresharedKey").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocation() -> Allocation {
        Allocation {
            uid: "u".into(),
            tunnel: "192.168.96.2/32".parse().unwrap(),
            routed: None,
        }
    }

    #[test]
    fn requests_are_read_and_bad_ones_explained() {
        let public = generate_key_pair().public;
        let request = parse_request(
            json!({"publicKey": public, "subnet": "172.20.0.0/16"})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(request.public_key.as_deref(), Some(public.as_str()));
        assert_eq!(request.subnet, Some("172.20.0.0/16".parse().unwrap()));
        let error = parse_request(json!({"subnet": "nope"}).as_object().unwrap()).unwrap_err();
        assert!(error.contains("not a CIDR"), "{error}");
        let error = parse_request(json!({"publicKey": "abc"}).as_object().unwrap()).unwrap_err();
        assert!(error.contains("wg pubkey"), "{error}");
        assert_eq!(
            parse_request(&Map::new()).unwrap(),
            ConnectRequest {
                public_key: None,
                subnet: None
            }
        );
    }

    #[test]
    fn config_has_gefyras_keys_and_a_private_key_only_when_generated() {
        let server = generate_key_pair();
        let client = generate_key_pair();
        let allocation = allocation();
        let mut inputs = ConfigInputs {
            allocation: &allocation,
            client_public: &client.public,
            client_private: Some(&client.private),
            server_public: &server.public,
            preshared_key: "psk",
            endpoint: "203.0.113.7:31820",
        };
        let config = provider_config(&inputs);
        assert_eq!(config["Interface.Address"], "192.168.96.2");
        assert_eq!(config["Interface.DNS"], "192.168.99.1");
        assert_eq!(config["Peer.AllowedIPs"], "0.0.0.0/0, ::/0");
        assert_eq!(config["Interface.PrivateKey"], json!(client.private));
        let generated = ConnectRequest {
            public_key: None,
            subnet: None,
        };
        assert!(config_matches(&config, &allocation, &generated));
        inputs.client_private = None;
        let config = provider_config(&inputs);
        assert!(!config.contains_key("Interface.PrivateKey"));
        let own_key = ConnectRequest {
            public_key: Some(client.public.clone()),
            subnet: None,
        };
        assert!(config_matches(&config, &allocation, &own_key));
        assert!(!config_matches(&config, &allocation, &generated));
    }
}
