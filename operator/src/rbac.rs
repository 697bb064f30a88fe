//! The operator's own permissions: a namespaced Role in the namespace it manages, and
//! nothing cluster-wide. It must hold every permission it grants to clients (the API server
//! refuses to let it create a Role granting more, since it has no `escalate` or `bind`).
//! `gefyra-operator rbac` prints these objects; the chart renders the same rules.

use gefyra_api::bridge::{BRIDGE_MOUNT_PLURAL, BRIDGE_PLURAL};
use gefyra_api::rbac::{documents_yaml, identity_yaml, meta, rule, with_type_meta};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};

use crate::allocator::SERVER_KEY_SECRET;
use crate::credentials::MANAGED_BY;

/// Every rule the operator needs in its namespace, for a Lease named `lease_name`.
pub fn operator_rules(lease_name: &str) -> Vec<PolicyRule> {
    vec![
        // Watch and drive clients; `list` and `watch` are also granted onward to clients.
        rule(
            "gefyra.dev",
            &["gefyraclients"],
            &[],
            &["get", "list", "watch", "patch", "update", "delete"],
        ),
        rule(
            "gefyra.dev",
            &["gefyraclients/status"],
            &[],
            &["get", "patch", "update"],
        ),
        // Bridges and mounts: driven (a mount's finalizer; a vanished laptop's bridge
        // deleted, a deleted mount's bridges too); `get`, `list`, `watch`, `create` and
        // `delete` on bridges are also granted onward to clients.
        rule(
            "gefyra.dev",
            &[BRIDGE_PLURAL, BRIDGE_MOUNT_PLURAL],
            &[],
            &[
                "get",
                "list",
                "watch",
                "create",
                "patch",
                "update",
                "delete",
                "deletecollection",
            ],
        ),
        // Granted onward to clients in gefyra-compat mode: Gefyra's CLI waits for a
        // bridge's `Ready` Event.
        rule("", &["events"], &[], &["get", "list", "watch"]),
        // Stowaway's bridge port, which the routers are told (its cluster IP), by name.
        rule("", &["services"], &[STOWAWAY_BRIDGES_SERVICE], &["get"]),
        // Each client's identity.
        rule(
            "",
            &["serviceaccounts"],
            &[],
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        rule("", &["serviceaccounts/token"], &[], &["create"]),
        rule(
            "rbac.authorization.k8s.io",
            &["roles", "rolebindings"],
            &[],
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        // The API server's CA for client files; the routes table's shards (named after the
        // address space they cover, so not by name): changed by compare-and-swap, watched
        // so that an idle sweep asks nothing, deleted when they hold no route (and the old
        // single table once moved).
        rule(
            "",
            &["configmaps"],
            &[],
            &["get", "list", "watch", "create", "update", "delete"],
        ),
        // The Stowaway server's key pair: created once, then only read, by name.
        rule("", &["secrets"], &[], &["create"]),
        rule("", &["secrets"], &[SERVER_KEY_SECRET], &["get"]),
        // The subnet webhook's certificate (gefyra-compat mode): renewed by compare-and-swap.
        rule(
            "",
            &["secrets"],
            &[crate::webhook::TLS_SECRET],
            &["get", "update"],
        ),
        rule("events.k8s.io", &["events"], &[], &["create", "patch"]),
        // Tunnel-address claims are Leases named after their address (any name in the
        // pool); leader election uses one more. Creating cannot be limited by name.
        rule(
            "coordination.k8s.io",
            &["leases"],
            &[],
            &["get", "list", "watch", "create", "delete"],
        ),
        rule(
            "coordination.k8s.io",
            &["leases"],
            &[lease_name],
            &["get", "update", "patch"],
        ),
    ]
}

/// The one cluster-scoped permission, for the subnet webhook only (gefyra-compat mode):
/// publishing the CA of its certificate in its own ValidatingWebhookConfiguration.
pub fn webhook_rules(configuration: &str) -> Vec<PolicyRule> {
    vec![rule(
        "admissionregistration.k8s.io",
        &["validatingwebhookconfigurations"],
        &[configuration],
        &["get", "patch"],
    )]
}

/// The chart's Service for Stowaway's bridge port.
pub const STOWAWAY_BRIDGES_SERVICE: &str = "gefyra-stowaway-bridges";

/// What the operator needs in a namespace where bridging is enabled: read the workload,
/// switch its Services, run the router with an identity of its own, and ask the API server
/// whether a client holds the bridging grant there. It never writes the workload's Pods.
pub fn bridging_rules() -> Vec<PolicyRule> {
    vec![
        rule(
            "apps",
            &["deployments"],
            &[],
            &[
                "get", "list", "watch", "create", "patch", "update", "delete",
            ],
        ),
        rule("apps", &["statefulsets"], &[], &["get"]),
        rule("", &["pods"], &[], &["get"]),
        rule(
            "",
            &["services"],
            &[],
            &[
                "get", "list", "watch", "create", "patch", "update", "delete",
            ],
        ),
        rule(
            "",
            &["serviceaccounts"],
            &[],
            &["get", "create", "patch", "delete"],
        ),
        rule(
            "authorization.k8s.io",
            &["localsubjectaccessreviews"],
            &[],
            &["create"],
        ),
    ]
}

/// A router's identity (bound by the operator, in the operator's namespace): read bridges.
pub fn carrier_rules() -> Vec<PolicyRule> {
    vec![rule(
        "gefyra.dev",
        &[BRIDGE_PLURAL],
        &[],
        &["get", "list", "watch"],
    )]
}

/// The grant an admin binds in a namespace to let a client (or anyone) bridge there.
pub fn grant_rules() -> Vec<PolicyRule> {
    vec![rule(
        "gefyra.dev",
        &[BRIDGE_PLURAL],
        &[],
        &[gefyra_api::bridge::GRANT_VERB],
    )]
}

/// The operator's ServiceAccount, Role and RoleBinding, all named `name`, then the Role the
/// routers' identities are bound to (`gefyra-carrier`) and the ClusterRole of the bridging
/// grant (`gefyra-bridge`, bound only by admins), as one YAML stream.
pub fn operator_rbac_yaml(name: &str, namespace: &str, lease_name: &str) -> String {
    let mut yaml = identity_yaml(name, namespace, MANAGED_BY, operator_rules(lease_name));
    let carrier = Role {
        metadata: meta(
            crate::bridging::mount::CARRIER_ROLE,
            namespace,
            "gefyra-carrier",
        ),
        rules: Some(carrier_rules()),
    };
    let mut grant_meta = meta(gefyra_api::bridge::GRANT_CLUSTER_ROLE, "", MANAGED_BY);
    grant_meta.namespace = None;
    let grant = ClusterRole {
        metadata: grant_meta,
        rules: Some(grant_rules()),
        ..ClusterRole::default()
    };
    yaml.push_str("---\n");
    yaml.push_str(&documents_yaml(&[
        with_type_meta(&carrier, "rbac.authorization.k8s.io/v1", "Role"),
        with_type_meta(&grant, "rbac.authorization.k8s.io/v1", "ClusterRole"),
    ]));
    yaml
}

/// The operator's rights for bridging: a Role and RoleBinding named `name` in `target`
/// (`Some`), or a ClusterRole and ClusterRoleBinding (`None`, cluster-wide), bound to the
/// operator's ServiceAccount `name` in `namespace`.
pub fn bridging_rbac_yaml(name: &str, namespace: &str, target: Option<&str>) -> String {
    let subject = Subject {
        kind: "ServiceAccount".into(),
        name: name.to_string(),
        namespace: Some(namespace.to_string()),
        ..Subject::default()
    };
    let role_name = format!("{name}-bridging");
    let documents = match target {
        Some(target) => vec![
            with_type_meta(
                &Role {
                    metadata: meta(&role_name, target, MANAGED_BY),
                    rules: Some(bridging_rules()),
                },
                "rbac.authorization.k8s.io/v1",
                "Role",
            ),
            with_type_meta(
                &RoleBinding {
                    metadata: meta(&role_name, target, MANAGED_BY),
                    role_ref: RoleRef {
                        api_group: Some("rbac.authorization.k8s.io".into()),
                        kind: "Role".into(),
                        name: role_name.clone(),
                    },
                    subjects: Some(vec![subject]),
                },
                "rbac.authorization.k8s.io/v1",
                "RoleBinding",
            ),
        ],
        None => {
            let mut cluster_meta = meta(&role_name, "", MANAGED_BY);
            cluster_meta.namespace = None;
            vec![
                with_type_meta(
                    &ClusterRole {
                        metadata: cluster_meta.clone(),
                        rules: Some(bridging_rules()),
                        ..ClusterRole::default()
                    },
                    "rbac.authorization.k8s.io/v1",
                    "ClusterRole",
                ),
                with_type_meta(
                    &ClusterRoleBinding {
                        metadata: cluster_meta,
                        role_ref: RoleRef {
                            api_group: Some("rbac.authorization.k8s.io".into()),
                            kind: "ClusterRole".into(),
                            name: role_name.clone(),
                        },
                        subjects: Some(vec![subject]),
                    },
                    "rbac.authorization.k8s.io/v1",
                    "ClusterRoleBinding",
                ),
            ]
        }
    };
    documents_yaml(&documents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::{ClientRbac, role};
    use gefyra_api::GefyraClient;

    fn covers(rules: &[PolicyRule], wanted: &PolicyRule) -> bool {
        let names = wanted.resource_names.clone().unwrap_or_default();
        wanted.verbs.iter().all(|verb| {
            rules.iter().any(|rule| {
                rule.api_groups == wanted.api_groups
                    && wanted
                        .resources
                        .iter()
                        .flatten()
                        .all(|resource| rule.resources.iter().flatten().any(|r| r == resource))
                    && rule.verbs.contains(verb)
                    && rule.resource_names.as_ref().is_none_or(|allowed| {
                        !names.is_empty() && names.iter().all(|name| allowed.contains(name))
                    })
            })
        })
    }

    #[test]
    fn the_operator_holds_everything_it_grants_and_cannot_escalate() {
        let rules = operator_rules("lease");
        let client: GefyraClient = serde_json::from_value(serde_json::json!({
            "apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
            "metadata": {"name": "abc", "namespace": "gefyra", "uid": "uid"},
            "provider": "stowaway"
        }))
        .unwrap();
        for rbac in [ClientRbac::Minimal, ClientRbac::GefyraCompat] {
            let mut granted_rules = role(&client, rbac).rules.unwrap();
            granted_rules.extend(crate::credentials::minter_role(&client).rules.unwrap());
            for granted in granted_rules {
                assert!(covers(&rules, &granted), "operator lacks {granted:?}");
            }
        }
        // The routers' Role is bound by the operator: it must hold what it grants.
        for granted in carrier_rules() {
            assert!(covers(&rules, &granted), "operator lacks {granted:?}");
        }
        for rule in rules.iter().chain(&bridging_rules()) {
            for verb in ["escalate", "bind", "impersonate", "*"] {
                assert!(!rule.verbs.iter().any(|v| v == verb), "{rule:?}");
            }
            assert!(!rule.resources.iter().flatten().any(|r| r == "*"));
            // Secrets: create; read (the server key) or renew (the webhook's certificate)
            // only by name; never list or watch.
            if rule.resources.iter().flatten().any(|r| r == "secrets") {
                let by_name = rule.resource_names.is_some();
                let read_or_renew = rule.verbs.iter().all(|v| v == "get" || v == "update");
                assert!(
                    rule.verbs == ["create"] || (by_name && read_or_renew),
                    "{rule:?}"
                );
            }
        }
    }

    #[test]
    fn rbac_yaml_is_three_namespaced_objects() {
        let yaml = operator_rbac_yaml("gefyra-operator", "gefyra", "lease");
        let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
        let kinds: Vec<_> = documents
            .iter()
            .map(|d| d["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "Role",
                "RoleBinding",
                "Role",
                "ClusterRole"
            ]
        );
        assert!(
            documents[..4]
                .iter()
                .all(|d| d["metadata"]["namespace"] == "gefyra")
        );
        assert_eq!(documents[4]["metadata"]["name"], "gefyra-bridge");
        assert_eq!(documents[4]["rules"][0]["verbs"][0], "bridge");
    }
}
