//! One reconcile against a mocked API server (the kube-rs controller-rs way): every request
//! the operator sends is recorded and answered from a small script, so that what a step
//! costs the API server is pinned request by request. The e2e suite runs the same steps
//! against a real API server; this shows, in a second, that they send nothing more.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gefyra_api::ipam::Allocation;
use gefyra_api::{ClientState, GefyraClient};
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::client::Body;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};

use super::identity::Identity;
use crate::allocator;
use crate::context::{Context, Settings};
use crate::credentials::{self, ClientRbac};
use crate::lifecycle;
use crate::metrics::Metrics;
use crate::owned::OwnedObjects;

const NAMESPACE: &str = "gefyra";
const ACCOUNT_UID: &str = "sa-uid-1";

/// Requests seen, as "METHOD path".
type Seen = Arc<Mutex<Vec<String>>>;

/// A client whose requests go to `answer` (method, path, body → status, body), recorded.
fn mocked_client(answer: fn(&str, &str, &Value) -> (StatusCode, Value)) -> (Client, Seen) {
    let seen = Seen::default();
    let log = seen.clone();
    let service = tower::service_fn(move |request: Request<Body>| {
        let log = log.clone();
        async move {
            let method = request.method().to_string();
            let path = request.uri().path().to_string();
            let bytes = request
                .into_body()
                .collect()
                .await
                .map(|body| body.to_bytes())
                .unwrap_or_default();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            log.lock().unwrap().push(format!("{method} {path}"));
            let (status, answer) = answer(&method, &path, &body);
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            )
        }
    });
    (Client::new(service, NAMESPACE), seen)
}

/// A token as the TokenRequest API mints them (only its claims are read).
fn token(expires: Timestamp) -> String {
    let claims = json!({
        "iat": expires.as_second() - 86_400, "exp": expires.as_second(),
        "kubernetes.io": {"serviceaccount": {"uid": ACCOUNT_UID}},
    });
    format!(
        "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// A settled WAITING client with fresh credentials whose developer just asked to connect.
fn waiting_client_asking_to_connect() -> GefyraClient {
    let data = credentials::service_account_data(
        &token(Timestamp::now() + jiff::SignedDuration::from_hours(24)),
        "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        NAMESPACE,
    );
    serde_json::from_value(json!({
        "apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
        "metadata": {"name": "dev", "namespace": NAMESPACE, "uid": "client-uid-1",
            "generation": 3, "resourceVersion": "10", "finalizers": ["gefyra.dev/cleanup"]},
        "provider": "stowaway", "state": "WAITING",
        "stateTransitions": {"CREATING": "2026-12-01T00:00:00Z", "WAITING": "2026-12-01T00:00:01Z"},
        "serviceAccountName": "gefyra-client-dev",
        "serviceAccountData": data,
        "providerParameter": {},
    }))
    .unwrap()
}

/// The resource version the mocked API server gives the client for each write of a connect:
/// ENABLING, ACTIVE, then the Ready condition (status).
const ENABLING_VERSION: &str = "11";
const ACTIVE_VERSION: &str = "12";
const READY_VERSION: &str = "13";

/// The API server's side of a connect: the client as patched (with the version of that
/// write), Events and claims as created (a claim stamped by the server), the Stowaway key;
/// anything else is not found.
fn connect_answers(method: &str, path: &str, body: &Value) -> (StatusCode, Value) {
    let client = || serde_json::to_value(waiting_client_asking_to_connect()).unwrap();
    match (method, path) {
        ("PATCH", path) if path.contains("/gefyraclients/dev") => {
            let version = match (path.ends_with("/status"), body["state"].as_str()) {
                (true, _) => READY_VERSION,
                (false, Some("ENABLING")) => ENABLING_VERSION,
                (false, Some("ACTIVE")) => ACTIVE_VERSION,
                _ => "99",
            };
            let mut client = client();
            client["metadata"]["resourceVersion"] = json!(version);
            (StatusCode::OK, client)
        }
        ("POST", path) if path.ends_with("/events") => (StatusCode::CREATED, body.clone()),
        ("POST", path) if path.ends_with("/leases") => {
            let mut lease = body.clone();
            lease["metadata"]["creationTimestamp"] = json!("2026-12-03T00:00:00Z");
            lease["metadata"]["resourceVersion"] = json!("11");
            (StatusCode::CREATED, lease)
        }
        ("GET", path) if path.contains("/secrets/") => {
            let key = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
            let pair = crate::connection::generate_key_pair();
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "gefyra-stowaway-server-key", "namespace": NAMESPACE},
                    "data": {"privateKey": key(&pair.private), "publicKey": key(&pair.public)}}),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": format!("{method} {path}: not in the script")}),
        ),
    }
}

/// A cache that shows `objects`, filled as a watch's first list fills it.
fn cache_of<K>(objects: Vec<K>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

fn context(client: Client, owner: &GefyraClient, claims: Vec<Lease>) -> Context {
    let settings = Settings {
        namespace: NAMESPACE.into(),
        client_rbac: ClientRbac::Minimal,
        token_lifetime: None,
        renew_before: None,
        concurrency: 1,
        pool: gefyra_api::ipam::Pool::default(),
        wireguard_endpoint: "stowaway.example:31820".parse().unwrap(),
        max_connection_age: None,
        bridging: crate::bridging::BridgingSettings {
            carrier_image: "gefyra-operator:test".into(),
            stowaway_service: "gefyra-stowaway-bridges".into(),
            stowaway_port: 8082,
            idle_timeout: None,
        },
    };
    let ctx = Context::new(client, Arc::new(Metrics::default()), settings);
    // The watches' caches, as a running operator has them: the identity in place.
    let identity = Identity::desired(owner, ClientRbac::Minimal);
    let mut account = identity.service_account.clone();
    account.metadata.uid = Some(ACCOUNT_UID.into());
    let _ = ctx.owned.set(OwnedObjects {
        service_accounts: cache_of(vec![account, identity.minter_service_account.clone()]),
        roles: cache_of(vec![identity.role.clone(), identity.minter_role.clone()]),
        role_bindings: cache_of(vec![
            identity.role_binding.clone(),
            identity.minter_role_binding.clone(),
        ]),
    });
    ctx.claims_filled_for_tests(claims);
    ctx.routes.watch_into(cache_of(Vec::new()));
    ctx
}

#[tokio::test]
async fn a_connect_sends_the_state_the_claim_the_config_two_events_and_the_condition_and_nothing_else()
 {
    let (client, seen) = mocked_client(connect_answers);
    let waiting = waiting_client_asking_to_connect();
    let ctx = context(client, &waiting, Vec::new());
    // Read once at start-up by a running operator.
    ctx.server_key().await.unwrap();
    seen.lock().unwrap().clear();

    super::apply(&waiting, &ctx).await.unwrap();

    let clients = "/apis/gefyra.dev/v1/namespaces/gefyra/gefyraclients/dev";
    let events = "/apis/events.k8s.io/v1/namespaces/gefyra/events";
    let mut seen = seen.lock().unwrap().clone();
    // ENABLING's Event and the claim go out together, in either order.
    seen[1..3].sort();
    assert_eq!(
        seen,
        [
            format!("PATCH {clients}"),
            "POST /apis/coordination.k8s.io/v1/namespaces/gefyra/leases".to_string(),
            format!("POST {events}"),
            format!("PATCH {clients}"),
            format!("POST {events}"),
            format!("PATCH {clients}/status"),
        ],
        "ENABLING, its Event and the tunnel-address claim, ACTIVE with the config, its Event, Ready"
    );
}

/// A connect of a waiting client through `apply`, and that client as a cache may show it
/// next: ENABLING at resource version `version`. (context, requests, waiting, enabling)
async fn connected_then_seen_enabling_at(
    version: &str,
) -> (Context, Seen, GefyraClient, GefyraClient) {
    let (client, seen) = mocked_client(connect_answers);
    let waiting = waiting_client_asking_to_connect();
    let ctx = context(client, &waiting, Vec::new());
    ctx.server_key().await.unwrap();
    super::apply(&waiting, &ctx).await.unwrap();
    let mut enabling = waiting.clone();
    enabling.state = ClientState::Enabling;
    enabling.metadata.resource_version = Some(version.into());
    (ctx, seen, waiting, enabling)
}

/// A second reconcile right after a connect, from a cache that shows the client's own
/// ENABLING write but neither ACTIVE nor the new claim (watches lag behind writes): it
/// finds the claim this process just made instead of claiming a second address (which
/// leaked one and changed the address on the next start: seen at 10,000 clients).
#[tokio::test]
async fn a_reconcile_from_a_lagging_cache_right_after_a_connect_claims_no_second_address() {
    // ENABLING, as the cache shows it after someone else's write (not one this process
    // replaced: the reconcile goes ahead).
    let (ctx, seen, _, enabling) = connected_then_seen_enabling_at("14").await;

    super::apply(&enabling, &ctx).await.unwrap();

    let claims_made = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|request| request.starts_with("POST") && request.ends_with("/leases"))
        .count();
    assert_eq!(claims_made, 1, "one tunnel address per client");
}

/// A reconcile right after a connect, from a cache that shows the client as the
/// connect's own ENABLING write left it (or as it was before): it waits for the cache and
/// sends nothing — not a second ACTIVE patch and Event (63 of 10,000 connects did).
#[tokio::test]
async fn a_reconcile_from_a_view_older_than_its_own_last_write_sends_nothing() {
    let (ctx, seen, waiting, enabling) = connected_then_seen_enabling_at(ENABLING_VERSION).await;
    seen.lock().unwrap().clear();

    for stale in [&enabling, &waiting] {
        let action = super::apply(stale, &ctx).await.unwrap();
        assert_eq!(
            action,
            kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(1))
        );
    }

    assert_eq!(*seen.lock().unwrap(), Vec::<String>::new());
}

/// The same client once connected and settled, as a restarted operator finds it: ACTIVE
/// with its configuration, its claim in the cache, Ready for this generation.
fn settled_active_client() -> (GefyraClient, Lease) {
    let mut client = waiting_client_asking_to_connect();
    let pool = gefyra_api::ipam::Pool::default();
    let address = gefyra_api::ipam::free_tunnel_address(&pool, 0, |_| false, 0).unwrap();
    let mut claim = allocator::claim(&client, address);
    claim.metadata.creation_timestamp = Some(Time("2026-12-03T00:00:00Z".parse().unwrap()));
    let allocation = Allocation {
        uid: "client-uid-1".into(),
        tunnel: address.into(),
        routed: None,
    };
    let own = crate::connection::generate_key_pair();
    let server = crate::connection::generate_key_pair();
    let key = |text: &str| text.parse().unwrap();
    let config = crate::connection::new_config(
        &allocation,
        key(&own.public),
        Some(key(&own.private)),
        key(&server.public),
        &"stowaway.example:31820".parse().unwrap(),
    );
    let token = client
        .service_account_data
        .as_ref()
        .and_then(super::identity::stored_token)
        .and_then(|token| credentials::token_claims(&token))
        .expect("the fixture's token");
    let ready = lifecycle::ready_condition(
        None,
        true,
        "Connected",
        "the client's credentials are ready and it is connected",
        Some(3),
        Timestamp::now(),
    );
    client.state = ClientState::Active;
    client.provider_config = serde_json::from_value(json!(config.to_map())).unwrap();
    client.status = serde_json::from_value(json!({
        "conditions": [ready],
        "credentialsExpireAt": token.expires_at.to_string(),
    }))
    .unwrap();
    (client, claim)
}

#[tokio::test]
async fn a_settled_active_client_costs_no_request() {
    let (client, seen) = mocked_client(connect_answers);
    let (settled, claim) = settled_active_client();
    let ctx = context(client, &settled, vec![claim]);
    ctx.server_key().await.unwrap();
    seen.lock().unwrap().clear();

    super::apply(&settled, &ctx).await.unwrap();

    assert_eq!(*seen.lock().unwrap(), Vec::<String>::new());
}
