//! Proof that the local control plane is the real thing: RBAC decisions, the TokenRequest
//! API, token invalidation, ownerReference garbage collection, namespace deletion, and a
//! teardown that leaves no process behind.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gefyra_e2e::{Cluster, api_status, controlplane_script, eventually, processes_mentioning};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::{Api, Resource};

const WAIT: Duration = Duration::from_secs(60);

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        ..ObjectMeta::default()
    }
}

#[tokio::test]
async fn token_request_rbac_allows_forbids_and_dies_with_its_service_account() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let ns = cluster.namespace("token-rbac").await?;
    let admin = cluster.admin()?;
    let pp = PostParams::default();

    let configmaps: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    configmaps
        .create(
            &pp,
            &ConfigMap {
                metadata: meta("visible"),
                ..ConfigMap::default()
            },
        )
        .await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns);
    accounts
        .create(
            &pp,
            &ServiceAccount {
                metadata: meta("reader"),
                ..ServiceAccount::default()
            },
        )
        .await?;
    let role = Role {
        metadata: meta("read-configmaps"),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            verbs: vec!["get".into()],
            ..PolicyRule::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&pp, &role)
        .await?;
    let binding = RoleBinding {
        metadata: meta("reader-reads-configmaps"),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: "read-configmaps".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "reader".into(),
            namespace: Some(ns.clone()),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&pp, &binding)
        .await?;

    let token = cluster.mint_token(&ns, "reader", 3600).await?;
    let as_reader = cluster.with_token(&token)?;

    // RBAC decides per request; the binding may need a moment to reach the authorizer's cache.
    let own_configmaps: Api<ConfigMap> = Api::namespaced(as_reader.clone(), &ns);
    eventually("reader can get the configmap", WAIT, || async {
        Ok(own_configmaps.get("visible").await.ok())
    })
    .await?;
    let secrets: Api<Secret> = Api::namespaced(as_reader.clone(), &ns);
    let denied = secrets
        .list(&Default::default())
        .await
        .expect_err("listing secrets must be forbidden");
    assert_eq!(api_status(&denied), Some(403), "listing secrets: {denied}");
    let denied = own_configmaps
        .delete("visible", &DeleteParams::default())
        .await
        .expect_err("delete must be forbidden");
    assert_eq!(
        api_status(&denied),
        Some(403),
        "deleting a configmap: {denied}"
    );

    accounts.delete("reader", &DeleteParams::default()).await?;
    eventually(
        "the deleted service account's token gets 401",
        WAIT,
        || async {
            match own_configmaps.get("visible").await {
                Err(error) if api_status(&error) == Some(401) => Ok(Some(())),
                Err(error) => Err(error.into()),
                Ok(_) => Ok(None),
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn garbage_collector_deletes_dependents_of_a_deleted_owner() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let ns = cluster.namespace("owner-gc").await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(cluster.admin()?, &ns);
    let pp = PostParams::default();
    let owner = configmaps
        .create(
            &pp,
            &ConfigMap {
                metadata: meta("owner"),
                ..ConfigMap::default()
            },
        )
        .await?;
    let owner_ref = owner.controller_owner_ref(&()).context("owner has a uid")?;
    let dependent = ConfigMap {
        metadata: ObjectMeta {
            owner_references: Some(vec![owner_ref]),
            ..meta("dependent")
        },
        ..ConfigMap::default()
    };
    configmaps.create(&pp, &dependent).await?;

    configmaps
        .delete("owner", &DeleteParams::background())
        .await?;
    eventually("the dependent is garbage-collected", WAIT, || async {
        Ok(configmaps
            .get_opt("dependent")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn namespace_deletion_completes() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let ns = cluster.namespace("ns-delete").await?;
    let admin = cluster.admin()?;
    Api::<ConfigMap>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta("content"),
                ..ConfigMap::default()
            },
        )
        .await?;
    let namespaces: Api<Namespace> = Api::all(admin);
    // The controller-manager fills every namespace with kube-root-ca.crt and a default
    // ServiceAccount: seeing them proves it runs, and the namespace controller must remove them.
    eventually("kube-root-ca.crt is published", WAIT, || async {
        let cms: Api<ConfigMap> = Api::namespaced(cluster.admin()?, &ns);
        Ok(cms.get_opt("kube-root-ca.crt").await?.map(|_| ()))
    })
    .await?;
    namespaces.delete(&ns, &DeleteParams::default()).await?;
    eventually("the namespace disappears", WAIT, || async {
        Ok(namespaces.get_opt(&ns).await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

/// Starts a second control plane with `run DIR -- CMD` and returns the script's child.
fn spawn_run(
    dir: &std::path::Path,
    cmd: &[&str],
    extra_env: &[(&str, &str)],
) -> Result<tokio::process::Child> {
    let mut command = tokio::process::Command::new("bash");
    command
        .arg(controlplane_script())
        .arg("run")
        .arg(dir)
        .arg("--")
        .args(cmd);
    for (key, value) in extra_env {
        command.env(key, value);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(command.spawn()?)
}

async fn no_process_left(dir: &std::path::Path) -> Result<()> {
    let needle = dir.to_string_lossy().to_string();
    eventually(
        "no process of the control plane is left",
        Duration::from_secs(20),
        || async {
            let left = processes_mentioning(&needle);
            if left.is_empty() {
                Ok(Some(()))
            } else {
                anyhow::bail!("still running: {left:?}")
            }
        },
    )
    .await
}

#[tokio::test]
async fn terminated_run_leaves_no_process_behind() -> Result<()> {
    let dir = tempdir("interrupt")?;
    let mut run = spawn_run(&dir, &["sleep", "600"], &[])?;
    eventually(
        "the second control plane is ready",
        Duration::from_secs(180),
        || async { Ok(dir.join("server").exists().then_some(())) },
    )
    .await?;
    ensure!(
        !processes_mentioning(&dir.to_string_lossy()).is_empty(),
        "the control plane should be running"
    );
    let pid = run.id().context("script has a pid")?;
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    let status = tokio::time::timeout(Duration::from_secs(60), run.wait()).await??;
    assert!(
        !status.success(),
        "an interrupted run reports failure, got {status}"
    );
    no_process_left(&dir).await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn component_that_fails_to_start_is_reported_with_its_log() -> Result<()> {
    let dir = tempdir("broken")?;
    let run = spawn_run(
        &dir,
        &["true"],
        &[("GEFYRA_KUBE_APISERVER_ARGS", "--no-such-flag-for-test")],
    )?;
    let output = tokio::time::timeout(Duration::from_secs(180), run.wait_with_output()).await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a broken start must fail");
    assert!(
        stderr.contains("kube-apiserver exited during start-up"),
        "stderr names the component: {stderr}"
    );
    assert!(
        stderr.contains("no-such-flag-for-test"),
        "stderr shows the component's log: {stderr}"
    );
    no_process_left(&dir).await?;
    // The script keeps a failed start's directory for its logs; the test has read them.
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempdir(what: &str) -> Result<std::path::PathBuf> {
    let base =
        std::env::temp_dir().join(format!("gefyra-e2e-{what}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&base)?;
    Ok(base)
}
