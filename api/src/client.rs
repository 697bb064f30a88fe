//! The GefyraClient resource in Gefyra 2.x's wire layout: no `spec`, every field a sibling
//! of `metadata`, kind `gefyraclient` (lower-case, as Gefyra's CLI sends it).

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube_core::Resource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const GROUP: &str = "gefyra.dev";
pub const VERSION: &str = "v1";
pub const API_VERSION: &str = "gefyra.dev/v1";
pub const KIND: &str = "gefyraclient";
pub const PLURAL: &str = "gefyraclients";
/// The namespace clients live in unless configured otherwise.
pub const DEFAULT_NAMESPACE: &str = "gefyra";
/// The longest client name: it is a label value (`gefyra.dev/client`) on the client's objects.
pub const MAX_NAME_LENGTH: usize = 63;
/// Client identities are the ServiceAccounts named with these prefixes (admission restricts
/// what requests made with them may change).
pub const ACCESS_IDENTITY_PREFIX: &str = "gefyra-client-";
pub const MINTER_IDENTITY_PREFIX: &str = "gefyra-minter-";
/// The longest `maxConnectionAge` (seconds) the CRD accepts: a year.
pub const MAX_CONNECTION_AGE_SECONDS: i64 = 365 * 24 * 3600;

/// A developer's access to the cluster: credentials, and when connected, a WireGuard peer
/// with an exclusive IP range.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(rename = "GefyraClient")]
pub struct GefyraClient {
    #[serde(default = "api_version")]
    #[schemars(skip)]
    pub api_version: String,
    #[serde(default = "kind")]
    #[schemars(skip)]
    pub kind: String,
    #[serde(default)]
    #[schemars(skip)]
    pub metadata: ObjectMeta,

    /// The connection provider; `stowaway` is the only one.
    pub provider: Provider,
    /// Set by the client to connect (`{"subnet": CIDR, "publicKey": KEY}`), `null` to disconnect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub provider_parameter: Option<Map<String, Value>>,
    /// The WireGuard configuration for the client, written by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub provider_config: Option<Map<String, Value>>,
    /// The client's ServiceAccount, `gefyra-client-<name>`, written by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// The client's credentials, base64-encoded as in a Secret's `.data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_data: Option<ServiceAccountData>,
    /// RFC 3339 time at which the client is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sunset: Option<String>,
    /// Seconds after which an ACTIVE client is disconnected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_age: Option<i64>,
    /// The lifecycle state.
    #[serde(default)]
    pub state: ClientState,
    /// When each state was last entered (RFC 3339).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub state_transitions: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ClientStatus>,
}

fn api_version() -> String {
    API_VERSION.to_string()
}

fn kind() -> String {
    KIND.to_string()
}

fn open_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

fn open_object_required(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    #[default]
    Stowaway,
}

/// The states Gefyra 2.x defines, spelled as it spells them.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    JsonSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClientState {
    #[default]
    Requested,
    Creating,
    Waiting,
    Enabling,
    Active,
    Disabling,
    Terminating,
    Error,
}

impl ClientState {
    pub const ALL: [ClientState; 8] = [
        Self::Requested,
        Self::Creating,
        Self::Waiting,
        Self::Enabling,
        Self::Active,
        Self::Disabling,
        Self::Terminating,
        Self::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "REQUESTED",
            Self::Creating => "CREATING",
            Self::Waiting => "WAITING",
            Self::Enabling => "ENABLING",
            Self::Active => "ACTIVE",
            Self::Disabling => "DISABLING",
            Self::Terminating => "TERMINATING",
            Self::Error => "ERROR",
        }
    }
}

impl std::fmt::Display for ClientState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Base64 values, as Gefyra copied them from a token Secret's `.data`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct ServiceAccountData {
    pub token: String,
    #[serde(rename = "ca.crt")]
    pub ca_crt: String,
    pub namespace: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientStatus {
    /// `Ready`: the client's credentials exist and the state it asked for is reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the token in `serviceAccountData` expires (RFC 3339); renewed before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_expire_at: Option<String>,
    /// WireGuard peer status, written by Stowaway (`latest_handshake`, `transfer`, `endpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object_required")]
    pub wireguard: Option<Map<String, Value>>,
}

impl Resource for GefyraClient {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(KIND)
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(GROUP)
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(VERSION)
    }
    fn api_version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(API_VERSION)
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed(PLURAL)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl GefyraClient {
    /// A new client as Gefyra's CLI creates one: a name, the `stowaway` provider, nothing else.
    pub fn new(name: &str, namespace: &str) -> Self {
        Self {
            api_version: api_version(),
            kind: kind(),
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                ..ObjectMeta::default()
            },
            provider: Provider::Stowaway,
            ..Self::default()
        }
    }

    /// The ServiceAccount (and Role, RoleBinding) name of client `name`.
    pub fn service_account_name_for(name: &str) -> String {
        format!("{ACCESS_IDENTITY_PREFIX}{name}")
    }

    /// The ServiceAccount (and Role, RoleBinding) of client `name`'s token minter: an
    /// identity that may only mint short-lived tokens for the client's ServiceAccount. Its
    /// prefix differs from the access identity's, so no client name can produce another
    /// client's identity names (`x`'s minter is not client `x-minter`'s access identity).
    pub fn token_minter_name_for(name: &str) -> String {
        format!("{MINTER_IDENTITY_PREFIX}{name}")
    }

    /// The `Ready` condition, if the operator has written one.
    pub fn ready_condition(&self) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gefyra_cli_create_body_parses() {
        let body = serde_json::json!({"apiVersion":"gefyra.dev/v1","kind":"gefyraclient",
            "metadata":{"name":"0123456789abcdef0123456789abcdef","namespace":"gefyra"},
            "provider":"stowaway","status":{}});
        let client: GefyraClient = serde_json::from_value(body).unwrap();
        assert_eq!(client.state, ClientState::Requested);
        assert_eq!(client.provider, Provider::Stowaway);
    }

    #[test]
    fn states_are_spelled_as_gefyra_spells_them() {
        for state in ClientState::ALL {
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                Value::String(state.as_str().into())
            );
        }
    }

    #[test]
    fn identity_names_never_collide_and_are_valid_object_names() {
        // DNS subdomains (what the API server accepts as a name) of at most 63 characters.
        let label = "[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?";
        let name = format!("{label}(\\.{label}){{0,2}}");
        proptest::proptest!(|(a in name.as_str(), b in name.as_str())| {
            let a_names = [GefyraClient::service_account_name_for(&a), GefyraClient::token_minter_name_for(&a)];
            let b_names = [GefyraClient::service_account_name_for(&b), GefyraClient::token_minter_name_for(&b)];
            proptest::prop_assert_ne!(&a_names[0], &a_names[1]);
            if a != b {
                for derived in &a_names {
                    proptest::prop_assert!(!b_names.contains(derived), "{} and {} share {}", a, b, derived);
                }
            }
            for derived in &a_names {
                // A DNS subdomain, as ServiceAccount names must be.
                proptest::prop_assert!(derived.len() <= 253);
                proptest::prop_assert!(derived.split('.').all(|label| !label.is_empty() && label.len() <= 63));
            }
            proptest::prop_assert!(a.len() <= MAX_NAME_LENGTH);
        });
        // The collision the old naming had: `x`'s minter was client `x-minter`'s identity.
        assert_ne!(
            GefyraClient::token_minter_name_for("x"),
            GefyraClient::service_account_name_for("x-minter")
        );
    }

    #[test]
    fn service_account_data_keeps_the_secret_key_names() {
        let data = ServiceAccountData {
            token: "dA==".into(),
            ca_crt: "Yw==".into(),
            namespace: "bg==".into(),
        };
        let json = serde_json::to_value(&data).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"token":"dA==","ca.crt":"Yw==","namespace":"bg=="})
        );
    }
}
