//! GefyraBridge and GefyraBridgeMount, served in Gefyra 2.x's wire layout (no `spec`, kinds
//! in lower case, Gefyra's short names) so that Gefyra's CLI can list a client's bridges.
//! Bridging itself is not implemented: the operator puts every bridge and bridge mount in
//! state ERROR with a reason saying so.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionNames, CustomResourceDefinitionSpec,
    CustomResourceDefinitionVersion, CustomResourceValidation, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use crate::client::{GROUP, VERSION};

pub const BRIDGE_KIND: &str = "gefyrabridge";
pub const BRIDGE_PLURAL: &str = "gefyrabridges";
pub const BRIDGE_MOUNT_KIND: &str = "gefyrabridgemount";
pub const BRIDGE_MOUNT_PLURAL: &str = "gefyrabridgemounts";
/// The label Gefyra's CLI selects a client's bridges by.
pub const CLIENT_LABEL: &str = "gefyra.dev/client";
/// The reason an ERROR bridge or bridge mount carries.
pub const NOT_SUPPORTED_REASON: &str = "BridgingNotSupported";
pub const NOT_SUPPORTED_MESSAGE: &str = "bridging is not supported by gefyra-operator yet: this object is kept as written and nothing is bridged; delete it";

fn open_object() -> Value {
    json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn text() -> Value {
    json!({"type": "string"})
}

/// The fields both kinds share: where they point, the lifecycle, the status.
fn common_properties() -> serde_json::Map<String, Value> {
    let mut properties = serde_json::Map::new();
    properties.insert("apiVersion".into(), text());
    properties.insert("kind".into(), text());
    properties.insert("metadata".into(), json!({"type": "object"}));
    properties.insert("targetNamespace".into(), text());
    properties.insert("target".into(), text());
    properties.insert("targetContainer".into(), text());
    properties.insert("providerParameter".into(), open_object());
    properties.insert("sunset".into(), text());
    properties.insert(
        "state".into(),
        json!({"type": "string", "default": "REQUESTED"}),
    );
    properties.insert("stateTransitions".into(), open_object());
    properties.insert("status".into(), open_object());
    properties
}

fn bridge_schema() -> Value {
    let mut properties = common_properties();
    properties.insert(
        "provider".into(),
        json!({"type": "string", "enum": ["carrier", "carrier2"]}),
    );
    properties.insert(
        "connectionProvider".into(),
        json!({"type": "string", "enum": ["stowaway"]}),
    );
    properties.insert("client".into(), text());
    properties.insert("destinationIP".into(), text());
    properties.insert(
        "portMappings".into(),
        json!({"type": "array", "default": [], "items": {"type": "string"}}),
    );
    properties.insert("clusterEndpoint".into(), open_object());
    json!({"type": "object", "properties": properties})
}

fn bridge_mount_schema() -> Value {
    let mut properties = common_properties();
    properties.insert("provider".into(), text());
    properties.insert(
        "missingGracePeriod".into(),
        json!({"type": "integer", "minimum": 0}),
    );
    json!({"type": "object", "properties": properties})
}

fn definition(
    kind: &str,
    plural: &str,
    short_names: [&str; 2],
    schema: Value,
) -> CustomResourceDefinition {
    let schema: JSONSchemaProps = serde_json::from_value(schema).expect("a valid JSONSchemaProps");
    CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(format!("{plural}.{GROUP}")),
            ..ObjectMeta::default()
        },
        spec: CustomResourceDefinitionSpec {
            group: GROUP.to_string(),
            names: CustomResourceDefinitionNames {
                kind: kind.to_string(),
                list_kind: Some(format!("{kind}List")),
                plural: plural.to_string(),
                singular: Some(kind.to_string()),
                short_names: Some(short_names.map(str::to_string).to_vec()),
                ..CustomResourceDefinitionNames::default()
            },
            scope: "Namespaced".to_string(),
            versions: vec![CustomResourceDefinitionVersion {
                name: VERSION.to_string(),
                served: true,
                storage: true,
                schema: Some(CustomResourceValidation {
                    open_api_v3_schema: Some(schema),
                }),
                ..CustomResourceDefinitionVersion::default()
            }],
            ..CustomResourceDefinitionSpec::default()
        },
        status: None,
    }
}

/// The CRDs `gefyrabridges.gefyra.dev` and `gefyrabridgemounts.gefyra.dev`.
pub fn crds() -> [CustomResourceDefinition; 2] {
    [
        definition(
            BRIDGE_KIND,
            BRIDGE_PLURAL,
            ["gbridge", "gbridges"],
            bridge_schema(),
        ),
        definition(
            BRIDGE_MOUNT_KIND,
            BRIDGE_MOUNT_PLURAL,
            ["gbridgemount", "gbridgemounts"],
            bridge_mount_schema(),
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
        yaml.push_str(&serde_yaml::to_string(crd).expect("a CRD serializes to YAML"));
    }
    yaml
}

/// The merge patch that puts a bridge or bridge mount in ERROR at `now` (RFC 3339), as
/// Gefyra records states, with the reason in its `status`.
pub fn refusal(now: &str) -> Value {
    json!({
        "state": "ERROR",
        "stateTransitions": {"ERROR": now},
        "status": {"reason": NOT_SUPPORTED_REASON, "message": NOT_SUPPORTED_MESSAGE},
    })
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
        let patch = refusal("2026-01-01T00:00:00.000000Z");
        assert_eq!(patch["state"], "ERROR");
        assert_eq!(patch["status"]["reason"], NOT_SUPPORTED_REASON);
    }
}
