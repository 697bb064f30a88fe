//! The trust boundary, enforced by the API server itself (a `ValidatingAdmissionPolicy`, no
//! webhook): a request made with a client's identity — its own ServiceAccount or its token
//! minter's — may change the client's `providerParameter` and nothing else. The client's
//! Role grants `patch` on its GefyraClient, and Gefyra's wire layout has no spec/status
//! split, so without this a client could rewrite its `sunset`, `state` or `providerConfig`.
//! Admins and the operator are not restricted.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MatchResources, NamedRuleWithOperations, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicyBindingSpec,
    ValidatingAdmissionPolicySpec, Validation,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use crate::client::{ACCESS_IDENTITY_PREFIX, GROUP, MINTER_IDENTITY_PREFIX, PLURAL, VERSION};

/// The fields of a GefyraClient only an admin or the operator may change (everything but
/// `providerParameter`, `apiVersion`/`kind` and what the API server maintains itself).
pub const PROTECTED_FIELDS: [&str; 9] = [
    "provider",
    "state",
    "stateTransitions",
    "providerConfig",
    "serviceAccountName",
    "serviceAccountData",
    "sunset",
    "maxConnectionAge",
    "status",
];

/// The metadata a client may not change: who owns the object, what selects it, what must
/// happen before it goes.
pub const PROTECTED_METADATA: [&str; 4] =
    ["labels", "annotations", "finalizers", "ownerReferences"];

/// The name of the policy and of its binding for clients in `namespace` (one per install).
pub fn policy_name(namespace: &str) -> String {
    format!("gefyra-client-fields-{namespace}")
}

/// CEL: the request is made with a client's identity (in any namespace).
pub fn client_identity_condition() -> String {
    format!(
        "request.userInfo.username.matches('^system:serviceaccount:[^:]+:({}|{})')",
        ACCESS_IDENTITY_PREFIX, MINTER_IDENTITY_PREFIX
    )
}

/// CEL: `path` (below `object` and `oldObject`) is unchanged, present or absent alike.
fn unchanged(path: &str) -> String {
    let (parent, field) = path.rsplit_once('.').map_or(("", path), |(p, f)| (p, f));
    let at = |root: &str| match parent {
        "" => format!("{root}.{field}"),
        parent => format!("{root}.{parent}.{field}"),
    };
    format!(
        "has({new}) == has({old}) && (!has({new}) || {new} == {old})",
        new = at("object"),
        old = at("oldObject")
    )
}

/// CEL: a request adds at most one `metadata.managedFields` entry (its own manager's) with a
/// manager name of at most 128 characters. A client may send `managedFields` itself; CEL
/// cannot look inside an entry's `fieldsV1`, so its one entry is bounded by the API server's
/// object size, and the operator and Stowaway keep no client's managedFields in memory.
const MANAGED_FIELDS_BOUNDED: &str = "!has(object.metadata.managedFields) || (size(object.metadata.managedFields) <= (has(oldObject.metadata.managedFields) ? size(oldObject.metadata.managedFields) : 0) + 1 && object.metadata.managedFields.all(entry, !has(entry.manager) || size(entry.manager) <= 128))";

fn refusal(field: &str) -> String {
    format!(
        "{field} may be changed only by an admin or the operator: a client may change providerParameter and nothing else"
    )
}

/// The policy: one validation per protected field, each refusal naming its field.
pub fn policy(namespace: &str) -> ValidatingAdmissionPolicy {
    let fields = PROTECTED_FIELDS
        .iter()
        .map(|field| (field.to_string(), field.to_string()))
        .chain(
            PROTECTED_METADATA
                .iter()
                .map(|field| (format!("metadata.{field}"), format!("metadata.{field}"))),
        );
    let validations = fields
        .map(|(path, field)| Validation {
            expression: unchanged(&path),
            message: Some(refusal(&field)),
            reason: Some("Forbidden".into()),
            ..Validation::default()
        })
        .chain([Validation {
            expression: MANAGED_FIELDS_BOUNDED.into(),
            message: Some("metadata.managedFields: a client's request may add one entry (its own) with a manager name of at most 128 characters".into()),
            reason: Some("Forbidden".into()),
            ..Validation::default()
        }])
        .collect();
    ValidatingAdmissionPolicy {
        metadata: ObjectMeta {
            name: Some(policy_name(namespace)),
            ..ObjectMeta::default()
        },
        spec: Some(ValidatingAdmissionPolicySpec {
            failure_policy: Some("Fail".into()),
            match_constraints: Some(MatchResources {
                resource_rules: Some(vec![NamedRuleWithOperations {
                    api_groups: Some(vec![GROUP.into()]),
                    api_versions: Some(vec![VERSION.into()]),
                    operations: Some(vec!["UPDATE".into()]),
                    resources: Some(vec![PLURAL.into(), format!("{PLURAL}/status")]),
                    ..NamedRuleWithOperations::default()
                }]),
                ..MatchResources::default()
            }),
            match_conditions: Some(vec![MatchCondition {
                name: "made-with-a-client-identity".into(),
                expression: client_identity_condition(),
            }]),
            validations: Some(validations),
            ..ValidatingAdmissionPolicySpec::default()
        }),
        status: None,
    }
}

/// A binding of policy `name` (named as it is) that denies what the policy refuses, in what
/// `match_resources` selects (`None`: wherever the policy matches).
pub fn denying_binding(
    name: String,
    match_resources: Option<MatchResources>,
) -> ValidatingAdmissionPolicyBinding {
    ValidatingAdmissionPolicyBinding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        spec: ValidatingAdmissionPolicyBindingSpec {
            policy_name: name,
            validation_actions: vec!["Deny".into()],
            match_resources,
            ..ValidatingAdmissionPolicyBindingSpec::default()
        },
    }
}

/// Binds the policy to the GefyraClients of `namespace`, denying what it refuses.
pub fn binding(namespace: &str) -> ValidatingAdmissionPolicyBinding {
    denying_binding(
        policy_name(namespace),
        Some(MatchResources {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    namespace.to_string(),
                )])),
                ..LabelSelector::default()
            }),
            ..MatchResources::default()
        }),
    )
}

/// The policy and its binding as YAML documents.
pub fn policy_yaml(namespace: &str) -> String {
    let mut yaml = String::new();
    yaml.push_str(&serde_saphyr::to_string(&policy(namespace)).expect("the policy serializes"));
    yaml.push_str("---\n");
    yaml.push_str(&serde_saphyr::to_string(&binding(namespace)).expect("the binding serializes"));
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_protected_field_has_a_rule_naming_it() {
        let policy = policy("gefyra");
        let validations = policy.spec.unwrap().validations.unwrap();
        assert_eq!(
            validations.len(),
            PROTECTED_FIELDS.len() + PROTECTED_METADATA.len() + 1
        );
        assert_eq!(
            validations[0].expression,
            "has(object.provider) == has(oldObject.provider) && (!has(object.provider) || object.provider == oldObject.provider)"
        );
        assert_eq!(
            validations[validations.len() - 2].expression,
            "has(object.metadata.ownerReferences) == has(oldObject.metadata.ownerReferences) && (!has(object.metadata.ownerReferences) || object.metadata.ownerReferences == oldObject.metadata.ownerReferences)"
        );
        assert!(
            validations[6]
                .message
                .as_deref()
                .unwrap()
                .starts_with("sunset may be changed only by an admin")
        );
        assert!(
            !validations
                .iter()
                .any(|v| v.expression.contains("providerParameter"))
        );
    }

    #[test]
    fn only_client_identities_are_matched() {
        assert_eq!(
            client_identity_condition(),
            "request.userInfo.username.matches('^system:serviceaccount:[^:]+:(gefyra-client-|gefyra-minter-)')"
        );
        let binding = binding("team-a");
        assert_eq!(
            binding.metadata.name.as_deref(),
            Some("gefyra-client-fields-team-a")
        );
        assert_eq!(binding.spec.policy_name, "gefyra-client-fields-team-a");
    }
}
