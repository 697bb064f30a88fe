//! Stowaway and the API: the server key from the operator's Secret; the peer table kept
//! equal to the ACTIVE clients the operator's decisions back (watches of the clients, the
//! tunnel-address claims and the routes table); `status.wireguard` written back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use gefyra_api::GefyraClient;
use gefyra_api::ipam::{CLAIM_SELECTOR, SERVER_KEY_SECRET};
use gefyra_api::route_shards::{self, SHARD_SELECTOR};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::dataplane::{self, Shared};
use crate::metrics::Metrics;
use crate::peers::{self, Decisions, Key, Refused};
use crate::status::PeerStatus;

/// The server's private key from the operator's Secret; waits until the operator made it.
pub async fn server_key(client: &Client, namespace: &str) -> anyhow::Result<Key> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut waited = 0u32;
    loop {
        match api.get_opt(SERVER_KEY_SECRET).await {
            Ok(Some(secret)) => {
                let text = secret
                    .data
                    .unwrap_or_default()
                    .get("privateKey")
                    .and_then(|value| String::from_utf8(value.0.clone()).ok())
                    .unwrap_or_default();
                return peers::decode_key(&text).with_context(|| {
                    format!(
                        "Secret {namespace}/{SERVER_KEY_SECRET} has no valid privateKey \
                         (base64 of 32 bytes); delete it and let the operator create it anew"
                    )
                });
            }
            Ok(None) => {
                if waited.is_multiple_of(15) {
                    tracing::info!(
                        secret = SERVER_KEY_SECRET,
                        namespace,
                        "waiting for the server key Secret (the operator creates it)"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "reading the server key Secret failed; retrying"),
        }
        waited += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Follows `api` into a store (watch retried with backoff); `changed` is told of every
/// event.
fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    changed: Arc<tokio::sync::Notify>,
) -> reflector::Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    tokio::spawn(
        reflector(
            writer,
            // Nothing here reads managedFields, and a client's token may write its own entry
            // in its GefyraClient's: never kept in memory.
            watcher(api, config).modify(|object| object.managed_fields_mut().clear()),
        )
        // Failed watches are retried with backoff, not in a hot loop.
        .default_backoff()
        .for_each(move |event| {
            match event {
                Ok(_) => changed.notify_one(),
                Err(error) => tracing::warn!(%error, "watching {what} failed; retrying"),
            }
            futures::future::ready(())
        }),
    );
    store
}

/// The routes table's shards as last decoded, each decoded again only when it changes (the
/// peer table is recomputed on every client event, status writes included), merged.
#[derive(Default)]
struct RoutesTable {
    /// Per shard, the resourceVersion decoded and its data.
    shards: BTreeMap<String, (Option<String>, BTreeMap<String, String>)>,
    merged: gefyra_api::ipam::Routes,
}

impl RoutesTable {
    fn current(&mut self, store: &reflector::Store<ConfigMap>) -> &gefyra_api::ipam::Routes {
        let shards = store.state();
        let unchanged = shards.len() == self.shards.len()
            && shards.iter().all(|shard| {
                self.shards
                    .get(&shard.name_any())
                    .is_some_and(|(version, _)| {
                        version.is_some() && *version == shard.metadata.resource_version
                    })
            });
        if !unchanged {
            self.shards = shards
                .iter()
                .map(|shard| {
                    let data = shard.data.clone().unwrap_or_default();
                    (
                        shard.name_any(),
                        (shard.metadata.resource_version.clone(), data),
                    )
                })
                .collect();
            self.merged = route_shards::merge(self.shards.values().map(|(_, data)| data));
        }
        &self.merged
    }
}

/// The operator's decisions as the stores show them: who holds which tunnel address, and
/// the routes table.
fn decisions(claims: &reflector::Store<Lease>, routes: &gefyra_api::ipam::Routes) -> Decisions {
    let claims = claims
        .state()
        .iter()
        .filter_map(|lease| {
            let (address, uid) = gefyra_api::ipam::claimed(lease)?;
            Some((address, uid.to_string()))
        })
        .collect();
    Decisions {
        claims,
        routes: routes.clone(),
    }
}

/// Keeps the data plane's peer table equal to the ACTIVE clients that the operator's
/// decisions back (bursts of events are applied together).
pub async fn keep_peers(
    client: Client,
    namespace: String,
    handle: dataplane::Handle,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) {
    let changed = Arc::new(tokio::sync::Notify::new());
    let clients = follow(
        Api::<GefyraClient>::namespaced(client.clone(), &namespace),
        watcher::Config::default(),
        "GefyraClients",
        changed.clone(),
    );
    let claims = follow(
        Api::<Lease>::namespaced(client.clone(), &namespace),
        watcher::Config::default().labels(CLAIM_SELECTOR),
        "tunnel-address claims (Leases)",
        changed.clone(),
    );
    let routes = follow(
        Api::<ConfigMap>::namespaced(client, &namespace),
        watcher::Config::default().labels(SHARD_SELECTOR),
        "the routes table's shards (ConfigMaps)",
        changed.clone(),
    );
    for store in [
        clients.wait_until_ready().await,
        claims.wait_until_ready().await,
        routes.wait_until_ready().await,
    ] {
        if store.is_err() {
            return;
        }
    }
    let mut reported: Vec<Refused> = Vec::new();
    let mut table = RoutesTable::default();
    loop {
        let decisions = decisions(&claims, table.current(&routes));
        let clients = clients.state();
        let (desired, refused) =
            peers::desired(clients.iter().map(|client| client.as_ref()), &decisions);
        if refused != reported {
            for refusal in &refused {
                tracing::warn!(reason = refusal.reason.label(), "{}", refusal.message);
            }
            metrics.observe_refused(&refused);
            reported = refused;
        }
        handle.set_peers(desired);
        ready.store(true, Ordering::Relaxed);
        changed.notified().await;
        // Let a burst of events settle into one update.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `status.wireguard` of every peer whose figures changed, every `interval`; clears
/// it for clients that are no longer peers.
pub async fn write_status(api: Api<GefyraClient>, shared: Arc<Shared>, interval: Duration) {
    let mut written: BTreeMap<String, PeerStatus> = BTreeMap::new();
    loop {
        tokio::time::sleep(interval).await;
        let stats = shared.peer_stats();
        let now = jiff::Timestamp::now();
        let mut writes = Vec::new();
        for (client, peer) in &stats {
            let status = PeerStatus::of(peer, now);
            if written
                .get(client)
                .is_none_or(|previous| status.differs_from(previous))
            {
                writes.push((client.clone(), Some(status)));
            }
        }
        for client in written.keys() {
            if !stats.contains_key(client) {
                writes.push((client.clone(), None));
            }
        }
        let results: Vec<_> = futures::stream::iter(writes)
            .map(|(client, status)| {
                let api = api.clone();
                async move {
                    let body = json!({ "status": {
                        "wireguard": status.as_ref().map(PeerStatus::to_json)
                    } });
                    let result = api
                        .patch_status(&client, &PatchParams::default(), &Patch::Merge(body))
                        .await;
                    (client, status, result)
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for (client, status, result) in results {
            match (result, status) {
                (Ok(_), Some(status)) => {
                    written.insert(client, status);
                }
                (Ok(_), None) => {
                    written.remove(&client);
                }
                (Err(kube::Error::Api(response)), _) if response.code == 404 => {
                    written.remove(&client);
                }
                (Err(error), _) => {
                    tracing::warn!(client, %error, "writing status.wireguard failed; retrying next round");
                }
            }
        }
    }
}
