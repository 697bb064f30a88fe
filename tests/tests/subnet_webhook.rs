//! The subnet webhook (gefyra-compat mode) against the real API server: a taken subnet is
//! refused with HTTP 500 — the code on which Gefyra's CLI picks another subnet by itself —
//! the client stays WAITING and connects with a free one; with the webhook down the API
//! server fails open and the operator's own check still refuses the subnet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gefyra_api::{ClientState, GefyraClient};
use gefyra_e2e::{
    Cluster, Operator, WAIT, api_status, create_client, eventually, free_port, install_crd,
    set_provider_parameter as connect, token_of, wait_for_ready, wait_for_state,
};
use gefyra_operator::webhook;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

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

/// Waits until the webhook refuses client b's (dry-run) ask for `subnet` with 500.
async fn refused_with_500(as_b: &Api<GefyraClient>, subnet: &str) -> Result<()> {
    eventually("the webhook refuses a taken subnet", WAIT, || async {
        Ok(ask_for_subnet(as_b, "b", subnet, true)
            .await
            .err()
            .filter(|error| api_status(error) == Some(500))
            .map(drop))
    })
    .await
}

#[tokio::test]
async fn a_taken_subnet_is_refused_with_500_and_the_client_picks_another() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    // An operator outside the cluster is reached by URL; the chart uses its Service.
    let Served {
        ns,
        admin,
        configurations,
        name,
        mut operator,
        ..
    } = serve_webhook(&cluster, "subnet-webhook").await?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
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
    refused_with_500(&as_b, "172.24.1.0/24")
        .await
        .with_context(|| operator.log_text())?;

    let refused = ask_for_subnet(&as_b, "b", "172.24.1.0/24", false)
        .await
        .unwrap_err();
    // The other client stays unnamed (its name and range are in the operator's log only).
    let message = refused.to_string();
    ensure!(
        api_status(&refused) == Some(500)
            && message.contains("overlaps another client's range")
            && !message.contains("client a")
            && !message.contains("172.24.0.0/16"),
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

/// A namespace whose clients' updates go to the webhook of an operator run here.
struct Served {
    ns: String,
    admin: kube::Client,
    address: SocketAddr,
    configurations: Api<ValidatingWebhookConfiguration>,
    /// The configuration's name.
    name: String,
    operator: Operator,
}

async fn serve_webhook(cluster: &Cluster, test: &str) -> Result<Served> {
    install_crd(cluster).await?;
    let ns = cluster.namespace(test).await?;
    let admin = cluster.admin()?;
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    let configuration = webhook::url_configuration(&ns, address);
    let name = configuration.metadata.name.clone().context("a name")?;
    configurations
        .create(&PostParams::default(), &configuration)
        .await?;
    let operator = Operator::start(
        cluster,
        &ns,
        &[
            "--client-rbac",
            "gefyra-compat",
            "--webhook-address",
            &address.to_string(),
        ],
    )?;
    Ok(Served {
        ns,
        admin,
        address,
        configurations,
        name,
        operator,
    })
}

/// A TLS client that trusts the webhook's CA (from its Secret), as any sender that reaches
/// the port could make: the webhook answers whoever connects.
async fn tls_connector(admin: kube::Client, namespace: &str) -> Result<TlsConnector> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let secret = Api::<Secret>::namespaced(admin, namespace)
        .get(webhook::TLS_SECRET)
        .await?;
    let ca = secret
        .data
        .and_then(|data| data.get("ca.crt").cloned())
        .context("the webhook Secret holds ca.crt")?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&ca.0) {
        roots.add(certificate?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// A connector once the webhook serves TLS with the CA in its Secret.
async fn serving_tls(
    admin: &kube::Client,
    namespace: &str,
    address: SocketAddr,
) -> Result<TlsConnector> {
    eventually("the webhook serves TLS", WAIT, || async {
        let connector = tls_connector(admin.clone(), namespace).await?;
        Ok(tls_to(&connector, address)
            .await
            .ok()
            .map(|_| connector.clone()))
    })
    .await
}

async fn tls_to(
    connector: &TlsConnector,
    address: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let stream = TcpStream::connect(address).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?.to_owned();
    Ok(connector.connect(name, stream).await?)
}

/// Whether the peer closes `stream` (EOF or reset) within `limit`, reading what it sends.
async fn closed_within(stream: &mut (impl AsyncRead + Unpin), limit: Duration) -> bool {
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// The status line of the HTTP answer read from `stream` within `limit`.
async fn status_within(stream: &mut (impl AsyncRead + Unpin), limit: Duration) -> Result<String> {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(limit, async {
        while !answer.windows(2).any(|two| two == b"\r\n") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => answer.extend_from_slice(&buffer[..read]),
            }
        }
    })
    .await
    .context("no answer in time")?;
    let text = String::from_utf8_lossy(&answer);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// No sender can cost the operator more than a bounded share: connections that never
/// finish their TLS handshake or their headers are closed, a body larger than a review is
/// refused from its headers without being read, and meanwhile a client connects as usual
/// and the webhook, once they are gone, answers again.
#[tokio::test]
async fn slow_and_oversized_requests_are_cut_off_while_clients_still_connect() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let Served {
        ns,
        admin,
        address,
        configurations,
        name,
        operator,
    } = serve_webhook(&cluster, "webhook-bounds").await?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    create_client(admin.clone(), &ns, "a").await?;
    wait_for_ready(&clients, "a").await?;
    connect(&clients, "a", json!({"subnet": "172.26.0.0/16"})).await?;
    wait_for_state(&clients, "a", ClientState::Active).await?;
    let connector = serving_tls(&admin, &ns, address)
        .await
        .with_context(|| operator.log_text())?;

    // Oversized: refused from its headers, the body never read (nothing of it is sent).
    let mut oversized = tls_to(&connector, address).await?;
    oversized
        .write_all(
            format!(
                "POST {} HTTP/1.1\r\nhost: webhook\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                webhook::PATH,
                1_900_000
            )
            .as_bytes(),
        )
        .await?;
    let status = status_within(&mut oversized, Duration::from_secs(5)).await?;
    ensure!(status.contains(" 413 "), "a 1.9 MB review: {status}");
    ensure!(
        closed_within(&mut oversized, Duration::from_secs(5)).await,
        "the connection of an oversized review is closed"
    );

    // Slow: TLS connections that never finish their headers, and many more that never
    // even say hello.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut stream = tls_to(&connector, address).await?;
        stream
            .write_all(format!("POST {} HTTP/1.1\r\nhost: webhook\r\n", webhook::PATH).as_bytes())
            .await?;
        slow.push(stream);
    }
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(TcpStream::connect(address).await?);
    }
    // Meanwhile a client connects (the API server fails open while the webhook is busy).
    create_client(admin.clone(), &ns, "b").await?;
    wait_for_ready(&clients, "b").await?;
    connect(&clients, "b", json!({"subnet": "172.27.0.0/16"})).await?;
    wait_for_state(&clients, "b", ClientState::Active).await?;
    let limit = Duration::from_secs(40);
    for (index, stream) in slow.iter_mut().enumerate() {
        ensure!(
            closed_within(stream, limit).await,
            "slow TLS connection {index} still open after {limit:?}\n{}",
            operator.log_text()
        );
    }
    let closed =
        futures::future::join_all(silent.iter_mut().map(|stream| closed_within(stream, limit)))
            .await;
    let open = closed.iter().filter(|closed| !**closed).count();
    ensure!(
        open == 0,
        "{open} of 200 silent connections still open after {limit:?}"
    );

    // The webhook answers again: a taken subnet is refused with 500.
    let b = clients.get("b").await?;
    let as_b: Api<GefyraClient> = Api::namespaced(cluster.with_token(&token_of(&b)?)?, &ns);
    connect(&as_b, "b", Value::Null).await?;
    wait_for_state(&clients, "b", ClientState::Waiting).await?;
    refused_with_500(&as_b, "172.26.1.0/24")
        .await
        .with_context(|| operator.log_text())?;
    configurations
        .delete(&name, &DeleteParams::default())
        .await?;
    Ok(())
}

/// The operator's resident memory (VmRSS), in bytes.
fn resident_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .context("VmRSS in /proc/<pid>/status")?;
    Ok(kib * 1024)
}

/// `senders` at once, each announcing a body of `declared` bytes and sending `sent` of
/// them as fast as the webhook takes them (for at most 10 s), then holding the
/// connection; those still connected are returned. A sender still waiting to be accepted
/// after 3 s (past the connection cap) gives up.
async fn send_unfinished(
    connector: &TlsConnector,
    address: SocketAddr,
    senders: usize,
    declared: usize,
    sent: usize,
) -> Vec<tokio_rustls::client::TlsStream<TcpStream>> {
    let chunk = vec![b' '; 16 * 1024];
    let one = || async {
        let connecting = tls_to(connector, address);
        let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(3), connecting).await
        else {
            return None;
        };
        let head = format!(
            "POST {} HTTP/1.1\r\nhost: webhook\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n",
            webhook::PATH
        );
        stream.write_all(head.as_bytes()).await.ok()?;
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            for _ in 0..sent / chunk.len() {
                if stream.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        })
        .await;
        Some(stream)
    };
    futures::future::join_all((0..senders).map(|_| one()))
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// 130 senders of a 1.9 MB review at once, and then 130 of a review just under the body
/// limit, each left unfinished and held open, cost the operator a few MiB — not the 250 MB
/// they would if each body were read whole.
#[tokio::test]
async fn many_large_reviews_at_once_cost_the_operator_little_memory() -> Result<()> {
    const SENDERS: usize = 130;
    let cluster = Cluster::from_env().await?;
    let served = serve_webhook(&cluster, "webhook-memory").await?;
    let connector = serving_tls(&served.admin, &served.ns, served.address)
        .await
        .with_context(|| served.operator.log_text())?;
    let pid = served.operator.child.id().context("the operator runs")?;
    let before = resident_bytes(pid)?;
    let mut grown = Vec::new();
    for (declared, sent) in [(1_900_000, 1_880_000), (65_000, 64_000)] {
        let held = send_unfinished(&connector, served.address, SENDERS, declared, sent).await;
        let now = resident_bytes(pid)?;
        eprintln!(
            "operator RSS {} MiB before, {} MiB with {} of {SENDERS} senders of {declared} bytes connected",
            before >> 20,
            now >> 20,
            held.len()
        );
        grown.push((declared, now.saturating_sub(before)));
    }
    for (declared, grown) in grown {
        ensure!(
            grown < 48 << 20,
            "{SENDERS} reviews of {declared} bytes grew the operator by {} MiB",
            grown >> 20
        );
    }
    served
        .configurations
        .delete(&served.name, &DeleteParams::default())
        .await?;
    Ok(())
}

/// The operator's one cluster-wide grant — `patch` on the webhook's configuration, to
/// publish its CA — reaches the CA and nothing else: with the operator's own token, a change
/// of the rules, of where reviews go, of the failure policy or of the labels is refused by
/// the API server, with a message naming the field; a new caBundle passes (dry runs all).
#[tokio::test]
async fn the_operators_identity_may_change_only_the_webhooks_ca() -> Result<()> {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};

    let cluster = Cluster::from_env().await?;
    let ns = cluster.namespace("webhook-ca-only").await?;
    let admin = cluster.admin()?;
    // What the chart installs in gefyra-compat mode, and the operator's ServiceAccount.
    let install = webhook::Install::new(&ns, "gefyra-operator");
    let apply = PatchParams::apply("gefyra-e2e").force();
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: kube::api::ObjectMeta {
                    name: Some("gefyra-operator".into()),
                    ..Default::default()
                },
                ..ServiceAccount::default()
            },
        )
        .await?;
    let name = install
        .configuration
        .metadata
        .name
        .clone()
        .context("a name")?;
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    configurations
        .patch(&name, &apply, &Patch::Apply(&install.configuration))
        .await?;
    Api::<ClusterRole>::all(admin.clone())
        .patch(&name, &apply, &Patch::Apply(&install.role))
        .await?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .patch(&name, &apply, &Patch::Apply(&install.role_binding))
        .await?;
    let policy = install.policy.metadata.name.clone().context("a name")?;
    Api::<ValidatingAdmissionPolicy>::all(admin.clone())
        .patch(&policy, &apply, &Patch::Apply(&install.policy))
        .await
        .context("the API server takes the policy (its CEL compiles within the cost budget)")?;
    Api::<ValidatingAdmissionPolicyBinding>::all(admin.clone())
        .patch(&policy, &apply, &Patch::Apply(&install.policy_binding))
        .await?;

    let token = cluster.mint_token(&ns, "gefyra-operator", 600).await?;
    let as_operator: Api<ValidatingWebhookConfiguration> = Api::all(cluster.with_token(&token)?);
    let dry_run = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let json_patch = |operations: Value| -> Result<Patch<Value>> {
        Ok(Patch::Json(serde_json::from_value(operations)?))
    };
    let changes = [
        (
            "webhooks[*].rules",
            json!([{"op": "replace", "path": "/webhooks/0/rules/0/resources", "value": ["secrets"]}]),
        ),
        (
            "webhooks[*].rules",
            json!([{"op": "replace", "path": "/webhooks/0/rules/0/apiGroups", "value": ["*"]}]),
        ),
        (
            "webhooks[*].clientConfig.url",
            json!([
                {"op": "remove", "path": "/webhooks/0/clientConfig/service"},
                {"op": "add", "path": "/webhooks/0/clientConfig/url", "value": "https://203.0.113.9/steal"},
            ]),
        ),
        (
            "webhooks[*].clientConfig.service",
            json!([{"op": "replace", "path": "/webhooks/0/clientConfig/service/name", "value": "elsewhere"}]),
        ),
        (
            "webhooks[*].failurePolicy",
            json!([{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Fail"}]),
        ),
        (
            "webhooks[*].timeoutSeconds",
            json!([{"op": "replace", "path": "/webhooks/0/timeoutSeconds", "value": 30}]),
        ),
        (
            "webhooks[*].namespaceSelector",
            json!([{"op": "replace", "path": "/webhooks/0/namespaceSelector", "value": {}}]),
        ),
        (
            "webhooks[*].matchConditions",
            json!([{"op": "remove", "path": "/webhooks/0/matchConditions"}]),
        ),
        (
            "the webhooks (their names, number and order)",
            json!([{"op": "replace", "path": "/webhooks/0/name", "value": "other.gefyra.dev"}]),
        ),
        (
            "metadata.labels",
            json!([{"op": "add", "path": "/metadata/labels", "value": {"taken": "over"}}]),
        ),
    ];
    // The binding takes effect within a moment of its creation.
    let (first_field, first_change) = &changes[0];
    eventually(
        "the policy refuses the operator's first change",
        WAIT,
        || async {
            Ok(as_operator
                .patch(&name, &dry_run, &json_patch(first_change.clone())?)
                .await
                .err()
                .filter(|error| error.to_string().contains(first_field))
                .map(drop))
        },
    )
    .await?;
    for (field, change) in &changes {
        let refused = as_operator
            .patch(&name, &dry_run, &json_patch(change.clone())?)
            .await;
        let error = match refused {
            Ok(_) => anyhow::bail!("the operator's identity changed {field}: {change}"),
            Err(error) => error,
        };
        ensure!(
            error
                .to_string()
                .contains(&format!("{field} of ValidatingWebhookConfiguration {name}"))
                && error.to_string().contains("caBundle and nothing else"),
            "the refusal of {field} names it: {error}"
        );
    }
    // The CA is the operator's to publish, as it does (server-side apply of that field).
    let ca = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{"name": webhook::WEBHOOK_NAME, "clientConfig": {"caBundle": "Zm9v"}}],
    });
    as_operator
        .patch(
            &name,
            &PatchParams {
                dry_run: true,
                ..PatchParams::apply("gefyra-operator-webhook").force()
            },
            &Patch::Apply(ca),
        )
        .await
        .context("the operator publishes a new caBundle")?;
    as_operator
        .patch(
            &name,
            &dry_run,
            &json_patch(json!([{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": "YmFy"}]))?,
        )
        .await
        .context("a JSON patch of the caBundle alone")?;
    // An admin may still change the rest (the policy binds the operator only).
    configurations
        .patch(&name, &dry_run, &json_patch(changes[4].1.clone())?)
        .await
        .context("an admin changes the failure policy")?;
    // And the operator may not create the configuration anew once it is gone.
    configurations
        .delete(&name, &DeleteParams::default())
        .await?;
    let created = as_operator
        .patch(
            &name,
            &PatchParams {
                dry_run: true,
                ..PatchParams::apply("gefyra-operator-webhook").force()
            },
            &Patch::Apply(&install.configuration),
        )
        .await;
    // RBAC refuses it first (server-side apply needs `create` to create); the policy,
    // which matches CREATE as well, would be the second line.
    ensure!(
        created.as_ref().is_err_and(|error| {
            error.to_string().contains("is created by an admin") || api_status(error) == Some(403)
        }),
        "server-side apply as the operator creates the configuration: {created:?}"
    );
    Api::<ValidatingAdmissionPolicyBinding>::all(admin.clone())
        .delete(&policy, &DeleteParams::default())
        .await?;
    Api::<ValidatingAdmissionPolicy>::all(admin.clone())
        .delete(&policy, &DeleteParams::default())
        .await?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .delete(&name, &DeleteParams::default())
        .await?;
    Api::<ClusterRole>::all(admin)
        .delete(&name, &DeleteParams::default())
        .await?;
    Ok(())
}
