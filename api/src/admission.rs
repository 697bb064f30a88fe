//! The trust boundary, enforced by the API server itself (a `ValidatingAdmissionPolicy`, no
//! webhook): a request made with a client's identity — its own ServiceAccount or its token
//! minter's — may change the client's `providerParameter` and nothing else. The client's
//! Role grants `patch` on its GefyraClient, and Gefyra's wire layout has no spec/status
//! split, so without this a client could rewrite its `sunset`, `state` or `providerConfig`.
//! Admins and the operator are not restricted.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MatchResources, NamedRuleWithOperations, ParamKind, ParamRef,
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    ValidatingAdmissionPolicyBindingSpec, ValidatingAdmissionPolicySpec, Validation,
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

/// [`MANAGED_FIELDS_BOUNDED`] for CREATE too (no `oldObject` then).
const MANAGED_FIELDS_BOUNDED_ON_ANY: &str = "(!has(object.metadata.managedFields) || (size(object.metadata.managedFields) <= (oldObject != null && has(oldObject.metadata.managedFields) ? size(oldObject.metadata.managedFields) : 0) + 1 && object.metadata.managedFields.all(entry, !has(entry.manager) || size(entry.manager) <= 128)))";

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
    denying_binding(policy_name(namespace), Some(in_namespace(namespace)))
}

/// The policy and its binding as YAML documents.
pub fn policy_yaml(namespace: &str) -> String {
    let mut yaml = String::new();
    yaml.push_str(&serde_saphyr::to_string(&policy(namespace)).expect("the policy serializes"));
    yaml.push_str("---\n");
    yaml.push_str(&serde_saphyr::to_string(&binding(namespace)).expect("the binding serializes"));
    for (policy, binding) in bridge_policies(namespace) {
        yaml.push_str("---\n");
        yaml.push_str(&serde_saphyr::to_string(&policy).expect("the policy serializes"));
        yaml.push_str("---\n");
        yaml.push_str(&serde_saphyr::to_string(&binding).expect("the binding serializes"));
    }
    yaml
}

/// The name of the policy (and binding) that lets a client identity create, see the fate of
/// and delete only its own GefyraBridges in `namespace`.
pub fn client_bridges_policy_name(namespace: &str) -> String {
    format!("gefyra-client-bridges-{namespace}")
}

/// The name of the policy (and binding) that admits a GefyraBridgeMount only for a
/// requester granted bridging in its target namespace.
pub fn mount_grant_policy_name(namespace: &str) -> String {
    format!("gefyra-bridge-mount-grants-{namespace}")
}

/// The name of the policy (and binding) that admits a GefyraBridge only for a requester
/// granted bridging in the target namespace of the mount it names.
pub fn bridge_grant_policy_name(namespace: &str) -> String {
    format!("gefyra-bridge-grants-{namespace}")
}

/// The fields of a GefyraBridge a client may set when it creates one and never change: the
/// operator's fields (state, status, endpoint) and, once created, where the bridge goes.
pub const BRIDGE_FIELDS_FIXED_FOR_CLIENTS: [&str; 9] = [
    "client",
    "destinationIP",
    "portMappings",
    "target",
    "providerParameter",
    "state",
    "stateTransitions",
    "status",
    "clusterEndpoint",
];

fn rule_for(resource: &str, operations: &[&str]) -> NamedRuleWithOperations {
    NamedRuleWithOperations {
        api_groups: Some(vec![GROUP.into()]),
        api_versions: Some(vec![VERSION.into()]),
        operations: Some(operations.iter().map(|op| op.to_string()).collect()),
        resources: Some(vec![resource.into()]),
        ..NamedRuleWithOperations::default()
    }
}

fn forbidden(expression: String, message: String) -> Validation {
    Validation {
        expression,
        message: Some(message),
        reason: Some("Forbidden".into()),
        ..Validation::default()
    }
}

/// CEL: the requester holds the bridging grant in namespace `namespace` (a CEL expression).
fn granted_in(namespace: &str) -> String {
    format!(
        "authorizer.group('{GROUP}').resource('{}').namespace({namespace}).check('{}').allowed()",
        crate::bridge::BRIDGE_PLURAL,
        crate::bridge::GRANT_VERB
    )
}

fn grant_refusal(what: &str, namespace: &str) -> String {
    format!(
        "'{what} in namespace ' + {namespace} + ' is not granted to ' + request.userInfo.username + ': an admin allows it with a RoleBinding of ClusterRole {} in that namespace (kubectl -n ' + {namespace} + ' create rolebinding ... --clusterrole={})'",
        crate::bridge::GRANT_CLUSTER_ROLE,
        crate::bridge::GRANT_CLUSTER_ROLE
    )
}

/// A client identity's bridges: it creates them for itself only (`client` and the
/// `gefyra.dev/client` label name it), never writes the operator's fields, changes nothing
/// of where a bridge goes once created, and deletes only its own.
pub fn client_bridges_policy(namespace: &str) -> ValidatingAdmissionPolicy {
    let requester = "request.userInfo.username.split(':')[3].substring(14)";
    let mut validations = vec![
        forbidden(
            format!("request.operation == 'CREATE' || oldObject.client == {requester}"),
            "a client may change and delete only its own GefyraBridges (whose client is its name)".into(),
        ),
        forbidden(
            format!(
                "request.operation == 'DELETE' || (object.client == {requester} && has(object.metadata.labels) && '{label}' in object.metadata.labels && object.metadata.labels['{label}'] == object.client)",
                label = crate::bridge::CLIENT_LABEL
            ),
            format!(
                "a client creates GefyraBridges for itself only: client and the label {} must be the client's own name",
                crate::bridge::CLIENT_LABEL
            ),
        ),
        forbidden(
            "request.operation != 'CREATE' || (!has(object.clusterEndpoint) && !has(object.status) && !has(object.stateTransitions) && (!has(object.state) || object.state == 'REQUESTED'))".into(),
            "state, stateTransitions, status and clusterEndpoint are the operator's: a client's new GefyraBridge leaves them out".into(),
        ),
    ];
    validations.extend(BRIDGE_FIELDS_FIXED_FOR_CLIENTS.iter().map(|field| {
        forbidden(
            format!("request.operation != 'UPDATE' || ({})", unchanged(field)),
            format!("{field} of a GefyraBridge does not change once created: delete the bridge and create another"),
        )
    }));
    validations.push(forbidden(
        format!(
            "request.operation != 'UPDATE' || ({})",
            unchanged("metadata.labels")
        ),
        "metadata.labels of a GefyraBridge do not change once created".into(),
    ));
    validations.push(forbidden(
        format!("request.operation == 'DELETE' || {MANAGED_FIELDS_BOUNDED_ON_ANY}"),
        "metadata.managedFields: a client's request may add one entry (its own) with a manager name of at most 128 characters".into(),
    ));
    fail_closed_policy(
        client_bridges_policy_name(namespace),
        rule_for(
            crate::bridge::BRIDGE_PLURAL,
            &["CREATE", "UPDATE", "DELETE"],
        ),
        None,
        Some(vec![MatchCondition {
            name: "made-with-a-client-identity".into(),
            expression: client_identity_condition(),
        }]),
        validations,
    )
}

/// Whoever creates a GefyraBridgeMount (or moves one to another namespace) holds the
/// bridging grant in its target namespace. An admin's own credentials hold every verb.
pub fn mount_grant_policy(namespace: &str) -> ValidatingAdmissionPolicy {
    let validation = Validation {
        expression: format!(
            "(request.operation == 'UPDATE' && object.targetNamespace == oldObject.targetNamespace) || {}",
            granted_in("object.targetNamespace")
        ),
        message_expression: Some(grant_refusal(
            "mounting workloads",
            "object.targetNamespace",
        )),
        reason: Some("Forbidden".into()),
        ..Validation::default()
    };
    fail_closed_policy(
        mount_grant_policy_name(namespace),
        rule_for(crate::bridge::BRIDGE_MOUNT_PLURAL, &["CREATE", "UPDATE"]),
        None,
        None,
        vec![validation],
    )
}

/// Whoever creates a GefyraBridge holds the bridging grant in the target namespace of the
/// mount it names. The mounts are the policy's params (each mount of the namespace is one;
/// only the one named matters), so the API server decides without the operator.
pub fn bridge_grant_policy(namespace: &str) -> ValidatingAdmissionPolicy {
    let validation = Validation {
        expression: format!(
            "params.metadata.name != object.target || (request.operation == 'UPDATE' && object.target == oldObject.target) || !has(params.targetNamespace) || {}",
            granted_in("params.targetNamespace")
        ),
        message_expression: Some(grant_refusal(
            "bridging workloads",
            "params.targetNamespace",
        )),
        reason: Some("Forbidden".into()),
        ..Validation::default()
    };
    fail_closed_policy(
        bridge_grant_policy_name(namespace),
        rule_for(crate::bridge::BRIDGE_PLURAL, &["CREATE", "UPDATE"]),
        Some(crate::bridge::BRIDGE_MOUNT_KIND),
        None,
        vec![validation],
    )
}

/// The name of the policy (and binding) that admits a GefyraBridge only to its own
/// client's tunnel address or routed subnet.
pub fn bridge_destination_policy_name(namespace: &str) -> String {
    format!("gefyra-bridge-destinations-{namespace}")
}

/// CEL: the operator has accepted the client's current `providerParameter` (its Ready
/// condition describes the object's generation, and it is connected). The subnet is written
/// by the client itself: one the operator refused, or has not looked at yet, is no range of
/// the client's.
const PARAMS_CONNECTION_ACCEPTED: &str = "has(params.state) && params.state == 'ACTIVE' && has(params.status) && has(params.status.conditions) && params.status.conditions.exists(c, c.type == 'Ready' && c.status == 'True' && has(c.observedGeneration) && c.observedGeneration == params.metadata.generation)";

/// A GefyraBridge's `destinationIP` is its client's tunnel address or in its routed subnet
/// (once the operator accepted it), whoever writes it: a bridge never reaches another client
/// or an arbitrary cluster address. The clients are the policy's params (only the one the
/// bridge names matters); a client not connected has no address yet, so its bridges wait
/// for its connection.
pub fn bridge_destination_policy(namespace: &str) -> ValidatingAdmissionPolicy {
    let address = "params.providerConfig['Interface.Address']";
    let subnet = "params.providerParameter.subnet";
    let validation = Validation {
        expression: format!(
            "params.metadata.name != object.client || (has(params.providerConfig) && 'Interface.Address' in params.providerConfig && {address} == object.destinationIP) || ({PARAMS_CONNECTION_ACCEPTED} && has(params.providerParameter) && has({subnet}) && isCIDR({subnet}) && isIP(object.destinationIP) && cidr({subnet}).containsIP(object.destinationIP))"
        ),
        message_expression: Some(
            "'destinationIP ' + object.destinationIP + ' is neither the tunnel address of client ' + object.client + ' nor in a routed subnet the operator accepted for it: a bridge reaches only its own client (connect first; gefyra bridge uses the container address in its own network)'".into(),
        ),
        reason: Some("Forbidden".into()),
        ..Validation::default()
    };
    fail_closed_policy(
        bridge_destination_policy_name(namespace),
        rule_for(crate::bridge::BRIDGE_PLURAL, &["CREATE", "UPDATE"]),
        Some(crate::client::KIND),
        None,
        vec![validation],
    )
}

/// A fail-closed policy named `name` matching `rule`, with the objects of kind `param_kind`
/// (group gefyra.dev) as params if any, for requests that meet `conditions`.
fn fail_closed_policy(
    name: String,
    rule: NamedRuleWithOperations,
    param_kind: Option<&str>,
    conditions: Option<Vec<MatchCondition>>,
    validations: Vec<Validation>,
) -> ValidatingAdmissionPolicy {
    ValidatingAdmissionPolicy {
        metadata: ObjectMeta {
            name: Some(name),
            ..ObjectMeta::default()
        },
        spec: Some(ValidatingAdmissionPolicySpec {
            failure_policy: Some("Fail".into()),
            param_kind: param_kind.map(|kind| ParamKind {
                api_version: Some(format!("{GROUP}/{VERSION}")),
                kind: Some(kind.into()),
            }),
            match_constraints: Some(MatchResources {
                resource_rules: Some(vec![rule]),
                ..MatchResources::default()
            }),
            match_conditions: conditions,
            validations: Some(validations),
            ..ValidatingAdmissionPolicySpec::default()
        }),
        status: None,
    }
}

/// A binding of policy `name` in `namespace` whose params are every object of the policy's
/// param kind in `namespace` (none found: nothing is refused for want of one).
fn binding_over_params(name: String, namespace: &str) -> ValidatingAdmissionPolicyBinding {
    let mut binding = denying_binding(name, Some(in_namespace(namespace)));
    binding.spec.param_ref = Some(ParamRef {
        namespace: Some(namespace.into()),
        selector: Some(LabelSelector::default()),
        parameter_not_found_action: Some("Allow".into()),
        ..ParamRef::default()
    });
    binding
}

fn in_namespace(namespace: &str) -> MatchResources {
    MatchResources {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                namespace.to_string(),
            )])),
            ..LabelSelector::default()
        }),
        ..MatchResources::default()
    }
}

/// The four bridge policies with their bindings, for the bridges and mounts of `namespace`.
pub fn bridge_policies(
    namespace: &str,
) -> Vec<(ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding)> {
    vec![
        (
            client_bridges_policy(namespace),
            denying_binding(
                client_bridges_policy_name(namespace),
                Some(in_namespace(namespace)),
            ),
        ),
        (
            mount_grant_policy(namespace),
            denying_binding(
                mount_grant_policy_name(namespace),
                Some(in_namespace(namespace)),
            ),
        ),
        (
            bridge_grant_policy(namespace),
            binding_over_params(bridge_grant_policy_name(namespace), namespace),
        ),
        (
            bridge_destination_policy(namespace),
            binding_over_params(bridge_destination_policy_name(namespace), namespace),
        ),
    ]
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

    #[test]
    fn the_four_bridge_policies_are_bound_denying_and_fail_closed() {
        let rendered = bridge_policies("team-a");
        let names: Vec<String> = rendered
            .iter()
            .map(|(policy, binding)| {
                let name = policy.metadata.name.clone().unwrap();
                let spec = policy.spec.as_ref().unwrap();
                assert_eq!(spec.failure_policy.as_deref(), Some("Fail"), "{name}");
                assert_eq!(binding.metadata.name.as_deref(), Some(name.as_str()));
                assert_eq!(binding.spec.policy_name, name);
                assert_eq!(binding.spec.validation_actions, ["Deny"], "{name}");
                let selected = binding
                    .spec
                    .match_resources
                    .as_ref()
                    .and_then(|m| m.namespace_selector.as_ref())
                    .and_then(|s| s.match_labels.as_ref())
                    .and_then(|labels| labels.get("kubernetes.io/metadata.name"));
                assert_eq!(selected.map(String::as_str), Some("team-a"), "{name}");
                // A policy with params is bound to them, and one without is not.
                assert_eq!(
                    spec.param_kind.is_some(),
                    binding.spec.param_ref.is_some(),
                    "{name}"
                );
                name
            })
            .collect();
        assert_eq!(
            names,
            [
                "gefyra-client-bridges-team-a",
                "gefyra-bridge-mount-grants-team-a",
                "gefyra-bridge-grants-team-a",
                "gefyra-bridge-destinations-team-a",
            ]
        );
        // The grants are checked against the mounts, the destinations against the clients:
        // every one of the namespace's, none found meaning nothing to check against.
        for ((policy, binding), kind) in rendered[2..]
            .iter()
            .zip(["gefyrabridgemount", "gefyraclient"])
        {
            let param_kind = policy.spec.as_ref().unwrap().param_kind.as_ref().unwrap();
            assert_eq!(param_kind.api_version.as_deref(), Some("gefyra.dev/v1"));
            assert_eq!(param_kind.kind.as_deref(), Some(kind));
            let param_ref = binding.spec.param_ref.as_ref().unwrap();
            assert_eq!(param_ref.namespace.as_deref(), Some("team-a"));
            assert_eq!(param_ref.selector, Some(LabelSelector::default()));
            assert_eq!(
                param_ref.parameter_not_found_action.as_deref(),
                Some("Allow")
            );
            assert_eq!(param_ref.name, None);
        }
        // A subnet counts only once the operator accepted it: the client writes it itself.
        let destinations = &rendered[3]
            .0
            .spec
            .as_ref()
            .unwrap()
            .validations
            .as_ref()
            .unwrap()[0];
        let (address, subnet) = destinations
            .expression
            .split_once("|| (has(params.state)")
            .unwrap();
        assert!(
            address.contains("params.providerConfig['Interface.Address'] == object.destinationIP")
        );
        assert!(subnet.contains("c.observedGeneration == params.metadata.generation"));
        assert!(
            subnet
                .contains("cidr(params.providerParameter.subnet).containsIP(object.destinationIP)")
        );
        let yaml = policy_yaml("team-a");
        for name in &names {
            assert_eq!(
                yaml.matches(&format!("name: {name}\n")).count(),
                2,
                "{name}"
            );
        }
    }
}
