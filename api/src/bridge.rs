//! GefyraBridge and GefyraBridgeMount in Gefyra 2.x's wire layout (no `spec`, kinds in lower
//! case, Gefyra's short names, states in Gefyra's order), so that Gefyra's CLI creates,
//! lists and waits for them as it does against Gefyra's operator.
//!
//! A mount names a workload (`deployment/web` in namespace `demo`); the operator puts a
//! router (`gefyra-carrier`) in front of its Pods. A bridge sends the requests of a mount
//! that match its rules (or, without rules, every connection of its ports) through its
//! client's tunnel to `destinationIP`. The schemas bound everything a client writes: the API
//! server refuses a bad regex, too many rules or a malformed port mapping with a message.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion, JSONSchemaProps,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::bridge_rules::{
    MAX_HEADER_NAME_LEN, MAX_MATCHES_PER_RULE, MAX_PATH_LEN, MAX_PORT_MAPPINGS, MAX_REGEX_LEN,
    MAX_RULES, MAX_VALUE_LEN,
};
use crate::crd::{self, column};

pub const BRIDGE_KIND: &str = "gefyrabridge";
pub const BRIDGE_PLURAL: &str = "gefyrabridges";
pub const BRIDGE_MOUNT_KIND: &str = "gefyrabridgemount";
pub const BRIDGE_MOUNT_PLURAL: &str = "gefyrabridgemounts";
/// The label Gefyra's CLI selects a client's bridges by (equal to the bridge's `client`).
pub const CLIENT_LABEL: &str = "gefyra.dev/client";
/// The label Gefyra's CLI selects a mount's bridges by (equal to the bridge's `target`).
pub const MOUNT_LABEL: &str = "gefyra.dev/bridge-mount";
/// The label of a mount's router Pods, which the workload's Services select while mounted.
pub const CARRIER_LABEL: &str = "gefyra.dev/carrier";
/// The RBAC verb (on `gefyrabridges`) whose grant in a namespace lets its holder mount and
/// bridge workloads there; the chart's ClusterRole [`GRANT_CLUSTER_ROLE`] holds it.
pub const GRANT_VERB: &str = "bridge";
/// The ClusterRole an admin binds (with a RoleBinding in a namespace) to allow bridging there.
pub const GRANT_CLUSTER_ROLE: &str = "gefyra-bridge";
/// The longest mount and bridge name: names are label values.
pub const MAX_NAME_LENGTH: usize = 63;
/// The mount's own provider (Gefyra 2's name for it).
pub const MOUNT_PROVIDER: &str = "carrier2mount";

/// A GefyraBridgeMount's states, in Gefyra's order.
pub const MOUNT_STATES: [&str; 8] = [
    "REQUESTED",
    "PREPARING",
    "INSTALLING",
    "ACTIVE",
    "RESTORING",
    "ERROR",
    "MISSING",
    "TERMINATED",
];
/// A GefyraBridge's states, in Gefyra's order.
pub const BRIDGE_STATES: [&str; 8] = [
    "REQUESTED",
    "INSTALLING",
    "INSTALLED",
    "CREATING",
    "ACTIVE",
    "RESTORING",
    "ERROR",
    "TERMINATING",
];

/// What the operator reads of a GefyraBridgeMount (unknown fields are ignored).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct MountFields {
    pub target_namespace: String,
    pub target: String,
    pub target_container: Option<String>,
    pub provider: Option<String>,
    pub provider_parameter: Option<Value>,
    pub state: Option<String>,
}

/// What the operator, Stowaway and the router read of a GefyraBridge.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct BridgeFields {
    pub client: String,
    #[serde(rename = "destinationIP")]
    pub destination_ip: String,
    pub port_mappings: Vec<String>,
    /// The mount's name.
    pub target: String,
    pub provider_parameter: Option<Value>,
    pub sunset: Option<String>,
    pub state: Option<String>,
}

/// A workload reference as Gefyra writes it: `deployment/web`, `sts/db`, `po/x`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    Pod,
}

/// `kind/name` of a mount's `target`, or why not.
pub fn workload(target: &str) -> Result<(WorkloadKind, &str), String> {
    let (kind, name) = target.split_once('/').ok_or_else(|| {
        format!("target {target:?} is not KIND/NAME (deployment/NAME, statefulset/NAME, pod/NAME)")
    })?;
    let kind = match kind {
        "deployment" | "deploy" => WorkloadKind::Deployment,
        "statefulset" | "sts" => WorkloadKind::StatefulSet,
        "pod" | "po" => WorkloadKind::Pod,
        other => {
            return Err(format!(
                "target kind {other:?} cannot be mounted: use deployment, statefulset or pod"
            ));
        }
    };
    if name.is_empty() {
        return Err(format!("target {target:?} names no workload"));
    }
    Ok((kind, name))
}

const TARGET_PATTERN: &str =
    "^(deployment|deploy|statefulset|sts|pod|po)/[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$";
const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";
/// An HTTP header name (RFC 9110 token).
const HEADER_NAME_PATTERN: &str = "^[!#$%&'*+.^_`|~0-9A-Za-z-]+$";

fn text(max_length: usize) -> Value {
    json!({"type": "string", "maxLength": max_length})
}

fn optional_text(max_length: usize) -> Value {
    json!({"type": "string", "maxLength": max_length, "nullable": true})
}

fn open_object() -> Value {
    json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn validation(rule: &str, message: &str) -> Value {
    json!({"rule": rule, "message": message})
}

/// CEL: a `regex` value compiles (an invalid pattern makes both sides fail to evaluate, so
/// the API server refuses the object and quotes the parse error).
fn regex_compiles(field: &str, path: &str) -> Value {
    validation(
        &format!(
            "!has(self.type) || self.type != 'regex' || (size(self.{field}) <= {MAX_REGEX_LEN} && (''.matches(self.{field}) || !''.matches(self.{field})))"
        ),
        &format!(
            "{path}.{field}: a regex of at most {MAX_REGEX_LEN} characters that compiles (RE2 syntax)"
        ),
    )
}

fn match_type() -> Value {
    json!({"type": "string", "enum": ["exact", "prefix", "regex"], "default": "exact"})
}

/// `providerParameter.rules` as Gefyra's CLI writes them, bounded.
fn rules_schema() -> Value {
    // With type regex the name is a regex too (carrier2's behaviour), else a header name.
    let header = json!({
        "type": "object",
        "required": ["name", "value"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": MAX_HEADER_NAME_LEN},
            "value": text(MAX_VALUE_LEN),
            "type": match_type(),
        },
        "x-kubernetes-validations": [
            validation(
                &format!("(has(self.type) && self.type == 'regex') || self.name.matches(\"{HEADER_NAME_PATTERN}\")"),
                "matchHeader.name: an HTTP header name (letters, digits and !#$%&'*+.^_`|~-) unless type is regex",
            ),
            regex_compiles("name", "matchHeader"),
            regex_compiles("value", "matchHeader"),
        ],
    });
    let path = json!({
        "type": "object",
        "required": ["path"],
        "properties": {
            "path": text(MAX_PATH_LEN),
            "type": match_type(),
        },
        "x-kubernetes-validations": [regex_compiles("path", "matchPath")],
    });
    json!({
        "type": "array",
        "maxItems": MAX_RULES,
        "items": {
            "type": "object",
            "required": ["match"],
            "properties": {
                "match": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_MATCHES_PER_RULE,
                    "items": {
                        "type": "object",
                        "minProperties": 1,
                        "maxProperties": 1,
                        "properties": {"matchHeader": header, "matchPath": path},
                    },
                },
            },
        },
    })
}

fn port_mappings_schema() -> Value {
    json!({
        "type": "array",
        "default": [],
        "maxItems": MAX_PORT_MAPPINGS,
        "items": {"type": "string", "maxLength": 11, "pattern": "^[0-9]{1,5}:[0-9]{1,5}$"},
        "x-kubernetes-validations": [
            validation(
                "self.all(m, int(m.split(':')[0]) >= 1 && int(m.split(':')[0]) <= 65535 && int(m.split(':')[1]) >= 1 && int(m.split(':')[1]) <= 65535)",
                "portMappings: each is LOCAL:REMOTE (the port on the developer's side, then the workload's container port), both 1-65535",
            ),
            validation(
                "self.all(a, self.filter(b, int(b.split(':')[1]) == int(a.split(':')[1])).size() == 1)",
                "portMappings: each remote (container) port at most once",
            ),
        ],
    })
}

fn states_schema(states: &[&str]) -> Value {
    json!({"type": "string", "enum": states, "default": "REQUESTED"})
}

/// The fields both kinds share.
fn common_properties(states: &[&str]) -> serde_json::Map<String, Value> {
    let mut properties = serde_json::Map::new();
    properties.insert("apiVersion".into(), json!({"type": "string"}));
    properties.insert("kind".into(), json!({"type": "string"}));
    properties.insert("metadata".into(), json!({"type": "object"}));
    properties.insert("sunset".into(), optional_text(64));
    properties.insert("state".into(), states_schema(states));
    properties.insert("stateTransitions".into(), open_object());
    properties.insert("status".into(), open_object());
    properties
}

fn name_rule() -> Value {
    validation(
        &format!("size(self.metadata.name) <= {MAX_NAME_LENGTH}"),
        &format!("metadata.name: at most {MAX_NAME_LENGTH} characters (it is a label value)"),
    )
}

fn bridge_schema() -> Value {
    let mut properties = common_properties(&BRIDGE_STATES);
    properties.insert(
        "provider".into(),
        json!({"type": "string", "enum": ["carrier", "carrier2"], "default": "carrier2"}),
    );
    properties.insert(
        "connectionProvider".into(),
        json!({"type": "string", "enum": ["stowaway"], "default": "stowaway"}),
    );
    properties.insert(
        "providerParameter".into(),
        json!({"type": "object", "nullable": true, "properties": {"rules": rules_schema()}}),
    );
    properties.insert("client".into(), text(MAX_NAME_LENGTH));
    properties.insert(
        "destinationIP".into(),
        json!({
            "type": "string",
            "maxLength": 15,
            "x-kubernetes-validations": [validation(
                "isIP(self) && ip(self).family() == 4",
                "destinationIP: an IPv4 address of the client's tunnel or routed subnet",
            )],
        }),
    );
    properties.insert("portMappings".into(), port_mappings_schema());
    properties.insert("target".into(), text(MAX_NAME_LENGTH));
    properties.insert("targetNamespace".into(), optional_text(63));
    properties.insert("targetContainer".into(), optional_text(63));
    properties.insert("handleProbes".into(), json!({"type": "boolean"}));
    properties.insert("clusterEndpoint".into(), open_object());
    json!({
        "type": "object",
        "required": ["client", "destinationIP", "target"],
        "properties": properties,
        "x-kubernetes-validations": [name_rule()],
    })
}

fn bridge_mount_schema() -> Value {
    let mut properties = common_properties(&MOUNT_STATES);
    properties.insert(
        "provider".into(),
        json!({"type": "string", "enum": [MOUNT_PROVIDER], "default": MOUNT_PROVIDER}),
    );
    properties.insert("providerParameter".into(), open_object());
    properties.insert(
        "target".into(),
        json!({"type": "string", "maxLength": 264, "pattern": TARGET_PATTERN}),
    );
    properties.insert(
        "targetNamespace".into(),
        json!({"type": "string", "maxLength": 63, "pattern": DNS_LABEL_PATTERN}),
    );
    properties.insert(
        "targetContainer".into(),
        json!({"type": "string", "maxLength": 63, "nullable": true}),
    );
    properties.insert(
        "missingGracePeriod".into(),
        json!({"type": "integer", "minimum": 0}),
    );
    json!({
        "type": "object",
        "required": ["target", "targetNamespace"],
        "properties": properties,
        "x-kubernetes-validations": [name_rule()],
    })
}

fn version(
    schema: Value,
    columns: Vec<(&str, &str, &str, &str)>,
) -> CustomResourceDefinitionVersion {
    let schema: JSONSchemaProps = serde_json::from_value(schema).expect("a valid JSONSchemaProps");
    CustomResourceDefinitionVersion {
        additional_printer_columns: Some(
            columns
                .into_iter()
                .map(|(name, type_, path, description)| column(name, type_, path, description))
                .collect(),
        ),
        ..crd::version(schema)
    }
}

/// The CRDs `gefyrabridges.gefyra.dev` and `gefyrabridgemounts.gefyra.dev`.
pub fn crds() -> [CustomResourceDefinition; 2] {
    [
        crd::definition(
            BRIDGE_KIND,
            BRIDGE_PLURAL,
            &["gbridge", "gbridges"],
            version(
                bridge_schema(),
                vec![
                    (
                        "Client",
                        "string",
                        ".client",
                        "The client the traffic goes to",
                    ),
                    (
                        "Mount",
                        "string",
                        ".target",
                        "The GefyraBridgeMount bridged",
                    ),
                    (
                        "Destination",
                        "string",
                        ".destinationIP",
                        "Where on the client's side",
                    ),
                    (
                        "Ports",
                        "string",
                        ".portMappings",
                        "LOCAL:REMOTE port mappings",
                    ),
                    ("State", "string", ".state", "The lifecycle state"),
                    (
                        "Reason",
                        "string",
                        ".status.reason",
                        "Why the state is what it is",
                    ),
                    (
                        "Age",
                        "date",
                        ".metadata.creationTimestamp",
                        "Time since creation",
                    ),
                ],
            ),
        ),
        crd::definition(
            BRIDGE_MOUNT_KIND,
            BRIDGE_MOUNT_PLURAL,
            &["gbridgemount", "gbridgemounts"],
            version(
                bridge_mount_schema(),
                vec![
                    (
                        "Namespace",
                        "string",
                        ".targetNamespace",
                        "The workload's namespace",
                    ),
                    ("Target", "string", ".target", "The workload mounted"),
                    (
                        "Container",
                        "string",
                        ".targetContainer",
                        "The container bridged",
                    ),
                    ("State", "string", ".state", "The lifecycle state"),
                    (
                        "Reason",
                        "string",
                        ".status.reason",
                        "Why the state is what it is",
                    ),
                    (
                        "Age",
                        "date",
                        ".metadata.creationTimestamp",
                        "Time since creation",
                    ),
                ],
            ),
        ),
    ]
}

/// Both CRDs as the YAML committed in `crds/`.
pub fn crds_yaml() -> String {
    let mut yaml =
        String::from("# Generated by `gefyra-operator crd --bridges` from api/src; do not edit.\n");
    for (index, crd) in crds().iter().enumerate() {
        if index > 0 {
            yaml.push_str("---\n");
        }
        yaml.push_str(&serde_saphyr::to_string(crd).expect("a CRD serializes to YAML"));
    }
    yaml
}

/// The merge patch that enters `state` at `now` (RFC 3339, as Gefyra records states), having
/// passed through `passed` (states recorded at the same time, in Gefyra's order), with
/// `reason` and `message` in `status`.
pub fn enter(state: &str, passed: &[&str], now: &str, reason: &str, message: &str) -> Value {
    let mut transitions = serde_json::Map::new();
    for state in passed.iter().chain([&state]) {
        transitions.insert((*state).to_string(), json!(now));
    }
    json!({
        "state": state,
        "stateTransitions": transitions,
        "status": {"reason": reason, "message": message},
    })
}

/// A short stable suffix for names derived from a longer one (FNV-1a, 8 hex digits).
pub fn name_hash(name: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    format!("{hash:08x}")
}

/// A DNS label `{prefix}-{mount}` of at most 63 characters: the mount's name cut, with a
/// hash of the whole so that cut names stay apart.
fn derived_name(prefix: &str, mount: &str) -> String {
    let clean: String = mount
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    let whole = format!("{prefix}-{clean}");
    if clean == mount && whole.len() <= 63 {
        return whole;
    }
    let keep = 63 - prefix.len() - 2 - 8;
    let cut: String = clean.chars().take(keep).collect();
    format!("{prefix}-{}-{}", cut.trim_matches('-'), name_hash(mount))
}

/// The router Deployment (and its ServiceAccount) of mount `mount`, in the target namespace.
pub fn router_name(mount: &str) -> String {
    derived_name("gefyra-carrier", mount)
}

/// The Service that reaches the original Pods of mount `mount` while its router is in front.
pub fn original_service_name(mount: &str) -> String {
    derived_name("gefyra-original", mount)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crds_match_the_rust_definitions() {
        let committed = include_str!("../../crds/gefyrabridges.yaml");
        assert!(
            committed == crds_yaml(),
            "crds/gefyrabridges.yaml is stale: run `make generate` and commit the result"
        );
    }

    #[test]
    fn kinds_and_short_names_are_gefyras() {
        let [bridge, mount] = crds();
        assert_eq!(bridge.spec.names.kind, "gefyrabridge");
        assert_eq!(
            bridge.spec.names.short_names.unwrap(),
            ["gbridge", "gbridges"]
        );
        assert_eq!(
            mount.metadata.name.as_deref(),
            Some("gefyrabridgemounts.gefyra.dev")
        );
    }

    #[test]
    fn states_are_entered_like_gefyra_records_them() {
        let patch = enter(
            "ACTIVE",
            &["INSTALLING"],
            "2026-01-01T00:00:00.000000Z",
            "Ready",
            "routed",
        );
        assert_eq!(patch["state"], "ACTIVE");
        assert_eq!(
            patch["stateTransitions"]["INSTALLING"],
            "2026-01-01T00:00:00.000000Z"
        );
        assert_eq!(patch["status"]["reason"], "Ready");
    }

    #[test]
    fn workloads_are_read_in_gefyras_notation() {
        assert_eq!(
            workload("deploy/web"),
            Ok((WorkloadKind::Deployment, "web"))
        );
        assert_eq!(workload("sts/db"), Ok((WorkloadKind::StatefulSet, "db")));
        assert_eq!(workload("po/x"), Ok((WorkloadKind::Pod, "x")));
        assert!(
            workload("cronjob/x")
                .unwrap_err()
                .contains("cannot be mounted")
        );
        assert!(workload("web").is_err());
        assert!(workload("pod/").is_err());
    }

    #[test]
    fn derived_names_are_dns_labels_apart_when_cut() {
        assert_eq!(router_name("web"), "gefyra-carrier-web");
        let long_a = format!("{}a", "x".repeat(62));
        let long_b = format!("{}b", "x".repeat(62));
        let (a, b) = (router_name(&long_a), router_name(&long_b));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert!(original_service_name(&long_a).len() <= 63);
        let dotted = router_name("web.v2");
        assert!(dotted.starts_with("gefyra-carrier-web-v2-"), "{dotted}");
        assert_ne!(dotted, router_name("web-v2"));
    }
}
