//! Exclusive ranges, decided by the API server:
//! - a tunnel address is held by a **claim**: a `coordination.k8s.io` Lease named after the
//!   address, created by unique name (409 = taken), owned by the client (so the garbage
//!   collector removes it if the client disappears while no operator runs);
//! - routed ranges live in the shards of the routes table (see [`crate::routes`]).
//!
//! And the Stowaway server's key pair, in a Secret created once.

use std::collections::HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gefyra_api::GefyraClient;
use gefyra_api::ipam::{self, IpamError, Pool};
use ipnet::IpNet;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};

use crate::connection::{KeyPair, generate_key_pair};
use crate::credentials::MANAGED_BY;
use crate::index::Index;

pub use gefyra_api::ipam::{
    ADDRESS_ANNOTATION, CLAIM_SELECTOR, CLIENT_UID_LABEL, SERVER_KEY_SECRET, claimed,
};
pub const CLIENT_LABEL: &str = "gefyra.dev/client";

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

/// The claim's name for `address`: readable, valid for any IPv4 or IPv6 address.
pub fn claim_name(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("gefyra-ip-{a}-{b}-{c}-{d}")
        }
        IpAddr::V6(v6) => {
            let groups: Vec<String> = v6.segments().iter().map(|g| format!("{g:04x}")).collect();
            format!("gefyra-ip-{}", groups.join("-"))
        }
    }
}

/// The claim of `address` by `client` (pure).
pub fn claim(client: &GefyraClient, address: IpAddr) -> Lease {
    let mut metadata = meta(
        &claim_name(address),
        &client.namespace().unwrap_or_default(),
    );
    let (component, value) = CLAIM_SELECTOR
        .split_once('=')
        .expect("a key=value selector");
    let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(component.to_string(), value.to_string());
    labels.insert(CLIENT_LABEL.to_string(), client.name_any());
    labels.insert(
        CLIENT_UID_LABEL.to_string(),
        client.uid().unwrap_or_default(),
    );
    metadata.annotations = Some(BTreeMap::from([(
        ADDRESS_ANNOTATION.to_string(),
        IpNet::from(address).to_string(),
    )]));
    metadata.owner_references = client.controller_owner_ref(&()).map(|mut owner| {
        // Garbage collection only; the operator releases claims itself.
        owner.controller = Some(false);
        owner.block_owner_deletion = None;
        vec![owner]
    });
    Lease {
        metadata,
        spec: Some(LeaseSpec {
            holder_identity: Some(client.name_any()),
            ..LeaseSpec::default()
        }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("Lease {name} (tunnel-address claim): {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Ipam(#[from] IpamError),
}

/// A free address of `pool` by what a store of claims shows and the addresses the API
/// server `refused` (taken, though the store does not show it yet): one lookup by name per
/// address passed over, never a scan of every claim.
pub fn free_address_in(
    store: &Store<Lease>,
    namespace: &str,
    pool: &Pool,
    refused: &BTreeSet<IpAddr>,
    start: u128,
) -> Result<IpAddr, IpamError> {
    let is_taken = |address| {
        refused.contains(&address)
            || store
                .get(&ObjectRef::new(&claim_name(address)).within(namespace))
                .is_some()
    };
    ipam::free_tunnel_address(pool, store.len() + refused.len(), is_taken, start)
}

/// The tunnel-address claims: the API for writes, a watch-fed store for choosing, and the
/// claims of each client (by its uid) from the same watch.
#[derive(Clone)]
pub struct Claims {
    pub api: Api<Lease>,
    pub store: Store<Lease>,
    pub by_client: Arc<Index<Lease, String>>,
    /// Claims this process made that its store may not show yet, by client uid: a second
    /// reconcile of a client right after its connect (its own write seen, the claim not yet)
    /// must find the claim it holds, not make another.
    pub recent: Arc<Mutex<HashMap<String, RecentClaim>>>,
}

/// How long a claim this process made is trusted while the store does not show it (a
/// watch delivers within a second; a claim deleted before the store ever showed it must
/// not be held forever).
const RECENT_CLAIM_TRUST: Duration = Duration::from_secs(60);

/// A claim this process made, until its store shows it.
#[derive(Debug, Clone)]
pub struct RecentClaim {
    claim: ObjectRef<Lease>,
    held: Held,
    made: Instant,
}

/// The uid of the client a claim names (the value `Claims::by_client` is indexed by).
pub fn claim_holder_uid(lease: &Lease) -> Option<String> {
    lease.labels().get(CLIENT_UID_LABEL).cloned()
}

/// A tunnel address a client holds, and since when (the claim's creation, recorded by the
/// API server: nothing a client writes can move it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub address: IpAddr,
    pub since: Timestamp,
}

fn held_by_lease(lease: &Lease) -> Option<Held> {
    Some(Held {
        address: claimed(lease)?.0,
        since: lease.metadata.creation_timestamp.as_ref()?.0,
    })
}

impl Claims {
    /// The claims (name, address, since) the store shows for the client with `uid`: the
    /// few its index names, read from the store (never a scan of every claim).
    /// A claim this process just made counts too until the store shows it.
    fn held_by(&self, uid: &str) -> Vec<(String, Held)> {
        let mut held: Vec<(String, Held)> = self
            .by_client
            .holders(uid)
            .iter()
            .filter_map(|claim| self.store.get(claim))
            .filter(|lease| lease.labels().get(CLIENT_UID_LABEL).map(String::as_str) == Some(uid))
            .filter_map(|lease| Some((lease.name_any(), held_by_lease(&lease)?)))
            .collect();
        let mut recent = self.recent.lock().expect("not poisoned");
        if let Some(made) = recent.get(uid) {
            if self.store.get(&made.claim).is_some() || made.made.elapsed() > RECENT_CLAIM_TRUST {
                recent.remove(uid);
            } else if !held.iter().any(|(name, _)| *name == made.claim.name) {
                held.push((made.claim.name.clone(), made.held));
            }
        }
        held
    }

    /// Since when the client with `uid` holds a tunnel address, as the store shows.
    pub fn held_since(&self, uid: &str) -> Option<Timestamp> {
        self.held_by(uid)
            .into_iter()
            .map(|(_, held)| held.since)
            .min()
    }

    /// `client`'s tunnel address: the one it already holds in `pool`, else a newly claimed
    /// one. The API server decides: a claim that already exists (409) is someone else's.
    pub async fn claim_tunnel(
        &self,
        pool: &Pool,
        client: &GefyraClient,
    ) -> Result<Held, ClaimError> {
        let uid = client.uid().unwrap_or_default();
        let held = self.held_by(&uid);
        if let Some((_, current)) = held.iter().find(|(_, held)| pool.gives_out(held.address)) {
            return Ok(*current);
        }
        let namespace = client.namespace().unwrap_or_default();
        // Addresses the store does not show yet but the API server said are taken.
        let mut refused = BTreeSet::new();
        loop {
            // A random start spreads concurrent claimers over the pool.
            let start = u128::from(rand::random::<u64>());
            let address = free_address_in(&self.store, &namespace, pool, &refused, start)?;
            let name = claim_name(address);
            match self
                .api
                .create(&PostParams::default(), &claim(client, address))
                .await
            {
                Ok(created) => {
                    let since = created
                        .metadata
                        .creation_timestamp
                        .clone()
                        .map_or_else(Timestamp::now, |time| time.0);
                    let made = Held { address, since };
                    self.recent.lock().expect("not poisoned").insert(
                        uid.clone(),
                        RecentClaim {
                            claim: ObjectRef::from_obj(&created),
                            held: made,
                            made: Instant::now(),
                        },
                    );
                    // Addresses of an older pool the client held are given back.
                    for (name, _) in held {
                        self.delete_if_held(&name, &uid).await?;
                    }
                    return Ok(made);
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    refused.insert(address);
                }
                Err(source) => return Err(ClaimError::Api { name, source }),
            }
        }
    }

    /// Deletes claim `name` if (and only if) the client with `uid` holds it.
    pub async fn delete_if_held(&self, name: &str, uid: &str) -> Result<(), ClaimError> {
        let api_error = |source| ClaimError::Api {
            name: name.to_string(),
            source,
        };
        let Some(lease) = self.api.get_opt(name).await.map_err(api_error)? else {
            return Ok(());
        };
        if claimed(&lease).map(|(_, holder)| holder) != Some(uid) {
            return Ok(());
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: lease.uid(),
                resource_version: lease.resource_version(),
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(name, &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(source) => Err(api_error(source)),
        }
    }

    /// Releases every tunnel address the client with `uid` holds: the ones the store shows
    /// and `recorded` (the address in its `providerConfig`, which a lagging store may miss).
    pub async fn release(&self, uid: &str, recorded: Option<IpAddr>) -> Result<(), ClaimError> {
        let mut names: BTreeSet<String> = self
            .held_by(uid)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        names.extend(recorded.map(claim_name));
        for name in names {
            self.delete_if_held(&name, uid).await?;
        }
        self.recent.lock().expect("not poisoned").remove(uid);
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claims_are_named_after_their_address_and_owned_by_their_client() {
        assert_eq!(
            claim_name("192.168.96.7".parse().unwrap()),
            "gefyra-ip-192-168-96-7"
        );
        assert_eq!(
            claim_name("fd00:99::1".parse().unwrap()),
            "gefyra-ip-fd00-0099-0000-0000-0000-0000-0000-0001"
        );
        let client: GefyraClient = serde_json::from_value(json!({
            "apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
            "metadata": {"name": "dev", "namespace": "gefyra", "uid": "u-1"},
            "provider": "stowaway"
        }))
        .unwrap();
        let lease = claim(&client, "fd00:99::1".parse().unwrap());
        assert_eq!(
            claimed(&lease),
            Some(("fd00:99::1".parse().unwrap(), "u-1"))
        );
        assert_eq!(lease.labels()[CLIENT_LABEL], "dev");
        let owner = &lease.owner_references()[0];
        assert_eq!((owner.uid.as_str(), owner.name.as_str()), ("u-1", "dev"));
        assert_eq!(owner.controller, Some(false));
        assert_eq!(owner.block_owner_deletion, None);
    }
}
