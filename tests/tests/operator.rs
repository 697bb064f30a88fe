//! The operator against the real control plane: the lifecycle, least privilege checked
//! with the client's own token, cleanup, schema validation, leader election and crashes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use base64::Engine;
use gefyra_api::{ClientState, GefyraClient};
use gefyra_e2e::{
    Cluster, Operator, WAIT, api_status, create_client, dynamic_api, eventually, gefyra_cli_body,
    install_crd, token_of, wait_for_ready, wait_for_state, wait_gone,
};
use k8s_openapi::api::core::v1::{Event, Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use kube::{Api, Client};
use serde_json::json;

#[tokio::test]
async fn client_gets_least_privilege_credentials_that_die_with_it() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("lifecycle").await?;
    let admin = cluster.admin()?;
    let _operator = Operator::start(&cluster, &ns, &[])?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);

    create_client(admin.clone(), &ns, "0123456789abcdef0123456789abcdef").await?;
    create_client(admin.clone(), &ns, "other").await?;
    let client = wait_for_ready(&clients, "0123456789abcdef0123456789abcdef").await?;
    wait_for_state(&clients, "other", ClientState::Waiting).await?;

    assert_eq!(
        client.service_account_name.as_deref(),
        Some("gefyra-client-0123456789abcdef0123456789abcdef")
    );
    for state in ["CREATING", "WAITING"] {
        assert!(
            client.state_transitions.contains_key(state),
            "stateTransitions records {state}: {:?}",
            client.state_transitions
        );
    }
    ensure!(
        client.state_transitions["CREATING"] <= client.state_transitions["WAITING"],
        "CREATING is recorded before WAITING: {:?}",
        client.state_transitions
    );
    let data = client
        .service_account_data
        .clone()
        .context("serviceAccountData")?;
    let decode = |value: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(value)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(decode(&data.namespace), ns);
    assert!(decode(&data.ca_crt).contains("BEGIN CERTIFICATE"));

    // Least privilege, with the client's own token and real requests.
    let as_client = cluster.with_token(&token_of(&client)?)?;
    let own: Api<GefyraClient> = Api::namespaced(as_client.clone(), &ns);
    own.get("0123456789abcdef0123456789abcdef")
        .await
        .context("the client reads its own GefyraClient")?;
    own.patch(
        "0123456789abcdef0123456789abcdef",
        &PatchParams::default(),
        &Patch::Merge(json!({"providerParameter": null})),
    )
    .await
    .context("the client patches its own GefyraClient's providerParameter")?;
    // Anything else of its object is the admin's (the admission policy, once the API
    // server has loaded it; see trust.rs). Each attempt a new value: a patch that changes
    // nothing passes any policy, so one let through before the policy was loaded must not
    // make every later attempt a no-op.
    let attempt = std::sync::atomic::AtomicU32::new(0);
    eventually("a client's label patch is refused", WAIT, || async {
        let value = attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let labels = own
            .patch(
                "0123456789abcdef0123456789abcdef",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"labels": {"patched-by": format!("client-{value}")}}}),
                ),
            )
            .await;
        match labels {
            Err(error) if api_status(&error) == Some(403) => Ok(Some(())),
            Err(error) => Err(anyhow::anyhow!("refused, but not as forbidden: {error}")),
            Ok(_) => Ok(None),
        }
    })
    .await?;
    let forbidden = |result: Result<(), kube::Error>, what: &str| -> Result<()> {
        let error = result
            .err()
            .with_context(|| format!("{what} must be refused"))?;
        ensure!(
            api_status(&error) == Some(403),
            "{what}: expected 403, got {error}"
        );
        Ok(())
    };
    forbidden(
        own.get("other").await.map(drop),
        "reading another client's GefyraClient",
    )?;
    forbidden(
        own.list(&ListParams::default()).await.map(drop),
        "listing GefyraClients",
    )?;
    forbidden(
        Api::<Secret>::namespaced(as_client.clone(), &ns)
            .list(&ListParams::default())
            .await
            .map(drop),
        "listing Secrets",
    )?;
    forbidden(
        Api::<Namespace>::all(as_client.clone())
            .delete(&ns, &DeleteParams::default())
            .await
            .map(drop),
        "deleting the namespace",
    )?;
    let exec = http::Request::post(format!(
        "/api/v1/namespaces/{ns}/pods/any/exec?command=sh&stdout=true"
    ))
    .body(Vec::new())?;
    forbidden(as_client.request_text(exec).await.map(drop), "pods/exec")?;

    // Deletion removes the identity, and the token stops working.
    clients
        .delete("0123456789abcdef0123456789abcdef", &DeleteParams::default())
        .await?;
    wait_gone(&clients, "0123456789abcdef0123456789abcdef").await?;
    let sa = "gefyra-client-0123456789abcdef0123456789abcdef";
    ensure!(
        Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
            .get_opt(sa)
            .await?
            .is_none(),
        "ServiceAccount removed"
    );
    ensure!(
        Api::<Role>::namespaced(admin.clone(), &ns)
            .get_opt(sa)
            .await?
            .is_none(),
        "Role removed"
    );
    ensure!(
        Api::<RoleBinding>::namespaced(admin.clone(), &ns)
            .get_opt(sa)
            .await?
            .is_none(),
        "RoleBinding removed"
    );
    eventually("the deleted client's token gets 401", WAIT, || async {
        match own.get("other").await {
            Err(error) if api_status(&error) == Some(401) => Ok(Some(())),
            _ => Ok(None),
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn operator_serves_health_and_metrics() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("metrics").await?;
    let operator = Operator::start(&cluster, &ns, &[])?;
    create_client(cluster.admin()?, &ns, "measured").await?;
    wait_for_state(
        &Api::namespaced(cluster.admin()?, &ns),
        "measured",
        ClientState::Waiting,
    )
    .await?;
    eventually("/readyz answers 200", WAIT, || async {
        Ok((operator.http_get("/readyz").await?.0 == 200).then_some(()))
    })
    .await?;
    assert_eq!(operator.http_get("/livez").await?.0, 200);
    // Counts come from the operator's cache at scrape time, which may trail the API server
    // (where the test saw WAITING) by a watch event.
    let metrics = eventually("the metrics count the client as WAITING", WAIT, || async {
        let (status, metrics) = operator.http_get("/metrics").await?;
        assert_eq!(status, 200);
        Ok(metrics
            .contains("gefyra_operator_clients{state=\"WAITING\"} 1")
            .then_some(metrics))
    })
    .await?;
    assert!(
        metrics.contains("gefyra_operator_reconcile_duration_seconds_bucket"),
        "duration histogram: {metrics}"
    );
    assert!(
        metrics.contains("gefyra_operator_reconciles_total{result=\"ok\"}"),
        "reconciles: {metrics}"
    );
    Ok(())
}

/// Every request the operator sent to the API server, by verb, as it counts them.
async fn requests_by_verb(operator: &Operator) -> Result<std::collections::BTreeMap<String, f64>> {
    let (_, metrics) = operator.http_get("/metrics").await?;
    Ok(gefyra_e2e::api_requests_by_verb(&metrics))
}

/// Every request the operator sent to the API server, as it counts them.
async fn requests_sent(operator: &Operator) -> Result<f64> {
    Ok(requests_by_verb(operator).await?.values().sum())
}

/// The operator's requests by verb and its successful reconciles, once both stop moving
/// (two equal readings 2 s apart, within a minute).
async fn settled_counts(
    operator: &Operator,
) -> Result<(std::collections::BTreeMap<String, f64>, f64)> {
    let counts = || async {
        Ok::<_, anyhow::Error>((
            requests_by_verb(operator).await?,
            gefyra_e2e::metric(
                operator.http_port,
                "gefyra_operator_reconciles_total{result=\"ok\"}",
            )
            .await?,
        ))
    };
    let mut settled = counts().await?;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = counts().await?;
        if now == settled {
            break;
        }
        settled = now;
    }
    Ok(settled)
}

/// A restart with settled clients (one WAITING, one ACTIVE with a routed subnet): the new
/// operator reconciles each, finds everything in place in its caches and writes nothing.
#[tokio::test]
async fn a_restarted_operator_finds_settled_clients_in_place_and_writes_nothing() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("restart").await?;
    let args = ["--wireguard-endpoint", "203.0.113.7:31820"];
    let mut first = Operator::start(&cluster, &ns, &args)?;
    let clients: Api<GefyraClient> = Api::namespaced(cluster.admin()?, &ns);
    for name in ["resting", "routed"] {
        create_client(cluster.admin()?, &ns, name).await?;
        wait_for_ready(&clients, name).await?;
    }
    let (_, public) = gefyra_e2e::lab::key_pair();
    gefyra_e2e::lab::connect(
        &clients,
        "routed",
        json!({ "publicKey": public, "subnet": "10.77.0.0/24" }),
    )
    .await?;
    let (before, _) = settled_counts(&first).await?;
    ensure!(
        before.get("patch").is_some_and(|count| *count > 0.0),
        "the first operator wrote the clients' objects: {before:?}"
    );
    first.kill().await?;
    let objects_before = serde_json::to_value(clients.list(&ListParams::default()).await?.items)?;

    let second = Operator::start(&cluster, &ns, &args)?;
    eventually(
        "the restarted operator reconciled both clients",
        WAIT,
        || async {
            let reconciled = match second.http_get("/readyz").await {
                Ok((200, _)) => {
                    gefyra_e2e::metric(
                        second.http_port,
                        "gefyra_operator_reconciles_total{result=\"ok\"}",
                    )
                    .await?
                }
                _ => 0.0,
            };
            Ok((reconciled >= 2.0).then_some(()))
        },
    )
    .await?;
    let (requests, reconciles) = settled_counts(&second).await?;
    ensure!(
        reconciles >= 2.0,
        "the restarted operator reconciled both clients: {reconciles}\n{}",
        second.log_text()
    );
    let writes: Vec<_> = requests
        .iter()
        .filter(|(verb, _)| !matches!(verb.as_str(), "get" | "list" | "watch"))
        .collect();
    ensure!(
        writes.is_empty(),
        "a restart with settled clients wrote {writes:?} (all requests: {requests:?})"
    );
    let objects_after = serde_json::to_value(clients.list(&ListParams::default()).await?.items)?;
    ensure!(
        objects_before == objects_after,
        "the clients changed across the restart"
    );
    // Still in charge: a change that matters is acted on.
    gefyra_e2e::lab::connect(&clients, "routed", serde_json::Value::Null).await?;
    Ok(())
}

/// The idle cost: an ACTIVE client whose peer keeps handshaking gets `status.wireguard`
/// written by Stowaway every 30 s; none of those writes may cost a reconcile or a request.
#[tokio::test]
async fn status_writes_of_an_idle_active_client_cost_no_reconcile_and_no_request() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("idle").await?;
    let operator = Operator::start(
        &cluster,
        &ns,
        &["--wireguard-endpoint", "203.0.113.7:31820"],
    )?;
    let clients: Api<GefyraClient> = Api::namespaced(cluster.admin()?, &ns);
    create_client(cluster.admin()?, &ns, "idle").await?;
    wait_for_ready(&clients, "idle").await?;
    let (_, public) = gefyra_e2e::lab::key_pair();
    gefyra_e2e::lab::connect(&clients, "idle", json!({ "publicKey": public })).await?;
    // Settled: the counts stop moving (the connect's own writes come back as watch events).
    let counts = || async {
        Ok::<_, anyhow::Error>((
            requests_sent(&operator).await?,
            gefyra_e2e::metric(
                operator.http_port,
                "gefyra_operator_reconciles_total{result=\"ok\"}",
            )
            .await?,
        ))
    };
    let settled = settled_counts(&operator).await?;
    let settled = (settled.0.values().sum::<f64>(), settled.1);
    ensure!(
        settled.0 > 0.0,
        "the operator counts its requests: {settled:?}"
    );
    // Stowaway's writes (as Stowaway sends them: a merge patch of the status subresource).
    for round in 0..10 {
        clients
            .patch_status(
                "idle",
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": { "wireguard": {
                    "latest_handshake": format!("2026-01-01T00:00:{round:02}Z"),
                    "transfer": { "received": round * 1000, "sent": round * 2000 },
                    "endpoint": { "host": "198.51.100.7", "port": 51820 },
                } } })),
            )
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = counts().await?;
    ensure!(
        after == settled,
        "10 status writes cost (requests, reconciles) {settled:?} -> {after:?}"
    );
    // A change that matters still reconciles: disconnecting returns it to WAITING.
    gefyra_e2e::lab::connect(&clients, "idle", serde_json::Value::Null).await?;
    Ok(())
}

#[tokio::test]
async fn invalid_manifests_are_rejected_with_a_readable_message() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("invalid").await?;
    let api = dynamic_api(cluster.admin()?, &ns);
    let cases = [
        (
            json!({"provider": "openvpn"}),
            "supported values: \"stowaway\"",
        ),
        (
            json!({"provider": "stowaway", "sunset": "tomorrow"}),
            "sunset must be an RFC 3339 date-time",
        ),
        (
            json!({"provider": "stowaway", "maxConnectionAge": 0}),
            "maxConnectionAge",
        ),
        (
            json!({"provider": "stowaway", "providerParameter": {"subnet": "10.9.0.0/24"}}),
            "providerParameter may not be set at creation",
        ),
    ];
    for (index, (fields, expected)) in cases.into_iter().enumerate() {
        let mut body = gefyra_cli_body(&format!("bad-{index}"), &ns);
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let object: DynamicObject = serde_json::from_value(body)?;
        let error = api
            .create(&PostParams::default(), &object)
            .await
            .err()
            .with_context(|| format!("case {index} must be rejected"))?;
        let message = error.to_string();
        ensure!(
            api_status(&error) == Some(422),
            "case {index}: expected 422, got {message}"
        );
        ensure!(
            message.contains(expected),
            "case {index}: {message:?} should contain {expected:?}"
        );
    }
    // A valid sunset and age are accepted; providerParameter may be set once the client is
    // WAITING (no operator runs here, so it is set as the operator would).
    let mut body = gefyra_cli_body("good", &ns);
    body["sunset"] = json!("2099-01-01T00:00:00Z");
    body["maxConnectionAge"] = json!(3600);
    api.create(&PostParams::default(), &serde_json::from_value(body)?)
        .await?;
    let early = api
        .patch(
            "good",
            &PatchParams::default(),
            &Patch::Merge(json!({"providerParameter": {"subnet": "10.9.0.0/24"}})),
        )
        .await
        .err()
        .context("connecting before WAITING must be refused")?;
    ensure!(
        api_status(&early) == Some(422) && early.to_string().contains("may change only while"),
        "{early}"
    );
    api.patch(
        "good",
        &PatchParams::default(),
        &Patch::Merge(json!({"state": "WAITING"})),
    )
    .await?;
    for bad in [
        json!({"subnet": "10.9.0.1/24"}),
        json!({"publicKey": "abc"}),
    ] {
        let error = api
            .patch(
                "good",
                &PatchParams::default(),
                &Patch::Merge(json!({ "providerParameter": bad })),
            )
            .await
            .err()
            .with_context(|| format!("{bad} must be refused"))?;
        ensure!(api_status(&error) == Some(422), "{error}");
    }
    api.patch(
        "good",
        &PatchParams::default(),
        &Patch::Merge(json!({"providerParameter": {"subnet": "10.9.0.0/24"}})),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_follower_takes_over() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("leader").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    let mut first = Operator::start(&cluster, &ns, &["--leader-elect", "--identity", "first"])?;
    create_client(admin.clone(), &ns, "before").await?;
    wait_for_state(&clients, "before", ClientState::Waiting).await?;
    let second = Operator::start(&cluster, &ns, &["--leader-elect", "--identity", "second"])?;
    create_client(admin.clone(), &ns, "during").await?;
    wait_for_state(&clients, "during", ClientState::Waiting).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, follower_metrics) = second.http_get("/metrics").await?;
    ensure!(
        !follower_metrics.contains("gefyra_operator_reconciles_total"),
        "the follower reconciled: {follower_metrics}"
    );
    ensure!(
        !second.log_text().contains("became the leader"),
        "the follower must not lead"
    );
    // Readiness never waits for the lease (or a rolling update of two replicas could not
    // finish); leadership is a metric.
    ensure!(
        second.http_get("/readyz").await?.0 == 200,
        "the standby is ready"
    );
    ensure!(
        follower_metrics.contains("\ngefyra_operator_leader 0\n"),
        "the standby reports gefyra_operator_leader 0: {follower_metrics}"
    );
    let (_, leader_metrics) = first.http_get("/metrics").await?;
    ensure!(
        leader_metrics.contains("\ngefyra_operator_leader 1\n"),
        "the leader reports gefyra_operator_leader 1"
    );

    // A leader stopped as Kubernetes stops a Pod releases its lease: the standby leads well
    // within the lease's 15 s (it watches the Lease instead of waiting for it to expire).
    let stopped = Instant::now();
    ensure!(
        first.terminate().await?.success(),
        "the leader exits cleanly on SIGTERM"
    );
    ensure!(
        first.log_text().contains("released the leader lease"),
        "the leader released its lease: {}",
        first.log_text()
    );
    let took_over = eventually("the standby leads", WAIT, || async {
        let (_, metrics) = second.http_get("/metrics").await?;
        Ok(metrics
            .contains("\ngefyra_operator_leader 1\n")
            .then(|| stopped.elapsed()))
    })
    .await?;
    ensure!(
        took_over < Duration::from_secs(7),
        "the standby took {took_over:?} to lead after a clean stop (the lease lasts 15 s)"
    );
    create_client(admin.clone(), &ns, "after").await?;
    wait_for_state(&clients, "after", ClientState::Waiting).await?;
    ensure!(
        second.log_text().contains("became the leader"),
        "the follower took over: {}",
        second.log_text()
    );

    // A crashed leader (SIGKILL) cannot release: a third replica takes over once the lease
    // has expired (renewed 5 s before expiry, so at least 5 s remain), and not before.
    let third = Operator::start(
        &cluster,
        &ns,
        &[
            "--leader-elect",
            "--identity",
            "third",
            "--lease-duration-seconds",
            "15",
        ],
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut second = second;
    let crashed = Instant::now();
    second.kill().await?;
    let took_over = eventually("the third replica leads", WAIT, || async {
        let (_, metrics) = third.http_get("/metrics").await?;
        Ok(metrics
            .contains("\ngefyra_operator_leader 1\n")
            .then(|| crashed.elapsed()))
    })
    .await?;
    ensure!(
        took_over >= Duration::from_secs(4),
        "the third replica led {took_over:?} after the crash, while the lease was still valid"
    );
    create_client(admin.clone(), &ns, "after-crash").await?;
    wait_for_state(&clients, "after-crash", ClientState::Waiting).await?;
    Ok(())
}

#[tokio::test]
async fn crashes_at_random_points_converge_without_orphans() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("chaos").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    let names: Vec<String> = (0..100).map(|i| format!("chaos-{i:03}")).collect();

    let mut operator = Operator::start(&cluster, &ns, &[])?;
    let workload = {
        let (admin, ns, names) = (admin.clone(), ns.clone(), names.clone());
        tokio::spawn(async move {
            for name in &names {
                create_client(admin.clone(), &ns, name).await?;
            }
            // Every other client is deleted again while the operator keeps crashing.
            let api: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
            for name in names.iter().step_by(2) {
                api.delete(name, &DeleteParams::default()).await?;
            }
            anyhow::Ok(())
        })
    };
    for _ in 0..4 {
        let pause = 300 + u64::from(rand_u16() % 1500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        operator.kill().await?;
        operator = Operator::start(&cluster, &ns, &[])?;
    }
    workload.await??;

    let kept: Vec<&String> = names.iter().skip(1).step_by(2).collect();
    eventually(
        "every kept client is WAITING and every deleted one is gone",
        Duration::from_secs(180),
        || async {
            let list = clients.list(&ListParams::default()).await?;
            let waiting = list
                .items
                .iter()
                .filter(|c| c.state == ClientState::Waiting)
                .count();
            Ok((list.items.len() == kept.len() && waiting == kept.len()).then_some(()))
        },
    )
    .await?;
    let list = clients.list(&ListParams::default()).await?;
    let living: std::collections::BTreeSet<String> = list
        .items
        .iter()
        .flat_map(|c| {
            let name = c.metadata.name.as_deref().unwrap_or_default();
            // Each client has its own identity and its token minter.
            [
                GefyraClient::service_account_name_for(name),
                GefyraClient::token_minter_name_for(name),
            ]
        })
        .collect();
    let selector = ListParams::default().labels("app.kubernetes.io/managed-by=gefyra-operator");
    let orphans = |names: Vec<String>, kind: &str| -> Result<()> {
        let orphaned: Vec<&String> = names
            .iter()
            .filter(|name| !living.contains(*name))
            .collect();
        ensure!(orphaned.is_empty(), "{kind} without a client: {orphaned:?}");
        ensure!(
            names.len() == living.len(),
            "{kind}: {} for {} clients",
            names.len(),
            living.len()
        );
        Ok(())
    };
    orphans(
        names_of::<ServiceAccount>(&admin, &ns, &selector).await?,
        "ServiceAccount",
    )?;
    orphans(names_of::<Role>(&admin, &ns, &selector).await?, "Role")?;
    orphans(
        names_of::<RoleBinding>(&admin, &ns, &selector).await?,
        "RoleBinding",
    )?;
    Ok(())
}

fn rand_u16() -> u16 {
    rand::random()
}

/// Names of the objects of kind `K` in `namespace` that `selector` matches.
async fn names_of<K>(admin: &Client, namespace: &str, selector: &ListParams) -> Result<Vec<String>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    Ok(Api::<K>::namespaced(admin.clone(), namespace)
        .list(selector)
        .await?
        .items
        .into_iter()
        .filter_map(|object| object.meta().name.clone())
        .collect())
}

/// Reasons of the Events recorded about a client.
async fn event_reasons(admin: Client, namespace: &str, name: &str) -> Result<Vec<String>> {
    let events: Api<Event> = Api::namespaced(admin, namespace);
    let listed = events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await?;
    Ok(listed
        .items
        .into_iter()
        .filter_map(|event| event.reason)
        .collect())
}

#[tokio::test]
async fn tokens_are_renewed_before_they_expire_and_the_admin_is_told() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("renewal").await?;
    let admin = cluster.admin()?;
    // 10 minutes is the API server's shortest lifetime; renew 6 s after issue.
    let _operator = Operator::start(
        &cluster,
        &ns,
        &["--token-lifetime", "600", "--token-renew-before", "594"],
    )?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    create_client(admin.clone(), &ns, "renewed").await?;
    let first = wait_for_ready(&clients, "renewed").await?;
    let first_token = token_of(&first)?;
    let first_expiry = first
        .status
        .as_ref()
        .and_then(|status| status.credentials_expire_at.clone())
        .context("status.credentialsExpireAt is set")?;

    let renewed = eventually(
        "the token is renewed and its expiry recorded",
        WAIT,
        || async {
            let client = clients.get("renewed").await?;
            let expiry = client
                .status
                .as_ref()
                .and_then(|status| status.credentials_expire_at.clone());
            let moved = expiry.is_some_and(|expiry| expiry > first_expiry);
            Ok((token_of(&client)? != first_token && moved).then_some(client))
        },
    )
    .await?;
    let renewed_expiry = renewed
        .status
        .as_ref()
        .and_then(|status| status.credentials_expire_at.clone())
        .context("status.credentialsExpireAt is set")?;
    ensure!(
        renewed_expiry > first_expiry,
        "credentialsExpireAt moves on: {first_expiry} -> {renewed_expiry}"
    );
    Api::<GefyraClient>::namespaced(cluster.with_token(&token_of(&renewed)?)?, &ns)
        .get("renewed")
        .await
        .context("the renewed token works")?;
    eventually("a CredentialsRenewed Event", WAIT, || async {
        let reasons = event_reasons(admin.clone(), &ns, "renewed").await?;
        Ok(reasons
            .iter()
            .any(|reason| reason == "CredentialsRenewed")
            .then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn sunset_deletes_the_client_and_its_identity_at_that_time() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("sunset").await?;
    let admin = cluster.admin()?;
    let _operator = Operator::start(&cluster, &ns, &[])?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    let sunset = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(8);
    let mut body = gefyra_cli_body("ephemeral", &ns);
    body["sunset"] = json!(sunset.to_string());
    let object: DynamicObject = serde_json::from_value(body)?;
    dynamic_api(admin.clone(), &ns)
        .create(&PostParams::default(), &object)
        .await?;
    let ready = wait_for_ready(&clients, "ephemeral").await?;
    ensure!(
        jiff::Timestamp::now() < sunset,
        "the client was ready before its sunset"
    );
    // The token does not outlive the client: its lifetime is capped by the API server's
    // minimum of 10 minutes, but the client (and so the ServiceAccount) is gone at sunset.
    let token = token_of(&ready)?;
    wait_gone(&clients, "ephemeral").await?;
    ensure!(
        jiff::Timestamp::now() >= sunset,
        "deleted no earlier than its sunset"
    );
    ensure!(
        Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
            .get_opt("gefyra-client-ephemeral")
            .await?
            .is_none(),
        "ServiceAccount removed at sunset"
    );
    let as_client: Api<GefyraClient> = Api::namespaced(cluster.with_token(&token)?, &ns);
    eventually("the sunset client's token gets 401", WAIT, || async {
        match as_client.get("ephemeral").await {
            Err(error) if api_status(&error) == Some(401) => Ok(Some(())),
            _ => Ok(None),
        }
    })
    .await?;
    let reasons = event_reasons(admin, &ns, "ephemeral").await?;
    ensure!(
        reasons.iter().any(|reason| reason == "Sunset"),
        "a Sunset Event: {reasons:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_operator_does_its_whole_job_with_its_own_minimal_role() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("own-rbac").await?;
    let admin = cluster.admin()?;

    // Install exactly what `gefyra-operator rbac` prints.
    let printed = tokio::process::Command::new(gefyra_e2e::operator_binary())
        .args(["rbac", "--namespace", &ns])
        .output()
        .await?;
    ensure!(printed.status.success(), "gefyra-operator rbac failed");
    gefyra_e2e::apply_identity(admin.clone(), &ns, &String::from_utf8(printed.stdout)?).await?;
    let token = cluster.mint_token(&ns, "gefyra-operator", 3600).await?;
    let kubeconfig = cluster.kubeconfig_with_token(&token)?;
    // Both Role variants, and leader election, with nothing but that Role.
    let operator = Operator::start_with(
        &kubeconfig,
        &ns,
        &["--leader-elect", "--client-rbac", "gefyra-compat"],
    )?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    create_client(admin.clone(), &ns, "first").await?;
    let first = wait_for_ready(&clients, "first").await?;
    Api::<GefyraClient>::namespaced(cluster.with_token(&token_of(&first)?)?, &ns)
        .list(&ListParams::default())
        .await
        .context("gefyra-compat grants list, which the operator itself holds")?;
    // Connect (server key Secret, routes table, tunnel-address claim), disconnect, connect
    // again, and delete while ACTIVE: every write of the connection is covered by the Role.
    let connect = |parameter: serde_json::Value| {
        let clients = clients.clone();
        async move {
            clients
                .patch(
                    "first",
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "providerParameter": parameter })),
                )
                .await
        }
    };
    connect(serde_json::json!({"subnet": "172.30.0.0/16"})).await?;
    wait_for_state(&clients, "first", ClientState::Active).await?;
    connect(serde_json::Value::Null).await?;
    wait_for_state(&clients, "first", ClientState::Waiting).await?;
    connect(serde_json::json!({"subnet": "172.30.0.0/16"})).await?;
    wait_for_state(&clients, "first", ClientState::Active).await?;
    clients.delete("first", &DeleteParams::default()).await?;
    wait_gone(&clients, "first").await?;
    let log = operator.log_text();
    ensure!(
        // (not a bare "403": timestamps hold it)
        !log.contains("forbidden") && !log.contains("Forbidden") && !log.contains("code: 403"),
        "the operator was refused something:\n{log}"
    );
    let _ = std::fs::remove_file(kubeconfig);
    Ok(())
}
