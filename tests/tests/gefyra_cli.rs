//! Wire compatibility: the real `gefyra` CLI from PyPI (installed by `tests/gefyra-cli.sh`)
//! manages clients against our operator on the real control plane.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use base64::Engine;
use gefyra_api::GefyraClient;
use gefyra_e2e::{Cluster, DockerDaemon, Operator, api_status, eventually, install_crd};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

/// Gefyra's CLI always works in this namespace.
const GEFYRA_NAMESPACE: &str = "gefyra";
const WAIT: Duration = Duration::from_secs(60);

struct GefyraCli<'a> {
    program: String,
    cluster: &'a Cluster,
    docker: &'a DockerDaemon,
    home: &'a Path,
}

impl GefyraCli<'_> {
    /// Runs `gefyra ARGS`; fails with its output unless it exits 0.
    async fn run(&self, args: &[&str]) -> Result<String> {
        let Output {
            status,
            stdout,
            stderr,
        } = tokio::process::Command::new(&self.program)
            .args(args)
            .env("KUBECONFIG", &self.cluster.kubeconfig)
            .env("DOCKER_HOST", &self.docker.host)
            .env("HOME", self.home)
            .output()
            .await
            .with_context(|| format!("running {} {args:?}", self.program))?;
        let stdout = String::from_utf8_lossy(&stdout).into_owned();
        let stderr = String::from_utf8_lossy(&stderr);
        ensure!(
            status.success(),
            "gefyra {args:?} failed ({status}):\n{stdout}\n{stderr}"
        );
        Ok(format!("{stdout}{stderr}"))
    }
}

#[tokio::test]
async fn the_real_gefyra_cli_creates_lists_configures_and_deletes_clients() -> Result<()> {
    let program = std::env::var("GEFYRA_CLI").context(
        "GEFYRA_CLI is not set: run through `make test`, which installs the CLI with tests/gefyra-cli.sh",
    )?;
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let admin = cluster.admin()?;
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(GEFYRA_NAMESPACE.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match namespaces.create(&PostParams::default(), &namespace).await {
        Err(error) if api_status(&error) == Some(409) => {}
        other => drop(other?),
    }
    let _operator = Operator::start(&cluster, GEFYRA_NAMESPACE, &[])?;
    let docker = DockerDaemon::start().await?;
    let home = std::env::temp_dir().join(format!("gefyra-cli-home-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&home)?;
    let gefyra = GefyraCli {
        program,
        cluster: &cluster,
        docker: &docker,
        home: &home,
    };
    let id = "compat0123456789abcdef";

    let created = gefyra
        .run(&["clients", "create", "--client-id", id, "--timeout", "60"])
        .await?;
    ensure!(
        created.contains("1 GefyraClient(s) created successfully"),
        "create output: {created}"
    );

    let listed = gefyra.run(&["clients", "ls"]).await?;
    let row = listed
        .lines()
        .find(|line| line.starts_with(id))
        .with_context(|| format!("`clients ls` lists {id}:\n{listed}"))?;
    ensure!(row.contains("WAITING"), "listed as WAITING: {row}");

    let config = gefyra
        .run(&["clients", "config", id, "--host", "203.0.113.7"])
        .await?;
    let json_text = config
        .lines()
        .find(|line| line.starts_with('{'))
        .with_context(|| format!("`clients config` prints a JSON client file:\n{config}"))?;
    let order = [
        "client_id",
        "kubernetes_server",
        "provider",
        "namespace",
        "gefyra_server",
        "token",
        "ca_crt",
    ];
    let positions: Vec<_> = order
        .iter()
        .map(|key| json_text.find(&format!("\"{key}\":")))
        .collect();
    ensure!(
        positions.iter().all(Option::is_some) && positions.is_sorted(),
        "client file keys in Gefyra's order {order:?}: {json_text}"
    );
    let file: serde_json::Value = serde_json::from_str(json_text)?;
    ensure!(file["client_id"] == id, "client_id: {file}");
    ensure!(
        file["gefyra_server"] == "203.0.113.7:31820",
        "gefyra_server: {file}"
    );
    ensure!(file["namespace"] == GEFYRA_NAMESPACE, "namespace: {file}");
    let token = base64::engine::general_purpose::STANDARD
        .decode(file["token"].as_str().context("token is a string")?)?;
    let as_client = cluster.with_token(&String::from_utf8(token)?)?;
    Api::<GefyraClient>::namespaced(as_client, GEFYRA_NAMESPACE)
        .get(id)
        .await
        .context("the client file's token reads its own GefyraClient")?;

    let deleted = gefyra.run(&["clients", "delete", id]).await?;
    ensure!(
        deleted.contains(&format!("GefyraClient {id} marked for deletion")),
        "delete output: {deleted}"
    );
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), GEFYRA_NAMESPACE);
    let accounts: Api<ServiceAccount> = Api::namespaced(admin, GEFYRA_NAMESPACE);
    eventually(
        "the client and its ServiceAccount are gone",
        WAIT,
        || async {
            let gone = clients.get_opt(id).await?.is_none()
                && accounts
                    .get_opt(&format!("gefyra-client-{id}"))
                    .await?
                    .is_none();
            Ok(gone.then_some(()))
        },
    )
    .await?;
    let _ = std::fs::remove_dir_all(&home);
    Ok(())
}
