//! One reconcile of a GefyraClient, as a pipeline: validate and decide (pure,
//! [`lifecycle::next`]) → build the desired identity and apply it ([`identity`]) → issue
//! credentials → connect or disconnect ([`connect`]) → record the status ([`status`]).
//! Deletion is [`cleanup`].

pub mod connect;
pub mod identity;
#[cfg(test)]
mod mocked_api;
pub mod status;

use std::time::Duration;

use gefyra_api::{ClientState, GefyraClient};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::lifecycle::{self, Step};

/// Sets the client up (or keeps it set up), connects or disconnects it, and says when to
/// look again.
pub async fn apply(client: &GefyraClient, ctx: &Context) -> Result<Action> {
    // A view older than this process's last write to the client: what it would decide is
    // done (or being done); the cache will show the write and bring the next reconcile.
    if let Some(uid) = client.uid()
        && ctx
            .own_writes
            .is_stale(&uid, client.metadata.resource_version.as_deref())
    {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let now = Timestamp::now();
    // Validate and decide (pure).
    let plan = match lifecycle::next(client, now)? {
        Step::Delete { sunset } => return delete_at_sunset(client, ctx, sunset).await,
        Step::Reconcile(plan) => plan,
    };
    if plan.enter_creating {
        connect::transition(
            client,
            client.state,
            ClientState::Creating,
            json!({}),
            "",
            ctx,
        )
        .await?;
    }
    // Build the identity and apply it (what is already in place is not sent again).
    let identity = identity::Identity::desired(client, ctx.settings.client_rbac);
    let account = identity::apply(client, &identity, ctx).await?;
    // Credentials: minted with the TokenRequest API, renewed before they expire; WAITING
    // once they are issued.
    let issued = identity::issue_credentials(client, &account, &plan, ctx, now).await?;
    // Connect or disconnect; a failure returns here, before Ready is claimed.
    let connection =
        connect::connect_or_disconnect(client, issued.state, plan.connection, ctx, now).await?;
    // Status.
    status::record_ready(
        client,
        ctx,
        connection.connected,
        connection.generation.or(issued.generation),
        issued.expires_at,
        now,
    )
    .await?;
    Ok(Action::requeue(requeue_after(
        now,
        [issued.renew_at, plan.sunset, connection.due],
    )))
}

/// Deletes a client whose sunset has come (its cleanup then removes what it owns).
async fn delete_at_sunset(
    client: &GefyraClient,
    ctx: &Context,
    sunset: Timestamp,
) -> Result<Action> {
    let name = client.name_any();
    info!(client = %name, %sunset, "sunset reached; deleting the client");
    ctx.event(
        client,
        EventType::Normal,
        "Sunset",
        "Delete",
        format!("sunset {sunset} reached; deleting the client"),
    )
    .await;
    let api: Api<GefyraClient> =
        Api::namespaced(ctx.client.clone(), &client.namespace().unwrap_or_default());
    api.delete(&name, &DeleteParams::default())
        .await
        .map_err(|source| Error::Delete {
            client: name.clone(),
            source,
        })?;
    Ok(Action::await_change())
}

/// The longest a reconcile waits for what is due: kube-runtime's scheduler panics on a
/// delay beyond about two years, and a sunset may lie centuries ahead.
const MAX_REQUEUE: SignedDuration = SignedDuration::from_hours(6);

/// Come back when the first thing is due (a renewal, the sunset, the max connection age),
/// at least a second and at most [`MAX_REQUEUE`] from now.
fn requeue_after(now: Timestamp, dues: impl IntoIterator<Item = Option<Timestamp>>) -> Duration {
    dues.into_iter()
        .flatten()
        .map(|due| due.duration_since(now))
        .fold(MAX_REQUEUE, SignedDuration::min)
        .max(SignedDuration::from_secs(1))
        .unsigned_abs()
}

/// Removes everything the client owns, and only then lets it go: the RoleBinding, the Role,
/// the ServiceAccount (which invalidates every token minted for it).
pub async fn cleanup(client: &GefyraClient, ctx: &Context) -> Result<Action> {
    let name = client.name_any();
    let namespace = client.namespace().unwrap_or_default();
    // Revocation first, before anything that could fail and block it: the client's
    // identity and its token minter (deleting a ServiceAccount invalidates every token
    // minted for it), bindings before roles before accounts.
    for sa_name in [
        GefyraClient::service_account_name_for(&name),
        GefyraClient::token_minter_name_for(&name),
    ] {
        delete_if_present(
            Api::<RoleBinding>::namespaced(ctx.client.clone(), &namespace),
            "RoleBinding",
            &sa_name,
        )
        .await?;
        delete_if_present(
            Api::<ServiceAccount>::namespaced(ctx.client.clone(), &namespace),
            "ServiceAccount",
            &sa_name,
        )
        .await?;
        delete_if_present(
            Api::<Role>::namespaced(ctx.client.clone(), &namespace),
            "Role",
            &sa_name,
        )
        .await?;
    }
    if client.state != ClientState::Terminating {
        connect::transition(
            client,
            client.state,
            ClientState::Terminating,
            json!({}),
            "",
            ctx,
        )
        .await?;
    }
    // Then the peer: its ranges become free for others.
    connect::release(client, ctx).await?;
    if let Some(uid) = client.uid() {
        ctx.routes.forget(&name, &uid);
        ctx.own_writes.forget(&uid);
    }
    info!(client = %name, "client removed with its ServiceAccounts, Roles and RoleBindings (access and token minter)");
    Ok(Action::await_change())
}

async fn delete_if_present<K>(api: Api<K>, kind: &'static str, name: &str) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Cleanup {
            kind,
            name: name.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeues_are_bounded_whatever_is_due() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let at = |text: &str| Some(text.parse::<Timestamp>().unwrap());
        assert_eq!(
            requeue_after(
                now,
                [at("2026-01-01T00:10:00Z"), None, at("2026-01-01T00:05:00Z")]
            ),
            Duration::from_secs(300)
        );
        assert_eq!(
            requeue_after(now, [at("9999-01-01T00:00:00Z")]),
            MAX_REQUEUE.unsigned_abs()
        );
        assert_eq!(
            requeue_after(now, [at("2000-01-01T00:00:00Z")]),
            Duration::from_secs(1)
        );
        assert_eq!(requeue_after(now, [None]), MAX_REQUEUE.unsigned_abs());
    }

    proptest::proptest! {
        #[test]
        fn hostile_due_times_never_panic(due in Timestamp::MIN.as_second()..=Timestamp::MAX.as_second()) {
            let now = Timestamp::now();
            let wait = requeue_after(now, [Timestamp::from_second(due).ok()]);
            proptest::prop_assert!(wait >= Duration::from_secs(1) && wait <= MAX_REQUEUE.unsigned_abs());
        }
    }
}
