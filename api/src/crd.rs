//! The GefyraClient CustomResourceDefinition, generated from the Rust types plus what a
//! schema derive cannot say: CEL rules, the `state` default, printer columns, the status
//! subresource.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceDefinitionNames,
    CustomResourceDefinitionSpec, CustomResourceDefinitionVersion, CustomResourceSubresources,
    CustomResourceValidation, JSONSchemaProps, ValidationRule,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use crate::client::{
    GROUP, GefyraClient, KIND, MAX_CONNECTION_AGE_SECONDS, MAX_NAME_LENGTH, PLURAL, VERSION,
};

/// RFC 3339 with a mandatory zone, as `sunset` must be written.
const RFC3339: &str = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$";

fn rule(
    rule: &str,
    message: &str,
    reason: Option<&str>,
    field_path: Option<&str>,
) -> ValidationRule {
    ValidationRule {
        rule: rule.to_string(),
        message: Some(message.to_string()),
        reason: reason.map(str::to_string),
        field_path: field_path.map(str::to_string),
        ..ValidationRule::default()
    }
}

fn schema() -> JSONSchemaProps {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(schemars::transform::AddNullable::default())
        .with_transform(kube_core::schema::StructuralSchemaRewriter)
        .with_transform(kube_core::schema::OptionalEnum)
        .into_generator();
    let mut value = serde_json::to_value(generator.into_root_schema_for::<GefyraClient>())
        .expect("the GefyraClient schema serializes");
    let root = value.as_object_mut().expect("the schema is an object");
    root.remove("title");
    let properties = root
        .get_mut("properties")
        .and_then(Value::as_object_mut)
        .expect("the schema has properties");
    properties.insert("apiVersion".into(), json!({"type": "string"}));
    properties.insert("kind".into(), json!({"type": "string"}));
    properties.insert("metadata".into(), json!({"type": "object"}));
    properties["state"]["default"] = json!("REQUESTED");
    // No `format: date-time`: CEL would type the field as a timestamp, and the rule below
    // gives the clearer message.
    properties["maxConnectionAge"]["minimum"] = json!(1);
    properties["maxConnectionAge"]["maximum"] = json!(MAX_CONNECTION_AGE_SECONDS);
    // CEL has no overloads for nullable scalars; these are omitted, never null.
    // What a client may ask for when it connects, and nothing else: the object is closed, so
    // the API server prunes any other key (a client cannot make the operator, Stowaway and
    // the webhook carry megabytes of its own keys). `subnet` defaults to '' (none): Gefyra's
    // CLI reads the subnet of every ACTIVE client when it picks its own and fails on one
    // without, so no client can leave it out, whatever it sends.
    let parameter = properties["providerParameter"]
        .as_object_mut()
        .expect("a property schema");
    parameter.remove("x-kubernetes-preserve-unknown-fields");
    properties["providerParameter"]["properties"] = json!({
        "subnet": {
            "type": "string",
            "default": "",
            "maxLength": 64,
            "description": "The range the client routes through the tunnel (CIDR), exclusive to it; empty: none (recorded so that Gefyra's CLI, which reads every ACTIVE client's subnet, can read it).",
            "x-kubernetes-validations": [{
                "rule": "self == '' || (isCIDR(self) && cidr(self).masked() == cidr(self))",
                "message": "subnet must be a network in CIDR notation, e.g. 172.20.0.0/16, or empty for none",
                "reason": "FieldValueInvalid"
            }]
        },
        "publicKey": {
            "type": "string",
            "maxLength": 64,
            "description": "The client's WireGuard public key (base64 of 32 bytes); its private key never leaves the client.",
            "x-kubernetes-validations": [{
                "rule": "self.matches('^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$')",
                "message": "publicKey must be a WireGuard public key: base64 of 32 bytes, as `wg pubkey` prints it",
                "reason": "FieldValueInvalid"
            }]
        }
    });
    for field in ["sunset", "maxConnectionAge", "providerParameter"] {
        properties[field]
            .as_object_mut()
            .expect("a property schema")
            .remove("nullable");
    }

    let mut schema: JSONSchemaProps =
        serde_json::from_value(value).expect("a valid JSONSchemaProps");
    schema.x_kubernetes_validations = Some(vec![
        rule(
            "self.provider == 'stowaway'",
            "provider must be 'stowaway', the only connection provider",
            Some("FieldValueInvalid"),
            Some(".provider"),
        ),
        rule(
            &format!(
                "!has(self.sunset) || self.sunset.matches('{}')",
                RFC3339.replace('\\', "\\\\")
            ),
            "sunset must be an RFC 3339 date-time with a zone, e.g. 2030-01-31T18:00:00Z",
            Some("FieldValueInvalid"),
            Some(".sunset"),
        ),
        rule(
            &format!("size(self.metadata.name) <= {MAX_NAME_LENGTH}"),
            &format!(
                "the client name may have at most {MAX_NAME_LENGTH} characters: it is a label value on the client's ServiceAccounts, Roles and RoleBindings"
            ),
            Some("FieldValueInvalid"),
            None,
        ),
        rule(
            &format!(
                "!has(self.maxConnectionAge) || (self.maxConnectionAge > 0 && self.maxConnectionAge <= {MAX_CONNECTION_AGE_SECONDS})"
            ),
            &format!(
                "maxConnectionAge is a number of seconds, greater than 0 and at most {MAX_CONNECTION_AGE_SECONDS} (a year)"
            ),
            Some("FieldValueInvalid"),
            Some(".maxConnectionAge"),
        ),
        ValidationRule {
            optional_old_self: Some(true),
            ..rule(
                "oldSelf.hasValue() || !has(self.providerParameter)",
                "providerParameter may not be set at creation: create the client, wait for state WAITING, then set providerParameter to connect",
                Some("FieldValueForbidden"),
                Some(".providerParameter"),
            )
        },
        rule(
            &format!(
                "oldSelf.state in ['WAITING', 'ACTIVE', 'ERROR'] || (has(self.providerParameter) == has(oldSelf.providerParameter) && (!has(self.providerParameter) || ({} == {} && {} == {})))",
                optional_text("self", "subnet"),
                optional_text("oldSelf", "subnet"),
                optional_text("self", "publicKey"),
                optional_text("oldSelf", "publicKey"),
            ),
            "providerParameter may change only while the client is WAITING, ACTIVE or ERROR; it is being set up or connected/disconnected right now, try again in a moment",
            Some("FieldValueForbidden"),
            Some(".providerParameter"),
        ),
    ]);
    schema
}

/// CEL: `object.providerParameter.field`, or '' when absent.
fn optional_text(object: &str, field: &str) -> String {
    format!("(has({object}.providerParameter.{field}) ? {object}.providerParameter.{field} : '')")
}

pub(crate) fn column(
    name: &str,
    type_: &str,
    json_path: &str,
    description: &str,
) -> CustomResourceColumnDefinition {
    CustomResourceColumnDefinition {
        name: name.to_string(),
        type_: type_.to_string(),
        json_path: json_path.to_string(),
        description: Some(description.to_string()),
        ..CustomResourceColumnDefinition::default()
    }
}

/// A namespaced CRD of group `gefyra.dev` in Gefyra's naming (the singular is the kind)
/// with one served and stored `version`.
pub(crate) fn definition(
    kind: &str,
    plural: &str,
    short_names: &[&str],
    version: CustomResourceDefinitionVersion,
) -> CustomResourceDefinition {
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
                short_names: Some(short_names.iter().map(|name| name.to_string()).collect()),
                ..CustomResourceDefinitionNames::default()
            },
            scope: "Namespaced".to_string(),
            versions: vec![version],
            ..CustomResourceDefinitionSpec::default()
        },
        status: None,
    }
}

/// Version `v1`, served and stored, validated by `schema`.
pub(crate) fn version(schema: JSONSchemaProps) -> CustomResourceDefinitionVersion {
    CustomResourceDefinitionVersion {
        name: VERSION.to_string(),
        served: true,
        storage: true,
        schema: Some(CustomResourceValidation {
            open_api_v3_schema: Some(schema),
        }),
        ..CustomResourceDefinitionVersion::default()
    }
}

/// The CRD `gefyraclients.gefyra.dev`.
pub fn crd() -> CustomResourceDefinition {
    definition(
        KIND,
        PLURAL,
        &["gclients", "gclient"],
        CustomResourceDefinitionVersion {
            subresources: Some(CustomResourceSubresources {
                status: Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceSubresourceStatus(
                    serde_json::Map::new().into(),
                )),
                ..CustomResourceSubresources::default()
            }),
            additional_printer_columns: Some(vec![
                    column("State", "string", ".state", "The lifecycle state"),
                    column("Address", "string", ".providerConfig.Interface\\.Address", "The client's tunnel address"),
                    column("Subnet", "string", ".providerParameter.subnet", "The client's routed range"),
                    column("Handshake", "date", ".status.wireguard.latest_handshake", "The latest WireGuard handshake"),
                    column("Age", "date", ".metadata.creationTimestamp", "Time since creation"),
                ]),
            ..version(schema())
        },
    )
}

/// The CRD as the YAML committed in `crds/`.
pub fn crd_yaml() -> String {
    let mut yaml =
        String::from("# Generated by `gefyra-operator crd` from api/src; do not edit.\n");
    yaml.push_str(&serde_saphyr::to_string(&crd()).expect("the CRD serializes to YAML"));
    yaml
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_crd_matches_the_rust_types() {
        let committed = include_str!("../../crds/gefyraclients.yaml");
        assert!(
            committed == super::crd_yaml(),
            "crds/gefyraclients.yaml is stale: run `make generate` and commit the result"
        );
    }
}
