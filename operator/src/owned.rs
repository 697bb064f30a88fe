//! The objects a client owns (its ServiceAccounts, Roles and RoleBindings) as last seen by
//! the operator's watches: a server-side apply whose every field is already in place is
//! skipped, so a reconcile of a settled client (after a restart, a renewal check, a change
//! of an owned object) sends no writes.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::Value;

/// The watched caches of every kind a client owns.
#[derive(Clone)]
pub struct OwnedObjects {
    pub service_accounts: Store<ServiceAccount>,
    pub roles: Store<Role>,
    pub role_bindings: Store<RoleBinding>,
}

/// A kind a client owns, found in [`OwnedObjects`].
pub trait Owned: kube::Resource<DynamicType = ()> + Clone + 'static {
    fn store(owned: &OwnedObjects) -> &Store<Self>;
}

impl Owned for ServiceAccount {
    fn store(owned: &OwnedObjects) -> &Store<Self> {
        &owned.service_accounts
    }
}

impl Owned for Role {
    fn store(owned: &OwnedObjects) -> &Store<Self> {
        &owned.roles
    }
}

impl Owned for RoleBinding {
    fn store(owned: &OwnedObjects) -> &Store<Self> {
        &owned.role_bindings
    }
}

impl OwnedObjects {
    /// Whether every cache has been filled by its first list.
    pub fn ready(&self) -> bool {
        fn filled<K: Owned>(store: &Store<K>) -> bool {
            futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
        }
        filled(&self.service_accounts) && filled(&self.roles) && filled(&self.role_bindings)
    }

    /// The cached `K` named `name` in `namespace`, if it already holds every field of
    /// `desired` (see [`already_applied`]).
    pub fn in_place<K>(&self, namespace: &str, name: &str, desired: &K) -> Option<K>
    where
        K: Owned + serde::Serialize,
    {
        let cached = K::store(self).get(&ObjectRef::new(name).within(namespace))?;
        let desired = serde_json::to_value(desired).ok()?;
        let observed = serde_json::to_value(&*cached).ok()?;
        already_applied(&desired, &observed).then(|| (*cached).clone())
    }
}

/// Whether applying `desired` would change nothing in `observed`: every field `desired`
/// sets is present in `observed` with the same value (objects compared key by key, lists
/// element by element and of equal length, scalars by equality). Fields only `observed`
/// has (set by the API server or another manager) do not count: our apply leaves them alone.
pub fn already_applied(desired: &Value, observed: &Value) -> bool {
    match (desired, observed) {
        (Value::Object(desired), Value::Object(observed)) => desired.iter().all(|(key, value)| {
            observed
                .get(key)
                .is_some_and(|present| already_applied(value, present))
        }),
        (Value::Array(desired), Value::Array(observed)) => {
            desired.len() == observed.len()
                && desired
                    .iter()
                    .zip(observed)
                    .all(|(value, present)| already_applied(value, present))
        }
        (desired, observed) => desired == observed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_only_the_server_set_do_not_count() {
        let desired =
            json!({"metadata": {"name": "a", "labels": {"x": "1"}}, "rules": [{"verbs": ["get"]}]});
        let observed = json!({
            "metadata": {"name": "a", "uid": "u", "resourceVersion": "7", "labels": {"x": "1", "y": "2"}},
            "rules": [{"verbs": ["get"], "resourceNames": []}],
        });
        assert!(already_applied(&desired, &observed));
    }

    #[test]
    fn a_changed_missing_or_extra_element_counts() {
        let desired =
            json!({"rules": [{"verbs": ["get", "watch"]}], "metadata": {"labels": {"x": "1"}}});
        for observed in [
            json!({"rules": [{"verbs": ["get"]}], "metadata": {"labels": {"x": "1"}}}),
            json!({"rules": [{"verbs": ["get", "watch"]}], "metadata": {"labels": {"x": "2"}}}),
            json!({"rules": [{"verbs": ["get", "watch"]}], "metadata": {}}),
            json!({"rules": [{"verbs": ["get", "watch"]}, {"verbs": ["list"]}], "metadata": {"labels": {"x": "1"}}}),
            json!({"rules": "none", "metadata": {"labels": {"x": "1"}}}),
        ] {
            assert!(!already_applied(&desired, &observed), "{observed}");
        }
    }
}
