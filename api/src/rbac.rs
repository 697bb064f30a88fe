//! A component's own identity as plain objects: a ServiceAccount, a namespaced Role with
//! its rules and the RoleBinding between them. The operator and Stowaway print theirs
//! (`rbac` subcommands); the chart renders the same rules.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// One rule; an empty `names` means every object of the resources.
pub fn rule(group: &str, resources: &[&str], names: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |items: &[&str]| items.iter().map(|item| item.to_string()).collect();
    PolicyRule {
        api_groups: Some(vec![group.to_string()]),
        resources: Some(strings(resources)),
        resource_names: (!names.is_empty()).then(|| strings(names)),
        verbs: strings(verbs),
        ..PolicyRule::default()
    }
}

/// Labelled `app.kubernetes.io/name: <app>`, not `managed-by`: these objects are installed
/// for the component, not by it.
pub fn meta(name: &str, namespace: &str, app: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/name".to_string(),
            app.to_string(),
        )])),
        ..ObjectMeta::default()
    }
}

/// The ServiceAccount, Role (with `rules`) and RoleBinding, all named `name`, as one YAML
/// stream.
pub fn identity_yaml(name: &str, namespace: &str, app: &str, rules: Vec<PolicyRule>) -> String {
    let account = ServiceAccount {
        metadata: meta(name, namespace, app),
        ..ServiceAccount::default()
    };
    let role = Role {
        metadata: meta(name, namespace, app),
        rules: Some(rules),
    };
    let binding = RoleBinding {
        metadata: meta(name, namespace, app),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: name.to_string(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: name.to_string(),
            namespace: Some(namespace.to_string()),
            ..Subject::default()
        }]),
    };
    let documents = [
        with_type_meta(&account, "v1", "ServiceAccount"),
        with_type_meta(&role, "rbac.authorization.k8s.io/v1", "Role"),
        with_type_meta(&binding, "rbac.authorization.k8s.io/v1", "RoleBinding"),
    ];
    documents_yaml(&documents)
}

/// Objects (with their type meta) as one YAML stream.
pub fn documents_yaml(documents: &[serde_json::Value]) -> String {
    documents
        .iter()
        .map(|document| serde_saphyr::to_string(document).expect("RBAC objects serialize"))
        .collect::<Vec<_>>()
        .join("---\n")
}

pub fn with_type_meta(
    object: &impl serde::Serialize,
    api_version: &str,
    kind: &str,
) -> serde_json::Value {
    let mut value = serde_json::to_value(object).expect("RBAC objects serialize");
    value["apiVersion"] = api_version.into();
    value["kind"] = kind.into();
    value
}
