//! The routed ranges, in the shards of [`gefyra_api::route_shards`]: each a ConfigMap changed
//! only by compare-and-swap (`replace` with the `resourceVersion` read), so the API server
//! decides every overlap. A route is written to its shards in ascending order; a refusal in
//! one of them gives the shards already written back what they held.
//!
//! Changes to one shard that this process has waiting at the same time go out together
//! (group commit): whoever finds no write of that shard in flight writes every change queued
//! by then in one compare-and-swap, each change applied in turn to what the ones before it
//! left (a refused one leaves the routes as they were). Ten connects into one shard are then
//! one write, not ten writers retrying each other's; the API server still decides between
//! processes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gefyra_api::ipam::{self, IpamError, Pool, Route, Routes};
use gefyra_api::route_shards::{self, LEGACY_TABLE, SHARD_LABEL, SHARD_SELECTOR};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams, Preconditions};
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use tracing::{info, warn};

use crate::credentials::MANAGED_BY;
use crate::route_budget::{self, RouteBudget};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("routes table ConfigMap {shard}: {source}")]
    Api {
        shard: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "routes table ConfigMap {shard}: still conflicting after {attempts} attempts; the API server is very busy"
    )]
    Contended { shard: String, attempts: u32 },
    /// The failed write that carried this change with others.
    #[error("{0}")]
    Batch(Arc<TableError>),
    #[error(
        "routes table ConfigMap {shard}: the write that was to carry this change stopped (is the operator shutting down?)"
    )]
    WriterGone { shard: String },
}

fn api_error(shard: &str) -> impl FnOnce(kube::Error) -> TableError + '_ {
    move |source| TableError::Api {
        shard: shard.to_string(),
        source,
    }
}

/// A shard's data as routes, with the entries that do not parse kept as they are (nothing
/// is lost) and named in a warning.
pub fn decode_shard(
    shard: &str,
    data: &BTreeMap<String, String>,
) -> (Routes, BTreeMap<String, String>) {
    let (routes, unreadable) = ipam::decode_routes(data);
    for key in unreadable.keys() {
        warn!(configmap = shard, key = %key, "unreadable route entry left as it is");
    }
    (routes, unreadable)
}

/// The ConfigMap `data` for `routes`, with the entries that did not parse as they were.
pub fn encode_shard(
    routes: &Routes,
    unreadable: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut data = unreadable.clone();
    for (client, route) in routes {
        data.insert(
            client.clone(),
            serde_json::to_string(route).expect("routes serialize"),
        );
    }
    data
}

fn shard_object(shard: &str, namespace: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(shard.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    MANAGED_BY.to_string(),
                ),
                (SHARD_LABEL.to_string(), "true".to_string()),
            ])),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    }
}

/// Applies `change` to the shard `shard` atomically; retried on write conflicts. `change`
/// must be a pure function of the routes it is given (it may run more than once). A missing
/// shard is created only if `change` records something. Returns its result and the shard's
/// routes as written.
pub async fn modify_shard<T>(
    api: &Api<ConfigMap>,
    shard: &str,
    mut change: impl FnMut(&mut Routes) -> Result<T, IpamError>,
) -> Result<(Result<T, IpamError>, Routes), TableError> {
    const ATTEMPTS: u32 = 100;
    let namespace = api.namespace().unwrap_or_default();
    for attempt in 0..ATTEMPTS {
        let current = match api.get_opt(shard).await.map_err(api_error(shard))? {
            Some(current) => current,
            None => {
                let mut routes = Routes::new();
                let result = change(&mut routes);
                if routes.is_empty() {
                    return Ok((result, routes));
                }
                match api
                    .create(&PostParams::default(), &shard_object(shard, namespace))
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 409 => {}
                    Err(error) => return Err(api_error(shard)(error)),
                }
                continue;
            }
        };
        let (mut routes, unreadable) =
            decode_shard(shard, current.data.as_ref().unwrap_or(&BTreeMap::new()));
        let before = routes.clone();
        let result = change(&mut routes);
        if routes == before {
            return Ok((result, routes));
        }
        // A shard left empty is deleted (if nobody wrote it since it was read), so that the
        // shards are as many as the ranges in use need, not every range ever asked for.
        let written = if routes.is_empty() && unreadable.is_empty() {
            let unchanged = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: current.resource_version(),
                    uid: current.uid(),
                }),
                ..DeleteParams::default()
            };
            match api.delete(shard, &unchanged).await {
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                deleted => deleted.map(drop),
            }
        } else {
            let mut next = current;
            next.data = Some(encode_shard(&routes, &unreadable));
            api.replace(shard, &PostParams::default(), &next)
                .await
                .map(drop)
        };
        match written {
            Ok(()) => return Ok((result, routes)),
            // Someone else wrote first, or emptied and deleted the shard since it was read:
            // read again. A little jitter spreads the retries.
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {
                let jitter = rand::random::<u64>() % (5 + 5 * u64::from(attempt.min(10)));
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            Err(error) => return Err(api_error(shard)(error)),
        }
    }
    Err(TableError::Contended {
        shard: shard.to_string(),
        attempts: ATTEMPTS,
    })
}

/// Every shard's routes (data by shard name), read from the API server.
pub async fn read_shards(
    client: &Client,
    namespace: &str,
) -> Result<BTreeMap<String, Routes>, TableError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let shards = api
        .list(&ListParams::default().labels(SHARD_SELECTOR))
        .await
        .map_err(api_error("(every shard)"))?;
    Ok(shards
        .items
        .into_iter()
        .map(|shard| {
            let name = shard.name_any();
            let routes = decode_shard(&name, shard.data.as_ref().unwrap_or(&BTreeMap::new())).0;
            (name, routes)
        })
        .collect())
}

/// Every route, each client once, read from the API server.
pub async fn read_routes(client: &Client, namespace: &str) -> Result<Routes, TableError> {
    let mut merged = Routes::new();
    for routes in read_shards(client, namespace).await?.into_values() {
        for (name, route) in routes {
            merged.entry(name).or_insert(route);
        }
    }
    Ok(merged)
}

enum InPlace {
    Yes,
    No {
        cached: BTreeMap<String, Option<Route>>,
        seen: Option<Seen>,
    },
}

/// What this process last knew from the API server of a client's route.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// It wrote (or found) this route in every one of its shards, and nothing elsewhere.
    Is(Option<Route>),
    /// A change was refused part-way and given back: ask the API server next time.
    Unsure,
}

/// A change of a shard's routes, queued for the shard's next write; it keeps its own result.
type Change = Box<dyn FnMut(&mut Routes) + Send>;

/// Tells a queued change how the write that carried it went.
type Written = tokio::sync::oneshot::Sender<Result<(), Arc<TableError>>>;

/// What waits to be written to one shard.
#[derive(Default)]
struct ShardQueue {
    changes: Vec<(Change, Written)>,
    /// A write of this shard is under way (its writer takes what is queued next).
    writing: bool,
}

type Queues = Arc<Mutex<HashMap<String, ShardQueue>>>;

/// Writes what is queued for `shard`, batch after batch, until nothing is.
async fn write_queued(api: Api<ConfigMap>, shard: String, queues: Queues) {
    loop {
        let mut batch = {
            let mut queues = queues.lock().unwrap_or_else(|e| e.into_inner());
            let Some(queue) = queues.get_mut(&shard) else {
                return;
            };
            if queue.changes.is_empty() {
                queues.remove(&shard);
                return;
            }
            std::mem::take(&mut queue.changes)
        };
        let written = modify_shard(&api, &shard, |routes| {
            for (change, _) in batch.iter_mut() {
                change(routes);
            }
            Ok(())
        })
        .await;
        let outcome = written.map(drop).map_err(Arc::new);
        for (_, done) in batch {
            // A caller that went away leaves its change written all the same.
            let _ = done.send(outcome.clone());
        }
    }
}

/// The routes table as the operator changes it: the API for writes, a watched cache of the
/// shards to skip a change already in place.
pub struct RouteTables {
    queues: Queues,
    api: Api<ConfigMap>,
    namespace: String,
    store: OnceLock<Store<ConfigMap>>,
    /// Per client, its route as this process last wrote it, so that a cache that has not yet
    /// delivered one of its own writes is never trusted for that client.
    seen: Mutex<HashMap<String, Seen>>,
    /// How often each client may change its route.
    budget: RouteBudget,
}

/// Why a client's route was not recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The range itself may not be routed (overlap, form, width, family).
    #[error(transparent)]
    Range(#[from] IpamError),
    /// The client changed its route too often; the change is made once `retry_in` passed.
    #[error(
        "it changed its routed range more than {burst} times within a minute, the most a client may; this change is made in {}s",
        retry_in.as_secs().max(1)
    )]
    TooOften { burst: u32, retry_in: Duration },
}

impl RouteTables {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            queues: Queues::default(),
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            store: OnceLock::new(),
            seen: Mutex::default(),
            budget: RouteBudget::default(),
        }
    }

    /// Applies `change` to shard `shard` in the shard's next write (see the module: group
    /// commit); its result once that write is in. `change` must be a pure function of the
    /// routes it is given, leaving them as they were when it refuses (it may run more than
    /// once, after the changes queued before it).
    async fn change_shard<T: Send + 'static>(
        &self,
        shard: &str,
        mut change: impl FnMut(&mut Routes) -> Result<T, IpamError> + Send + 'static,
    ) -> Result<Result<T, IpamError>, TableError> {
        let result: Arc<Mutex<Option<Result<T, IpamError>>>> = Arc::default();
        let kept = result.clone();
        let change: Change = Box::new(move |routes| {
            let outcome = change(routes);
            *kept.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        });
        let (done, written) = tokio::sync::oneshot::channel();
        let lead = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            let queue = queues.entry(shard.to_string()).or_default();
            queue.changes.push((change, done));
            !std::mem::replace(&mut queue.writing, true)
        };
        if lead {
            tokio::spawn(write_queued(
                self.api.clone(),
                shard.to_string(),
                self.queues.clone(),
            ));
        }
        let gone = || TableError::WriterGone {
            shard: shard.to_string(),
        };
        written
            .await
            .map_err(|_| gone())?
            .map_err(TableError::Batch)?;
        let outcome = result.lock().unwrap_or_else(|e| e.into_inner()).take();
        outcome.ok_or_else(gone)
    }

    /// [`change_shard`] with a change that refuses nothing (a removal, a restore).
    async fn edit_shard(
        &self,
        shard: &str,
        mut edit: impl FnMut(&mut Routes) + Send + 'static,
    ) -> Result<(), TableError> {
        let _never_refused = self
            .change_shard(shard, move |routes| {
                edit(routes);
                Ok(())
            })
            .await?;
        Ok(())
    }

    /// The watched shards (filled before the first reconcile).
    pub fn watch_into(&self, store: Store<ConfigMap>) {
        let _ = self.store.set(store);
    }

    /// The cached shards that hold an entry for `name`, with it (`None`: unreadable).
    fn cached_entries(&self, name: &str) -> Option<BTreeMap<String, Option<Route>>> {
        let store = self.store.get()?;
        Some(
            store
                .state()
                .iter()
                .filter(|shard| shard.namespace().as_deref() == Some(self.namespace.as_str()))
                .filter_map(|shard| {
                    let data = shard.data.as_ref()?;
                    data.contains_key(name)
                        .then(|| (shard.name_any(), route_shards::entry_in(data, name)))
                })
                .collect(),
        )
    }

    /// The uids of every route in the cached shards (`None`: not watched yet).
    pub fn cached_uids(&self) -> Option<BTreeSet<String>> {
        let store = self.store.get()?;
        Some(
            store
                .state()
                .iter()
                .filter_map(|shard| shard.data.as_ref())
                .flat_map(|data| ipam::decode_routes(data).0.into_values())
                .map(|route| route.uid)
                .collect(),
        )
    }

    /// Records `subnet` as `name`'s routed range, refused (the inner error) when it
    /// overlaps another client's range, the pool or a reserved range, is too wide or of
    /// another family than the pool, or the client changed its route too often. Sends
    /// nothing when the watched shards show it in place, and nothing when they show a
    /// conflict in any shard it covers (the API server decides the rest).
    pub async fn set_route(
        &self,
        pool: &Pool,
        name: &str,
        uid: &str,
        subnet: IpNet,
    ) -> Result<Result<(), Refused>, TableError> {
        // What no table can change: the pool, reserved ranges, the form of the subnet.
        let targets = match ipam::check_routed(pool, &Routes::new(), name, subnet)
            .and_then(|()| route_shards::shards_of(&subnet))
        {
            Ok(targets) => targets,
            Err(refused) => return Ok(Err(refused.into())),
        };
        let desired = Route {
            uid: uid.to_string(),
            subnet,
        };
        let (cached, seen) = match self.in_place(name, &targets, Some(&desired)) {
            InPlace::Yes => return Ok(Ok(())),
            InPlace::No { cached, seen } => (cached, seen),
        };
        if let Some(near) = self.cached_routes_in(&targets)
            && let Err(refused) = ipam::check_routed(pool, &near, name, subnet)
        {
            return Ok(Err(refused.into()));
        }
        if let Err(retry_in) = self.budget.spend(uid, std::time::Instant::now()) {
            return Ok(Err(Refused::TooOften {
                burst: route_budget::BURST,
                retry_in,
            }));
        }
        let mut written: Vec<(&String, Option<Route>)> = Vec::new();
        for shard in &targets {
            let previous: Arc<Mutex<Option<Route>>> = Arc::default();
            let result = {
                let (previous, pool) = (previous.clone(), pool.clone());
                let (name, uid) = (name.to_string(), uid.to_string());
                self.change_shard(shard, move |routes| {
                    *previous.lock().unwrap_or_else(|e| e.into_inner()) =
                        routes.get(&name).cloned();
                    ipam::route(&pool, routes, &name, &uid, Some(subnet))
                })
                .await?
            };
            if let Err(refused) = result {
                self.remember(name, Seen::Unsure);
                for (shard, previous) in written.into_iter().rev() {
                    let (name, desired) = (name.to_string(), desired.clone());
                    self.edit_shard(shard, move |routes| {
                        if routes.get(&name) == Some(&desired) {
                            match &previous {
                                Some(previous) => routes.insert(name.clone(), previous.clone()),
                                None => routes.remove(&name),
                            };
                        }
                    })
                    .await?;
                }
                return Ok(Err(refused.into()));
            }
            let previous = previous.lock().unwrap_or_else(|e| e.into_inner()).take();
            written.push((shard, previous));
        }
        self.remove_elsewhere(name, &targets, cached, seen).await?;
        self.remember(name, Seen::Is(Some(desired)));
        Ok(Ok(()))
    }

    /// Removes `name`'s routed range, if it has one. Sends nothing when the watched shards
    /// show none.
    pub async fn remove_route(&self, name: &str) -> Result<(), TableError> {
        if let InPlace::No { cached, seen } = self.in_place(name, &[], None) {
            self.remove_elsewhere(name, &[], cached, seen).await?;
            self.remember(name, Seen::Is(None));
        }
        Ok(())
    }

    /// Forgets what this process knew of a deleted client's route, and its budget.
    pub fn forget(&self, name: &str, uid: &str) {
        self.seen.lock().expect("not poisoned").remove(name);
        self.budget.forget(uid);
    }

    /// Every route the watched shards `shards` show (`None`: not watched yet).
    fn cached_routes_in(&self, shards: &[String]) -> Option<Routes> {
        let store = self.store.get()?;
        let data: Vec<BTreeMap<String, String>> = shards
            .iter()
            .filter_map(|shard| {
                store.get(&kube::runtime::reflector::ObjectRef::new(shard).within(&self.namespace))
            })
            .filter_map(|shard| shard.data.clone())
            .collect();
        Some(route_shards::merge(&data))
    }

    fn remember(&self, name: &str, seen: Seen) {
        self.seen
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), seen);
    }

    /// Whether the watched shards show `desired` in place for `name` (see [`in_place`]);
    /// if not, what they show and what this process last wrote.
    fn in_place(&self, name: &str, targets: &[String], desired: Option<&Route>) -> InPlace {
        let seen = self.seen.lock().expect("not poisoned").get(name).cloned();
        let cached = self.cached_entries(name);
        match &cached {
            Some(cached) if in_place(targets, desired, cached, seen.as_ref()) => InPlace::Yes,
            _ => InPlace::No {
                cached: cached.unwrap_or_default(),
                seen,
            },
        }
    }

    /// Removes `name`'s entries from every shard but `targets`: where the cache shows them,
    /// and where this process last wrote them (the cache may not show that yet).
    async fn remove_elsewhere(
        &self,
        name: &str,
        targets: &[String],
        cached: BTreeMap<String, Option<Route>>,
        seen: Option<Seen>,
    ) -> Result<(), TableError> {
        let mut elsewhere: BTreeSet<String> = cached.into_keys().collect();
        if let Some(Seen::Is(Some(route))) = &seen {
            elsewhere.extend(route_shards::shards_of(&route.subnet).unwrap_or_default());
        }
        for shard in elsewhere.iter().filter(|shard| !targets.contains(shard)) {
            let name = name.to_string();
            self.edit_shard(shard, move |routes| {
                routes.remove(&name);
            })
            .await?;
        }
        Ok(())
    }

    /// Removes the routes of clients whose uid is not in `live` from every shard, but only
    /// entries unchanged since `before` (read before `live` was listed: a route recorded
    /// after the list belongs to a client the list may not show). Returns the clients freed.
    pub async fn sweep(
        &self,
        before: &BTreeMap<String, Routes>,
        live: &BTreeSet<String>,
    ) -> Result<BTreeSet<String>, TableError> {
        let mut freed = BTreeSet::new();
        for (shard, seen) in before {
            if seen.values().all(|route| live.contains(&route.uid)) {
                continue;
            }
            let (seen, live) = (seen.clone(), live.clone());
            let swept = self
                .change_shard(shard, move |routes| Ok(ipam::sweep(routes, &seen, &live)))
                .await?;
            freed.extend(swept.unwrap_or_default());
        }
        Ok(freed)
    }

    /// Moves the routes of the single table of earlier versions into shards, then deletes
    /// it (unless it changed meanwhile). Run once at start, before any reconcile.
    pub async fn migrate_legacy_table(&self) -> Result<(), TableError> {
        let Some(legacy) = self
            .api
            .get_opt(LEGACY_TABLE)
            .await
            .map_err(api_error(LEGACY_TABLE))?
        else {
            return Ok(());
        };
        let (routes, unreadable) = decode_shard(
            LEGACY_TABLE,
            legacy.data.as_ref().unwrap_or(&BTreeMap::new()),
        );
        for (name, route) in &routes {
            let shards = match route_shards::shards_of(&route.subnet) {
                Ok(shards) => shards,
                Err(refused) => {
                    warn!(client = %name, %refused, "a route of the old routes table is not carried over; the client's next connect is refused with the reason");
                    continue;
                }
            };
            for shard in &shards {
                let (name, route) = (name.clone(), route.clone());
                self.edit_shard(shard, move |routes| {
                    routes.entry(name.clone()).or_insert_with(|| route.clone());
                })
                .await?;
            }
        }
        if !unreadable.is_empty() {
            warn!(entries = ?unreadable.keys().collect::<Vec<_>>(), "the old routes table keeps entries that do not parse; it is left in place");
            return Ok(());
        }
        let delete = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: legacy.resource_version(),
                uid: legacy.uid(),
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(LEGACY_TABLE, &delete).await {
            Ok(_) => info!(
                routes = routes.len(),
                "the routes table was moved into shards"
            ),
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {
                warn!(
                    "the old routes table changed while it was moved; moving it again at the next start"
                );
            }
            Err(error) => return Err(api_error(LEGACY_TABLE)(error)),
        }
        Ok(())
    }
}

/// Whether the cached shards show `desired` as the client's route already: in each of
/// `targets` and nowhere else, and this process has not written anything the cache may
/// not show yet.
fn in_place(
    targets: &[String],
    desired: Option<&Route>,
    cached: &BTreeMap<String, Option<Route>>,
    seen: Option<&Seen>,
) -> bool {
    let seen_agrees = match seen {
        None => true,
        Some(Seen::Is(route)) => route.as_ref() == desired,
        Some(Seen::Unsure) => false,
    };
    seen_agrees
        && cached.len() == targets.len()
        && targets.iter().all(|shard| {
            cached
                .get(shard)
                .is_some_and(|entry| entry.as_ref() == desired)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(subnet: &str) -> Route {
        Route {
            uid: "u".into(),
            subnet: subnet.parse().unwrap(),
        }
    }

    #[test]
    fn in_place_only_when_every_shard_shows_it_and_nothing_else_does() {
        let wide = route("172.18.0.0/15");
        let targets = route_shards::shards_of(&wide.subnet).unwrap();
        let both: BTreeMap<_, _> = targets
            .iter()
            .map(|s| (s.clone(), Some(wide.clone())))
            .collect();
        assert!(in_place(&targets, Some(&wide), &both, None));
        assert!(in_place(
            &targets,
            Some(&wide),
            &both,
            Some(&Seen::Is(Some(wide.clone())))
        ));
        // Written part-way (a crash, a refusal given back), elsewhere too, or not yet seen.
        let mut half = both.clone();
        half.pop_last();
        assert!(!in_place(&targets, Some(&wide), &half, None));
        let mut more = both.clone();
        more.insert("gefyra-routes-v4-10-0".into(), Some(wide.clone()));
        assert!(!in_place(&targets, Some(&wide), &more, None));
        assert!(!in_place(&targets, Some(&wide), &both, Some(&Seen::Unsure)));
        assert!(!in_place(
            &targets,
            Some(&wide),
            &both,
            Some(&Seen::Is(None))
        ));
        // No route: in place where no shard shows one.
        assert!(in_place(&[], None, &BTreeMap::new(), None));
        assert!(!in_place(&[], None, &both, None));
        assert!(!in_place(
            &[],
            None,
            &BTreeMap::new(),
            Some(&Seen::Is(Some(wide)))
        ));
    }
}
