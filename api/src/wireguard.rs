//! WireGuard keys and the client side's configuration file, as `wg` and `wg-quick` read it.
//!
//! The operator generates keys for clients that do not bring their own; the CLI generates
//! them on the developer's machine, so the private key never leaves it.

use std::fmt::Write as _;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use x25519_dalek::{PublicKey, StaticSecret};

use ipnet::IpNet;

use crate::connection::{Endpoint, WireGuardKey, format_allowed_ips};
use crate::ipam::SERVER_ADDRESS;

/// Keep NAT mappings open; the interval Gefyra's clients use.
pub const PERSISTENT_KEEPALIVE_SECONDS: u16 = 21;

/// A WireGuard key pair, base64 as `wg` prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a private key, not even in a debug log.
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// A fresh key pair (rand's thread-local CSPRNG, seeded from the operating system).
pub fn generate_key_pair() -> KeyPair {
    let secret = StaticSecret::from(rand::random::<[u8; 32]>());
    let public = PublicKey::from(&secret);
    KeyPair {
        private: STANDARD.encode(secret.to_bytes()),
        public: STANDARD.encode(public.as_bytes()),
    }
}

/// The public key of a base64 private key, if it is one.
pub fn public_key_of(private: &str) -> Option<String> {
    let bytes: [u8; 32] = STANDARD.decode(private).ok()?.try_into().ok()?;
    let secret = StaticSecret::from(bytes);
    Some(STANDARD.encode(PublicKey::from(&secret).as_bytes()))
}

/// A fresh pre-shared key (32 random bytes, base64).
pub fn generate_preshared_key() -> String {
    STANDARD.encode(rand::random::<[u8; 32]>())
}

/// Which program reads the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFormat {
    /// `wg-quick up FILE`: also sets the address, DNS server and MTU.
    WgQuick,
    /// `wg setconf INTERFACE FILE`: keys, peer and routes only; the address is set apart.
    Wg,
}

/// Everything the client's end of the tunnel needs, typed: no value can carry a line break
/// into the file (which `wg-quick`, often run with `sudo`, would read as a directive).
#[derive(Clone, PartialEq, Eq)]
pub struct TunnelConfig {
    pub private_key: WireGuardKey,
    /// The client's tunnel address with its prefix, e.g. `192.168.99.2/32`.
    pub address: IpNet,
    pub mtu: Option<u16>,
    pub server_public_key: WireGuardKey,
    pub preshared_key: Option<WireGuardKey>,
    /// Stowaway's `host:port`.
    pub endpoint: Endpoint,
    /// What goes through the tunnel, e.g. `192.168.99.1/32, 10.96.0.0/12`.
    pub allowed_ips: Vec<IpNet>,
}

impl std::fmt::Debug for TunnelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelConfig")
            .field("address", &self.address)
            .field("endpoint", &self.endpoint)
            .field("allowed_ips", &self.allowed_ips)
            .finish_non_exhaustive()
    }
}

impl TunnelConfig {
    /// The configuration file; it holds the private key, so whoever writes it writes `0600`.
    pub fn render(&self, format: ConfigFormat) -> String {
        let mut text = String::from("[Interface]\n");
        let mut line = |key: &str, value: &str| {
            // Writing to a String cannot fail.
            let _ = writeln!(text, "{key} = {value}");
        };
        line("PrivateKey", &self.private_key.to_string());
        if format == ConfigFormat::WgQuick {
            line("Address", &self.address.to_string());
            line("DNS", &SERVER_ADDRESS.to_string());
            if let Some(mtu) = self.mtu {
                line("MTU", &mtu.to_string());
            }
        }
        text.push_str("\n[Peer]\n");
        let mut line = |key: &str, value: &str| {
            let _ = writeln!(text, "{key} = {value}");
        };
        line("PublicKey", &self.server_public_key.to_string());
        if let Some(preshared_key) = &self.preshared_key {
            line("PresharedKey", &preshared_key.to_string());
        }
        line("Endpoint", &self.endpoint.to_string());
        line("AllowedIPs", &format_allowed_ips(&self.allowed_ips));
        line(
            "PersistentKeepalive",
            &PERSISTENT_KEEPALIVE_SECONDS.to_string(),
        );
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_wireguard_keys_and_never_printed() {
        let pair = generate_key_pair();
        assert_eq!(STANDARD.decode(&pair.private).unwrap().len(), 32);
        assert_eq!(
            public_key_of(&pair.private).as_deref(),
            Some(pair.public.as_str())
        );
        assert!(!format!("{pair:?}").contains(&pair.private));
        assert_ne!(generate_key_pair(), pair);
        assert_eq!(STANDARD.decode(generate_preshared_key()).unwrap().len(), 32);
        assert_eq!(public_key_of("not base64"), None);
    }

    fn tunnel() -> TunnelConfig {
        TunnelConfig {
            private_key: WireGuardKey([1; 32]),
            address: "192.168.99.2/32".parse().unwrap(),
            mtu: Some(1380),
            server_public_key: WireGuardKey([2; 32]),
            preshared_key: Some(WireGuardKey([3; 32])),
            endpoint: "203.0.113.7:31820".parse().unwrap(),
            allowed_ips: crate::connection::parse_allowed_ips("192.168.99.1/32, 10.96.0.0/12")
                .unwrap(),
        }
    }

    #[test]
    fn wg_quick_files_carry_address_dns_and_mtu() {
        assert_eq!(
            tunnel().render(ConfigFormat::WgQuick),
            "[Interface]\nPrivateKey = AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\nAddress = 192.168.99.2/32\nDNS = 192.168.99.1\nMTU = 1380\n\n\
             [Peer]\nPublicKey = AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=\nPresharedKey = AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=\nEndpoint = 203.0.113.7:31820\n\
             AllowedIPs = 192.168.99.1/32, 10.96.0.0/12\nPersistentKeepalive = 21\n"
        );
    }

    #[test]
    fn wg_files_hold_only_what_wg_setconf_accepts() {
        let text = tunnel().render(ConfigFormat::Wg);
        for key in ["Address", "DNS", "MTU"] {
            assert!(!text.contains(key), "{text}");
        }
        assert!(text.contains("PresharedKey = AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=\n"));
        assert!(!format!("{:?}", tunnel()).contains("AQEBAQEB"));
    }
}
