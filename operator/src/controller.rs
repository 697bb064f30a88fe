//! The GefyraClient controller: what every reconcile shares ([`Context`]), the watches that
//! feed it, and the reconcile around the pipeline of [`crate::reconcile`] (the finalizer,
//! failures recorded in the client, retries). Every write is idempotent, so a crash at any
//! line converges on the next run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use gefyra_api::{ClientState, GefyraClient};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{PredicateConfig, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use crate::allocator::{self, Claims};
use crate::connection::{self, KeyPair};
use crate::credentials::{self, ClientRbac};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::lifecycle;
use crate::metrics::Metrics;
use crate::owned::OwnedObjects;
use crate::routes::RouteTables;
use crate::{reconcile, sweep};
use gefyra_api::connection::{Endpoint, ProviderConfig, WireGuardKey};
use gefyra_api::route_shards;

pub const FINALIZER: &str = "gefyra.dev/cleanup";
pub const FIELD_MANAGER: &str = "gefyra-operator";

/// The longest a reconcile waits for the caches of owned objects after a start.
const OWNED_CACHE_WAIT: Duration = Duration::from_secs(30);

/// What the operator is told on its command line.
#[derive(Clone, Debug)]
pub struct Settings {
    pub namespace: String,
    pub client_rbac: ClientRbac,
    /// Token lifetime; `None`: until the client's sunset, else 365 days.
    pub token_lifetime: Option<SignedDuration>,
    /// Renew this long before expiry; `None`: after 80 % of the lifetime.
    pub renew_before: Option<SignedDuration>,
    pub concurrency: u16,
    /// Tunnel-address pool and reserved ranges.
    pub pool: gefyra_api::ipam::Pool,
    /// `Peer.Endpoint` written into every client's `providerConfig`.
    pub wireguard_endpoint: Endpoint,
    /// Disconnect ACTIVE clients after this long, unless the client sets its own.
    pub max_connection_age: Option<SignedDuration>,
}

/// Built once, shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Consecutive failures per client, for the retry backoff only (never for correctness).
    failures: Mutex<HashMap<String, u32>>,
    /// The Stowaway server's key pair, read (or created) once.
    server_key: tokio::sync::OnceCell<KeyPair>,
    /// Tunnel-address claims; the store is fed by `run`.
    pub claims: Claims,
    claims_writer: Mutex<Option<Writer<Lease>>>,
    /// The controller's cache of GefyraClients (set by `run`), to find a public key that
    /// another client already uses.
    pub(crate) clients: std::sync::OnceLock<Store<GefyraClient>>,
    /// The ACTIVE clients in that cache by the public key of their peer.
    clients_by_key: Arc<Index<GefyraClient, WireGuardKey>>,
    /// The routes table's shards, watched by `run`: a route in place is not written again,
    /// and the sweep asks the API server only when they or the claims show a range of a
    /// client the cache does not know.
    pub routes: RouteTables,
    /// The objects clients own as last seen (watched by `run`): applies already in place
    /// are skipped.
    pub(crate) owned: std::sync::OnceLock<OwnedObjects>,
    /// Client versions this process's own writes replaced (a reconcile from a cache that
    /// shows one waits for the cache).
    pub(crate) own_writes: crate::own_writes::OwnWrites,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, settings: Settings) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let (store, writer) = reflector::store();
        let routes = RouteTables::new(client.clone(), &settings.namespace);
        let claims = Claims {
            api: Api::namespaced(client.clone(), &settings.namespace),
            store,
            by_client: Arc::new(Index::new(allocator::claim_holder_uid)),
            recent: Arc::default(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            settings,
            failures: Mutex::default(),
            server_key: tokio::sync::OnceCell::new(),
            claims,
            claims_writer: Mutex::new(Some(writer)),
            clients: std::sync::OnceLock::new(),
            clients_by_key: Arc::new(Index::new(active_public_key)),
            owned: std::sync::OnceLock::new(),
            own_writes: crate::own_writes::OwnWrites::default(),
            routes,
        }
    }

    /// Merge-patches `client` (as the reconcile saw it; its `status` subresource with
    /// `status`) and records the write in `own_writes`; a refusal becomes `failed(error)`.
    pub(crate) async fn patch_client(
        &self,
        client: &GefyraClient,
        status: bool,
        patch: serde_json::Value,
        failed: impl FnOnce(kube::Error) -> Error,
    ) -> Result<GefyraClient> {
        let api: Api<GefyraClient> =
            Api::namespaced(self.client.clone(), &client.namespace().unwrap_or_default());
        let name = client.name_any();
        let params = PatchParams::default();
        let patch = Patch::Merge(patch);
        let patched = if status {
            api.patch_status(&name, &params, &patch).await
        } else {
            api.patch(&name, &params, &patch).await
        }
        .map_err(failed)?;
        if let Some(uid) = client.uid() {
            self.own_writes.wrote(
                &uid,
                client.metadata.resource_version.as_deref(),
                patched.metadata.resource_version.as_deref(),
            );
        }
        Ok(patched)
    }

    /// The claims cache as a watch's first list of `claims` leaves it (tests that run a
    /// reconcile without a controller).
    #[cfg(test)]
    pub(crate) fn claims_filled_for_tests(&self, claims: Vec<Lease>) {
        if let Some(mut writer) = self.claims_writer.lock().expect("not poisoned").take() {
            let events = std::iter::once(watcher::Event::Init)
                .chain(claims.into_iter().map(watcher::Event::InitApply))
                .chain([watcher::Event::InitDone]);
            for event in events {
                writer.apply_watcher_event(&event);
                self.claims.by_client.apply(&event);
            }
        }
    }

    /// Waits (at most [`OWNED_CACHE_WAIT`]) until the caches of owned objects are filled, so
    /// that the first reconciles after a start find settled objects in place instead of
    /// applying them again; past that, applies go to the API server as before.
    pub(crate) async fn owned_caches_filled(&self) {
        let deadline = tokio::time::Instant::now() + OWNED_CACHE_WAIT;
        while self.owned.get().is_some_and(|owned| !owned.ready())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The Stowaway server's key pair, created once if missing (at start-up, so that
    /// Stowaway can start before any client connects).
    pub async fn server_key(&self) -> Result<&KeyPair> {
        self.server_key
            .get_or_try_init(|| allocator::server_key(&self.client, &self.settings.namespace))
            .await
            .map_err(|source| Error::ServerKey { source })
    }

    /// Another client that holds `key` as its ACTIVE peer's public key and connected
    /// before the client with `uid` did (by their claims, which the API server stamped);
    /// that one keeps it. Only the clients the index names for `key` are read (checked
    /// against the cache); claims are looked up only for them.
    pub(crate) fn key_holder(&self, client: &GefyraClient, key: WireGuardKey) -> Option<String> {
        let store = self.clients.get()?;
        let uid = client.uid().unwrap_or_default();
        let holders: Vec<_> = self
            .clients_by_key
            .holders(&key)
            .iter()
            .filter_map(|other| store.get(other))
            .filter(|other| {
                other.uid().unwrap_or_default() != uid
                    && other.state == ClientState::Active
                    && other
                        .provider_config
                        .as_ref()
                        .and_then(ProviderConfig::public_key_in)
                        == Some(key)
            })
            .collect();
        if holders.is_empty() {
            return None;
        }
        let held_since = |uid: &str| self.claims.held_since(uid);
        connection::first_holder(
            (held_since(&uid), client.name_any()),
            holders.iter().map(|other| {
                (
                    held_since(&other.uid().unwrap_or_default()),
                    other.name_any(),
                )
            }),
        )
    }

    /// Records how much of the pool is claimed (claims of addresses outside the pool, left
    /// from an earlier `--tunnel-pool`, count too until their clients reconnect).
    pub(crate) fn observe_pool(&self) {
        let claimed = self.claims.store.len();
        self.metrics
            .observe_pool(self.settings.pool.capacity(), claimed);
    }

    /// Posts an Event. kube's Recorder folds Events with the same type, reason and `action`
    /// into one series that keeps the first note, so `action` must tell apart what should
    /// stay apart (each state entered is its own action).
    pub(crate) async fn event(
        &self,
        client: &GefyraClient,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &client.object_ref(&())).await {
            warn!(client = %client.name_any(), %error, "could not publish event {reason}");
        }
    }
}

/// The public key of an ACTIVE client's peer (what [`Context::key_holder`] looks up).
fn active_public_key(client: &GefyraClient) -> Option<WireGuardKey> {
    if client.state != ClientState::Active {
        return None;
    }
    client
        .provider_config
        .as_ref()
        .and_then(ProviderConfig::public_key_in)
}

/// The Event action for entering `state`: `EnterActive`, `EnterWaiting`, ...
pub(crate) fn enter_action(state: ClientState) -> String {
    let name = state.as_str();
    format!("Enter{}{}", &name[..1], name[1..].to_ascii_lowercase())
}

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
    let bridges = crate::bridges::refuse_forever(ctx.clone());
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
    let api: Api<GefyraClient> =
        Api::namespaced(ctx.client.clone(), &client.namespace().unwrap_or_default());
    let now = Timestamp::now();
    let condition = lifecycle::ready_condition(
        client.ready_condition(),
        false,
        error.category(),
        &message,
        client.metadata.generation,
        now,
    );
    if let Err(error) = api
        .patch_status(
            &client.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "conditions": [condition] } })),
        )
        .await
    {
        warn!(client = %client.name_any(), %error, "could not record the failure in the client's status");
    }
    // The reason first, then the state: whoever sees ERROR sees why.
    if !deleting && client.state != ClientState::Error {
        let _ = api
            .patch(
                &client.name_any(),
                &PatchParams::default(),
                &Patch::Merge(lifecycle::enter(ClientState::Error, now)),
            )
            .await;
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

    #[test]
    fn each_state_entered_is_its_own_event_action() {
        assert_eq!(enter_action(ClientState::Active), "EnterActive");
        let actions: std::collections::BTreeSet<String> =
            ClientState::ALL.into_iter().map(enter_action).collect();
        assert_eq!(actions.len(), ClientState::ALL.len());
    }
}
