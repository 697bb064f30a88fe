//! What the operator's identity may change in the webhook's configuration: its CA
//! (`webhooks[*].clientConfig.caBundle`), and nothing else. RBAC can grant `patch` on that
//! one ValidatingWebhookConfiguration but not on one field of it, and a whole `patch` would
//! let the operator's token send the API server's reviews elsewhere, widen the rules (to
//! Secrets, say) or make the webhook fail closed. This ValidatingAdmissionPolicy, enforced
//! by the API server, refuses every other change the operator's ServiceAccount makes to it
//! — and creating it (server-side apply creates with `patch` alone), which is the chart's.

use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MatchResources, NamedRuleWithOperations, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicySpec, Validation,
};
use kube::api::ObjectMeta;

use super::configuration::configuration_name;

/// The fields of each webhook the operator's identity may not change (`clientConfig`'s
/// `caBundle` is the one it may).
pub const KEPT_WEBHOOK_FIELDS: [&str; 11] = [
    "admissionReviewVersions",
    "clientConfig.url",
    "clientConfig.service",
    "failurePolicy",
    "matchConditions",
    "matchPolicy",
    "namespaceSelector",
    "objectSelector",
    "rules",
    "sideEffects",
    "timeoutSeconds",
];

/// The configuration's metadata the operator's identity may not change.
pub const KEPT_METADATA: [&str; 4] = ["labels", "annotations", "finalizers", "ownerReferences"];

/// The policy's name (and its binding's) for the install in `namespace`.
pub fn policy_name(namespace: &str) -> String {
    format!("{}-ca-only", configuration_name(namespace))
}

/// CEL: `path` below `new` and `old` is the same, present or absent alike.
fn same(new: &str, old: &str, path: &str) -> String {
    format!(
        "has({new}.{path}) == has({old}.{path}) && (!has({new}.{path}) || {new}.{path} == {old}.{path})"
    )
}

fn refusal(what: &str, configuration: &str) -> String {
    format!(
        "{what} of ValidatingWebhookConfiguration {configuration} may be changed only by an admin (the chart): the operator may change webhooks[*].clientConfig.caBundle and nothing else"
    )
}

fn validation(expression: String, message: String) -> Validation {
    Validation {
        expression,
        message: Some(message),
        reason: Some("Forbidden".into()),
        ..Validation::default()
    }
}

/// The validations, in order: not created by the operator; the same webhooks (names, in
/// order); then one per kept field, each refusal naming its field.
fn validations(configuration: &str) -> Vec<Validation> {
    let created = validation(
        "oldObject != null".into(),
        format!(
            "ValidatingWebhookConfiguration {configuration} is created by an admin (the chart), not by the operator"
        ),
    );
    // Webhooks compared in order, each list mapped in one pass (a cost linear in their
    // number); a field absent maps to [], present to [its value].
    let both = |mapped: &str| {
        format!(
            "oldObject == null || (has(object.webhooks) == has(oldObject.webhooks) && (!has(object.webhooks) || object.webhooks.map(w, {new}) == oldObject.webhooks.map(w, {new})))",
            new = mapped
        )
    };
    let webhooks = validation(
        both("w.name"),
        refusal(
            "the webhooks (their names, number and order)",
            configuration,
        ),
    );
    let fields = KEPT_WEBHOOK_FIELDS.iter().map(|field| {
        validation(
            both(&format!("has(w.{field}) ? [w.{field}] : []")),
            refusal(&format!("webhooks[*].{field}"), configuration),
        )
    });
    let metadata = KEPT_METADATA.iter().map(|field| {
        validation(
            format!(
                "oldObject == null || ({})",
                same("object.metadata", "oldObject.metadata", field)
            ),
            refusal(&format!("metadata.{field}"), configuration),
        )
    });
    std::iter::once(created)
        .chain(std::iter::once(webhooks))
        .chain(fields)
        .chain(metadata)
        .collect()
}

/// The policy for the install in `namespace`, whose operator runs as ServiceAccount
/// `operator_account` there.
pub fn policy(namespace: &str, operator_account: &str) -> ValidatingAdmissionPolicy {
    let configuration = configuration_name(namespace);
    ValidatingAdmissionPolicy {
        metadata: ObjectMeta {
            name: Some(policy_name(namespace)),
            ..ObjectMeta::default()
        },
        spec: Some(ValidatingAdmissionPolicySpec {
            failure_policy: Some("Fail".into()),
            match_constraints: Some(MatchResources {
                resource_rules: Some(vec![NamedRuleWithOperations {
                    api_groups: Some(vec!["admissionregistration.k8s.io".into()]),
                    api_versions: Some(vec!["*".into()]),
                    operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
                    resources: Some(vec!["validatingwebhookconfigurations".into()]),
                    resource_names: Some(vec![configuration.clone()]),
                    ..NamedRuleWithOperations::default()
                }]),
                ..MatchResources::default()
            }),
            match_conditions: Some(vec![MatchCondition {
                name: "made-by-the-operator".into(),
                expression: format!(
                    "request.userInfo.username == 'system:serviceaccount:{namespace}:{operator_account}'"
                ),
            }]),
            validations: Some(validations(&configuration)),
            ..ValidatingAdmissionPolicySpec::default()
        }),
        status: None,
    }
}

/// Binds the policy, denying what it refuses.
pub fn binding(namespace: &str) -> ValidatingAdmissionPolicyBinding {
    gefyra_api::admission::denying_binding(policy_name(namespace), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kept_field_has_its_own_refusal_and_only_the_operator_is_matched() {
        let policy = policy("gefyra", "gefyra-operator");
        let spec = policy.spec.unwrap();
        let validations = spec.validations.unwrap();
        assert_eq!(
            validations.len(),
            2 + KEPT_WEBHOOK_FIELDS.len() + KEPT_METADATA.len()
        );
        for field in KEPT_WEBHOOK_FIELDS {
            let found = validations
                .iter()
                .find(|v| {
                    v.message
                        .as_deref()
                        .unwrap()
                        .starts_with(&format!("webhooks[*].{field} "))
                })
                .unwrap_or_else(|| panic!("a validation for {field}"));
            assert!(
                found
                    .expression
                    .contains(&format!("has(w.{field}) ? [w.{field}] : []"))
            );
        }
        assert!(
            validations
                .iter()
                .all(|v| !v.expression.contains("caBundle")),
            "the CA is the operator's to change"
        );
        assert_eq!(
            spec.match_conditions.unwrap()[0].expression,
            "request.userInfo.username == 'system:serviceaccount:gefyra:gefyra-operator'"
        );
        let rules = spec.match_constraints.unwrap().resource_rules.unwrap();
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&["gefyra-client-subnets-gefyra".to_string()][..])
        );
        assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(binding("gefyra").spec.policy_name, policy_name("gefyra"));
    }
}
