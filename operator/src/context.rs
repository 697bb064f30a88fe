//! What every reconcile shares: the operator's [`Settings`] and the [`Context`] built once
//! from them (the API client, the Event recorder, the caches the watches fill, the record
//! of the operator's own writes). The controllers (`controller` for GefyraClients,
//! `bridging` for bridges and mounts) and the reconcile steps all take it from here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gefyra_api::connection::{Endpoint, ProviderConfig, WireGuardKey};
use gefyra_api::{ClientState, GefyraClient};
use jiff::SignedDuration;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::warn;

use crate::allocator::{self, Claims};
use crate::connection::{self, KeyPair};
use crate::credentials::ClientRbac;
use crate::error::{Error, Result};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::owned::OwnedObjects;
use crate::routes::RouteTables;

/// The field manager of every write the operator makes.
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
    /// Mounts and bridges.
    pub bridging: crate::bridging::BridgingSettings,
}

/// Built once, shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Consecutive failures per client, for the retry backoff only (never for correctness).
    pub(crate) failures: Mutex<HashMap<String, u32>>,
    /// The Stowaway server's key pair, read (or created) once.
    server_key: tokio::sync::OnceCell<KeyPair>,
    /// Tunnel-address claims; the store is fed by `run`.
    pub claims: Claims,
    pub(crate) claims_writer: Mutex<Option<Writer<Lease>>>,
    /// The controller's cache of GefyraClients (set by `run`), to find a public key that
    /// another client already uses.
    pub(crate) clients: std::sync::OnceLock<Store<GefyraClient>>,
    /// The ACTIVE clients in that cache by the public key of their peer.
    pub(crate) clients_by_key: Arc<Index<GefyraClient, WireGuardKey>>,
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
            let events = std::iter::once(kube::runtime::watcher::Event::Init)
                .chain(
                    claims
                        .into_iter()
                        .map(kube::runtime::watcher::Event::InitApply),
                )
                .chain([kube::runtime::watcher::Event::InitDone]);
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
