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

    // The honest connect and disconnect still work, with the client's own token.
    let (_, public) = key_pair();
    connect(
        &as_dev,
        "dev",
        json!({"publicKey": public, "subnet": "172.21.0.0/16"}),
    )
    .await?;
    wait_for_state(&clients, "dev", ClientState::Active).await?;
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
        matches!(&reason, Some((reason, message)) if reason == "DuplicatePublicKey" && message.contains("client a")),
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
