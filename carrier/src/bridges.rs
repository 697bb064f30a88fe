//! The bridges of this router's mount, watched: every change rebuilds the route table from
//! the whole set and publishes it as one value.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use gefyra_api::bridge::{BRIDGE_KIND, BRIDGE_PLURAL};
use gefyra_api::bridge_rules::BRIDGE_MOUNT_LABEL;
use gefyra_api::client::{GROUP, VERSION};
use kube::api::{ApiResource, GroupVersionKind};
use kube::core::DynamicObject;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_objects};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::routes::{RouteTable, Skipped};

/// The GefyraBridge resource, for a dynamic API.
pub fn bridge_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, BRIDGE_KIND),
        BRIDGE_PLURAL,
    )
}

/// The current set of bridges, by name, as the watch reports it.
#[derive(Default)]
pub struct Bridges {
    objects: BTreeMap<String, DynamicObject>,
    /// Objects of a list (re)starting, swapped in whole when it is done.
    listing: BTreeMap<String, DynamicObject>,
    /// The last skips, logged when they change rather than on every event.
    skipped: Vec<Skipped>,
}

impl Bridges {
    /// Applies one watch event; `true` when the set changed and is complete (a table to
    /// publish).
    pub fn apply(&mut self, event: Event<DynamicObject>) -> bool {
        match event {
            Event::Init => {
                self.listing.clear();
                false
            }
            Event::InitApply(object) => {
                self.listing.insert(object.name_any(), object);
                false
            }
            Event::InitDone => {
                self.objects = std::mem::take(&mut self.listing);
                true
            }
            Event::Apply(object) => {
                self.objects.insert(object.name_any(), object);
                true
            }
            Event::Delete(object) => {
                self.objects.remove(&object.name_any());
                true
            }
        }
    }

    /// The route table of the current set; skipped bridges are logged when the skips
    /// change.
    pub fn table(&mut self) -> RouteTable {
        let (table, mut skipped) = RouteTable::build(self.objects.values());
        skipped.sort();
        if skipped != self.skipped {
            for skip in skipped.iter().filter(|skip| !self.skipped.contains(skip)) {
                tracing::warn!(bridge = %skip.bridge, reason = %skip.reason, "an ACTIVE bridge is not routed: its rules or port mappings do not parse");
            }
            self.skipped = skipped;
        }
        table
    }

    pub fn skipped(&self) -> usize {
        self.skipped.len()
    }
}

/// Watches the bridges labelled with `mount` in `namespace` for ever (retried with backoff),
/// publishing each new table on `tables`; `listed` turns true once the first list is in.
pub async fn follow(
    client: Client,
    namespace: &str,
    mount: &str,
    served: Vec<u16>,
    tables: watch::Sender<Arc<RouteTable>>,
    listed: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
) {
    let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &bridge_resource());
    let config = watcher::Config::default().labels(&format!("{BRIDGE_MOUNT_LABEL}={mount}"));
    let mut events = watch_objects(api, config)
        // A bridge's managedFields are nothing the router reads.
        .modify(|object| object.managed_fields_mut().clear())
        .default_backoff()
        .boxed();
    let mut bridges = Bridges::default();
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                if !bridges.apply(event) {
                    continue;
                }
                let table = bridges.table();
                for port in table.ports().filter(|port| !served.contains(port)) {
                    tracing::warn!(
                        port,
                        "a bridge maps a container port this router does not serve; its traffic there is not bridged"
                    );
                }
                metrics
                    .bridges
                    .set(i64::try_from(table.bridge_count()).unwrap_or(i64::MAX));
                metrics
                    .skipped_bridges
                    .set(i64::try_from(bridges.skipped()).unwrap_or(i64::MAX));
                tracing::info!(bridges = table.bridge_count(), "route table updated");
                tables.send_replace(Arc::new(table));
                listed.store(true, Ordering::Relaxed);
            }
            Err(error) => tracing::warn!(%error, "watching the GefyraBridges failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bridge(name: &str, header: &str) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "gefyra.dev/v1", "kind": "gefyrabridge",
            "metadata": {"name": name, "namespace": "gefyra", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "state": "ACTIVE", "portMappings": ["1:80"],
            "providerParameter": {"rules": [{"match": [{"matchHeader": {"name": "x", "value": header}}]}]},
        }))
        .expect("a bridge")
    }

    fn names(table: &RouteTable) -> Vec<String> {
        table
            .routes(80)
            .iter()
            .map(|route| route.bridge.to_string())
            .collect()
    }

    #[test]
    fn a_relist_replaces_the_set_only_when_done() {
        let mut bridges = Bridges::default();
        assert!(!bridges.apply(Event::Init));
        assert!(!bridges.apply(Event::InitApply(bridge("a", "a"))));
        assert!(bridges.apply(Event::InitDone));
        assert_eq!(names(&bridges.table()), ["a"]);
        assert!(bridges.apply(Event::Apply(bridge("b", "b"))));
        assert_eq!(names(&bridges.table()), ["a", "b"]);

        // A restarted watch: the old set stays until the new list is complete.
        assert!(!bridges.apply(Event::Init));
        assert!(!bridges.apply(Event::InitApply(bridge("c", "c"))));
        assert_eq!(names(&bridges.table()), ["a", "b"]);
        assert!(bridges.apply(Event::InitDone));
        assert_eq!(names(&bridges.table()), ["c"]);

        assert!(bridges.apply(Event::Delete(bridge("c", "c"))));
        assert!(names(&bridges.table()).is_empty());
    }

    #[test]
    fn skips_are_counted() {
        let mut bridges = Bridges::default();
        let mut broken = bridge("broken", "x");
        broken.data["portMappings"] = json!(["nope"]);
        bridges.apply(Event::Apply(broken));
        bridges.apply(Event::Apply(bridge("fine", "y")));
        assert_eq!(names(&bridges.table()), ["fine"]);
        assert_eq!(bridges.skipped(), 1);
    }
}
