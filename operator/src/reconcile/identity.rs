//! The client's identity: its ServiceAccount, Role and RoleBinding, and those of its token
//! minter (built pure, applied unless the watched caches show them in place), and its
//! credentials (a token minted with the TokenRequest API, renewed before it expires).

use gefyra_api::{ClientState, GefyraClient};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use crate::context::{Context, FIELD_MANAGER};
use crate::credentials::{self, ClientRbac, CredentialsNeed};
use crate::error::{Error, Result};
use crate::lifecycle::enter_action;
use crate::lifecycle::{self, Plan};
use crate::owned::Owned;

/// The objects that make up a client's identity, as they should be.
pub struct Identity {
    /// The client's own ServiceAccount (its credentials are this account's tokens).
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    /// The token minter, for short-lived credentials (`clients config --short-lived`).
    pub minter_service_account: ServiceAccount,
    pub minter_role: Role,
    pub minter_role_binding: RoleBinding,
}

impl Identity {
    /// Built from the client alone (pure).
    pub fn desired(client: &GefyraClient, rbac: ClientRbac) -> Self {
        Self {
            service_account: credentials::service_account(client),
            role: credentials::role(client, rbac),
            role_binding: credentials::role_binding(client),
            minter_service_account: credentials::minter_service_account(client),
            minter_role: credentials::minter_role(client),
            minter_role_binding: credentials::minter_role_binding(client),
        }
    }
}

/// Applies `identity`; returns the client's ServiceAccount as the API server (or the cache)
/// shows it.
pub async fn apply(
    client: &GefyraClient,
    identity: &Identity,
    ctx: &Context,
) -> Result<ServiceAccount> {
    ctx.owned_caches_filled().await;
    let namespace = client.namespace().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    // Accounts and roles together, then the bindings together: two round trips instead of
    // six in a row. A binding waits for its Role: without `bind`, the API server checks the
    // operator holds what the Role grants, and refuses one whose Role it cannot find.
    let (account, _, _, _) = futures::try_join!(
        apply_owned(
            ctx,
            &namespace,
            "ServiceAccount",
            &params,
            &identity.service_account
        ),
        apply_owned(ctx, &namespace, "Role", &params, &identity.role),
        apply_owned(
            ctx,
            &namespace,
            "ServiceAccount",
            &params,
            &identity.minter_service_account
        ),
        apply_owned(ctx, &namespace, "Role", &params, &identity.minter_role),
    )?;
    futures::try_join!(
        apply_owned(
            ctx,
            &namespace,
            "RoleBinding",
            &params,
            &identity.role_binding
        ),
        apply_owned(
            ctx,
            &namespace,
            "RoleBinding",
            &params,
            &identity.minter_role_binding
        ),
    )?;
    Ok(account)
}

/// What issuing the credentials left behind.
pub struct Issued {
    /// The state the client is in now (WAITING once settled).
    pub state: ClientState,
    /// The generation of the client as last written (`None`: nothing written).
    pub generation: Option<i64>,
    pub expires_at: Option<String>,
    pub renew_at: Option<Timestamp>,
}

/// Mints a token when the client has none for `account`, or one due for renewal, and
/// records it; enters WAITING in the same patch when `plan` settles the client.
pub async fn issue_credentials(
    client: &GefyraClient,
    account: &ServiceAccount,
    plan: &Plan,
    ctx: &Context,
    now: Timestamp,
) -> Result<Issued> {
    let name = client.name_any();
    let namespace = client.namespace().unwrap_or_default();
    let sa_name = account.name_any();
    let account_uid = account.uid().unwrap_or_default();
    let need = credentials::credentials_need(
        client.service_account_data.as_ref(),
        &account_uid,
        ctx.settings.renew_before,
        now,
    );
    let mut patch = serde_json::Map::new();
    // The expiry is read from the stored token itself, not from the status: a reconcile
    // that sees a cached object whose status lags behind its token must not write the
    // expiry back as unknown.
    let stored = client.service_account_data.as_ref().and_then(stored_token);
    let mut expires_at = stored
        .as_deref()
        .and_then(credentials::token_claims)
        .map(|claims| claims.expires_at.to_string());
    let mut renew_at = stored
        .as_deref()
        .and_then(|token| renew_at_of(token, ctx.settings.renew_before));
    if need != CredentialsNeed::Fresh
        || client.service_account_name.as_deref() != Some(sa_name.as_str())
    {
        let lifetime =
            credentials::requested_lifetime(now, plan.sunset, ctx.settings.token_lifetime);
        let (token, expiry) = mint_token(ctx, &namespace, &sa_name, lifetime).await?;
        let ca = cluster_ca(ctx, &namespace).await?;
        patch.insert("serviceAccountName".into(), json!(sa_name));
        patch.insert(
            "serviceAccountData".into(),
            json!(credentials::service_account_data(&token, &ca, &namespace)),
        );
        expires_at = Some(expiry.to_string());
        renew_at = renew_at_of(&token, ctx.settings.renew_before);
        if need == CredentialsNeed::Renew {
            ctx.event(
                client,
                EventType::Normal,
                "CredentialsRenewed",
                "RenewCredentials",
                format!("the client's token was renewed (valid until {expiry}); re-issue the client file: kubectl gefyra clients config {name}"),
            )
            .await;
        }
    }
    let state = if plan.settle {
        patch.extend(
            lifecycle::enter(ClientState::Waiting, Timestamp::now())
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        ClientState::Waiting
    } else {
        client.state
    };
    let mut generation = client.metadata.generation;
    if !patch.is_empty() {
        let patch = serde_json::Value::Object(patch);
        let patched = ctx
            .patch_client(client, false, patch, |source| Error::RecordCredentials {
                client: name.clone(),
                source,
            })
            .await?;
        // The patch bumps the generation; the condition describes the object as written.
        generation = patched.metadata.generation;
        if plan.settle && client.state != ClientState::Waiting {
            info!(client = %name, from = %client.state, to = "WAITING", "state changed");
            ctx.event(
                client,
                EventType::Normal,
                "StateChanged",
                &enter_action(ClientState::Waiting),
                format!("{} -> WAITING: credentials issued", client.state),
            )
            .await;
        }
    }
    Ok(Issued {
        state,
        generation,
        expires_at,
        renew_at,
    })
}

/// Server-side applies one of the client's objects, unless the watched cache shows every
/// field of it already in place; a failure names its kind and name.
async fn apply_owned<K>(
    ctx: &Context,
    namespace: &str,
    kind: &'static str,
    params: &PatchParams,
    object: &K,
) -> Result<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Owned
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = object.meta().name.as_deref().unwrap_or_default();
    if let Some(cached) = ctx
        .owned
        .get()
        .and_then(|owned| owned.in_place(namespace, name, object))
    {
        return Ok(cached);
    }
    Api::<K>::namespaced(ctx.client.clone(), namespace)
        .patch(name, params, &Patch::Apply(object))
        .await
        .map_err(|source| Error::Apply {
            kind,
            name: name.to_string(),
            source,
        })
}

fn renew_at_of(token: &str, renew_before: Option<SignedDuration>) -> Option<Timestamp> {
    credentials::token_claims(token).map(|claims| credentials::renew_at(&claims, renew_before))
}

pub(super) fn stored_token(data: &gefyra_api::ServiceAccountData) -> Option<String> {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD
        .decode(&data.token)
        .ok()?;
    String::from_utf8(token).ok()
}

async fn mint_token(
    ctx: &Context,
    namespace: &str,
    account: &str,
    lifetime: SignedDuration,
) -> Result<(String, Timestamp)> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(lifetime.as_secs()),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let minted = Api::<ServiceAccount>::namespaced(ctx.client.clone(), namespace)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .map_err(|source| Error::MintToken {
            account: account.to_string(),
            source,
        })?;
    let status = minted.status.unwrap_or_default();
    match (status.token, status.expiration_timestamp) {
        (Some(token), Some(expiry)) => Ok((token, expiry.0)),
        _ => Err(Error::EmptyToken {
            account: account.to_string(),
        }),
    }
}

/// The API server's CA, as the controller-manager publishes it into every namespace.
async fn cluster_ca(ctx: &Context, namespace: &str) -> Result<String> {
    let configmap = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace)
        .get("kube-root-ca.crt")
        .await
        .map_err(|source| Error::ClusterCa {
            namespace: namespace.to_string(),
            source: Some(source),
        })?;
    configmap
        .data
        .and_then(|mut data| data.remove("ca.crt"))
        .ok_or(Error::ClusterCa {
            namespace: namespace.to_string(),
            source: None,
        })
}
