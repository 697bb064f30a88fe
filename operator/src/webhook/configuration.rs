//! The ValidatingWebhookConfiguration that sends the API server's reviews to the webhook,
//! and what the chart installs with it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, RuleWithOperations, ServiceReference, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding, ValidatingWebhook, ValidatingWebhookConfiguration,
    WebhookClientConfig,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::ObjectMeta;

use super::{PATH, SERVICE, WEBHOOK_NAME};

/// The configuration's name for clients in `namespace` (cluster-scoped, one per install).
pub fn configuration_name(namespace: &str) -> String {
    format!("gefyra-client-subnets-{namespace}")
}

/// The webhook's configuration for the GefyraClients of `namespace`, reaching the webhook
/// at `client_config` (the chart's Service, or a URL for an operator outside the cluster).
/// The `caBundle` is the operator's to fill in.
pub fn configuration(
    namespace: &str,
    client_config: WebhookClientConfig,
) -> ValidatingWebhookConfiguration {
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(configuration_name(namespace)),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![ValidatingWebhook {
            name: WEBHOOK_NAME.into(),
            admission_review_versions: vec!["v1".into()],
            client_config,
            failure_policy: Some("Ignore".into()),
            side_effects: "None".into(),
            timeout_seconds: Some(5),
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    namespace.to_string(),
                )])),
                ..LabelSelector::default()
            }),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![gefyra_api::client::GROUP.into()]),
                api_versions: Some(vec![gefyra_api::client::VERSION.into()]),
                operations: Some(vec!["UPDATE".into()]),
                resources: Some(vec![gefyra_api::client::PLURAL.into()]),
                scope: Some("Namespaced".into()),
            }]),
            // Only what changes providerParameter: deletes, status writes and the
            // operator's own bookkeeping never wait for the webhook.
            match_conditions: Some(vec![MatchCondition {
                name: "changes-provider-parameter".into(),
                expression: "has(object.providerParameter) && (!has(oldObject.providerParameter) || object.providerParameter != oldObject.providerParameter)".into(),
            }]),
            ..ValidatingWebhook::default()
        }]),
    }
}

/// The configuration the chart installs: the webhook behind Service [`SERVICE`].
pub fn service_configuration(namespace: &str) -> ValidatingWebhookConfiguration {
    configuration(
        namespace,
        WebhookClientConfig {
            service: Some(ServiceReference {
                name: SERVICE.into(),
                namespace: namespace.into(),
                path: Some(PATH.into()),
                port: Some(443),
            }),
            ..WebhookClientConfig::default()
        },
    )
}

/// `configuration` for an operator run outside the cluster (tests, `make up`): the webhook at
/// `https://<address>/validate-subnet`.
pub fn url_configuration(namespace: &str, address: SocketAddr) -> ValidatingWebhookConfiguration {
    configuration(
        namespace,
        WebhookClientConfig {
            url: Some(format!("https://{address}{PATH}")),
            ..WebhookClientConfig::default()
        },
    )
}

/// What the chart installs for the webhook of `namespace`: the configuration, the one
/// cluster-scoped permission the operator (ServiceAccount `operator_account`) needs — to
/// publish the CA in exactly that configuration — and the policy that keeps that
/// permission to the CA (see [`super::ca_policy`]).
#[derive(Debug, Clone)]
pub struct Install {
    pub configuration: ValidatingWebhookConfiguration,
    pub role: ClusterRole,
    pub role_binding: ClusterRoleBinding,
    pub policy: ValidatingAdmissionPolicy,
    pub policy_binding: ValidatingAdmissionPolicyBinding,
}

impl Install {
    pub fn new(namespace: &str, operator_account: &str) -> Self {
        let name = configuration_name(namespace);
        let meta = ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        };
        Self {
            configuration: service_configuration(namespace),
            role: ClusterRole {
                metadata: meta.clone(),
                rules: Some(crate::rbac::webhook_rules(&name)),
                ..ClusterRole::default()
            },
            role_binding: ClusterRoleBinding {
                metadata: meta,
                role_ref: RoleRef {
                    api_group: Some("rbac.authorization.k8s.io".into()),
                    kind: "ClusterRole".into(),
                    name,
                },
                subjects: Some(vec![Subject {
                    kind: "ServiceAccount".into(),
                    name: operator_account.into(),
                    namespace: Some(namespace.into()),
                    ..Subject::default()
                }]),
            },
            policy: super::ca_policy::policy(namespace, operator_account),
            policy_binding: super::ca_policy::binding(namespace),
        }
    }

    /// As YAML documents, as `gefyra-operator webhook-configuration` prints them.
    pub fn yaml(&self) -> String {
        [
            serde_saphyr::to_string(&self.configuration),
            serde_saphyr::to_string(&self.role),
            serde_saphyr::to_string(&self.role_binding),
            serde_saphyr::to_string(&self.policy),
            serde_saphyr::to_string(&self.policy_binding),
        ]
        .into_iter()
        .map(|document| document.expect("the webhook's objects serialize"))
        .collect::<Vec<_>>()
        .join("---\n")
    }
}

/// [`Install`] as YAML documents (the chart's template is generated from it).
pub fn install_yaml(namespace: &str, operator_account: &str) -> String {
    Install::new(namespace, operator_account).yaml()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_matches_only_provider_parameter_updates_and_fails_open() {
        let configuration = service_configuration("gefyra");
        let webhook = &configuration.webhooks.as_ref().unwrap()[0];
        assert_eq!(
            configuration.metadata.name.as_deref(),
            Some("gefyra-client-subnets-gefyra")
        );
        assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
        assert_eq!(
            webhook.rules.as_ref().unwrap()[0].operations.as_deref(),
            Some(&["UPDATE".to_string()][..])
        );
        let service = webhook.client_config.service.as_ref().unwrap();
        assert_eq!(
            (service.name.as_str(), service.path.as_deref()),
            (SERVICE, Some(PATH))
        );
    }
}
