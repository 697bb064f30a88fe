//! The bridges Stowaway knows, from the API: a watch of the GefyraBridges in its namespace
//! feeding a map name → `Bridge`. Only the fields authorization reads are kept, never the
//! objects (nor their managedFields).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use gefyra_api::bridge::{BRIDGE_KIND, BRIDGE_PLURAL};
use gefyra_api::client::{GROUP, VERSION};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;

use super::{Bridge, Destination, SERVED, port_mappings};

/// The fields of a GefyraBridge Stowaway reads (Gefyra 2.x's layout: top level, no spec).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Fields {
    state: Option<String>,
    client: Option<String>,
    #[serde(rename = "destinationIP")]
    destination_ip: Option<String>,
    port_mappings: Option<Vec<String>>,
}

impl Bridge {
    /// What a GefyraBridge's fields (an object without apiVersion, kind and metadata) say.
    pub fn of(data: &serde_json::Value) -> Self {
        let fields = match Fields::deserialize(data) {
            Ok(fields) => fields,
            // The CRD's schema types these fields; an object that still does not fit is
            // never served.
            Err(error) => {
                return Self {
                    active: false,
                    client: String::new(),
                    destination: Err(format!("its fields do not parse: {error}")),
                };
            }
        };
        Self {
            active: fields
                .state
                .as_deref()
                .is_some_and(|state| SERVED.contains(&state)),
            client: fields.client.unwrap_or_default(),
            destination: destination(
                fields.destination_ip.as_deref(),
                fields.port_mappings.as_deref().unwrap_or_default(),
            ),
        }
    }
}

fn destination(address: Option<&str>, mappings: &[String]) -> Result<Destination, String> {
    let text = address.ok_or("it has no destinationIP")?;
    let address = text
        .parse::<IpAddr>()
        .map_err(|_| format!("destinationIP {text:?} is not an IP address"))?
        .to_canonical();
    if address.is_ipv6() {
        return Err(format!(
            "destinationIP {address}: IPv6 destinations are not supported yet"
        ));
    }
    Ok(Destination {
        address,
        ports: port_mappings(mappings)?,
    })
}

/// How long a bridge is still served after it stopped being served (deleted, or out of
/// CREATING/ACTIVE): the routers follow the bridges by their own watches, and one that has
/// not yet seen the change still sends a connection or two; they reach the developer
/// instead of failing. The bridge's peer must still be there (the data plane checks).
pub const LINGER: Duration = Duration::from_secs(2);

/// One bridge as last seen, and what it was while it was served, if it stopped lately.
#[derive(Clone)]
struct Entry {
    /// `None` once deleted.
    bridge: Option<Bridge>,
    /// The last served version and when it stopped being served.
    lingering: Option<(Bridge, Instant)>,
}

impl Entry {
    fn served_at(&self, now: Instant) -> Option<Bridge> {
        if let Some(bridge) = self.bridge.as_ref().filter(|bridge| bridge.active) {
            return Some(bridge.clone());
        }
        if let Some((bridge, since)) = &self.lingering
            && now.saturating_duration_since(*since) < LINGER
        {
            return Some(bridge.clone());
        }
        self.bridge.clone()
    }

    /// `next` replaces what is known (`None`: deleted); a served bridge that stops being
    /// served lingers.
    fn change(&mut self, next: Option<Bridge>, now: Instant) {
        let was_served = self.bridge.as_ref().filter(|bridge| bridge.active).cloned();
        let served = next.as_ref().is_some_and(|bridge| bridge.active);
        if served {
            self.lingering = None;
        } else if let Some(previous) = was_served {
            self.lingering = Some((previous, now));
        }
        self.bridge = next;
    }

    fn gone_at(&self, now: Instant) -> bool {
        self.bridge.is_none()
            && self
                .lingering
                .as_ref()
                .is_none_or(|(_, since)| now.saturating_duration_since(*since) >= LINGER)
    }
}

/// The bridges as last seen, by name; shared by the watch and the listener.
#[derive(Clone, Default)]
pub struct Bridges(Arc<RwLock<HashMap<String, Entry>>>);

impl Bridges {
    pub fn get(&self, name: &str) -> Option<Bridge> {
        self.get_at(name, Instant::now())
    }

    fn get_at(&self, name: &str, now: Instant) -> Option<Bridge> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .and_then(|entry| entry.served_at(now))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Entry>> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn apply(
        &self,
        event: watcher::Event<DynamicObject>,
        listing: &mut Option<HashMap<String, Bridge>>,
    ) {
        self.apply_at(event, listing, Instant::now());
    }

    /// Applies one watch event; `listing` holds a relist until it is complete (then it
    /// replaces the map at once, so that bridges deleted meanwhile go, lingering if they
    /// were served).
    fn apply_at(
        &self,
        event: watcher::Event<DynamicObject>,
        listing: &mut Option<HashMap<String, Bridge>>,
        now: Instant,
    ) {
        match event {
            watcher::Event::Init => *listing = Some(HashMap::new()),
            watcher::Event::InitApply(object) => {
                let bridge = Bridge::of(&object.data);
                report(&object.name_any(), &bridge);
                listing
                    .get_or_insert_default()
                    .insert(object.name_any(), bridge);
            }
            watcher::Event::InitDone => {
                let mut listed = listing.take().unwrap_or_default();
                tracing::info!(bridges = listed.len(), "GefyraBridges listed");
                let mut bridges = self.write();
                for (name, entry) in bridges.iter_mut() {
                    entry.change(listed.remove(name), now);
                }
                for (name, bridge) in listed {
                    bridges.insert(
                        name,
                        Entry {
                            bridge: Some(bridge),
                            lingering: None,
                        },
                    );
                }
                bridges.retain(|_, entry| !entry.gone_at(now));
            }
            watcher::Event::Apply(object) => {
                let name = object.name_any();
                let bridge = Bridge::of(&object.data);
                let mut bridges = self.write();
                bridges.retain(|_, entry| !entry.gone_at(now));
                let entry = bridges.entry(name.clone()).or_insert(Entry {
                    bridge: None,
                    lingering: None,
                });
                if entry.bridge.as_ref() != Some(&bridge) {
                    report(&name, &bridge);
                    entry.change(Some(bridge), now);
                }
            }
            watcher::Event::Delete(object) => {
                let name = object.name_any();
                tracing::info!(bridge = %name, "GefyraBridge deleted: no longer served (after {}s for routers still sending)", LINGER.as_secs());
                let mut bridges = self.write();
                if let Some(entry) = bridges.get_mut(&name) {
                    entry.change(None, now);
                }
                bridges.retain(|_, entry| !entry.gone_at(now));
            }
        }
    }
}

/// Logs what a bridge now is (it changes seldom: created, made ACTIVE, deleted).
fn report(name: &str, bridge: &Bridge) {
    match &bridge.destination {
        Ok(destination) => tracing::info!(
            bridge = %name,
            client = %bridge.client,
            active = bridge.active,
            destination = %destination.address,
            ports = ?destination.ports,
            "GefyraBridge seen"
        ),
        Err(why) if bridge.active => tracing::warn!(
            bridge = %name,
            client = %bridge.client,
            "GefyraBridge is ACTIVE but not served: {why}"
        ),
        Err(why) => tracing::debug!(bridge = %name, "GefyraBridge not served (yet): {why}"),
    }
}

/// Keeps `bridges` equal to the GefyraBridges in `namespace` (the watch retried with
/// backoff).
pub async fn keep_bridges(client: Client, namespace: String, bridges: Bridges) {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, BRIDGE_KIND),
        BRIDGE_PLURAL,
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client, &namespace, &resource);
    let mut listing = None;
    watcher(api, watcher::Config::default())
        .default_backoff()
        .for_each(|event| {
            match event {
                Ok(event) => bridges.apply(event, &mut listing),
                Err(error) => {
                    tracing::warn!(%error, "watching GefyraBridges failed; retrying")
                }
            }
            futures::future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::bridges::PortMapping;

    fn object(name: &str, fields: serde_json::Value) -> DynamicObject {
        let mut object = json!({
            "apiVersion": "gefyra.dev/v1",
            "kind": "gefyrabridge",
            "metadata": {"name": name, "namespace": "gefyra"},
        });
        for (key, value) in fields.as_object().unwrap() {
            object[key] = value.clone();
        }
        serde_json::from_value(object).unwrap()
    }

    #[test]
    fn a_bridge_is_read_from_gefyras_wire_format() {
        let web = object(
            "b1",
            json!({
                "client": "dev",
                "destinationIP": "192.168.99.2",
                "portMappings": ["8080:80"],
                "state": "ACTIVE",
                "target": "deploy/web",
                "provider": "carrier2",
            }),
        );
        assert_eq!(
            Bridge::of(&web.data),
            Bridge {
                active: true,
                client: "dev".into(),
                destination: Ok(Destination {
                    address: "192.168.99.2".parse().unwrap(),
                    ports: vec![PortMapping {
                        local: 8080,
                        remote: 80
                    }],
                }),
            }
        );
        let requested = Bridge::of(&object("b2", json!({"client": "dev"})).data);
        assert!(!requested.active);
        assert!(requested.destination.is_err());
        for (fields, why) in [
            (
                json!({"destinationIP": "dev.local", "portMappings": ["1:1"]}),
                "not an IP",
            ),
            (
                json!({"destinationIP": "fd00::2", "portMappings": ["1:1"]}),
                "IPv6",
            ),
            (
                json!({"destinationIP": "192.168.99.2", "portMappings": ["80"]}),
                "<local port>:<container port>",
            ),
            (json!({"portMappings": "80:80"}), "do not parse"),
        ] {
            let bridge = Bridge::of(&object("b", fields).data);
            let error = bridge.destination.unwrap_err();
            assert!(error.contains(why), "{error}");
        }
        // An IPv4 address written as IPv6-mapped is the IPv4 address.
        let mapped = Bridge::of(
            &object(
                "b",
                json!({"destinationIP": "::ffff:192.168.99.2", "portMappings": ["1:1"]}),
            )
            .data,
        );
        assert_eq!(
            mapped.destination.unwrap().address,
            "192.168.99.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_map_follows_the_watch_and_a_relist_drops_what_is_gone() {
        let bridges = Bridges::default();
        let mut listing = None;
        let active = json!({"client": "dev", "destinationIP": "192.168.99.2", "portMappings": ["8080:80"], "state": "ACTIVE"});
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(object("b1", active.clone())),
            watcher::Event::InitApply(object("b2", active.clone())),
        ] {
            bridges.apply(event, &mut listing);
        }
        assert!(bridges.get("b1").is_none(), "served only once listed");
        bridges.apply(watcher::Event::InitDone, &mut listing);
        assert!(bridges.get("b1").is_some_and(|bridge| bridge.active));
        let mut error = active.clone();
        error["state"] = json!("ERROR");
        bridges.apply(watcher::Event::Apply(object("b1", error)), &mut listing);
        assert!(
            bridges.get("b1").is_some_and(|bridge| bridge.active),
            "a bridge that stopped being served is still served for a moment"
        );
        let later = || Instant::now() + LINGER + Duration::from_millis(100);
        assert!(
            bridges
                .get_at("b1", later())
                .is_some_and(|bridge| !bridge.active)
        );
        bridges.apply(
            watcher::Event::Delete(object("b2", active.clone())),
            &mut listing,
        );
        assert!(
            bridges.get("b2").is_some_and(|bridge| bridge.active),
            "lingers"
        );
        assert!(bridges.get_at("b2", later()).is_none());
        let mut creating = active.clone();
        creating["state"] = json!("CREATING");
        bridges.apply(watcher::Event::Apply(object("b4", creating)), &mut listing);
        assert!(
            bridges.get("b4").is_some_and(|bridge| bridge.active),
            "served from CREATING on, before routers send to it"
        );
        let mut requested = active.clone();
        requested["state"] = json!("REQUESTED");
        bridges.apply(watcher::Event::Apply(object("b5", requested)), &mut listing);
        assert!(bridges.get("b5").is_some_and(|bridge| !bridge.active));
        // A relist that no longer has b1 (deleted while the watch was down).
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(object("b3", active)),
        ] {
            bridges.apply(event, &mut listing);
        }
        assert!(bridges.get("b1").is_some(), "kept until the relist is done");
        bridges.apply(watcher::Event::InitDone, &mut listing);
        assert!(bridges.get_at("b1", later()).is_none());
        assert!(bridges.get("b3").is_some());
    }
}
