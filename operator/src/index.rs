//! Lookups by a value read off each watched object — a client's public key, the client a
//! claim belongs to — kept from the same watch events as a reflector's store. kube's
//! [`Store`](kube::runtime::reflector::Store) finds objects by name only; a scan of every
//! cached object in each reconcile costs a fleet of N clients N² on a restart (89 s for
//! 10,000 settled clients).
//!
//! An index is a hint: callers read what it names from the store and check it there. It is
//! fed each event just before its store, so that it is filled when the store says it is
//! ready; a moment ahead of the store is the same as reading the store a moment later.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::RwLock;

use kube::runtime::reflector::{Lookup, ObjectRef};
use kube::runtime::watcher::Event;

/// The objects of kind `K` by the value `read` finds in each (at most one per object).
pub struct Index<K: Lookup, V> {
    read: fn(&K) -> Option<V>,
    state: RwLock<State<K, V>>,
}

struct State<K: Lookup, V> {
    /// Each indexed object's value, as last seen.
    values: HashMap<ObjectRef<K>, V>,
    /// The objects that hold each value.
    holders: HashMap<V, HashSet<ObjectRef<K>>>,
    /// A relist under way: the values it has shown so far, swapped in when it is done (as
    /// the store does), so that a relist drops what was deleted while the watch was down.
    relist: HashMap<ObjectRef<K>, V>,
}

impl<K, V> Index<K, V>
where
    K: Lookup<DynamicType = ()> + Clone,
    V: Hash + Eq + Clone,
{
    pub fn new(read: fn(&K) -> Option<V>) -> Self {
        Self {
            read,
            state: RwLock::new(State {
                values: HashMap::new(),
                holders: HashMap::new(),
                relist: HashMap::new(),
            }),
        }
    }

    /// Follows one watch event (the same events the store is given).
    pub fn apply(&self, event: &Event<K>) {
        let mut state = self.state.write().expect("not poisoned");
        match event {
            Event::Apply(object) => {
                let key = ObjectRef::from_obj(object);
                state.remove(&key);
                if let Some(value) = (self.read)(object) {
                    state.insert(key, value);
                }
            }
            Event::Delete(object) => state.remove(&ObjectRef::from_obj(object)),
            Event::Init => state.relist = HashMap::new(),
            Event::InitApply(object) => {
                let key = ObjectRef::from_obj(object);
                match (self.read)(object) {
                    Some(value) => state.relist.insert(key, value),
                    None => state.relist.remove(&key),
                };
            }
            Event::InitDone => {
                let listed = std::mem::take(&mut state.relist);
                state.values = HashMap::new();
                state.holders = HashMap::new();
                for (key, value) in listed {
                    state.insert(key, value);
                }
            }
        }
    }

    /// The objects whose value is `value`.
    pub fn holders<Q>(&self, value: &Q) -> Vec<ObjectRef<K>>
    where
        V: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let state = self.state.read().expect("not poisoned");
        state
            .holders
            .get(value)
            .map(|holders| holders.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl<K: Lookup<DynamicType = ()>, V: Hash + Eq + Clone> State<K, V> {
    fn insert(&mut self, key: ObjectRef<K>, value: V) {
        self.holders
            .entry(value.clone())
            .or_default()
            .insert(key.clone());
        self.values.insert(key, value);
    }

    fn remove(&mut self, key: &ObjectRef<K>) {
        let Some(value) = self.values.remove(key) else {
            return;
        };
        if let Some(holders) = self.holders.get_mut(&value) {
            holders.remove(key);
            if holders.is_empty() {
                self.holders.remove(&value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::ObjectMeta;
    use proptest::prelude::*;

    use super::*;

    /// A ConfigMap named `name` whose label `value` is the indexed value, if any.
    fn object(name: &str, value: Option<u8>) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("gefyra".into()),
                labels: value.map(|value| BTreeMap::from([("value".into(), value.to_string())])),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    fn index() -> Index<ConfigMap, String> {
        Index::new(|object: &ConfigMap| object.metadata.labels.as_ref()?.get("value").cloned())
    }

    fn names(index: &Index<ConfigMap, String>, value: u8) -> Vec<String> {
        let mut names: Vec<_> = index
            .holders(&value.to_string())
            .into_iter()
            .map(|key| key.name)
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_changed_value_moves_its_object_and_a_deleted_object_leaves() {
        let index = index();
        index.apply(&Event::Apply(object("a", Some(1))));
        index.apply(&Event::Apply(object("b", Some(1))));
        assert_eq!(names(&index, 1), ["a", "b"]);
        index.apply(&Event::Apply(object("a", Some(2))));
        assert_eq!(names(&index, 1), ["b"]);
        assert_eq!(names(&index, 2), ["a"]);
        index.apply(&Event::Apply(object("b", None)));
        index.apply(&Event::Delete(object("a", Some(2))));
        assert!(names(&index, 1).is_empty() && names(&index, 2).is_empty());
    }

    #[test]
    fn a_relist_replaces_everything_once_it_is_done() {
        let index = index();
        index.apply(&Event::Apply(object("gone", Some(1))));
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(object("kept", Some(1))));
        // Until the relist is done, the index shows what it showed before.
        assert_eq!(names(&index, 1), ["gone"]);
        index.apply(&Event::InitDone);
        assert_eq!(names(&index, 1), ["kept"]);
    }

    /// One watch event on objects o0..o4 with values 0..3 (or none).
    fn event() -> impl Strategy<Value = Event<ConfigMap>> {
        let object = (0..5u8, proptest::option::of(0..4u8))
            .prop_map(|(name, value)| object(&format!("o{name}"), value));
        prop_oneof![
            4 => object.clone().prop_map(Event::Apply),
            2 => object.clone().prop_map(Event::Delete),
            1 => Just(Event::Init),
            2 => object.prop_map(Event::InitApply),
            1 => Just(Event::InitDone),
        ]
    }

    proptest! {
        /// Whatever the events, the index names exactly the objects a scan of the store
        /// (fed the same events) finds with each value.
        #[test]
        fn the_index_agrees_with_a_scan_of_the_store(events in proptest::collection::vec(event(), 0..60)) {
            let index = index();
            let (store, mut writer) = kube::runtime::reflector::store::<ConfigMap>();
            for event in &events {
                writer.apply_watcher_event(event);
                index.apply(event);
            }
            for value in 0..4u8 {
                let mut scanned: Vec<String> = store
                    .state()
                    .iter()
                    .filter(|object| {
                        object.metadata.labels.as_ref().and_then(|labels| labels.get("value"))
                            == Some(&value.to_string())
                    })
                    .map(|object| object.metadata.name.clone().unwrap_or_default())
                    .collect();
                scanned.sort();
                prop_assert_eq!(names(&index, value), scanned);
            }
        }
    }
}
