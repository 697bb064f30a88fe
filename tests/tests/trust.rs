//! The trust boundary against the real API server, each attack made with the attacker's own
//! credentials: a client's token may change its providerParameter and nothing else (the
//! admission policy), hostile values never stop the operator, names never collide, a
//! duplicated public key is refused, and a failed connect leaks no range; a client's token
//! bridges only its own traffic, where an admin granted it, within the schema's bounds.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gefyra_api::bridge::{
    BRIDGE_KIND, BRIDGE_MOUNT_KIND, BRIDGE_MOUNT_PLURAL, CLIENT_LABEL, GRANT_CLUSTER_ROLE,
    MOUNT_LABEL,
};
use gefyra_api::{ClientState, GefyraClient};
use gefyra_e2e::{
    Cluster, Operator, WAIT, api_status, create_client, eventually, install_bridge_policies,
    install_crd, set_provider_parameter as connect, token_of, wait_for_ready, wait_for_state,
};
use gefyra_operator::bridging::{bridge_resource, mount_resource};
use gefyra_operator::route_budget;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding, RoleRef, Subject};
use kube::api::{DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

fn merge(body: Value) -> Patch<Value> {
    Patch::Merge(body)
}

/// A merge patch of client `name`, made as `api`'s identity.
async fn patch(api: &Api<GefyraClient>, name: &str, body: Value) -> kube::Result<GefyraClient> {
    api.patch(name, &PatchParams::default(), &merge(body)).await
}

/// The refusal of `patch` made as `api`: (HTTP status, message).
async fn refusal(api: &Api<GefyraClient>, name: &str, body: Value) -> Result<(u16, String)> {
    match patch(api, name, body.clone()).await {
        Ok(_) => anyhow::bail!("{body} was accepted"),
        Err(error) => Ok((api_status(&error).unwrap_or(0), error.to_string())),
    }
}

fn key_pair() -> (String, String) {
    let pair = gefyra_api::wireguard::generate_key_pair();
    (pair.private, pair.public)
}

#[tokio::test]
async fn a_clients_own_token_may_change_its_provider_parameter_and_nothing_else() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("trust").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    let _operator = Operator::start(&cluster, &ns, &[])?;
    create_client(admin.clone(), &ns, "dev").await?;
    patch(&clients, "dev", json!({"sunset": "2099-01-01T00:00:00Z"})).await?;
    let dev = wait_for_ready(&clients, "dev").await?;
    let as_dev: Api<GefyraClient> = Api::namespaced(cluster.with_token(&token_of(&dev)?)?, &ns);

    // The policy takes effect once the API server has loaded it.
    let (status, message) = eventually(
        "the admission policy refuses a client's sunset",
        WAIT,
        || async {
            match patch(&as_dev, "dev", json!({"sunset": null})).await {
                Ok(_) => {
                    // Too early: put the admin's value back and try again.
                    patch(&clients, "dev", json!({"sunset": "2099-01-01T00:00:00Z"})).await?;
                    Ok(None)
                }
                Err(error) => Ok(Some((api_status(&error).unwrap_or(0), error.to_string()))),
            }
        },
    )
    .await?;
    ensure!(
        status == 403 && message.contains("sunset may be changed only by an admin"),
        "{status} {message}"
    );

    let forbidden = [
        ("sunset", json!({"sunset": "2199-01-01T00:00:00Z"})),
        ("state", json!({"state": "ACTIVE"})),
        (
            "stateTransitions",
            json!({"stateTransitions": {"ACTIVE": "9999-01-01T00:00:00.000000Z"}}),
        ),
        (
            "providerConfig",
            json!({"providerConfig": {"Interface.Address": "192.168.96.2", "Peer.PublicKey": key_pair().1}}),
        ),
        (
            "serviceAccountName",
            json!({"serviceAccountName": "gefyra-client-other"}),
        ),
        (
            "serviceAccountData",
            json!({"serviceAccountData": {"token": "eA==", "ca.crt": "eA==", "namespace": "eA=="}}),
        ),
        ("maxConnectionAge", json!({"maxConnectionAge": 31_536_000})),
        (
            "metadata.labels",
            json!({"metadata": {"labels": {"team": "mine"}}}),
        ),
        (
            "metadata.annotations",
            json!({"metadata": {"annotations": {"note": "mine"}}}),
        ),
        (
            "metadata.finalizers",
            json!({"metadata": {"finalizers": null}}),
        ),
    ];
    for (field, body) in forbidden {
        let (status, message) = refusal(&as_dev, "dev", body).await?;
        ensure!(
            status == 403
                && message.contains(&format!(
                    "{field} may be changed only by an admin or the operator"
                )),
            "{field}: {status} {message}"
        );
    }
    // Status is not the client's either (its Role does not reach the subresource).
    let status = as_dev
        .patch_status(
            "dev",
            &PatchParams::default(),
            &merge(json!({"status": {"credentialsExpireAt": null}})),
        )
        .await
        .map(|_| ())
        .err()
        .and_then(|error| api_status(&error));
    ensure!(
        status == Some(403),
        "status patch by the client: {status:?}"
    );
    let unchanged = clients.get("dev").await?;
    ensure!(
        unchanged.sunset.as_deref() == Some("2099-01-01T00:00:00Z")
            && unchanged.state == ClientState::Waiting
    );
    // managedFields: a request may add its own entry, not fill the object with more.
    let entry = |manager: String| {
        json!({"manager": manager, "operation": "Update", "apiVersion": "gefyra.dev/v1",
               "fieldsType": "FieldsV1", "fieldsV1": {"f:providerParameter": {}}})
    };
    let mut entries: Vec<Value> = unchanged
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    entries.extend((0..3).map(|n| entry(format!("filler-{n}"))));
    let (status, message) = refusal(
        &as_dev,
        "dev",
        json!({"metadata": {"managedFields": entries}}),
    )
    .await?;
    ensure!(
        status == 403
            && message.contains("metadata.managedFields: a client's request may add one entry"),
        "managedFields: {status} {message}"
    );

    // The honest connect and disconnect still work, with the client's own token. What else
    // it sends in providerParameter is not kept (the object is closed): a client cannot make
    // the operator, Stowaway and the webhook carry half a megabyte of its own keys.
    let (_, public) = key_pair();
    connect(
        &as_dev,
        "dev",
        json!({"publicKey": public, "subnet": "172.21.0.0/16",
               "junk": "x".repeat(512 * 1024), "more": {"a": 1}}),
    )
    .await?;
    let connected = wait_for_state(&clients, "dev", ClientState::Active).await?;
    ensure!(
        connected.provider_parameter
            == json!({"publicKey": public, "subnet": "172.21.0.0/16"})
                .as_object()
                .cloned(),
        "stored: {:?}",
        connected
            .provider_parameter
            .map(|p| p.keys().cloned().collect::<Vec<_>>())
    );
    connect(&as_dev, "dev", Value::Null).await?;
    wait_for_state(&clients, "dev", ClientState::Waiting).await?;
    // Admins are not restricted.
    patch(
        &clients,
        "dev",
        json!({"sunset": "2098-01-01T00:00:00Z", "metadata": {"labels": {"team": "a"}}}),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn hostile_values_never_stop_the_operator() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("hostile").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    let mut operator = Operator::start(&cluster, &ns, &[])?;
    create_client(admin.clone(), &ns, "victim").await?;
    wait_for_ready(&clients, "victim").await?;

    // Absurd values are refused at the schema, naming the field.
    for (body, field) in [
        (json!({"maxConnectionAge": i64::MAX}), "maxConnectionAge"),
        (json!({"maxConnectionAge": 0}), "maxConnectionAge"),
    ] {
        let (status, message) = refusal(&clients, "victim", body).await?;
        ensure!(
            status == 422 && message.contains(field),
            "{status} {message}"
        );
    }

    // Values the schema lets through but that overflowed the old arithmetic: a sunset
    // centuries ahead (a requeue beyond what the scheduler can hold), a stored token whose
    // claims are far apart, the longest connection age, a far-future ACTIVE transition.
    let jwt = |claims: Value| {
        use base64::Engine;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            engine.encode(claims.to_string())
        )
    };
    // The claims name the client's real ServiceAccount, so the operator takes the token
    // for its own and computes its renewal from them.
    let account_uid = Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .get(&GefyraClient::service_account_name_for("victim"))
        .await?
        .uid()
        .context("a uid")?;
    let token = jwt(
        json!({"iat": -377_700_000_000i64, "exp": 253_400_000_000i64,
        "kubernetes.io": {"serviceaccount": {"uid": account_uid}}}),
    );
    let data = gefyra_operator::credentials::service_account_data(&token, "ca", &ns);
    let alive = |operator: &mut Operator| -> Result<()> {
        ensure!(
            operator.child.try_wait()?.is_none() && !operator.log_text().contains("panicked"),
            "the operator died:\n{}",
            operator.log_text()
        );
        Ok(())
    };
    // A renewal and a sunset millennia ahead: nothing due for longer than kube-runtime's
    // scheduler can hold.
    patch(
        &clients,
        "victim",
        json!({"sunset": "9999-12-30T00:00:00Z", "serviceAccountData": data}),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    alive(&mut operator)?;
    create_client(admin.clone(), &ns, "other").await?;
    wait_for_ready(&clients, "other").await?;

    // Connected, then the longest age and an ACTIVE transition at the end of time.
    connect(&clients, "victim", json!({"publicKey": key_pair().1})).await?;
    wait_for_state(&clients, "victim", ClientState::Active).await?;
    patch(
        &clients,
        "victim",
        json!({
            "maxConnectionAge": gefyra_api::client::MAX_CONNECTION_AGE_SECONDS,
            "stateTransitions": {"ACTIVE": "9999-12-30T00:00:00.000000Z"},
        }),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    alive(&mut operator)?;

    // It keeps reconciling everyone else.
    connect(&clients, "other", json!({"publicKey": key_pair().1})).await?;
    wait_for_state(&clients, "other", ClientState::Active).await?;
    alive(&mut operator)?;
    Ok(())
}

#[tokio::test]
async fn names_never_collide_and_long_ones_are_refused_at_creation() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("names").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    let _operator = Operator::start(&cluster, &ns, &[])?;

    let long = "a".repeat(64);
    let error = create_client(admin.clone(), &ns, &long).await.unwrap_err();
    let text = format!("{error:#}");
    ensure!(text.contains("at most 63 characters"), "{text}");
    create_client(admin.clone(), &ns, &"b".repeat(63)).await?;
    wait_for_ready(&clients, &"b".repeat(63)).await?;

    // `x`'s token minter and client `x-minter` once shared a ServiceAccount.
    for name in ["x", "x-minter"] {
        create_client(admin.clone(), &ns, name).await?;
    }
    for name in ["x", "x-minter"] {
        wait_for_ready(&clients, name).await?;
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns);
    for name in ["x", "x-minter"] {
        for account in [
            GefyraClient::service_account_name_for(name),
            GefyraClient::token_minter_name_for(name),
        ] {
            let found = accounts
                .get(&account)
                .await
                .with_context(|| account.clone())?;
            let owner = found.labels().get("gefyra.dev/client").cloned();
            ensure!(
                owner.as_deref() == Some(name),
                "{account} belongs to {owner:?}, not {name}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_duplicated_public_key_is_refused_and_a_failed_connect_leaks_nothing() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("duplicate").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    // Two addresses in all: the third connect fails after recording its route.
    let _operator = Operator::start(&cluster, &ns, &["--tunnel-pool", "192.168.96.0/30"])?;
    for name in ["a", "b", "c"] {
        create_client(admin.clone(), &ns, name).await?;
    }
    for name in ["a", "b", "c"] {
        wait_for_ready(&clients, name).await?;
    }

    // b, with its own token, takes a's public key: refused, a stays connected.
    let (_, key) = key_pair();
    connect(&clients, "a", json!({"publicKey": key})).await?;
    wait_for_state(&clients, "a", ClientState::Active).await?;
    let b = clients.get("b").await?;
    let as_b: Api<GefyraClient> = Api::namespaced(cluster.with_token(&token_of(&b)?)?, &ns);
    connect(&as_b, "b", json!({"publicKey": key})).await?;
    let refused = wait_for_state(&clients, "b", ClientState::Error).await?;
    let reason = refused
        .ready_condition()
        .map(|ready| (ready.reason.clone(), ready.message.clone()));
    ensure!(
        matches!(&reason, Some((reason, message)) if reason == "DuplicatePublicKey" && message.contains("another client") && !message.contains("client a")),
        "{reason:?}"
    );
    ensure!(
        clients.get("a").await?.state == ClientState::Active,
        "a keeps its connection"
    );
    ensure!(refused.provider_config.is_none(), "b got no configuration");
    // With a key of its own, b connects.
    connect(&as_b, "b", json!({"publicKey": key_pair().1})).await?;
    wait_for_state(&clients, "b", ClientState::Active).await?;

    // c asks for a subnet when no address is left: the route is recorded, the claim fails.
    connect(
        &clients,
        "c",
        json!({"publicKey": key_pair().1, "subnet": "172.22.0.0/16"}),
    )
    .await?;
    let failed = wait_for_state(&clients, "c", ClientState::Error).await?;
    ensure!(failed.ready_condition().map(|c| c.reason.as_str()) == Some("PoolExhausted"));
    let routes = gefyra_operator::routes::read_routes(&admin, &ns).await?;
    ensure!(
        routes.contains_key("c"),
        "c's route was recorded before the claim: {routes:?}"
    );
    // Disconnecting gives the route back.
    connect(&clients, "c", Value::Null).await?;
    wait_for_state(&clients, "c", ClientState::Waiting).await?;
    eventually("c's route is released", WAIT, || async {
        Ok((!gefyra_operator::routes::read_routes(&admin, &ns)
            .await?
            .contains_key("c"))
        .then_some(()))
    })
    .await?;
    Ok(())
}

/// Every request the operator has sent to the API server (all verbs), from its /metrics.
async fn api_requests(operator: &Operator) -> Result<f64> {
    let (_, body) = operator.http_get("/metrics").await?;
    Ok(body
        .lines()
        .filter(|line| line.starts_with("gefyra_operator_api_requests_total{"))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

/// The route shards in `namespace`, by name.
async fn shard_names(admin: &kube::Client, namespace: &str) -> Result<Vec<String>> {
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(admin.clone(), namespace);
    Ok(maps
        .list(&kube::api::ListParams::default().labels(gefyra_api::route_shards::SHARD_SELECTOR))
        .await?
        .items
        .iter()
        .map(|shard| shard.name_any())
        .collect())
}

/// The message of client `name`'s Ready condition once it is in ERROR with a message
/// containing `expected` (the last message seen, if it never does).
async fn refusal_message(
    clients: &Api<GefyraClient>,
    name: &str,
    expected: &str,
) -> Result<String> {
    let found = eventually(&format!("{name} is refused: {expected}"), WAIT, || async {
        let client = clients.get(name).await?;
        let message = client
            .ready_condition()
            .map(|ready| ready.message.clone())
            .unwrap_or_default();
        Ok((client.state == ClientState::Error && message.contains(expected)).then_some(message))
    })
    .await;
    if found.is_err() {
        let client = clients.get(name).await?;
        let last = client.ready_condition().map(|ready| &ready.message);
        anyhow::bail!("{name} was not refused with {expected:?}; last: {last:?}");
    }
    found
}

/// One client's token changes its routed range in a loop — too wide, of the wrong family,
/// over another client's, and twenty times across four shards each: what the operator
/// writes stays bounded (a route covers at most four shards, a shard left empty is deleted,
/// five changes at once then one per 12 s), the refusal names no other client, and another
/// client connects meanwhile.
#[tokio::test]
async fn one_clients_route_changes_cost_a_bounded_number_of_shards_and_requests() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("route-cost").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    let operator = Operator::start(&cluster, &ns, &[])?;
    for name in ["attacker", "bystander"] {
        create_client(admin.clone(), &ns, name).await?;
    }
    let attacker = wait_for_ready(&clients, "attacker").await?;
    wait_for_ready(&clients, "bystander").await?;
    let as_attacker: Api<GefyraClient> =
        Api::namespaced(cluster.with_token(&token_of(&attacker)?)?, &ns);
    let key = key_pair().1;
    let route = |subnet: &str| json!({"publicKey": key, "subnet": subnet});
    connect(&as_attacker, "attacker", route("172.16.0.0/16")).await?;
    wait_for_state(&clients, "attacker", ClientState::Active).await?;
    connect(
        &clients,
        "bystander",
        json!({"publicKey": key_pair().1, "subnet": "172.20.0.0/16"}),
    )
    .await?;
    wait_for_state(&clients, "bystander", ClientState::Active).await?;

    // Refused before anything is written, each with a reason naming no one.
    for (subnet, expected) in [
        ("10.0.0.0/8", "wider than /14"),
        ("fd00:1::/64", "is an IPv6 range"),
        ("172.20.5.0/24", "overlaps another client's range"),
    ] {
        let before = api_requests(&operator).await?;
        connect(&as_attacker, "attacker", route(subnet)).await?;
        let message = refusal_message(&clients, "attacker", expected).await?;
        ensure!(!message.contains("bystander"), "{subnet}: {message}");
        let spent = api_requests(&operator).await? - before;
        eprintln!("{subnet} refused for {spent} requests");
        // The ERROR patch, its status and Events (no shard is read or written for a refused
        // range: a /8 was 256 shards).
        ensure!(spent <= 20.0, "{subnet} refused for {spent} requests");
    }
    // The admin learns whose range it was: an Event on the other client.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), &ns);
    let told = eventually(
        "the bystander is told of the refused overlap",
        WAIT,
        || async {
            Ok(events
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .find(|event| {
                    event.reason.as_deref() == Some("SubnetRefusedToAnother")
                        && event.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some("bystander")
                }))
        },
    )
    .await?;
    ensure!(
        told.note
            .as_deref()
            .is_some_and(|note| note.contains("client attacker")),
        "{:?}",
        told.note
    );

    // Twenty changes as fast as the API server takes them, each route over four shards.
    let before = api_requests(&operator).await?;
    let changes = 20u8;
    let last = format!("10.{}.0.0/14", (changes - 1) * 4);
    for change in 0..changes {
        connect(
            &as_attacker,
            "attacker",
            route(&format!("10.{}.0.0/14", change * 4)),
        )
        .await?;
    }
    // Meanwhile another client connects and disconnects.
    connect(&clients, "bystander", Value::Null).await?;
    wait_for_state(&clients, "bystander", ClientState::Waiting).await?;
    connect(
        &clients,
        "bystander",
        json!({"publicKey": key_pair().1, "subnet": "172.21.0.0/16"}),
    )
    .await?;
    wait_for_state(&clients, "bystander", ClientState::Active).await?;
    // The last change is made, within the budget's time.
    eventually("the attacker's last route is in place", WAIT, || async {
        let routes = gefyra_operator::routes::read_routes(&admin, &ns).await?;
        let client = clients.get("attacker").await?;
        Ok((client.state == ClientState::Active
            && routes
                .get("attacker")
                .is_some_and(|route| route.subnet.to_string() == last))
        .then_some(()))
    })
    .await?;
    let spent = api_requests(&operator).await? - before;
    eprintln!("20 route changes by one client: {spent} requests");
    // Each change made costs at most ~40 requests (four shards read and written, four
    // emptied and deleted, the state, Events); at most five are made at once and one
    // more each 12 s — whatever the number of patches.
    ensure!(
        spent <= 400.0,
        "20 route changes cost the operator {spent} requests"
    );
    let mut shards = shard_names(&admin, &ns).await?;
    shards.sort();
    ensure!(
        shards.len() == 5,
        "left: {shards:?} (the attacker's four, the bystander's one)"
    );

    // An attacker that waits for each change to be made before the next: within a burst's
    // worth of changes it is told to wait, and the change is made later by itself.
    let mut throttled = None;
    for change in 0..=route_budget::BURST {
        let subnet = format!("10.{}.0.0/16", 100 + change);
        connect(&as_attacker, "attacker", route(&subnet)).await?;
        let outcome = eventually("the change is made or refused", WAIT, || async {
            let client = clients.get("attacker").await?;
            let ready = client.ready_condition().cloned();
            let routes = gefyra_operator::routes::read_routes(&admin, &ns).await?;
            Ok(
                if ready
                    .as_ref()
                    .is_some_and(|r| r.reason == "RouteChangesTooOften")
                {
                    Some(Err(ready.map(|r| r.message).unwrap_or_default()))
                } else if client.state == ClientState::Active
                    && routes
                        .get("attacker")
                        .is_some_and(|r| r.subnet.to_string() == subnet)
                {
                    Some(Ok(()))
                } else {
                    None
                },
            )
        })
        .await?;
        if let Err(message) = outcome {
            throttled = Some((subnet, message));
            break;
        }
    }
    let (subnet, message) = throttled.context("no change was ever refused as too often")?;
    ensure!(
        message.contains("more than 5 times within a minute") && message.contains("is made in"),
        "{message}"
    );
    eventually("the throttled change is made by itself", WAIT, || async {
        let routes = gefyra_operator::routes::read_routes(&admin, &ns).await?;
        Ok((clients.get("attacker").await?.state == ClientState::Active
            && routes
                .get("attacker")
                .is_some_and(|r| r.subnet.to_string() == subnet))
        .then_some(()))
    })
    .await?;
    Ok(())
}

// ---- Bridges: what a client's own token may create, and what the operator refuses ----

/// The identities and places of the bridge attacks: the operator's namespace `ns` (clients
/// `dev` and `other`, both connected; mounts `web` into `granted` and `elsewhere` into
/// `ungranted`), with dev's own token.
struct BridgeScene {
    ns: String,
    granted: String,
    ungranted: String,
    admin: kube::Client,
    clients: Api<GefyraClient>,
    /// GefyraBridges as the admin.
    bridges: Api<DynamicObject>,
    /// GefyraBridges as dev's own token.
    as_dev: Api<DynamicObject>,
    dev_address: String,
    other_address: String,
}

/// A GefyraBridge as Gefyra's CLI writes one: for `client`, on mount `mount`, to
/// `destination`, port 8080 on the developer's side for container port 80.
fn bridge_body(name: &str, client: &str, mount: &str, destination: &str) -> Value {
    json!({
        "apiVersion": "gefyra.dev/v1",
        "kind": BRIDGE_KIND,
        "metadata": {"name": name, "labels": {CLIENT_LABEL: client, MOUNT_LABEL: mount}},
        "provider": "carrier2",
        "client": client,
        "destinationIP": destination,
        "target": mount,
        "portMappings": ["8080:80"],
    })
}

fn mount_body(name: &str, namespace: &str) -> Value {
    json!({
        "apiVersion": "gefyra.dev/v1",
        "kind": BRIDGE_MOUNT_KIND,
        "metadata": {"name": name},
        "target": "deployment/web",
        "targetNamespace": namespace,
    })
}

/// Creates `body` as `api`'s identity: `None` if admitted, else the refusal (status, message).
async fn create(api: &Api<DynamicObject>, body: &Value) -> Result<Option<(u16, String)>> {
    let object: DynamicObject = serde_json::from_value(body.clone())?;
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) => Ok(Some((status.code, status.message))),
        Err(other) => Err(other.into()),
    }
}

/// `body` is refused as `api`'s identity with `status` and a message containing `expected`;
/// the message.
async fn refused(
    api: &Api<DynamicObject>,
    body: &Value,
    status: u16,
    expected: &str,
) -> Result<String> {
    let name = &body["metadata"]["name"];
    match create(api, body).await? {
        None => anyhow::bail!("{name} was admitted, expected {status} {expected:?}"),
        Some((code, message)) => {
            ensure!(
                code == status && message.contains(expected),
                "{name}: {code} {message} (expected {status} {expected:?})"
            );
            eprintln!("refused {name}: {code} {message}");
            Ok(message)
        }
    }
}

async fn admitted(api: &Api<DynamicObject>, body: &Value) -> Result<()> {
    if let Some((code, message)) = create(api, body).await? {
        anyhow::bail!("{} refused: {code} {message}", body["metadata"]["name"]);
    }
    Ok(())
}

/// The ClusterRole `gefyra-bridge` as the chart ships it.
async fn install_grant_role(admin: &kube::Client) -> Result<()> {
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(GRANT_CLUSTER_ROLE.into()),
            ..ObjectMeta::default()
        },
        rules: Some(gefyra_operator::rbac::grant_rules()),
        ..ClusterRole::default()
    };
    Api::<ClusterRole>::all(admin.clone())
        .patch(
            GRANT_CLUSTER_ROLE,
            &PatchParams::apply("gefyra-e2e").force(),
            &Patch::Apply(role),
        )
        .await?;
    Ok(())
}

/// The admin's grant: a RoleBinding of ClusterRole `gefyra-bridge` in `target` to
/// ServiceAccount `account` of namespace `ns`.
async fn grant(admin: &kube::Client, target: &str, ns: &str, account: &str) -> Result<()> {
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some(format!("bridge-{account}")),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: GRANT_CLUSTER_ROLE.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: account.into(),
            namespace: Some(ns.into()),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), target)
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// A ServiceAccount in `ns` that may create GefyraBridgeMounts there (a team member, not a
/// client), and a token of it.
async fn mount_maker(cluster: &Cluster, ns: &str) -> Result<String> {
    let yaml = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: mounter}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: mounter}}\n\
         rules: [{{apiGroups: [gefyra.dev], resources: [{BRIDGE_MOUNT_PLURAL}], verbs: [get, create, delete]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: mounter}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: mounter}}\n\
         subjects: [{{kind: ServiceAccount, name: mounter, namespace: {ns}}}]\n"
    );
    gefyra_e2e::apply_identity(cluster.admin()?, ns, &yaml).await?;
    cluster.mint_token(ns, "mounter", 3600).await
}

/// Connects `name` with its own token's `api` and `parameter`; its tunnel address.
async fn connected_address(
    clients: &Api<GefyraClient>,
    api: &Api<GefyraClient>,
    name: &str,
    parameter: Value,
) -> Result<String> {
    connect(api, name, parameter).await?;
    let active = wait_for_state(clients, name, ClientState::Active).await?;
    let config = active
        .provider_config
        .as_ref()
        .context("an ACTIVE client has a providerConfig")?;
    Ok(gefyra_api::connection::ProviderConfig::parse(config)?
        .address
        .to_string())
}

/// A new client `name` in `clients`' namespace, connected with its own token: that token
/// and its tunnel address.
async fn connected_client(
    cluster: &Cluster,
    clients: &Api<GefyraClient>,
    name: &str,
) -> Result<(String, String)> {
    let ns = clients.namespace().context("namespaced")?;
    create_client(cluster.admin()?, ns, name)
        .await
        .with_context(|| format!("creating client {name}"))?;
    let token = token_of(&wait_for_ready(clients, name).await?)?;
    let own: Api<GefyraClient> = Api::namespaced(cluster.with_token(&token)?, ns);
    let parameter = json!({"publicKey": key_pair().1});
    let address = connected_address(clients, &own, name, parameter).await?;
    Ok((token, address))
}

/// The two policies whose params are custom resources refuse everything ("failed to find
/// resource referenced by paramKind") until the API server's RESTMapper knows the CRDs, and
/// admit everything until their bindings are loaded: each is probed until it answers with
/// its own message. How long that took since `started` (when they were installed).
async fn wait_for_bridge_policies(
    scene: &BridgeScene,
    started: std::time::Instant,
) -> Result<Duration> {
    let probes = [
        (
            bridge_body("probe-grant", "dev", "web", &scene.dev_address),
            "is not granted",
        ),
        (
            bridge_body("probe-destination", "dev", "no-mount", &scene.other_address),
            "is neither the tunnel address",
        ),
    ];
    for (body, expected) in &probes {
        let seen = std::cell::RefCell::new(Vec::new());
        let seen = &seen;
        eventually(
            &format!("the bridge policies answer {expected:?}"),
            Duration::from_secs(90),
            || async {
                match create(&scene.as_dev, body).await? {
                    None => {
                        // Admitted before the binding was loaded: take it back.
                        let name = body["metadata"]["name"].as_str().unwrap_or_default();
                        scene.bridges.delete(name, &Default::default()).await?;
                        Ok(None)
                    }
                    Some((_, message)) if message.contains(expected) => Ok(Some(())),
                    Some((code, message)) => {
                        if !seen.borrow().contains(&message) {
                            eprintln!(
                                "{:?} into the policies' warm-up: {code} {message}",
                                started.elapsed()
                            );
                            seen.borrow_mut().push(message);
                        }
                        Ok(None)
                    }
                }
            },
        )
        .await?;
    }
    Ok(started.elapsed())
}

/// Attack 1: a mount, and a bridge on a mount, where no grant reaches.
async fn mounts_and_bridges_need_the_grant(scene: &BridgeScene, cluster: &Cluster) -> Result<()> {
    let mounts: Api<DynamicObject> = Api::namespaced_with(
        cluster.with_token(&token_of(&scene.clients.get("dev").await?)?)?,
        &scene.ns,
        &mount_resource(),
    );
    let as_mounter: Api<DynamicObject> = Api::namespaced_with(
        cluster.with_token(&mount_maker(cluster, &scene.ns).await?)?,
        &scene.ns,
        &mount_resource(),
    );
    let dev_account = format!(
        "system:serviceaccount:{}:{}",
        scene.ns,
        GefyraClient::service_account_name_for("dev")
    );
    let on_web = bridge_body("on-web", "dev", "web", &scene.dev_address);
    let message = refused(&scene.as_dev, &on_web, 403, "is not granted").await?;
    ensure!(
        message.contains(&format!(
            "bridging workloads in namespace {} is not granted to {dev_account}",
            scene.granted
        )) && message.contains(GRANT_CLUSTER_ROLE),
        "{message}"
    );
    // A client creates no mount at all, granted or not: its Role has no such verb.
    let cannot = "cannot create resource \"gefyrabridgemounts\"";
    refused(&mounts, &mount_body("dev-web", &scene.granted), 403, cannot).await?;
    let mounting = |ns: &str| format!("mounting workloads in namespace {ns} is not granted");
    let mounter_web = mount_body("mounter-web", &scene.granted);
    refused(&as_mounter, &mounter_web, 403, &mounting(&scene.granted)).await?;

    grant(
        &scene.admin,
        &scene.granted,
        &scene.ns,
        &GefyraClient::service_account_name_for("dev"),
    )
    .await?;
    grant(&scene.admin, &scene.granted, &scene.ns, "mounter").await?;
    let started = std::time::Instant::now();
    eventually("the grant takes effect", WAIT, || async {
        Ok(create(&scene.as_dev, &on_web)
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    eprintln!("the RoleBinding took effect in {:?}", started.elapsed());
    admitted(&as_mounter, &mounter_web).await?;
    refused(&mounts, &mount_body("dev-web", &scene.granted), 403, cannot).await?;

    // Elsewhere nothing changed.
    let on_elsewhere = bridge_body("on-elsewhere", "dev", "elsewhere", &scene.dev_address);
    let message = refused(&scene.as_dev, &on_elsewhere, 403, "is not granted").await?;
    ensure!(message.contains(&scene.ungranted), "{message}");
    let mounter_elsewhere = mount_body("mounter-elsewhere", &scene.ungranted);
    refused(
        &as_mounter,
        &mounter_elsewhere,
        403,
        &mounting(&scene.ungranted),
    )
    .await?;
    Ok(())
}

/// Attack 2: another client's bridges, by name, by label, by deletion; one's own, patched.
async fn a_client_writes_only_its_own_bridges(scene: &BridgeScene) -> Result<()> {
    let itself = "a client creates GefyraBridges for itself only";
    let for_other = bridge_body("for-other", "other", "web", &scene.other_address);
    refused(&scene.as_dev, &for_other, 403, itself).await?;
    let mut mislabelled = bridge_body("mislabelled", "dev", "web", &scene.dev_address);
    mislabelled["metadata"]["labels"][CLIENT_LABEL] = json!("other");
    refused(&scene.as_dev, &mislabelled, 403, itself).await?;
    let mut unlabelled = bridge_body("unlabelled", "dev", "web", &scene.dev_address);
    unlabelled["metadata"]["labels"] = json!({MOUNT_LABEL: "web"});
    refused(&scene.as_dev, &unlabelled, 403, itself).await?;

    admitted(
        &scene.bridges,
        &bridge_body("others", "other", "web", &scene.other_address),
    )
    .await?;
    let deleted = scene.as_dev.delete("others", &Default::default()).await;
    let Err(kube::Error::Api(status)) = deleted else {
        anyhow::bail!("dev deleted other's bridge: {deleted:?}");
    };
    ensure!(
        status.code == 403
            && status
                .message
                .contains("a client may change and delete only its own GefyraBridges"),
        "{status:?}"
    );
    eprintln!(
        "refused delete of others: {} {}",
        status.code, status.message
    );
    ensure!(scene.bridges.get_opt("others").await?.is_some());

    // Its own bridge is fixed once created: no patch right, no update right.
    let patched = scene
        .as_dev
        .patch(
            "on-web",
            &PatchParams::default(),
            &merge(json!({"destinationIP": scene.other_address, "state": "ACTIVE"})),
        )
        .await;
    let Err(kube::Error::Api(status)) = patched else {
        anyhow::bail!("dev patched its bridge: {patched:?}");
    };
    ensure!(
        status.code == 403
            && status
                .message
                .contains("cannot patch resource \"gefyrabridges\""),
        "{status:?}"
    );
    eprintln!(
        "refused patch of on-web: {} {}",
        status.code, status.message
    );
    let mut own = scene.as_dev.get("on-web").await?;
    own.data["state"] = json!("ACTIVE");
    let replaced = scene
        .as_dev
        .replace("on-web", &PostParams::default(), &own)
        .await;
    let Err(kube::Error::Api(status)) = replaced else {
        anyhow::bail!("dev replaced its bridge: {replaced:?}");
    };
    ensure!(
        status.code == 403
            && status
                .message
                .contains("cannot update resource \"gefyrabridges\""),
        "{status:?}"
    );
    eprintln!(
        "refused update of on-web: {} {}",
        status.code, status.message
    );
    Ok(())
}

/// Attack 3: a destination that is not the client's own, whoever writes it.
async fn a_bridge_reaches_only_its_own_client(
    scene: &BridgeScene,
    cluster: &Cluster,
    kubernetes_ip: &str,
) -> Result<()> {
    let neither = |address: &str| {
        format!("destinationIP {address} is neither the tunnel address of client dev")
    };
    let to_other = bridge_body("to-other", "dev", "web", &scene.other_address);
    refused(
        &scene.as_dev,
        &to_other,
        403,
        &neither(&scene.other_address),
    )
    .await?;
    let to_cluster = bridge_body("to-cluster", "dev", "web", kubernetes_ip);
    refused(&scene.as_dev, &to_cluster, 403, &neither(kubernetes_ip)).await?;
    refused(&scene.bridges, &to_cluster, 403, &neither(kubernetes_ip)).await?;
    admitted(
        &scene.as_dev,
        &bridge_body("to-itself", "dev", "web", &scene.dev_address),
    )
    .await?;

    // A subnet the client asks for and the operator refuses (the cluster's own range) is no
    // range of its own; one the operator accepts is.
    create_client(scene.admin.clone(), &scene.ns, "wide").await?;
    let wide = wait_for_ready(&scene.clients, "wide").await?;
    let as_wide: Api<GefyraClient> =
        Api::namespaced(cluster.with_token(&token_of(&wide)?)?, &scene.ns);
    let bridges_as_wide: Api<DynamicObject> = Api::namespaced_with(
        cluster.with_token(&token_of(&wide)?)?,
        &scene.ns,
        &bridge_resource(),
    );
    connected_address(
        &scene.clients,
        &as_wide,
        "wide",
        json!({"publicKey": key_pair().1, "subnet": "172.30.0.0/16"}),
    )
    .await?;
    admitted(
        &bridges_as_wide,
        &bridge_body("wide-to-subnet", "wide", "no-mount", "172.30.0.5"),
    )
    .await?;
    connect(
        &as_wide,
        "wide",
        json!({"publicKey": key_pair().1, "subnet": "10.0.0.0/24"}),
    )
    .await?;
    refusal_message(&scene.clients, "wide", "reserved range").await?;
    refused(
        &bridges_as_wide,
        &bridge_body("wide-to-cluster", "wide", "no-mount", kubernetes_ip),
        403,
        "is neither the tunnel address of client wide",
    )
    .await?;
    Ok(())
}

/// Attack 4: what the CRD schema bounds, and the operator's fields at creation.
async fn the_schema_bounds_what_a_client_writes(scene: &BridgeScene) -> Result<()> {
    let path_rule = |path: &str| json!({"match": [{"matchPath": {"path": path, "type": "regex"}}]});
    let regex = "a regex of at most 512 characters that compiles";
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "bad-regex",
            json!({"providerParameter": {"rules": [path_rule("(a")]}}),
            422,
            regex,
        ),
        (
            "long-regex",
            json!({"providerParameter": {"rules": [path_rule(&"a".repeat(600))]}}),
            422,
            regex,
        ),
        (
            "many-rules",
            json!({"providerParameter": {"rules": vec![path_rule("/a"); 17]}}),
            422,
            "must have at most 16 items",
        ),
        (
            "many-matches",
            json!({"providerParameter": {"rules": [{"match": vec![json!({"matchPath": {"path": "/a"}}); 9]}]}}),
            422,
            "must have at most 8 items",
        ),
        (
            "port-70000",
            json!({"portMappings": ["70000:80"]}),
            422,
            "both 1-65535",
        ),
        (
            "remote-twice",
            json!({"portMappings": ["8080:80", "9090:80"]}),
            422,
            "each remote (container) port at most once",
        ),
        (
            "same-twice",
            json!({"portMappings": ["8080:80", "8080:80"]}),
            422,
            "each remote (container) port at most once",
        ),
        (
            "abc",
            json!({"portMappings": ["abc"]}),
            422,
            "portMappings[0]",
        ),
        (
            "state-active",
            json!({"state": "ACTIVE"}),
            403,
            "are the operator's",
        ),
        (
            "endpoint",
            json!({"clusterEndpoint": {"stowaway": "evil:1"}}),
            403,
            "are the operator's",
        ),
        (
            "status",
            json!({"status": {"reason": "Ready"}}),
            403,
            "are the operator's",
        ),
        (
            "transitions",
            json!({"stateTransitions": {"ACTIVE": "2026-01-01T00:00:00Z"}}),
            403,
            "are the operator's",
        ),
    ];
    for (name, fields, status, expected) in cases {
        let mut body = bridge_body(name, "dev", "web", &scene.dev_address);
        for (key, value) in fields.as_object().context("an object")? {
            body[key] = value.clone();
        }
        refused(&scene.as_dev, &body, status, expected).await?;
    }
    Ok(())
}

/// The bridge `name` in ERROR with `reason`, and the Warning Event saying so.
async fn in_error(scene: &BridgeScene, name: &str, reason: &str) -> Result<String> {
    let message = eventually(
        &format!("bridge {name} is in ERROR {reason}"),
        WAIT,
        || async {
            let bridge = scene.bridges.get(name).await?;
            let state = bridge.data["state"].as_str();
            let recorded = bridge
                .data
                .pointer("/status/reason")
                .and_then(Value::as_str);
            Ok(
                (state == Some("ERROR") && recorded == Some(reason)).then(|| {
                    bridge.data["status"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                }),
            )
        },
    )
    .await?;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(scene.admin.clone(), &scene.ns);
    eventually(
        &format!("a Warning Event {reason} on {name}"),
        WAIT,
        || async {
            Ok(events
                .list(&Default::default())
                .await?
                .items
                .into_iter()
                .find(|event| {
                    event.type_.as_deref() == Some("Warning")
                        && event.reason.as_deref() == Some(reason)
                        && event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                }))
        },
    )
    .await?;
    eprintln!("bridge {name}: ERROR {reason}: {message}");
    Ok(message)
}

/// Attack 5: what admission lets through and the operator refuses.
async fn the_operator_refuses_what_admission_lets_through(scene: &BridgeScene) -> Result<()> {
    // A bridge naming a mount that does not exist passes the grant policy (no mount, no
    // namespace to check): the operator refuses it.
    admitted(
        &scene.as_dev,
        &bridge_body("ghost", "dev", "ghost-mount", &scene.dev_address),
    )
    .await?;
    let message = in_error(scene, "ghost", "MountNotFound").await?;
    ensure!(message.contains("ghost-mount does not exist"), "{message}");

    // An admin's bridge for a client that then disconnects (a disconnected client's is
    // refused at admission: it has no address).
    connect(&scene.clients, "other", Value::Null).await?;
    wait_for_state(&scene.clients, "other", ClientState::Waiting).await?;
    let message = in_error(scene, "others", "ClientNotConnected").await?;
    ensure!(
        message.contains("client other is not connected"),
        "{message}"
    );
    refused(
        &scene.bridges,
        &bridge_body("for-disconnected", "other", "web", &scene.other_address),
        403,
        "is neither the tunnel address of client other",
    )
    .await?;
    Ok(())
}

impl BridgeScene {
    /// The scene, its operator (the cluster's Service range reserved, as the chart sets it)
    /// and the kubernetes Service's address; the bridge policies answering.
    async fn set_up(cluster: &Cluster) -> Result<(Self, Operator, String)> {
        install_crd(cluster).await?;
        let ns = cluster.namespace("bridge-trust").await?;
        let granted = cluster.namespace("bridge-granted").await?;
        let ungranted = cluster.namespace("bridge-ungranted").await?;
        let admin = cluster.admin()?;
        install_bridge_policies(admin.clone(), &ns).await?;
        let policies_installed = std::time::Instant::now();
        install_grant_role(&admin).await?;
        let kubernetes_ip = Api::<Service>::namespaced(admin.clone(), "default")
            .get("kubernetes")
            .await?
            .spec
            .and_then(|spec| spec.cluster_ip)
            .context("the kubernetes Service has a cluster IP")?;
        let reserved = format!("{kubernetes_ip}/24");
        let operator = Operator::start(cluster, &ns, &["--reserved-ranges", &reserved])?;
        let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
        let (dev_token, dev_address) = connected_client(cluster, &clients, "dev").await?;
        let (_, other_address) = connected_client(cluster, &clients, "other").await?;
        let mounts: Api<DynamicObject> =
            Api::namespaced_with(admin.clone(), &ns, &mount_resource());
        for (name, target) in [("web", &granted), ("elsewhere", &ungranted)] {
            admitted(&mounts, &mount_body(name, target))
                .await
                .with_context(|| format!("the admin's mount {name}"))?;
        }
        let scene = Self {
            bridges: Api::namespaced_with(admin.clone(), &ns, &bridge_resource()),
            as_dev: Api::namespaced_with(cluster.with_token(&dev_token)?, &ns, &bridge_resource()),
            ns,
            granted,
            ungranted,
            admin,
            clients,
            dev_address,
            other_address,
        };
        let warm_up = wait_for_bridge_policies(&scene, policies_installed).await?;
        eprintln!(
            "the bridge policies answered with their own messages {warm_up:?} after they were installed"
        );
        Ok((scene, operator, kubernetes_ip))
    }
}

/// Attack 6: after it all the operator runs, does not loop, and another client connects.
async fn the_operator_serves_others_afterwards(
    scene: &BridgeScene,
    operator: &mut Operator,
) -> Result<()> {
    ensure!(
        operator.child.try_wait()?.is_none() && !operator.log_text().contains("panicked"),
        "the operator died:\n{}",
        operator.log_text()
    );
    // The mounts waiting for their workload look for it every 5 s, the bridges in ERROR
    // every 30 s: a handful of requests, not a loop.
    let before = api_requests(operator).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let spent = api_requests(operator).await? - before;
    eprintln!("the operator's requests in 5 quiet seconds after the attacks: {spent}");
    ensure!(spent <= 20.0, "{spent} requests in 5 quiet seconds");
    create_client(scene.admin.clone(), &scene.ns, "bystander").await?;
    wait_for_ready(&scene.clients, "bystander").await?;
    connect(
        &scene.clients,
        "bystander",
        json!({"publicKey": key_pair().1}),
    )
    .await?;
    wait_for_state(&scene.clients, "bystander", ClientState::Active).await?;
    ensure!(operator.child.try_wait()?.is_none(), "the operator died");
    Ok(())
}

/// A client's own token bridges only its own traffic, only where an admin granted it, within
/// the bounds of the schema: each attack refused by the API server with a message naming
/// the problem, what admission lets through refused by the operator (ERROR, reason, Warning
/// Event), and the operator alive and serving others afterwards.
#[tokio::test]
async fn a_clients_token_bridges_only_its_own_traffic_where_granted() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let (scene, mut operator, kubernetes_ip) = BridgeScene::set_up(&cluster).await?;
    mounts_and_bridges_need_the_grant(&scene, &cluster).await?;
    a_client_writes_only_its_own_bridges(&scene).await?;
    a_bridge_reaches_only_its_own_client(&scene, &cluster, &kubernetes_ip).await?;
    the_schema_bounds_what_a_client_writes(&scene).await?;
    the_operator_refuses_what_admission_lets_through(&scene).await?;
    // The honest way out: a client deletes its own bridge.
    scene.as_dev.delete("on-web", &Default::default()).await?;
    the_operator_serves_others_afterwards(&scene, &mut operator).await
}

/// A restarted operator keeps the bridges of clients that exist: it releases a bridge as
/// "its client was deleted" only once its cache of clients is filled.
#[tokio::test]
async fn a_restarted_operator_keeps_the_bridges_of_present_clients() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("bridge-restart").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    let mut operator = Operator::start(&cluster, &ns, &[])?;
    let (_, address) = connected_client(&cluster, &clients, "dev").await?;
    let bridges: Api<DynamicObject> = Api::namespaced_with(admin, &ns, &bridge_resource());
    admitted(&bridges, &bridge_body("kept", "dev", "no-mount", &address)).await?;
    eventually("the operator looked at bridge kept", WAIT, || async {
        let bridge = bridges.get("kept").await?;
        Ok((bridge.data["state"].as_str() == Some("ERROR")).then_some(()))
    })
    .await?;
    operator.terminate().await?;

    let restarted = Operator::start(&cluster, &ns, &[])?;
    eventually("the restarted operator is ready", WAIT, || async {
        Ok((restarted.http_get("/readyz").await.map(|r| r.0).ok() == Some(200)).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        bridges.get_opt("kept").await?.is_some(),
        "bridge kept of client dev (ACTIVE) was released by the restarted operator:\n{}",
        restarted
            .log_text()
            .lines()
            .filter(|line| line.contains("released"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}
