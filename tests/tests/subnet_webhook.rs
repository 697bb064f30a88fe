//! The subnet webhook (gefyra-compat mode) against the real API server: a taken subnet is
//! refused with HTTP 500 — the code on which Gefyra's CLI picks another subnet by itself —
//! the client stays WAITING and connects with a free one; with the webhook down the API
//! server fails open and the operator's own check still refuses the subnet.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gefyra_api::{ClientState, GefyraClient};
use gefyra_e2e::{
    Cluster, Operator, WAIT, api_status, create_client, eventually, free_port, install_crd,
    set_provider_parameter as connect, token_of, wait_for_ready, wait_for_state,
};
use gefyra_operator::webhook;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// Gefyra's CLI's own patch, made with the client's token.
async fn ask_for_subnet(
    api: &Api<GefyraClient>,
    name: &str,
    subnet: &str,
    dry_run: bool,
) -> kube::Result<GefyraClient> {
    let params = PatchParams {
        dry_run,
        ..PatchParams::default()
    };
    api.patch(
        name,
        &params,
        &Patch::Merge(json!({"providerParameter": {"subnet": subnet}})),
    )
    .await
}

#[tokio::test]
async fn a_taken_subnet_is_refused_with_500_and_the_client_picks_another() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("subnet-webhook").await?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    // An operator outside the cluster is reached by URL; the chart uses its Service.
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    let configuration = webhook::url_configuration(&ns, address);
    let name = configuration.metadata.name.clone().context("a name")?;
    configurations
        .create(&PostParams::default(), &configuration)
        .await?;
    let mut operator = Operator::start(
        &cluster,
        &ns,
        &[
            "--client-rbac",
            "gefyra-compat",
            "--webhook-address",
            &address.to_string(),
        ],
    )?;
    for client in ["a", "b"] {
        create_client(admin.clone(), &ns, client).await?;
    }
    for client in ["a", "b"] {
        wait_for_ready(&clients, client).await?;
    }
    connect(&clients, "a", json!({"subnet": "172.24.0.0/16"})).await?;
    wait_for_state(&clients, "a", ClientState::Active).await?;
    let b = clients.get("b").await?;
    let as_b: Api<GefyraClient> = Api::namespaced(cluster.with_token(&token_of(&b)?)?, &ns);

    // The operator publishes its CA; the API server then calls the webhook (dry runs pass
    // through admission and change nothing).
    let configurations = &configurations;
    eventually("the operator publishes the webhook's CA", WAIT, || async {
        let published = configurations.get(&name).await?;
        let bundle = published.webhooks.unwrap_or_default()[0]
            .client_config
            .ca_bundle
            .clone();
        Ok(bundle.filter(|bundle| !bundle.0.is_empty()).map(drop))
    })
    .await
    .with_context(|| operator.log_text())?;
    eventually("the webhook refuses a taken subnet", WAIT, || async {
        Ok(ask_for_subnet(&as_b, "b", "172.24.1.0/24", true)
            .await
            .err()
            .filter(|error| api_status(error) == Some(500))
            .map(drop))
    })
    .await
    .with_context(|| operator.log_text())?;

    let refused = ask_for_subnet(&as_b, "b", "172.24.1.0/24", false)
        .await
        .unwrap_err();
    ensure!(
        api_status(&refused) == Some(500)
            && refused.to_string().contains("172.24.0.0/16 of client a"),
        "{refused}"
    );
    let waiting = clients.get("b").await?;
    ensure!(
        waiting.state == ClientState::Waiting && waiting.provider_parameter.is_none(),
        "a refused subnet leaves the client WAITING, where Gefyra's CLI can go on: {:?}",
        waiting.state
    );
    // Another subnet: accepted, connected.
    ask_for_subnet(&as_b, "b", "172.25.0.0/16", false).await?;
    wait_for_state(&clients, "b", ClientState::Active).await?;
    // Disconnecting never asks the webhook.
    connect(&as_b, "b", Value::Null).await?;
    wait_for_state(&clients, "b", ClientState::Waiting).await?;

    // The webhook down: the API server fails open (within the webhook's timeout), and the
    // operator, once back without a webhook, still refuses the conflict itself.
    operator.kill().await?;
    let started = std::time::Instant::now();
    ask_for_subnet(&as_b, "b", "172.24.2.0/24", false).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "the patch waited {:?}",
        started.elapsed()
    );
    let _operator = Operator::start(&cluster, &ns, &["--client-rbac", "gefyra-compat"])?;
    let conflict = wait_for_state(&clients, "b", ClientState::Error).await?;
    ensure!(
        conflict
            .ready_condition()
            .map(|ready| ready.reason.as_str())
            == Some("SubnetConflict")
    );
    configurations
        .delete(&name, &DeleteParams::default())
        .await?;
    Ok(())
}
