//! A client's identity: its ServiceAccount, the namespaced Role and RoleBinding that grant
//! the least it needs, and the token minted for it. Pure builders; the controller applies them.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use gefyra_api::{GefyraClient, ServiceAccountData};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

pub const MANAGED_BY: &str = "gefyra-operator";
pub const CLIENT_LABEL: &str = "gefyra.dev/client";

/// How much a client's Role grants beyond its own GefyraClient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientRbac {
    /// `get`, `watch`, `patch` on the client's own GefyraClient, nothing else.
    Minimal,
    /// Also `list` on all GefyraClients of the namespace, which Gefyra's CLI needs to pick
    /// a subnet, and `get`/`list`/`watch` on GefyraBridges, which it lists when it
    /// disconnects; every client then sees the others' objects, credentials included.
    GefyraCompat,
}

fn meta(client: &GefyraClient) -> ObjectMeta {
    meta_named(
        client,
        GefyraClient::service_account_name_for(&client.name_any()),
    )
}

fn meta_named(client: &GefyraClient, object_name: String) -> ObjectMeta {
    let name = client.name_any();
    ObjectMeta {
        name: Some(object_name),
        namespace: client.namespace(),
        labels: Some(BTreeMap::from([
            (
                "app.kubernetes.io/managed-by".to_string(),
                MANAGED_BY.to_string(),
            ),
            (CLIENT_LABEL.to_string(), name),
        ])),
        owner_references: owner_reference(client).map(|owner| vec![owner]),
        ..ObjectMeta::default()
    }
}

/// The client owns its objects, so the garbage collector removes them even if the
/// finalizer was forced away.
fn owner_reference(client: &GefyraClient) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: GefyraClient::api_version(&()).into_owned(),
        kind: GefyraClient::kind(&()).into_owned(),
        name: client.name_any(),
        uid: client.uid()?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}

pub fn service_account(client: &GefyraClient) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(client),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

pub fn role(client: &GefyraClient, rbac: ClientRbac) -> Role {
    let group = GefyraClient::group(&()).into_owned();
    let plural = GefyraClient::plural(&()).into_owned();
    let mut rules = vec![PolicyRule {
        api_groups: Some(vec![group.clone()]),
        resources: Some(vec![plural.clone()]),
        resource_names: Some(vec![client.name_any()]),
        verbs: vec!["get".into(), "watch".into(), "patch".into()],
        ..PolicyRule::default()
    }];
    if rbac == ClientRbac::GefyraCompat {
        rules.push(PolicyRule {
            api_groups: Some(vec![group.clone()]),
            resources: Some(vec![plural]),
            verbs: vec!["list".into()],
            ..PolicyRule::default()
        });
        // Gefyra's CLI waits for a bridge's `Ready` Event.
        rules.push(PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["events".into()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        });
    }
    // Bridging: a client creates, watches and deletes bridges (its own only: the admission
    // policy gefyra-client-bridges-<namespace>; where, only with the admin's grant there) and
    // reads the mounts it bridges.
    rules.push(PolicyRule {
        api_groups: Some(vec![group.clone()]),
        resources: Some(vec![gefyra_api::bridge::BRIDGE_PLURAL.into()]),
        verbs: ["get", "list", "watch", "create", "delete"]
            .map(String::from)
            .to_vec(),
        ..PolicyRule::default()
    });
    rules.push(PolicyRule {
        api_groups: Some(vec![group]),
        resources: Some(vec![gefyra_api::bridge::BRIDGE_MOUNT_PLURAL.into()]),
        verbs: ["get", "list", "watch"].map(String::from).to_vec(),
        ..PolicyRule::default()
    });
    Role {
        metadata: meta(client),
        rules: Some(rules),
    }
}

pub fn role_binding(client: &GefyraClient) -> RoleBinding {
    binding(
        client,
        GefyraClient::service_account_name_for(&client.name_any()),
    )
}

/// Binds the Role named `name` to the ServiceAccount of the same name.
fn binding(client: &GefyraClient, name: String) -> RoleBinding {
    RoleBinding {
        metadata: meta_named(client, name.clone()),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: client.namespace(),
            ..Subject::default()
        }]),
    }
}

/// The token minter: a second identity per client whose only permission is to mint tokens
/// (TokenRequest) for the client's ServiceAccount, for short-lived credentials. The
/// client's own identity cannot mint tokens at all.
pub fn minter_service_account(client: &GefyraClient) -> ServiceAccount {
    ServiceAccount {
        metadata: meta_named(
            client,
            GefyraClient::token_minter_name_for(&client.name_any()),
        ),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

pub fn minter_role(client: &GefyraClient) -> Role {
    let name = client.name_any();
    Role {
        metadata: meta_named(client, GefyraClient::token_minter_name_for(&name)),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["serviceaccounts/token".into()]),
            resource_names: Some(vec![GefyraClient::service_account_name_for(&name)]),
            verbs: vec!["create".into()],
            ..PolicyRule::default()
        }]),
    }
}

pub fn minter_role_binding(client: &GefyraClient) -> RoleBinding {
    binding(
        client,
        GefyraClient::token_minter_name_for(&client.name_any()),
    )
}

/// The claims of a service-account token we act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub service_account_uid: Option<String>,
}

/// Reads the claims of a JWT without verifying it: the token is ours, we only need to know
/// when to renew it and whether it belongs to the current ServiceAccount.
pub fn token_claims(token: &str) -> Option<TokenClaims> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let at = |key: &str| Timestamp::from_second(claims.get(key)?.as_i64()?).ok();
    Some(TokenClaims {
        issued_at: at("iat")?,
        expires_at: at("exp")?,
        service_account_uid: claims
            .pointer("/kubernetes.io/serviceaccount/uid")
            .and_then(|uid| uid.as_str())
            .map(str::to_string),
    })
}

/// When a token is renewed: `renew_before` its expiry if configured, else after 80 % of its
/// lifetime, so a client always has a fifth of it left to fetch the new one. Saturating:
/// claims too far apart to compute with mean "renew now".
pub fn renew_at(claims: &TokenClaims, renew_before: Option<SignedDuration>) -> Timestamp {
    let at = match renew_before {
        Some(before) => claims.expires_at.checked_sub(before),
        None => {
            let lifetime = claims.expires_at.duration_since(claims.issued_at);
            claims.issued_at.checked_add(lifetime / 5 * 4)
        }
    };
    at.unwrap_or(claims.issued_at)
}

/// The longest token the operator asks for; a later sunset is reached by renewals.
pub const MAX_TOKEN_LIFETIME: SignedDuration = SignedDuration::from_hours(365 * 24);

/// The lifetime to ask the API server for: the configured one, else until the client's
/// sunset, at most 365 days. At least 10 minutes (the API server's minimum).
pub fn requested_lifetime(
    now: Timestamp,
    sunset: Option<Timestamp>,
    configured: Option<SignedDuration>,
) -> SignedDuration {
    let wanted = configured
        .or_else(|| sunset.map(|sunset| sunset.duration_since(now).min(MAX_TOKEN_LIFETIME)))
        .unwrap_or(MAX_TOKEN_LIFETIME);
    wanted.max(SignedDuration::from_mins(10))
}

/// Why credentials must be (re)issued, if they must.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialsNeed {
    Fresh,
    Issue,
    Renew,
}

pub fn credentials_need(
    data: Option<&ServiceAccountData>,
    service_account_uid: &str,
    renew_before: Option<SignedDuration>,
    now: Timestamp,
) -> CredentialsNeed {
    let Some(data) = data else {
        return CredentialsNeed::Issue;
    };
    let claims = STANDARD
        .decode(&data.token)
        .ok()
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|token| token_claims(&token));
    match claims {
        None => CredentialsNeed::Issue,
        // A token of a deleted and re-created ServiceAccount no longer authenticates.
        Some(claims) if claims.service_account_uid.as_deref() != Some(service_account_uid) => {
            CredentialsNeed::Issue
        }
        Some(claims) if now >= renew_at(&claims, renew_before) => CredentialsNeed::Renew,
        Some(_) => CredentialsNeed::Fresh,
    }
}

/// `serviceAccountData` as Gefyra writes it: every value base64-encoded.
pub fn service_account_data(token: &str, ca_crt: &str, namespace: &str) -> ServiceAccountData {
    ServiceAccountData {
        token: STANDARD.encode(token),
        ca_crt: STANDARD.encode(ca_crt),
        namespace: STANDARD.encode(namespace),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn client(name: &str) -> GefyraClient {
        let mut client = GefyraClient::default();
        client.metadata.name = Some(name.into());
        client.metadata.namespace = Some("gefyra".into());
        client.metadata.uid = Some("uid-1".into());
        client
    }

    fn jwt(claims: serde_json::Value) -> String {
        format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    #[test]
    fn minimal_role_grants_the_clients_own_object_and_bridging() {
        let role = serde_json::to_value(role(&client("abc"), ClientRbac::Minimal)).unwrap();
        assert_eq!(
            role["rules"],
            json!([
                {"apiGroups":["gefyra.dev"],"resources":["gefyraclients"],"resourceNames":["abc"],"verbs":["get","watch","patch"]},
                {"apiGroups":["gefyra.dev"],"resources":["gefyrabridges"],"verbs":["get","list","watch","create","delete"]},
                {"apiGroups":["gefyra.dev"],"resources":["gefyrabridgemounts"],"verbs":["get","list","watch"]},
            ])
        );
        assert_eq!(role["metadata"]["name"], "gefyra-client-abc");
        assert_eq!(
            role["metadata"]["ownerReferences"][0]["kind"],
            "gefyraclient"
        );
    }

    #[test]
    fn gefyra_compat_role_adds_list_and_bridges() {
        let minter = serde_json::to_value(minter_role(&client("abc"))).unwrap();
        assert_eq!(
            minter["rules"],
            serde_json::json!([{"apiGroups": [""], "resources": ["serviceaccounts/token"],
                "resourceNames": ["gefyra-client-abc"], "verbs": ["create"]}])
        );
        assert_eq!(minter["metadata"]["name"], "gefyra-minter-abc");
        let bound = minter_role_binding(&client("abc"));
        assert_eq!(bound.role_ref.name, "gefyra-minter-abc");
        assert_eq!(bound.subjects.unwrap()[0].name, "gefyra-minter-abc");
        let role = role(&client("abc"), ClientRbac::GefyraCompat);
        let rules = role.rules.unwrap();
        assert_eq!(rules.len(), 5);
        assert_eq!(rules[1].verbs, vec!["list".to_string()]);
        assert_eq!(rules[1].resource_names, None);
        assert_eq!(
            rules[2].resources.as_deref(),
            Some(&["events".to_string()][..])
        );
        assert_eq!(
            rules[3].resources.as_deref(),
            Some(&["gefyrabridges".to_string()][..])
        );
    }

    #[test]
    fn binding_names_the_service_account_in_the_clients_namespace() {
        let binding = serde_json::to_value(role_binding(&client("abc"))).unwrap();
        assert_eq!(
            binding["subjects"],
            json!([{"kind":"ServiceAccount","name":"gefyra-client-abc","namespace":"gefyra"}])
        );
        assert_eq!(
            binding["roleRef"],
            json!({"apiGroup":"rbac.authorization.k8s.io","kind":"Role","name":"gefyra-client-abc"})
        );
    }

    #[test]
    fn token_claims_are_read_and_renewal_is_at_four_fifths() {
        let token = jwt(
            json!({"iat": 1000, "exp": 2000, "kubernetes.io": {"serviceaccount": {"uid": "sa-1"}}}),
        );
        let claims = token_claims(&token).unwrap();
        assert_eq!(claims.service_account_uid.as_deref(), Some("sa-1"));
        assert_eq!(
            renew_at(&claims, None),
            Timestamp::from_second(1800).unwrap()
        );
        assert_eq!(
            renew_at(&claims, Some(SignedDuration::from_secs(100))),
            Timestamp::from_second(1900).unwrap()
        );
        let data = service_account_data(&token, "ca", "gefyra");
        let at = |s| Timestamp::from_second(s).unwrap();
        assert_eq!(
            credentials_need(Some(&data), "sa-1", None, at(1799)),
            CredentialsNeed::Fresh
        );
        assert_eq!(
            credentials_need(Some(&data), "sa-1", None, at(1800)),
            CredentialsNeed::Renew
        );
        assert_eq!(
            credentials_need(Some(&data), "sa-2", None, at(1000)),
            CredentialsNeed::Issue
        );
        assert_eq!(
            credentials_need(None, "sa-1", None, at(1000)),
            CredentialsNeed::Issue
        );
        let garbage = ServiceAccountData {
            token: "not base64!".into(),
            ..data.clone()
        };
        assert_eq!(
            credentials_need(Some(&garbage), "sa-1", None, at(1000)),
            CredentialsNeed::Issue
        );
        assert_eq!(
            credentials_need(
                Some(&data),
                "sa-1",
                Some(SignedDuration::from_secs(100)),
                at(1900)
            ),
            CredentialsNeed::Renew
        );
    }

    proptest::proptest! {
        /// Whatever claims a stored token carries (it may have been written by anyone with
        /// patch on the client), renewal and lifetimes are computed without a panic.
        #[test]
        fn hostile_token_claims_and_sunsets_never_panic(
            iat in any_second(), exp in any_second(), before in proptest::prelude::any::<i64>(),
            now in any_second(), sunset in any_second(),
        ) {
            let at = |s| Timestamp::from_second(s).unwrap();
            let claims = TokenClaims { issued_at: at(iat), expires_at: at(exp), service_account_uid: None };
            let _ = renew_at(&claims, None);
            let _ = renew_at(&claims, Some(SignedDuration::from_secs(before)));
            let lifetime = requested_lifetime(at(now), Some(at(sunset)), None);
            proptest::prop_assert!(lifetime >= SignedDuration::from_mins(10) && lifetime <= MAX_TOKEN_LIFETIME);
            let token = jwt(json!({"iat": iat, "exp": exp}));
            let data = service_account_data(&token, "ca", "gefyra");
            let _ = credentials_need(Some(&data), "sa", Some(SignedDuration::from_secs(before)), at(now));
        }
    }

    fn any_second() -> impl proptest::strategy::Strategy<Value = i64> {
        Timestamp::MIN.as_second()..=Timestamp::MAX.as_second()
    }

    #[test]
    fn lifetime_follows_configuration_then_sunset_then_a_year() {
        let now = Timestamp::from_second(0).unwrap();
        let sunset = Timestamp::from_second(7200).unwrap();
        assert_eq!(
            requested_lifetime(now, Some(sunset), None),
            SignedDuration::from_hours(2)
        );
        assert_eq!(
            requested_lifetime(now, Some(sunset), Some(SignedDuration::from_hours(1))),
            SignedDuration::from_hours(1)
        );
        assert_eq!(
            requested_lifetime(now, None, None),
            SignedDuration::from_hours(365 * 24)
        );
        assert_eq!(
            requested_lifetime(now, Some(now), None),
            SignedDuration::from_mins(10)
        );
        let far = "9999-12-30T00:00:00Z".parse().unwrap();
        assert_eq!(requested_lifetime(now, Some(far), None), MAX_TOKEN_LIFETIME);
    }
}
