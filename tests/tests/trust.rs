//! The trust boundary against the real API server, each attack made with the attacker's own
//! credentials: a client's token may change its providerParameter and nothing else (the
//! admission policy), hostile values never stop the operator, names never collide, a
//! duplicated public key is refused, and a failed connect leaks no range.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gefyra_api::{ClientState, GefyraClient};
use gefyra_e2e::{
    Cluster, Operator, WAIT, api_status, create_client, eventually, install_crd,
    set_provider_parameter as connect, token_of, wait_for_ready, wait_for_state,
};
use gefyra_operator::route_budget;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Patch, PatchParams};
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
