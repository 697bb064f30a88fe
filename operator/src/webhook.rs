//! The subnet webhook, for Gefyra's own CLI (gefyra-compat mode). Gefyra's CLI picks a
//! subnet (its local Docker network), patches `providerParameter`, and — when the subnet is
//! taken — expects the API server to refuse the patch with HTTP 500, so that it picks
//! another one by itself. A ValidatingWebhookConfiguration sends updates that change a
//! client's `providerParameter` here; a subnet that overlaps another client's route, a
//! tunnel pool or a reserved range is refused with code 500 and the conflict named. Its
//! `failurePolicy` is `Ignore`: while the webhook is down the operator's own check still
//! refuses the subnet (ERROR `SubnetConflict`), and nothing else depends on it.
//!
//! The operator makes the webhook's certificate authority and serving certificate, keeps
//! them in a Secret (so replicas serve the same), renews them well before they expire and
//! publishes the CA as the configuration's `caBundle`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use base64::Engine;
use gefyra_api::connection::ProviderParameter;
use gefyra_api::ipam::{self, Pool, Routes};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, RuleWithOperations, ServiceReference, ValidatingWebhook,
    ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::{Api, Client};
use serde_json::{Value, json};
use tracing::{info, warn};

/// The Secret holding the webhook's CA and serving certificate.
pub const TLS_SECRET: &str = "gefyra-operator-webhook-tls";
/// Where the API server sends admission reviews.
pub const PATH: &str = "/validate-subnet";
/// The webhook's name inside its configuration.
pub const WEBHOOK_NAME: &str = "subnets.gefyra.dev";
/// The Service in front of the operator's webhook port (chart).
pub const SERVICE: &str = "gefyra-operator-webhook";
/// How long a certificate is valid, and how long before its end it is renewed.
const VALIDITY: SignedDuration = SignedDuration::from_hours(365 * 24);
const RENEW_BEFORE: SignedDuration = SignedDuration::from_hours(90 * 24);

/// The configuration's name for clients in `namespace` (cluster-scoped, one per install).
pub fn configuration_name(namespace: &str) -> String {
    format!("gefyra-client-subnets-{namespace}")
}

/// The subnet a client object asks for, if it parses.
fn subnet_of(object: &DynamicObject) -> Option<ipnet::IpNet> {
    let parameter = object.data.get("providerParameter")?.as_object()?;
    ProviderParameter::parse(parameter).ok()?.subnet
}

/// The decision (pure): refuse, with code 500, a subnet another client, a tunnel pool or a
/// reserved range already has; allow everything else (the CRD validates the form).
pub fn review(
    request: &AdmissionRequest<DynamicObject>,
    pool: &Pool,
    routes: &Routes,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    let Some(object) = request.object.as_ref() else {
        return response;
    };
    let Some(subnet) = subnet_of(object) else {
        return response;
    };
    if request.old_object.as_ref().and_then(subnet_of) == Some(subnet) {
        return response;
    }
    let name = object.metadata.name.clone().unwrap_or_default();
    match ipam::check_routed(pool, routes, &name, subnet) {
        Ok(()) => response,
        Err(error) => {
            let mut refused = response.deny(format!(
                "providerParameter.subnet: {error}; choose another subnet"
            ));
            // Gefyra's CLI picks another subnet on exactly this code.
            refused.result.code = 500;
            refused.result.reason = "SubnetConflict".into();
            refused
        }
    }
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

/// What the chart installs for the webhook of `namespace` (YAML documents): the
/// configuration, and the one cluster-scoped permission the operator (ServiceAccount
/// `operator_account`) needs, to publish the CA in exactly that configuration.
pub fn install_yaml(namespace: &str, operator_account: &str) -> String {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
    let configuration = service_configuration(namespace);
    let name = configuration_name(namespace);
    let meta = ObjectMeta {
        name: Some(name.clone()),
        ..ObjectMeta::default()
    };
    let role = ClusterRole {
        metadata: meta.clone(),
        rules: Some(crate::rbac::webhook_rules(&name)),
        ..ClusterRole::default()
    };
    let binding = ClusterRoleBinding {
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
    };
    [
        serde_saphyr::to_string(&configuration),
        serde_saphyr::to_string(&role),
        serde_saphyr::to_string(&binding),
    ]
    .into_iter()
    .map(|document| document.expect("the webhook's objects serialize"))
    .collect::<Vec<_>>()
    .join("---\n")
}

/// The host names the serving certificate is valid for in `namespace`.
pub fn default_names(namespace: &str) -> Vec<String> {
    vec![
        format!("{SERVICE}.{namespace}.svc"),
        format!("{SERVICE}.{namespace}.svc.cluster.local"),
        "localhost".into(),
        "127.0.0.1".into(),
    ]
}

/// A CA and a serving certificate it signed, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ServingTls {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: Timestamp,
}

impl std::fmt::Debug for ServingTls {
    /// Never prints the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingTls")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Year, month and day of `time` in UTC, as rcgen takes a validity date.
fn ymd(time: Timestamp) -> (i32, u8, u8) {
    let date = time.to_zoned(jiff::tz::TimeZone::UTC).date();
    (
        i32::from(date.year()),
        u8::try_from(date.month()).unwrap_or(1),
        u8::try_from(date.day()).unwrap_or(1),
    )
}

/// A fresh CA and a serving certificate for `names`, both valid from today for a year.
pub fn generate(names: &[String], now: Timestamp) -> Result<ServingTls, rcgen::Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let not_after = now.checked_add(VALIDITY).unwrap_or(Timestamp::MAX);
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "gefyra-operator webhook CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let (from, until) = (ymd(now), ymd(not_after));
    ca.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
    ca.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let mut serving = CertificateParams::new(names.to_vec())?;
    serving.distinguished_name.push(DnType::CommonName, SERVICE);
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    serving.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
    serving.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
    let key = KeyPair::generate()?;
    let cert = serving.signed_by(&key, &ca)?;
    Ok(ServingTls {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        // The certificate ends at the start of that day.
        not_after: rcgen_day_start(not_after),
    })
}

fn rcgen_day_start(time: Timestamp) -> Timestamp {
    time.to_zoned(jiff::tz::TimeZone::UTC)
        .start_of_day()
        .map(|day| day.timestamp())
        .unwrap_or(time)
}

fn secret_data(tls: &ServingTls) -> BTreeMap<String, ByteString> {
    BTreeMap::from([
        (
            "ca.crt".to_string(),
            ByteString(tls.ca_pem.clone().into_bytes()),
        ),
        (
            "tls.crt".to_string(),
            ByteString(tls.cert_pem.clone().into_bytes()),
        ),
        (
            "tls.key".to_string(),
            ByteString(tls.key_pem.clone().into_bytes()),
        ),
        (
            "notAfter".to_string(),
            ByteString(tls.not_after.to_string().into_bytes()),
        ),
    ])
}

fn from_secret(secret: &Secret) -> Option<ServingTls> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| String::from_utf8(data.get(key)?.0.clone()).ok();
    Some(ServingTls {
        ca_pem: text("ca.crt")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        not_after: text("notAfter")?.parse().ok()?,
    })
}

/// Whether `tls` is due for renewal at `now`.
pub fn due(tls: &ServingTls, now: Timestamp) -> bool {
    tls.not_after
        .checked_sub(RENEW_BEFORE)
        .map_or(true, |renew_at| renew_at <= now)
}

/// The certificate in the Secret, renewed (compare-and-swap, so replicas agree) when it is
/// missing, unreadable or due.
pub async fn ensure_tls(
    client: &Client,
    namespace: &str,
    names: &[String],
) -> anyhow::Result<ServingTls> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    loop {
        let now = Timestamp::now();
        let current = api.get_opt(TLS_SECRET).await?;
        if let Some(tls) = current.as_ref().and_then(from_secret)
            && !due(&tls, now)
        {
            return Ok(tls);
        }
        let tls = generate(names, now)?;
        let written = match current {
            Some(mut secret) => {
                secret.data = Some(secret_data(&tls));
                api.replace(TLS_SECRET, &PostParams::default(), &secret)
                    .await
            }
            None => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(TLS_SECRET.into()),
                        namespace: Some(namespace.into()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_string(),
                            crate::credentials::MANAGED_BY.to_string(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    type_: Some("kubernetes.io/tls".into()),
                    data: Some(secret_data(&tls)),
                    ..Secret::default()
                };
                api.create(&PostParams::default(), &secret).await
            }
        };
        match written {
            Ok(_) => {
                info!(secret = TLS_SECRET, not_after = %tls.not_after, "made the webhook's certificate");
                return Ok(tls);
            }
            // Another replica wrote first: use theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(error.into()),
        }
    }
}

/// Publishes the CA as the configuration's `caBundle` (server-side apply of that one field).
pub async fn publish_ca(client: &Client, configuration: &str, ca_pem: &str) -> kube::Result<()> {
    let patch = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": configuration},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "clientConfig": {
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem),
            },
        }],
    });
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(
            configuration,
            &PatchParams::apply("gefyra-operator-webhook").force(),
            &Patch::Apply(patch),
        )
        .await
        .map(drop)
}

/// Serves the certificate the resolver holds now, so a renewal needs no restart.
#[derive(Debug)]
pub struct CertificateResolver(RwLock<Arc<rustls::sign::CertifiedKey>>);

impl CertificateResolver {
    pub fn new(tls: &ServingTls) -> anyhow::Result<Self> {
        Ok(Self(RwLock::new(Arc::new(certified_key(tls)?))))
    }

    pub fn replace(&self, tls: &ServingTls) -> anyhow::Result<()> {
        let key = Arc::new(certified_key(tls)?);
        *self.0.write().expect("not poisoned") = key;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for CertificateResolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.read().expect("not poisoned").clone())
    }
}

fn certified_key(tls: &ServingTls) -> anyhow::Result<rustls::sign::CertifiedKey> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| anyhow::anyhow!("the webhook certificate is not PEM: {error}"))?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())
        .map_err(|error| anyhow::anyhow!("the webhook key is not PEM: {error}"))?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|error| anyhow::anyhow!("the webhook key is unusable: {error}"))?;
    Ok(rustls::sign::CertifiedKey::new(chain, key))
}

#[derive(Clone)]
struct Reviewer {
    client: Client,
    namespace: String,
    pool: Pool,
}

async fn handle(
    State(reviewer): State<Reviewer>,
    body: axum::body::Bytes,
) -> ([(axum::http::header::HeaderName, &'static str); 1], Vec<u8>) {
    let response = match serde_json::from_slice::<AdmissionReview<DynamicObject>>(&body)
        .map_err(|error| error.to_string())
        .and_then(|review| {
            let request: Result<AdmissionRequest<DynamicObject>, _> = review.try_into();
            request.map_err(|error| error.to_string())
        }) {
        Err(error) => AdmissionResponse::invalid(error),
        Ok(request) => {
            // Only the shards the subnet would be recorded in can hold an overlapping route.
            let subnet = request.object.as_ref().and_then(subnet_of);
            let near = match subnet {
                Some(subnet) => {
                    crate::routes::read_routes_near(&reviewer.client, &reviewer.namespace, &subnet)
                        .await
                }
                None => Ok(Routes::new()),
            };
            match near {
                Ok(routes) => review(&request, &reviewer.pool, &routes),
                Err(error) => {
                    // Allowed: the operator's own check still refuses a conflict (ERROR).
                    warn!(%error, "reading the routes table for the subnet webhook failed; allowing");
                    AdmissionResponse::from(&request)
                }
            }
        }
    };
    let body = serde_json::to_vec(&response.into_review()).unwrap_or_default();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
}

/// Serves the webhook over TLS on `address` until the process ends, renewing the
/// certificate and republishing the CA every hour (and at start).
pub async fn run(
    client: Client,
    namespace: String,
    pool: Pool,
    address: SocketAddr,
    configuration: String,
    names: Vec<String>,
) -> anyhow::Result<()> {
    let tls = ensure_tls(&client, &namespace, &names).await?;
    let resolver = Arc::new(CertificateResolver::new(&tls)?);
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(address).await?;
    info!(%address, path = PATH, "serving the subnet webhook");
    let app = Router::new()
        .route(PATH, post(handle))
        .with_state(Reviewer {
            client: client.clone(),
            namespace: namespace.clone(),
            pool,
        });
    let renewals = {
        let client = client.clone();
        async move {
            let mut published = None;
            loop {
                match ensure_tls(&client, &namespace, &names).await {
                    Ok(tls) => {
                        if let Err(error) = resolver.replace(&tls) {
                            warn!(%error, "the webhook certificate in the Secret is unusable");
                        }
                        if published.as_ref() != Some(&tls.ca_pem) {
                            match publish_ca(&client, &configuration, &tls.ca_pem).await {
                                Ok(()) => published = Some(tls.ca_pem.clone()),
                                Err(error) => {
                                    warn!(configuration, %error, "publishing the webhook's caBundle failed; retrying in a minute")
                                }
                            }
                        }
                    }
                    Err(error) => {
                        warn!(%error, "renewing the webhook certificate failed; retrying in a minute")
                    }
                }
                let wait = if published.is_some() { 3600 } else { 60 };
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
        }
    };
    let serving = async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accepting a webhook connection failed");
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    };
    tokio::select! {
        _ = renewals => Ok(()),
        _ = serving => Ok(()),
    }
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

/// The review as the API server sends it, for tests.
pub fn review_body(object: Value, old_object: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "gefyra.dev", "version": "v1", "kind": "gefyraclient"},
            "resource": {"group": "gefyra.dev", "version": "v1", "resource": "gefyraclients"},
            "operation": "UPDATE",
            "userInfo": {"username": "system:serviceaccount:gefyra:gefyra-client-b"},
            "object": object,
            "oldObject": old_object,
            "dryRun": false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(name: &str, subnet: Option<&str>) -> Value {
        let mut object = json!({"apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
            "metadata": {"name": name, "namespace": "gefyra"}, "provider": "stowaway"});
        if let Some(subnet) = subnet {
            object["providerParameter"] = json!({"subnet": subnet});
        }
        object
    }

    fn request(object: Value, old_object: Value) -> AdmissionRequest<DynamicObject> {
        let review: AdmissionReview<DynamicObject> =
            serde_json::from_value(review_body(object, old_object)).unwrap();
        review.try_into().unwrap()
    }

    #[test]
    fn a_taken_subnet_is_refused_with_the_code_gefyras_cli_retries_on() {
        let routes = Routes::from([(
            "a".to_string(),
            ipam::Route {
                uid: "u-a".into(),
                subnet: "172.20.0.0/16".parse().unwrap(),
            },
        )]);
        let pool = Pool::default();
        let taken = review(
            &request(client("b", Some("172.20.5.0/24")), client("b", None)),
            &pool,
            &routes,
        );
        assert!(!taken.allowed);
        assert_eq!(taken.result.code, 500);
        assert!(
            taken
                .result
                .message
                .contains("overlaps another client's range")
                && !taken.result.message.contains("client a"),
            "{}",
            taken.result.message
        );
        let free = review(
            &request(client("b", Some("172.21.0.0/16")), client("b", None)),
            &pool,
            &routes,
        );
        assert!(free.allowed);
        // Its own route, unchanged subnets and disconnects are never refused.
        let own = review(
            &request(client("a", Some("172.20.0.0/16")), client("a", None)),
            &pool,
            &routes,
        );
        assert!(own.allowed);
        let unchanged = review(
            &request(
                client("b", Some("172.20.5.0/24")),
                client("b", Some("172.20.5.0/24")),
            ),
            &pool,
            &routes,
        );
        assert!(unchanged.allowed);
        let disconnect = review(
            &request(client("b", None), client("b", Some("172.21.0.0/16"))),
            &pool,
            &routes,
        );
        assert!(disconnect.allowed);
        let pool_overlap = review(
            &request(client("b", Some("192.168.96.0/24")), client("b", None)),
            &pool,
            &routes,
        );
        assert_eq!(pool_overlap.result.code, 500);
    }

    #[test]
    fn certificates_are_made_for_the_service_and_renewed_in_time() {
        let now: Timestamp = "2026-01-01T12:00:00Z".parse().unwrap();
        let tls = generate(&default_names("gefyra"), now).unwrap();
        assert!(tls.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(tls.key_pem.contains("PRIVATE KEY"));
        assert!(!format!("{tls:?}").contains("PRIVATE"));
        assert_eq!(tls.not_after, "2027-01-01T00:00:00Z".parse().unwrap());
        assert!(!due(&tls, now));
        assert!(due(&tls, "2026-10-10T00:00:00Z".parse().unwrap()));
        certified_key(&tls).unwrap();
        let secret = Secret {
            data: Some(secret_data(&tls)),
            ..Secret::default()
        };
        assert_eq!(from_secret(&secret), Some(tls));
    }

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
