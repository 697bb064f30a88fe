//! What Stowaway may do in the API, as RBAC rules (`stowaway rbac` prints them with its
//! ServiceAccount, Role and RoleBinding).

use gefyra_api::bridge::BRIDGE_PLURAL;
use gefyra_api::ipam::SERVER_KEY_SECRET;
use gefyra_api::rbac::rule;
use k8s_openapi::api::rbac::v1::PolicyRule;

use crate::own_services::OWN_SERVICES;

/// Stowaway's rules: read the clients and the operator's decisions (tunnel-address claims,
/// the routes table by name), patch the clients' status, read its own key and its own
/// Services by name, read the bridges it serves.
pub fn stowaway_rules() -> Vec<PolicyRule> {
    vec![
        rule(
            "gefyra.dev",
            &["gefyraclients"],
            &[],
            &["get", "list", "watch"],
        ),
        rule("gefyra.dev", &["gefyraclients/status"], &[], &["patch"]),
        // The bridges whose connections it takes into their clients' tunnels.
        rule(
            "gefyra.dev",
            &[BRIDGE_PLURAL],
            &[],
            &["get", "list", "watch"],
        ),
        rule("", &["secrets"], &[SERVER_KEY_SECRET], &["get"]),
        // Its own Services by name: their addresses lead back to it, so peers never reach
        // them.
        rule("", &["services"], &OWN_SERVICES, &["get"]),
        rule(
            "coordination.k8s.io",
            &["leases"],
            &[],
            &["get", "list", "watch"],
        ),
        // The routes table's shards, named after the address space they cover (so not by
        // name; watched by label). The namespace's other ConfigMaps hold nothing secret.
        rule("", &["configmaps"], &[], &["get", "list", "watch"]),
    ]
}
