//! The GefyraClient reconciler: validate → build the client's identity → apply → record
//! the state. Every write is idempotent, so a crash at any line converges on the next run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use gefyra_api::ipam::{Allocation, IpamError};
use gefyra_api::{ClientState, GefyraClient};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{PredicateConfig, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::allocator::{self, ClaimError, Claims};
use crate::connection::{self, KeyPair};
use crate::credentials::{self, ClientRbac, CredentialsNeed};
use crate::error::{Error, Result};
use crate::lifecycle;
use crate::metrics::Metrics;
use crate::owned::{Owned, OwnedObjects};
use crate::routes::{self, RouteTables};
use gefyra_api::connection::{Endpoint, ProviderConfig, ProviderParameter, WireGuardKey};
use gefyra_api::ipam::Routes;
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
    clients: std::sync::OnceLock<Store<GefyraClient>>,
    /// The routes table's shards, watched by `run`: a route in place is not written again,
    /// and the sweep asks the API server only when they or the claims show a range of a
    /// client the cache does not know.
    pub routes: RouteTables,
    /// The objects clients own as last seen (watched by `run`): applies already in place
    /// are skipped.
    owned: std::sync::OnceLock<OwnedObjects>,
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
            owned: std::sync::OnceLock::new(),
            routes,
        }
    }

    /// Waits (at most [`OWNED_CACHE_WAIT`]) until the caches of owned objects are filled, so
    /// that the first reconciles after a start find settled objects in place instead of
    /// applying them again; past that, applies go to the API server as before.
    async fn owned_caches_filled(&self) {
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
    /// that one keeps it. Every cached client's key is read (one field, not its whole
    /// configuration); claims are looked up only for the few that hold `key`.
    fn key_holder(&self, client: &GefyraClient, key: WireGuardKey) -> Option<String> {
        let store = self.clients.get()?;
        let uid = client.uid().unwrap_or_default();
        let holders: Vec<_> = store
            .state()
            .into_iter()
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
    fn observe_pool(&self) {
        let claimed = self.claims.store.len();
        self.metrics
            .observe_pool(self.settings.pool.capacity(), claimed);
    }

    /// Posts an Event. kube's Recorder folds Events with the same type, reason and `action`
    /// into one series that keeps the first note, so `action` must tell apart what should
    /// stay apart (each state entered is its own action).
    async fn event(
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

/// The Event action for entering `state`: `EnterActive`, `EnterWaiting`, ...
fn enter_action(state: ClientState) -> String {
    let name = state.as_str();
    format!("Enter{}{}", &name[..1], name[1..].to_ascii_lowercase())
}

/// Keeps `writer`'s store in step with what `api` and `config` select, retrying (with
/// backoff) after a failed watch; `what` names it in the log.
async fn reflect_forever<K>(api: Api<K>, config: watcher::Config, writer: Writer<K>, what: &str)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    K: Send + Sync + 'static,
{
    watcher(api, config)
        .default_backoff()
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
    let claims = tokio::spawn(reflect_forever(
        ctx.claims.api.clone(),
        watcher::Config::default().labels(allocator::CLAIM_SELECTOR),
        writer,
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
    let changes = watcher(clients, watcher::Config::default())
        .default_backoff()
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
    let sweeper = sweep_allocations_forever(ctx.clone());
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

/// Every 30 s, frees the ranges of clients that no longer exist (e.g. deleted while no
/// operator ran and their finalizer was forced away).
async fn sweep_allocations_forever(ctx: Arc<Context>) {
    loop {
        if let Err(error) = sweep_allocations(&ctx).await {
            warn!(%error, "sweeping stale allocations failed; trying again in 30 s");
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
}

/// Whether the caches show a claim or a route of a client they do not know (then the sweep
/// asks the API server; else it sends nothing). Unsure (a cache not synced yet): true.
fn may_hold_stale_ranges(ctx: &Context) -> bool {
    let (Some(clients), Some(routed)) = (ctx.clients.get(), ctx.routes.cached_uids()) else {
        return true;
    };
    let known: std::collections::BTreeSet<String> = clients
        .state()
        .iter()
        .filter_map(|client| client.metadata.uid.clone())
        .collect();
    let claimed = ctx
        .claims
        .store
        .state()
        .iter()
        .filter_map(|lease| allocator::claimed(lease).map(|(_, uid)| uid.to_string()))
        .collect::<Vec<_>>();
    claimed
        .iter()
        .chain(routed.iter())
        .any(|uid| !known.contains(uid))
}

async fn sweep_allocations(ctx: &Context) -> anyhow::Result<()> {
    if !may_hold_stale_ranges(ctx) {
        return Ok(());
    }
    let namespace = &ctx.settings.namespace;
    // Only entries seen *before* listing the clients are candidates: a claim or route made
    // after the list belongs to a client the list may not show yet.
    let claims_before: Vec<(String, String)> = ctx
        .claims
        .store
        .state()
        .iter()
        .filter_map(|lease| {
            let (_, uid) = allocator::claimed(lease)?;
            Some((lease.name_any(), uid.to_string()))
        })
        .collect();
    let routes_before = routes::read_shards(&ctx.client, namespace).await?;
    if claims_before.is_empty() && routes_before.values().all(Routes::is_empty) {
        return Ok(());
    }
    let clients: Api<GefyraClient> = Api::namespaced(ctx.client.clone(), namespace);
    let live: std::collections::BTreeSet<String> = clients
        .list_metadata(&kube::api::ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|client| client.metadata.uid)
        .collect();
    let mut swept: Vec<String> = Vec::new();
    for (name, uid) in claims_before.iter().filter(|(_, uid)| !live.contains(uid)) {
        ctx.claims.delete_if_held(name, uid).await?;
        swept.push(name.clone());
    }
    let routes = ctx.routes.sweep(&routes_before, &live).await?;
    swept.extend(routes.into_iter().map(|name| format!("route of {name}")));
    ctx.observe_pool();
    if !swept.is_empty() {
        info!(freed = ?swept, "freed the ranges of clients that no longer exist");
    }
    Ok(())
}

async fn reconcile(client: Arc<GefyraClient>, ctx: Arc<Context>) -> Result<Action> {
    let started = std::time::Instant::now();
    let api: Api<GefyraClient> =
        Api::namespaced(ctx.client.clone(), &client.namespace().unwrap_or_default());
    let shared = ctx.clone();
    let result = finalizer(&api, FINALIZER, client.clone(), |event| async move {
        let ctx = &shared;
        let result = match &event {
            Finalizer::Apply(client) => apply(client, ctx).await,
            Finalizer::Cleanup(client) => cleanup(client, ctx).await,
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

fn sunset_of(client: &GefyraClient) -> Result<Option<Timestamp>> {
    client
        .sunset
        .as_deref()
        .map(|sunset| {
            sunset
                .parse::<Timestamp>()
                .map_err(|_| Error::InvalidSunset {
                    client: client.name_any(),
                    sunset: sunset.to_string(),
                })
        })
        .transpose()
}

async fn apply(client: &GefyraClient, ctx: &Context) -> Result<Action> {
    let name = client.name_any();
    let namespace = client.namespace().unwrap_or_default();
    let api: Api<GefyraClient> = Api::namespaced(ctx.client.clone(), &namespace);
    let now = Timestamp::now();

    // Validate (pure).
    let sunset = sunset_of(client)?;
    if let Some(sunset) = sunset
        && sunset <= now
    {
        info!(client = %name, %sunset, "sunset reached; deleting the client");
        ctx.event(
            client,
            EventType::Normal,
            "Sunset",
            "Delete",
            format!("sunset {sunset} reached; deleting the client"),
        )
        .await;
        api.delete(&name, &DeleteParams::default())
            .await
            .map_err(|source| Error::Delete {
                client: name.clone(),
                source,
            })?;
        return Ok(Action::await_change());
    }
    if matches!(client.state, ClientState::Requested) {
        transition(
            &api,
            client,
            client.state,
            ClientState::Creating,
            json!({}),
            "",
            ctx,
        )
        .await?;
    }

    // Build and apply the identity (what is already in place is not sent again).
    ctx.owned_caches_filled().await;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let account = credentials::service_account(client);
    let sa_name = account.name_any();
    let account = apply_owned(
        ctx,
        &namespace,
        "ServiceAccount",
        &sa_name,
        &params,
        &account,
    )
    .await?;
    apply_owned(
        ctx,
        &namespace,
        "Role",
        &sa_name,
        &params,
        &credentials::role(client, ctx.settings.client_rbac),
    )
    .await?;
    apply_owned(
        ctx,
        &namespace,
        "RoleBinding",
        &sa_name,
        &params,
        &credentials::role_binding(client),
    )
    .await?;
    // The token minter, for short-lived credentials (`clients config --short-lived`).
    let minter_name = GefyraClient::token_minter_name_for(&client.name_any());
    apply_owned(
        ctx,
        &namespace,
        "ServiceAccount",
        &minter_name,
        &params,
        &credentials::minter_service_account(client),
    )
    .await?;
    apply_owned(
        ctx,
        &namespace,
        "Role",
        &minter_name,
        &params,
        &credentials::minter_role(client),
    )
    .await?;
    apply_owned(
        ctx,
        &namespace,
        "RoleBinding",
        &minter_name,
        &params,
        &credentials::minter_role_binding(client),
    )
    .await?;

    // Credentials: minted with the TokenRequest API, renewed before they expire.
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
        let lifetime = credentials::requested_lifetime(now, sunset, ctx.settings.token_lifetime);
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
    let mut state = client.state;
    let settles = match client.state {
        ClientState::Requested | ClientState::Creating => true,
        // A failed connect stays in ERROR until the connection step succeeds.
        ClientState::Error => client.provider_parameter.is_none(),
        _ => false,
    };
    if settles {
        state = ClientState::Waiting;
        patch.extend(
            lifecycle::enter(ClientState::Waiting, Timestamp::now())
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
    }
    let mut generation = client.metadata.generation;
    if !patch.is_empty() {
        let patched = api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::Value::Object(patch)),
            )
            .await
            .map_err(|source| Error::RecordCredentials {
                client: name.clone(),
                source,
            })?;
        // The patch bumps the generation; the condition describes the object as written.
        generation = patched.metadata.generation;
        if settles && client.state != ClientState::Waiting {
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
    // Connect or disconnect; a failure returns here, before Ready is claimed.
    let (connection_due, connected, connection_generation) =
        connect_or_disconnect(client, state, ctx, now).await?;
    let generation = connection_generation.or(generation);
    let (reason, message) = if connected {
        (
            "Connected",
            "the client's credentials are ready and it is connected",
        )
    } else {
        ("CredentialsIssued", "the client's credentials are ready")
    };
    let condition = lifecycle::ready_condition(
        client.ready_condition(),
        true,
        reason,
        message,
        generation,
        now,
    );
    let status = client.status.clone().unwrap_or_default();
    let condition_changed = client.ready_condition().is_none_or(|c| {
        c.status != "True"
            || c.reason != condition.reason
            || c.observed_generation != condition.observed_generation
    });
    if condition_changed || status.credentials_expire_at != expires_at {
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "conditions": [condition], "credentialsExpireAt": expires_at } })),
        )
        .await
        .map_err(|source| Error::RecordCredentials { client: name.clone(), source })?;
    }

    Ok(Action::requeue(requeue_after(
        now,
        [renew_at, sunset, connection_due],
    )))
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

/// Server-side applies one of the client's objects, unless the watched cache shows every
/// field of it already in place; a failure names its kind and name.
async fn apply_owned<K>(
    ctx: &Context,
    namespace: &str,
    kind: &'static str,
    name: &str,
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

/// Records the state `to` (coming from `from`) with any `extra` fields in one patch, then
/// logs it and posts a `StateChanged` Event (with `note`, if any). Returns the generation
/// written.
async fn transition(
    api: &Api<GefyraClient>,
    client: &GefyraClient,
    from: ClientState,
    to: ClientState,
    extra: serde_json::Value,
    note: &str,
    ctx: &Context,
) -> Result<Option<i64>> {
    let name = client.name_any();
    let mut patch = lifecycle::enter(to, Timestamp::now());
    if let (Some(patch), serde_json::Value::Object(extra)) = (patch.as_object_mut(), extra) {
        patch.extend(extra);
    }
    let patched = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(|source| Error::RecordState {
            client: name.clone(),
            state: to,
            source,
        })?;
    info!(client = %name, %from, %to, "state changed");
    let message = match note {
        "" => format!("{from} -> {to}"),
        note => format!("{from} -> {to}: {note}"),
    };
    ctx.event(
        client,
        EventType::Normal,
        "StateChanged",
        &enter_action(to),
        message,
    )
    .await;
    Ok(patched.metadata.generation)
}

/// The connection state machine: `providerParameter` set → ENABLING → ACTIVE (route and
/// tunnel-address claim recorded before any configuration is published); unset →
/// DISABLING → WAITING (ranges released). Returns when `maxConnectionAge` is due, whether
/// the client is connected, and the generation of the last write.
async fn connect_or_disconnect(
    client: &GefyraClient,
    mut state: ClientState,
    ctx: &Context,
    now: Timestamp,
) -> Result<(Option<Timestamp>, bool, Option<i64>)> {
    let name = client.name_any();
    let namespace = client.namespace().unwrap_or_default();
    let api: Api<GefyraClient> = Api::namespaced(ctx.client.clone(), &namespace);
    let pool = &ctx.settings.pool;

    let Some(parameter) = client.provider_parameter.as_ref() else {
        let connected = client.provider_config.is_some()
            || matches!(
                state,
                ClientState::Enabling | ClientState::Active | ClientState::Disabling
            );
        if !connected {
            // A connect that failed (ERROR) may have recorded a route or a claim first.
            if client.state == ClientState::Error {
                release(client, ctx).await?;
            }
            return Ok((None, false, None));
        }
        if state != ClientState::Disabling {
            transition(
                &api,
                client,
                state,
                ClientState::Disabling,
                json!({}),
                "disconnect requested",
                ctx,
            )
            .await?;
            state = ClientState::Disabling;
        }
        release(client, ctx).await?;
        let generation = transition(
            &api,
            client,
            state,
            ClientState::Waiting,
            json!({"providerConfig": null}),
            "disconnected; its ranges were released",
            ctx,
        )
        .await?;
        return Ok((None, false, generation));
    };

    let request = ProviderParameter::parse(parameter).map_err(|error| Error::InvalidParameter {
        client: name.clone(),
        message: error.to_string(),
    })?;
    let uid = client.uid().unwrap_or_default();
    if let Some(key) = request.public_key
        && let Some(other) = ctx.key_holder(client, key)
    {
        return Err(Error::DuplicatePublicKey {
            client: name.clone(),
            other,
        });
    }
    // From WAITING the client enters ENABLING; a retry from ERROR goes straight to ACTIVE
    // once it succeeds, so a client that cannot connect stays in ERROR (no flapping).
    if state == ClientState::Waiting {
        transition(
            &api,
            client,
            state,
            ClientState::Enabling,
            json!({}),
            "connect requested",
            ctx,
        )
        .await?;
        state = ClientState::Enabling;
    }
    // The routed range first (compare-and-swap over every route), then the tunnel address
    // (a claim by unique name): both are recorded in the API server before any
    // configuration is published.
    let routed = match request.subnet {
        Some(subnet) => ctx.routes.set_route(pool, &name, &uid, subnet).await?,
        None => ctx.routes.remove_route(&name).await.map(Ok)?,
    };
    let ipam_error = |source: IpamError| match source {
        IpamError::PoolExhausted { .. } => Error::PoolExhausted {
            client: name.clone(),
            source,
        },
        IpamError::Overlap { .. } => Error::SubnetConflict {
            client: name.clone(),
            source,
        },
        IpamError::NotNetworkAddress { .. } | IpamError::TooWide { .. } => {
            Error::InvalidParameter {
                client: name.clone(),
                message: format!("providerParameter.{source}"),
            }
        }
    };
    routed.map_err(ipam_error)?;
    let held = ctx
        .claims
        .claim_tunnel(pool, client)
        .await
        .map_err(|source| match source {
            ClaimError::Ipam(source) => ipam_error(source),
            source => Error::TunnelClaim {
                client: name.clone(),
                source,
            },
        })?;
    ctx.observe_pool();
    let allocation = Allocation {
        uid,
        tunnel: held.address.into(),
        routed: request.subnet,
    };

    let mut generation = None;
    let stored = client
        .provider_config
        .as_ref()
        .and_then(|config| ProviderConfig::parse(config).ok());
    let current = state == ClientState::Active
        && connection::config_matches(stored.as_ref(), &allocation, request.public_key);
    if !current {
        let server = ctx.server_key().await?;
        let server_public: WireGuardKey =
            server
                .public
                .parse()
                .map_err(|problem| Error::InvalidServerKey {
                    problem: format!("publicKey {problem}"),
                })?;
        let (client_public, client_private) = match request.public_key {
            Some(public) => (public, None),
            None => {
                let pair = connection::generate_key_pair();
                let key = |text: &str| text.parse::<WireGuardKey>().expect("a generated key");
                (key(&pair.public), Some(key(&pair.private)))
            }
        };
        let config = connection::new_config(
            &allocation,
            client_public,
            client_private,
            server_public,
            &ctx.settings.wireguard_endpoint,
        );
        // Replace the whole map: keys of an older config are removed.
        let mut replacement = serde_json::Map::new();
        for stale in client.provider_config.iter().flat_map(|old| old.keys()) {
            replacement.insert(stale.clone(), serde_json::Value::Null);
        }
        replacement.extend(config.to_map());
        let routed = allocation
            .routed
            .map(|routed| format!(", routing {routed}"))
            .unwrap_or_default();
        generation = transition(
            &api,
            client,
            state,
            ClientState::Active,
            json!({ "providerConfig": replacement }),
            &format!(
                "connected with tunnel address {}{routed}",
                allocation.tunnel.addr()
            ),
            ctx,
        )
        .await?;
    }

    // The connection's age counts from the tunnel-address claim, which the API server
    // stamped: nothing a client writes (stateTransitions) can extend it.
    let due = connection::connection_due(
        client.max_connection_age,
        ctx.settings.max_connection_age,
        held.since,
    )
    .map_err(|message| Error::InvalidConnectionAge {
        client: name.clone(),
        message,
    })?;
    if let Some(due) = due
        && due <= now
    {
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "providerParameter": null })),
        )
        .await
        .map_err(|source| Error::RecordConnection {
            client: name.clone(),
            source,
        })?;
        ctx.event(
            client,
            EventType::Normal,
            "MaxConnectionAge",
            "Disconnect",
            format!(
                "connected since {}: maxConnectionAge reached; disconnecting",
                held.since
            ),
        )
        .await;
        return Ok((None, false, None));
    }
    Ok((due, true, generation))
}

/// Gives back everything `client` holds: its routed range and its tunnel-address claims.
async fn release(client: &GefyraClient, ctx: &Context) -> Result<()> {
    let name = client.name_any();
    ctx.routes.remove_route(&name).await?;
    let recorded = client
        .provider_config
        .as_ref()
        .and_then(|config| ProviderConfig::parse(config).ok())
        .map(|config| config.address);
    ctx.claims
        .release(&client.uid().unwrap_or_default(), recorded)
        .await
        .map_err(|source| Error::TunnelClaim {
            client: name.clone(),
            source,
        })?;
    ctx.observe_pool();
    Ok(())
}

fn renew_at_of(token: &str, renew_before: Option<SignedDuration>) -> Option<Timestamp> {
    credentials::token_claims(token).map(|claims| credentials::renew_at(&claims, renew_before))
}

fn stored_token(data: &gefyra_api::ServiceAccountData) -> Option<String> {
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

/// Removes everything the client owns, and only then lets it go: the RoleBinding, the Role,
/// the ServiceAccount (which invalidates every token minted for it).
async fn cleanup(client: &GefyraClient, ctx: &Context) -> Result<Action> {
    let name = client.name_any();
    let namespace = client.namespace().unwrap_or_default();
    let api: Api<GefyraClient> = Api::namespaced(ctx.client.clone(), &namespace);
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
        transition(
            &api,
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
    release(client, ctx).await?;
    ctx.routes.forget(&name);
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

    #[test]
    fn each_state_entered_is_its_own_event_action() {
        assert_eq!(enter_action(ClientState::Active), "EnterActive");
        let actions: std::collections::BTreeSet<String> =
            ClientState::ALL.into_iter().map(enter_action).collect();
        assert_eq!(actions.len(), ClientState::ALL.len());
    }
}
