//! The allocation table in the API server: one ConfigMap, changed only by compare-and-swap
//! (`replace` with the `resourceVersion` read), so the API server decides who gets a range —
//! across reconciles, processes and crashes. And the Stowaway server's key pair, in a Secret
//! created once.

use std::collections::BTreeMap;
use std::time::Duration;

use gefyra_api::ipam::{Allocation, Allocations, IpamError};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tracing::warn;

use crate::connection::{KeyPair, generate_key_pair};
use crate::credentials::MANAGED_BY;

pub const ALLOCATIONS_CONFIGMAP: &str = "gefyra-ip-allocations";
pub const SERVER_KEY_SECRET: &str = "gefyra-stowaway-key";

fn meta(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        )])),
        ..ObjectMeta::default()
    }
}

/// The table as stored: one key per client, its allocation as JSON. Entries that do not
/// parse are kept as they are (nothing is lost) and named in a warning.
fn read_table(config_map: &ConfigMap) -> (Allocations, BTreeMap<String, String>) {
    let mut allocations = Allocations::new();
    let mut unreadable = BTreeMap::new();
    for (client, value) in config_map.data.clone().unwrap_or_default() {
        match serde_json::from_str::<Allocation>(&value) {
            Ok(allocation) => {
                allocations.insert(client, allocation);
            }
            Err(error) => {
                warn!(configmap = ALLOCATIONS_CONFIGMAP, key = %client, %error, "unreadable allocation entry left as it is");
                unreadable.insert(client, value);
            }
        }
    }
    (allocations, unreadable)
}

fn write_table(
    allocations: &Allocations,
    unreadable: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut data = unreadable.clone();
    for (client, allocation) in allocations {
        data.insert(
            client.clone(),
            serde_json::to_string(allocation).expect("allocations serialize"),
        );
    }
    data
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("ConfigMap {ALLOCATIONS_CONFIGMAP}: {0}")]
    Api(#[from] kube::Error),
    #[error(
        "ConfigMap {ALLOCATIONS_CONFIGMAP}: still conflicting after {0} attempts; the API server is very busy"
    )]
    Contended(u32),
}

/// Applies `change` to the table atomically; retried on write conflicts. `change` must be
/// a pure function of the table it is given (it may run more than once). Returns its
/// result and the table as written.
pub async fn modify<T>(
    client: &Client,
    namespace: &str,
    mut change: impl FnMut(&mut Allocations) -> Result<T, IpamError>,
) -> Result<(Result<T, IpamError>, Allocations), TableError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    const ATTEMPTS: u32 = 100;
    for attempt in 0..ATTEMPTS {
        let Some(current) = api.get_opt(ALLOCATIONS_CONFIGMAP).await? else {
            let empty = ConfigMap {
                metadata: meta(ALLOCATIONS_CONFIGMAP, namespace),
                ..ConfigMap::default()
            };
            match api.create(&PostParams::default(), &empty).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(error) => return Err(error.into()),
            }
            continue;
        };
        let (mut allocations, unreadable) = read_table(&current);
        let before = allocations.clone();
        let result = change(&mut allocations);
        if allocations == before {
            return Ok((result, allocations));
        }
        let mut next = current;
        next.data = Some(write_table(&allocations, &unreadable));
        match api
            .replace(ALLOCATIONS_CONFIGMAP, &PostParams::default(), &next)
            .await
        {
            Ok(_) => return Ok((result, allocations)),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Someone else wrote first: read again. A little jitter spreads the retries.
                let jitter = rand::random::<u64>() % (5 + 5 * u64::from(attempt.min(10)));
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
    Err(TableError::Contended(ATTEMPTS))
}

/// Reads the table without changing it.
pub async fn read(client: &Client, namespace: &str) -> Result<Allocations, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .get_opt(ALLOCATIONS_CONFIGMAP)
        .await?
        .map(|config_map| read_table(&config_map).0)
        .unwrap_or_default())
}

/// The Stowaway server's key pair: read from its Secret, which is created once if missing.
pub async fn server_key(client: &Client, namespace: &str) -> Result<KeyPair, kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    loop {
        if let Some(secret) = api.get_opt(SERVER_KEY_SECRET).await? {
            let data = secret.data.unwrap_or_default();
            let text = |key: &str| {
                data.get(key)
                    .and_then(|value| String::from_utf8(value.0.clone()).ok())
                    .unwrap_or_default()
            };
            return Ok(KeyPair {
                private: text("privateKey"),
                public: text("publicKey"),
            });
        }
        let pair = generate_key_pair();
        let secret = Secret {
            metadata: meta(SERVER_KEY_SECRET, namespace),
            data: Some(BTreeMap::from([
                (
                    "privateKey".to_string(),
                    ByteString(pair.private.clone().into_bytes()),
                ),
                (
                    "publicKey".to_string(),
                    ByteString(pair.public.clone().into_bytes()),
                ),
            ])),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok(pair),
            // Another process created it first: use theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(error),
        }
    }
}
