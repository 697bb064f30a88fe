//! The GefyraClient controller: the watches that feed [`Context`], and the reconcile around
//! the pipeline of [`crate::reconcile`] (the finalizer, failures recorded in the client,
//! retries). Every write is idempotent, so a crash at any
//! line converges on the next run.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use gefyra_api::route_shards;
use gefyra_api::{ClientState, GefyraClient};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{PredicateConfig, WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

pub use crate::context::{Context, FIELD_MANAGER, Settings};
use crate::error::{Error, Result};
use crate::owned::OwnedObjects;
use crate::{allocator, credentials, lifecycle};
use crate::{reconcile, sweep};

pub const FINALIZER: &str = "gefyra.dev/cleanup";

/// Keeps `writer`'s store in step with what `api` and `config` select, retrying (with
/// backoff) after a failed watch; `what` names it in the log.
async fn reflect_forever<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    index: impl Fn(&watcher::Event<K>) + Send,
    what: &str,
) where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    K: Send + Sync + 'static,
{
    // The index first: when the store says it is ready, the index is too.
    watcher(api, config)
        .default_backoff()
        .inspect_ok(index)
        .reflect(writer)
        .for_each(|event| async move {
            if let Err(error) = event {
                warn!(%error, "watching {what} failed; retrying");
            }
        })
        .await;
}

/// Runs the controller until shutdown; `ready` is told once the cache is synced.
pub async fn run(ctx: Arc<Context>, ready: impl FnOnce() + Send + 'static) {
    let namespace = ctx.settings.namespace.clone();
    // Tunnel-address claims are chosen from this cache; the API server has the final say.
    let writer = ctx
        .claims_writer
        .lock()
        .expect("not poisoned")
        .take()
        .expect("controller::run is called once per Context");
    let by_client = ctx.claims.by_client.clone();
    let claims = tokio::spawn(reflect_forever(
        ctx.claims.api.clone(),
        watcher::Config::default().labels(allocator::CLAIM_SELECTOR),
        writer,
        move |event| by_client.apply(event),
        "the tunnel-address claims (Leases)",
    ));
    if ctx.claims.store.wait_until_ready().await.is_err() {
        warn!("the tunnel-address claims could not be watched; stopping");
        return;
    }
    ctx.observe_pool();
    // An earlier version's single routes table is moved into shards before any reconcile.
    while let Err(error) = ctx.routes.migrate_legacy_table().await {
        warn!(%error, "moving the old routes table into shards failed; trying again in 5 s");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let (routes_store, routes_writer) = reflector::store();
    let routes = tokio::spawn(reflect_forever(
        Api::<ConfigMap>::namespaced(ctx.client.clone(), &namespace),
        watcher::Config::default().labels(route_shards::SHARD_SELECTOR),
        routes_writer,
        |_| {},
        "the routes table's shards (ConfigMaps)",
    ));
    // Filled before the first reconcile, so that settled routes are found in place.
    if routes_store.wait_until_ready().await.is_err() {
        warn!("the routes table could not be watched; stopping");
        return;
    }
    ctx.routes.watch_into(routes_store);
    let clients: Api<GefyraClient> = Api::namespaced(ctx.client.clone(), &namespace);
    // What clients own, watched whole (without managedFields) so that an apply already in
    // place is skipped; a change or deletion of any of them reconciles its client.
    let managed = watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={}",
        credentials::MANAGED_BY
    ));
    let (service_accounts, accounts) = owned_watch::<ServiceAccount>(&ctx, &managed);
    let (roles, role_changes) = owned_watch::<Role>(&ctx, &managed);
    let (role_bindings, binding_changes) = owned_watch::<RoleBinding>(&ctx, &managed);
    let _ = ctx.owned.set(OwnedObjects {
        service_accounts,
        roles,
        role_bindings,
    });
    // Stowaway's `status.wireguard` writes (every 30 s per active peer) start no reconcile:
    // an idle fleet costs the API server nothing. Every other change does, as before.
    let (reader, writer) = reflector::store();
    let by_key = ctx.clients_by_key.clone();
    let changes = watcher(clients, watcher::Config::default())
        .default_backoff()
        // Nothing here reads managedFields, and a client's token may write its own entry
        // there (the one part of its object no schema bounds): never kept in memory.
        .modify(|client| client.managed_fields_mut().clear())
        .inspect_ok(move |event| by_key.apply(event))
        .reflect(writer)
        .applied_objects()
        .predicate_filter(reconcile_relevant, PredicateConfig::default());
    let controller = Controller::for_stream(changes, reader)
        .owns_stream(accounts)
        .owns_stream(role_changes)
        .owns_stream(binding_changes)
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency),
        )
        .shutdown_on_signal();
    let store = controller.store();
    let _ = ctx.clients.set(store.clone());
    ctx.metrics.watch_store(store.clone());
    // The store's readiness signal wakes only its latest waiter (the controller's own), so
    // poll it again every second instead of waiting once.
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(1), store.wait_until_ready()).await {
                Ok(Ok(())) => return ready(),
                Ok(Err(_)) => return,
                Err(_elapsed) => {}
            }
        }
    });
    let sweeper = sweep::sweep_allocations_forever(ctx.clone());
    let bridges = crate::bridging::run(ctx.clone(), ctx.settings.bridging.clone());
    let reconciler = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                // A client deleted while a change of one of its objects was queued.
                Err(kube::runtime::controller::Error::ObjectNotFound(object)) => {
                    tracing::debug!(%object, "the client is gone; nothing to reconcile");
                }
                Err(error) => warn!(%error, "reconcile failed"),
                Ok(_) => {}
            }
        });
    tokio::select! {
        _ = reconciler => {},
        _ = sweeper => {},
        _ = bridges => {},
    }
    claims.abort();
    routes.abort();
}

/// A reflected watch of the objects of kind `K` clients own: its cache, and its changes
/// (deletions included) to trigger their clients' reconciles.
fn owned_watch<K>(
    ctx: &Context,
    config: &watcher::Config,
) -> (
    Store<K>,
    impl futures::Stream<Item = std::result::Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let api = Api::<K>::namespaced(ctx.client.clone(), &ctx.settings.namespace);
    let changes = watcher(api, config.clone())
        .default_backoff()
        .modify(|object| object.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects();
    (store, changes)
}

/// What a reconcile may act on: the whole object but for what only Stowaway writes
/// (`status.wireguard`) and what every write changes (resourceVersion, managedFields), as a
/// hash; equal hashes start no reconcile.
pub fn reconcile_relevant(client: &GefyraClient) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut relevant = client.clone();
    relevant.metadata.resource_version = None;
    relevant.metadata.managed_fields = None;
    if let Some(status) = relevant.status.as_mut() {
        status.wireguard = None;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&relevant).ok()?.hash(&mut hasher);
    Some(hasher.finish())
}

async fn reconcile(client: Arc<GefyraClient>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    let api: Api<GefyraClient> =
        Api::namespaced(ctx.client.clone(), &client.namespace().unwrap_or_default());
    let shared = ctx.clone();
    let result = finalizer(&api, FINALIZER, client.clone(), |event| async move {
        let ctx = &shared;
        let result = match &event {
            Finalizer::Apply(client) => reconcile::apply(client, ctx).await,
            Finalizer::Cleanup(client) => reconcile::cleanup(client, ctx).await,
        };
        if let Err(error) = &result {
            report_failure(&event, error, ctx).await;
        }
        result
    })
    .await
    .map_err(|error| match error {
        kube::runtime::finalizer::Error::ApplyFailed(error)
        | kube::runtime::finalizer::Error::CleanupFailed(error) => error,
        other => Error::Finalizer(Box::new(other)),
    });
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.as_ref().err());
    if result.is_ok() {
        ctx.failures
            .lock()
            .expect("failures lock")
            .remove(&client.name_any());
    }
    result
}

/// Retries with exponential backoff: 1 s, 2 s, 4 s, ... up to 5 minutes.
fn error_policy(client: Arc<GefyraClient>, error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().expect("failures lock");
    let count = failures.entry(client.name_any()).or_insert(0);
    *count = count.saturating_add(1);
    let delay = match error {
        // Addresses free up when other clients disconnect: look again soon.
        Error::PoolExhausted { .. } => Duration::from_secs(2),
        // The client's route-change budget says when.
        Error::RouteChangesTooOften { retry_in, .. } => *retry_in,
        _ => Duration::from_secs(1u64 << (*count - 1).min(8)).min(Duration::from_secs(300)),
    };
    warn!(client = %client.name_any(), category = error.category(), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// A failure lands in the CR (`ERROR` plus the `Ready` condition), in an Event and the log.
async fn report_failure(event: &Finalizer<GefyraClient>, error: &Error, ctx: &Context) {
    let (client, deleting) = match event {
        Finalizer::Apply(client) => (client, false),
        Finalizer::Cleanup(client) => (client, true),
    };
    let message = error.to_string();
    ctx.event(
        client,
        EventType::Warning,
        error.category(),
        "Reconcile",
        message.clone(),
    )
    .await;
    let now = Timestamp::now();
    let condition = lifecycle::ready_condition(
        client.ready_condition(),
        false,
        error.category(),
        &message,
        client.metadata.generation,
        now,
    );
    // Both writes through the one path that records the operator's own writes, so that a
    // reconcile from a cache older than them waits for the cache.
    let recorded = ctx
        .patch_client(
            client,
            true,
            json!({ "status": { "conditions": [condition] } }),
            |source| Error::RecordState {
                client: client.name_any(),
                state: client.state,
                source,
            },
        )
        .await;
    if let Err(error) = &recorded {
        warn!(client = %client.name_any(), %error, "could not record the failure in the client's status");
    }
    // The reason first, then the state: whoever sees ERROR sees why.
    if !deleting && client.state != ClientState::Error {
        let client = recorded.as_ref().unwrap_or(client);
        if let Err(error) = ctx
            .patch_client(
                client,
                false,
                lifecycle::enter(ClientState::Error, now),
                |source| Error::RecordState {
                    client: client.name_any(),
                    state: ClientState::Error,
                    source,
                },
            )
            .await
        {
            warn!(client = %client.name_any(), %error, "could not put the client in state ERROR");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stowaways_status_writes_start_no_reconcile() {
        let client: GefyraClient = serde_json::from_value(json!({
            "apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
            "metadata": {"name": "a", "namespace": "gefyra", "resourceVersion": "1", "generation": 2},
            "provider": "stowaway", "state": "ACTIVE",
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Connected",
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}]},
        }))
        .unwrap();
        let base = reconcile_relevant(&client);
        let mut handshake = client.clone();
        handshake.metadata.resource_version = Some("2".into());
        handshake.status.as_mut().unwrap().wireguard = Some(
            json!({"latest_handshake": "2026-01-01T00:00:30Z"})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(reconcile_relevant(&handshake), base, "Stowaway's write");
        let mut stale = client.clone();
        stale.status.as_mut().unwrap().conditions[0].observed_generation = Some(1);
        assert_ne!(
            reconcile_relevant(&stale),
            base,
            "another writer's condition"
        );
        let mut state = client.clone();
        state.state = ClientState::Waiting;
        assert_ne!(reconcile_relevant(&state), base, "a field");
        let mut deleting = client.clone();
        deleting.metadata.finalizers = Some(vec![FINALIZER.into()]);
        assert_ne!(reconcile_relevant(&deleting), base, "the finalizers");
    }
}
