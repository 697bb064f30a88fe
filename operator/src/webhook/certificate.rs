//! The webhook's certificate authority and serving certificate: made by the operator, kept
//! in a Secret (so replicas serve the same), renewed well before they expire, served
//! without a restart, and the CA published as the configuration's `caBundle`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tracing::{info, warn};

use super::{SERVICE, WEBHOOK_NAME};

/// The Secret holding the webhook's CA and serving certificate.
pub const TLS_SECRET: &str = "gefyra-operator-webhook-tls";
/// How long a certificate is valid, and how long before its end it is renewed.
const VALIDITY: SignedDuration = SignedDuration::from_hours(365 * 24);
const RENEW_BEFORE: SignedDuration = SignedDuration::from_hours(90 * 24);

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

/// Renews the certificate (when due) and republishes the CA (when changed) every hour, every
/// minute while the CA is not yet published or a step failed.
pub async fn renew_forever(
    client: Client,
    namespace: String,
    names: Vec<String>,
    configuration: String,
    resolver: Arc<CertificateResolver>,
) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
