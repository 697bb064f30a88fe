//! Short-lived credentials against the real control plane and operator: a --short-lived
//! client file holds only a token minter; kubectl, through the generated kubeconfig and the
//! credential plugin, gets short-lived tokens for the client's own identity.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine;
use gefyra_api::GefyraClient;
use gefyra_e2e::{
    Cluster, CommandOutput, KubectlGefyra, Operator, controlplane_tool, eventually, install_crd,
    kubectl_gefyra_binary,
};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;
use serde_json::Value;

const REVOKED: i32 = 10;

/// Runs a program with a token cache of the test's own and no admin kubeconfig around.
async fn run(
    program: &Path,
    args: &[&str],
    cache: &Path,
    exec_info: Option<&str>,
) -> Result<CommandOutput> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("KUBECACHEDIR", cache)
        .env("KUBECONFIG", "/nonexistent")
        .env_remove("KUBERNETES_EXEC_INFO");
    if let Some(info) = exec_info {
        command.env("KUBERNETES_EXEC_INFO", info);
    }
    let output = command.output().await?;
    Ok(CommandOutput {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

const EXEC_INFO_V1: &str = r#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","spec":{"interactive":false}}"#;
const EXEC_INFO_V1BETA1: &str = r#"{"apiVersion":"client.authentication.k8s.io/v1beta1","kind":"ExecCredential","spec":{"interactive":false}}"#;

async fn mint_as(
    cluster: &Cluster,
    token: &str,
    namespace: &str,
    account: &str,
) -> Result<(), kube::Error> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let client = cluster.with_token(token).expect("a client");
    Api::<ServiceAccount>::namespaced(client, namespace)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .map(drop)
}

#[tokio::test]
async fn kubectl_gets_short_lived_tokens_through_the_plugin_until_the_client_is_deleted()
-> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("credentials").await?;
    let _operator = Operator::start(&cluster, &ns, &[])?;
    let admin = KubectlGefyra::new(&cluster.kubeconfig, &ns)?;
    admin
        .ok(&["clients", "create", "--client-id", "dev"])
        .await?;
    admin
        .ok(&["clients", "create", "--client-id", "other"])
        .await?;

    // The short-lived file carries only the minter's token, marked as such.
    admin
        .ok(&[
            "clients",
            "config",
            "dev",
            "--host",
            "203.0.113.7",
            "--short-lived",
            "-o",
            "dev.json",
        ])
        .await?;
    let client_file = admin.workdir.join("dev.json");
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&client_file)?)?;
    ensure!(
        file["credential"] == "token-minter",
        "marked: {:?}",
        file["credential"]
    );
    let minter_token = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(file["token"].as_str().context("a token")?)?,
    )?;
    // The plain file stays exactly Gefyra's (no marker).
    let plain = admin
        .ok(&["clients", "config", "dev", "--host", "203.0.113.7"])
        .await?;
    let plain: serde_json::Map<String, Value> = serde_json::from_str(&plain)?;
    ensure!(
        !plain.contains_key("credential"),
        "Gefyra's keys only: {:?}",
        plain.keys()
    );

    // The minter may mint for dev's identity and nothing else; dev's identity cannot mint.
    let as_minter = cluster.with_token(&minter_token)?;
    let refused = Api::<GefyraClient>::namespaced(as_minter, &ns)
        .get("dev")
        .await;
    ensure!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 403),
        "the minter cannot read clients: {refused:?}"
    );
    mint_as(&cluster, &minter_token, &ns, "gefyra-client-dev")
        .await
        .context("the minter mints for dev")?;
    for account in ["gefyra-client-other", "gefyra-client-dev-minter"] {
        let refused = mint_as(&cluster, &minter_token, &ns, account).await;
        ensure!(
            matches!(&refused, Err(kube::Error::Api(s)) if s.code == 403),
            "no token for {account}: {refused:?}"
        );
    }
    let dev_token = gefyra_e2e::token_of(
        &Api::<GefyraClient>::namespaced(cluster.admin()?, &ns)
            .get("dev")
            .await?,
    )?;
    let refused = mint_as(&cluster, &dev_token, &ns, "gefyra-client-dev").await;
    ensure!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 403),
        "dev's identity cannot mint for itself: {refused:?}"
    );

    // The kubeconfig: an exec plugin, no secret in it.
    let developer = tempdir("developer")?;
    let cache = developer.join("cache");
    let kubeconfig = developer.join("kubeconfig");
    let written = run(
        &kubectl_gefyra_binary(),
        &[
            "kubeconfig",
            "-f",
            client_file.to_str().context("utf-8")?,
            "-o",
            kubeconfig.to_str().context("utf-8")?,
        ],
        &cache,
        None,
    )
    .await?;
    ensure!(written.code == 0, "{written:?}");
    let text = std::fs::read_to_string(&kubeconfig)?;
    ensure!(
        !text.contains(file["token"].as_str().unwrap_or("-")) && !text.contains(&minter_token),
        "no credential in the kubeconfig"
    );
    let parsed: Value = serde_saphyr::from_str(&text)?;
    let exec = &parsed["users"][0]["user"]["exec"];
    ensure!(
        exec["apiVersion"] == "client.authentication.k8s.io/v1"
            && exec["interactiveMode"] == "Never"
            && exec["provideClusterInfo"] == true
            && exec["installHint"].is_string(),
        "{exec}"
    );

    // kubectl works through the plugin within the client's role, and only there.
    let kubectl = controlplane_tool("kubectl")?;
    let kc = kubeconfig.to_str().context("utf-8")?;
    let own = run(
        &kubectl,
        &[
            "--kubeconfig",
            kc,
            "get",
            "gefyraclient",
            "dev",
            "-o",
            "name",
        ],
        &cache,
        None,
    )
    .await?;
    ensure!(
        own.code == 0 && own.stdout.trim() == "gefyraclient.gefyra.dev/dev",
        "{own:?}"
    );
    for forbidden in [
        &["get", "gefyraclient", "other"][..],
        &["get", "gefyraclients"],
        &["get", "secrets"],
        &["get", "pods"],
    ] {
        let mut args = vec!["--kubeconfig", kc];
        args.extend_from_slice(forbidden);
        let refused = run(&kubectl, &args, &cache, None).await?;
        ensure!(
            refused.code != 0 && refused.stderr.contains("Forbidden"),
            "{forbidden:?} is refused: {refused:?}"
        );
    }
    let dir_mode = std::fs::metadata(cache.join("gefyra"))?
        .permissions()
        .mode()
        & 0o777;
    ensure!(dir_mode == 0o700, "cache directory mode {dir_mode:o}");
    let entries: Vec<PathBuf> = std::fs::read_dir(cache.join("gefyra"))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    ensure!(entries.len() == 1, "one cache entry: {entries:?}");
    let mode = std::fs::metadata(&entries[0])?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "cache entry mode {mode:o}");

    // 20 concurrent get-token calls on an empty cache mint exactly one token.
    let fresh_cache = developer.join("fresh-cache");
    let plugin = kubectl_gefyra_binary();
    let path = client_file.to_str().context("utf-8")?;
    let get_token = ["get-token", "-f", path];
    let calls = (0..20).map(|_| run(&plugin, &get_token, &fresh_cache, Some(EXEC_INFO_V1)));
    let outputs = futures::future::join_all(calls).await;
    let mut tokens = std::collections::BTreeSet::new();
    for output in outputs {
        let output = output?;
        ensure!(output.code == 0, "{output:?}");
        let credential: Value = serde_json::from_str(&output.stdout)?;
        ensure!(
            credential["apiVersion"] == "client.authentication.k8s.io/v1",
            "{credential}"
        );
        ensure!(
            credential["status"]["expirationTimestamp"].is_string(),
            "{credential}"
        );
        tokens.insert(
            credential["status"]["token"]
                .as_str()
                .context("a token")?
                .to_string(),
        );
    }
    ensure!(
        tokens.len() == 1,
        "one token minted for 20 calls, got {}",
        tokens.len()
    );
    let minted = tokens.into_iter().next().context("a token")?;
    ensure!(
        minted != dev_token && minted != minter_token,
        "a fresh token"
    );
    // Asked in v1beta1, answered in v1beta1 (from the cache: the same token).
    let beta = run(
        &plugin,
        &["get-token", "-f", path],
        &fresh_cache,
        Some(EXEC_INFO_V1BETA1),
    )
    .await?;
    let beta: Value = serde_json::from_str(&beta.stdout)?;
    ensure!(
        beta["apiVersion"] == "client.authentication.k8s.io/v1beta1"
            && beta["status"]["token"] == minted.as_str(),
        "{beta}"
    );
    // A corrupt entry is a miss; --force-refresh mints anew.
    for entry in std::fs::read_dir(fresh_cache.join("gefyra"))?.flatten() {
        if entry.path().extension().is_some_and(|e| e == "json") {
            std::fs::write(entry.path(), "{ not json")?;
        }
    }
    let after_corruption = run(&plugin, &["get-token", "-f", path], &fresh_cache, None).await?;
    ensure!(after_corruption.code == 0, "{after_corruption:?}");
    let refreshed = run(
        &plugin,
        &["get-token", "-f", path, "--force-refresh"],
        &fresh_cache,
        None,
    )
    .await?;
    let refreshed: Value = serde_json::from_str(&refreshed.stdout)?;
    ensure!(
        refreshed["status"]["token"] != minted.as_str(),
        "--force-refresh mints a new token"
    );
    // A kubeconfig for another server gets nothing.
    let elsewhere = r#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","spec":{"interactive":false,"cluster":{"server":"https://attacker.example:6443"}}}"#;
    let refused = run(
        &plugin,
        &["get-token", "-f", path],
        &fresh_cache,
        Some(elsewhere),
    )
    .await?;
    ensure!(
        refused.code == 5 && refused.stdout.is_empty(),
        "{refused:?}"
    );
    let cleared = run(&plugin, &["cache", "clear"], &fresh_cache, None).await?;
    ensure!(
        cleared.code == 0 && cleared.stderr.contains("removed"),
        "{cleared:?}"
    );

    // Deleting the client revokes everything: the plugin says so, a minted token gets 401.
    admin.ok(&["clients", "delete", "dev"]).await?;
    let minted_client = cluster.with_token(&minted)?;
    eventually(
        "a token minted before the delete is refused",
        Duration::from_secs(30),
        || async {
            let result = Api::<GefyraClient>::namespaced(minted_client.clone(), &ns)
                .get("dev")
                .await;
            Ok(matches!(result, Err(kube::Error::Api(ref s)) if s.code == 401).then_some(()))
        },
    )
    .await?;
    let revoked = run(
        &plugin,
        &["get-token", "-f", path, "--force-refresh"],
        &cache,
        Some(EXEC_INFO_V1),
    )
    .await?;
    ensure!(revoked.code == REVOKED, "{revoked:?}");
    let line = revoked.stderr.trim_end();
    ensure!(
        line.starts_with("error: ")
            && !line.contains('\n')
            && line.contains("revoked")
            && line.contains("ask your Gefyra admin"),
        "one actionable line: {line:?}"
    );
    let left = std::fs::read_dir(cache.join("gefyra"))?
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|e| e == "json"))
        .count();
    ensure!(left == 0, "the revoked entry was removed from the cache");
    let through_kubectl = run(
        &kubectl,
        &["--kubeconfig", kc, "get", "gefyraclient", "dev"],
        &cache,
        None,
    )
    .await?;
    ensure!(through_kubectl.code != 0, "{through_kubectl:?}");
    let _ = std::fs::remove_dir_all(&developer);
    Ok(())
}

fn tempdir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("gefyra-{name}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
