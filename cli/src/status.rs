//! `kubectl gefyra status -f FILE`: the developer's view of their own client, read with
//! nothing but the client file's token — is it connected, at which tunnel address, when did
//! WireGuard last shake hands, when does the file's token expire.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gefyra_api::GefyraClient;
use gefyra_api::client_file::ClientFile;
use gefyra_api::connection::{ProviderConfig, format_allowed_ips};
use jiff::Timestamp;
use serde::Serialize;

use crate::args::{OutputFormat, StatusArgs};
use crate::cluster::{as_file_client, read_client_file};
use crate::error::{CliError, Kind, Result};
use crate::render::{human_age, printable};

/// When a ServiceAccount token (a JWT) expires: its `exp` claim. The signature is not
/// checked; this only tells the developer what the token says about itself.
pub fn token_expiry(token: &str) -> Option<Timestamp> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Timestamp::from_second(claims.get("exp")?.as_i64()?).ok()
}

/// What `status -f` shows.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ClientStatus {
    pub client_id: String,
    pub namespace: String,
    pub kubernetes_server: String,
    pub state: String,
    /// Why the client is not ready (state ERROR and the like).
    pub message: Option<String>,
    pub tunnel_address: Option<String>,
    /// What a split tunnel routes (the cluster's ranges the operator publishes).
    pub cluster_ranges: Option<String>,
    pub latest_handshake: Option<String>,
    /// When the client file's token expires (RFC 3339); `None` if it does not say.
    pub token_expires_at: Option<String>,
    /// The token only mints short-lived tokens (`clients config --short-lived`).
    pub short_lived: bool,
    pub sunset: Option<String>,
}

impl ClientStatus {
    pub fn of(file: &ClientFile, token: &str, client: &GefyraClient) -> Self {
        let config = client
            .provider_config
            .as_ref()
            .and_then(|config| ProviderConfig::parse(config).ok());
        let ready = client.ready_condition();
        Self {
            client_id: file.client_id.clone(),
            namespace: file.namespace.clone(),
            kubernetes_server: file.kubernetes_server.clone(),
            state: client.state.to_string(),
            message: ready
                .filter(|condition| condition.status != "True" && !condition.message.is_empty())
                .map(|condition| condition.message.clone()),
            tunnel_address: config.as_ref().map(|config| config.address.to_string()),
            cluster_ranges: config
                .as_ref()
                .filter(|config| !config.cluster_ranges.is_empty())
                .map(|config| format_allowed_ips(&config.cluster_ranges)),
            latest_handshake: client
                .status
                .as_ref()
                .and_then(|status| status.wireguard.as_ref())
                .and_then(|wireguard| wireguard.get("latest_handshake"))
                .map(|value| {
                    value
                        .as_str()
                        .map_or_else(|| value.to_string(), str::to_string)
                }),
            token_expires_at: token_expiry(token).map(|at| at.to_string()),
            short_lived: file.is_short_lived(),
            sunset: client.sunset.clone(),
        }
    }

    /// The text shown; times as RFC 3339 with how far away they are.
    pub fn render(&self, format: OutputFormat, now: Timestamp) -> String {
        match format {
            OutputFormat::Json => {
                return serde_json::to_string_pretty(self).expect("a status serializes") + "\n";
            }
            OutputFormat::Yaml => {
                return serde_saphyr::to_string(self).expect("a status serializes");
            }
            OutputFormat::Name => {
                return format!("gefyraclient.gefyra.dev/{}\n", printable(&self.client_id));
            }
            OutputFormat::Table | OutputFormat::Wide => {}
        }
        let relative = |at: &str| match at.parse::<Timestamp>() {
            Ok(time) if time > now => format!("{at} (in {})", human_age(now, time)),
            Ok(time) => format!("{at} ({} ago)", human_age(time, now)),
            Err(_) => at.to_string(),
        };
        let mut fields: Vec<(&str, String)> = vec![
            ("Client", self.client_id.clone()),
            ("Namespace", self.namespace.clone()),
            ("API server", self.kubernetes_server.clone()),
            ("State", self.state.clone()),
        ];
        if let Some(message) = &self.message {
            fields.push(("Problem", message.clone()));
        }
        if let Some(address) = &self.tunnel_address {
            fields.push(("Tunnel address", address.clone()));
        }
        if let Some(ranges) = &self.cluster_ranges {
            fields.push(("Cluster ranges", ranges.clone()));
        }
        if self.tunnel_address.is_some() {
            fields.push((
                "Latest handshake",
                self.latest_handshake
                    .as_deref()
                    .map_or_else(|| "none yet".to_string(), relative),
            ));
        }
        let kind = if self.short_lived {
            "Minter token expires"
        } else {
            "Token expires"
        };
        fields.push((
            kind,
            self.token_expires_at
                .as_deref()
                .map_or_else(|| "unknown (not a JWT with exp)".to_string(), relative),
        ));
        if let Some(sunset) = &self.sunset {
            fields.push(("Sunset", relative(sunset)));
        }
        let width = fields.iter().map(|(name, _)| name.len()).max().unwrap_or(0) + 2;
        fields
            .iter()
            .map(|(name, value)| format!("{:width$}{}\n", format!("{name}:"), printable(value)))
            .collect()
    }
}

pub async fn status(args: &StatusArgs) -> Result<()> {
    let file = read_client_file(&args.file)?;
    let token = file
        .credentials()
        .map_err(|error| CliError::new(Kind::BadClientFile, error.to_string()))?
        .token;
    let api = as_file_client(&file).await?;
    let id = file.client_id.as_str();
    let client = crate::connect::own_client(&api, id).await?;
    print!(
        "{}",
        ClientStatus::of(&file, &token, &client).render(args.output, Timestamp::now())
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use serde_json::json;

    fn jwt(claims: serde_json::Value) -> String {
        format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    fn file() -> ClientFile {
        ClientFile::parse(
            &json!({
                "client_id": "dev", "kubernetes_server": "https://api.example:6443",
                "provider": "stowaway", "namespace": "gefyra",
                "gefyra_server": "203.0.113.7:31820",
                "token": STANDARD.encode(jwt(json!({"exp": 1_798_000_000}))),
                "ca_crt": STANDARD.encode("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"), "registry": null, "wireguard_mtu": null
            })
            .to_string(),
        )
        .unwrap()
    }

    #[test]
    fn the_token_says_when_it_expires() {
        assert_eq!(
            token_expiry(&jwt(json!({"exp": 1_798_000_000, "sub": "x"}))),
            Some(Timestamp::from_second(1_798_000_000).unwrap())
        );
        assert_eq!(token_expiry(&jwt(json!({"sub": "x"}))), None);
        assert_eq!(token_expiry("not a jwt"), None);
        assert_eq!(token_expiry("a.!!!.c"), None);
    }

    #[test]
    fn a_connected_client_shows_its_address_handshake_and_expiry() {
        let client: GefyraClient = serde_json::from_value(json!({
            "apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
            "metadata": {"name": "dev", "namespace": "gefyra"},
            "provider": "stowaway", "state": "ACTIVE",
            "providerConfig": {
                "Interface.Address": "192.168.96.2", "Interface.DNS": "192.168.99.1",
                "Interface.ListenPort": "51820",
                "Interface.PublicKey": STANDARD.encode([1u8; 32]),
                "Peer.PublicKey": STANDARD.encode([2u8; 32]),
                "Peer.PresharedKey": STANDARD.encode([3u8; 32]),
                "Peer.Endpoint": "203.0.113.7:31820", "Peer.AllowedIPs": "0.0.0.0/0, ::/0",
                "Cluster.AllowedIPs": "192.168.96.0/20, 10.96.0.0/12"
            },
            "status": {"wireguard": {"latest_handshake": "2026-12-07T14:59:30Z"}}
        }))
        .unwrap();
        let file = file();
        let token = file.credentials().unwrap().token;
        let status = ClientStatus::of(&file, &token, &client);
        let now: Timestamp = "2026-12-07T15:00:00Z".parse().unwrap();
        assert_eq!(
            status.render(OutputFormat::Table, now),
            "Client:           dev\n\
             Namespace:        gefyra\n\
             API server:       https://api.example:6443\n\
             State:            ACTIVE\n\
             Tunnel address:   192.168.96.2\n\
             Cluster ranges:   192.168.96.0/20, 10.96.0.0/12\n\
             Latest handshake: 2026-12-07T14:59:30Z (30s ago)\n\
             Token expires:    2026-12-23T04:26:40Z (in 15d)\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&status.render(OutputFormat::Json, now)).unwrap();
        assert_eq!(json["token_expires_at"], "2026-12-23T04:26:40Z");
        assert_eq!(json["state"], "ACTIVE");
        // The token itself is never shown.
        assert!(!status.render(OutputFormat::Json, now).contains(&token));
    }

    #[test]
    fn a_waiting_client_shows_no_tunnel() {
        let client: GefyraClient = serde_json::from_value(json!({
            "metadata": {"name": "dev"}, "provider": "stowaway", "state": "WAITING"
        }))
        .unwrap();
        let file = file();
        let text = ClientStatus::of(&file, "opaque", &client)
            .render(OutputFormat::Table, Timestamp::now());
        assert!(text.contains("State:         WAITING\n"), "{text}");
        assert!(
            !text.contains("Tunnel") && !text.contains("handshake"),
            "{text}"
        );
        assert!(text.contains("Token expires: unknown"), "{text}");
    }
}
