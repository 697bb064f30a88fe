//! kubectl-gefyra against the real control plane and operator: the admin's flows, the
//! client file, the errors; and `connect -f` with a real wireguard-go peer through Stowaway.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gefyra_api::{ClientState, GefyraClient};
use gefyra_e2e::lab::Deployment;
use gefyra_e2e::{
    Cluster, KubectlGefyra, Operator, controlplane_tool, decoded, eventually,
    install_bridge_admission_policies, install_crd, kubectl_gefyra_binary, parse_client_file,
    wait_for_state,
};
use k8s_openapi::api::apps::v1::Deployment as K8sDeployment;
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeStatus, Service,
    ServiceAccount, ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ObjectMeta, Patch, PatchParams,
    PostParams,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// Exit codes the CLI promises (cli/src/error.rs).
const USAGE: i32 = 2;
const NO_CLUSTER: i32 = 3;
const NOT_FOUND: i32 = 4;
const FORBIDDEN: i32 = 5;
const TIMEOUT: i32 = 6;
const BAD_CLIENT_FILE: i32 = 7;
const CONFLICT: i32 = 8;
const IN_ERROR: i32 = 9;

/// `kubectl gefyra <TAB>` through the kubectl we build: it finds kubectl_complete-gefyra
/// (a symlink to the CLI) on the PATH and offers what it prints.
async fn kubectl_completes_the_plugin(cli: &KubectlGefyra) -> Result<()> {
    let plugins = cli.workdir.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    for name in ["kubectl-gefyra", "kubectl_complete-gefyra"] {
        std::os::unix::fs::symlink(kubectl_gefyra_binary(), plugins.join(name))?;
    }
    let path = format!(
        "{}:{}",
        plugins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let kubectl = controlplane_tool("kubectl")?;
    let complete = |words: &'static [&'static str]| {
        let (kubectl, path) = (kubectl.clone(), path.clone());
        async move {
            let output = tokio::process::Command::new(&kubectl)
                .arg("__complete")
                .args(words)
                .env("PATH", &path)
                .env("KUBECONFIG", &cli.kubeconfig)
                .env("GEFYRA_NAMESPACE", &cli.namespace)
                .output()
                .await?;
            ensure!(
                output.status.success(),
                "kubectl __complete {words:?}: {output:?}"
            );
            let text = String::from_utf8(output.stdout)?;
            let values: Vec<String> = text
                .lines()
                .filter(|line| !line.starts_with(':'))
                .map(|line| line.split('\t').next().unwrap_or_default().to_string())
                .collect();
            Ok::<_, anyhow::Error>((values, text))
        }
    };
    let (plugins_listed, text) = complete(&["gef"]).await?;
    ensure!(
        !plugins_listed.is_empty() && plugins_listed.iter().all(|name| name == "gefyra"),
        "kubectl lists the plugin: {text}"
    );
    let (values, text) = complete(&["gefyra", "cl"]).await?;
    ensure!(values == ["clients"], "subcommands: {text}");
    ensure!(text.lines().last() == Some(":4"), "no file names: {text}");
    let (values, text) = complete(&["gefyra", "clients", ""]).await?;
    for expected in [
        "create",
        "list",
        "inspect",
        "config",
        "disconnect",
        "delete",
    ] {
        ensure!(values.iter().any(|v| v == expected), "{expected}: {text}");
    }
    let (values, text) = complete(&["gefyra", "clients", "list", "-o", ""]).await?;
    ensure!(
        values == ["table", "wide", "json", "yaml", "name"],
        "formats: {text}"
    );
    let (values, text) = complete(&["gefyra", "clients", "inspect", "an"]).await?;
    ensure!(values == ["anna"], "client IDs from the cluster: {text}");
    let (values, text) = complete(&["gefyra", "clients", "list", "--no"]).await?;
    ensure!(values == ["--no-headers"], "flags: {text}");
    Ok(())
}

#[tokio::test]
async fn admins_create_list_inspect_configure_and_delete_clients() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("cli-admin").await?;
    let admin = cluster.admin()?;
    let _operator = Operator::start(&cluster, &ns, &[])?;
    let cli = KubectlGefyra::new(&cluster.kubeconfig, &ns)?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);

    // create -n 20: random 32-hex IDs, all WAITING when the command returns; the IDs alone
    // on stdout, the message on stderr.
    let output = cli.run(&["clients", "create", "-n", "20"]).await?;
    ensure!(
        output.code == 0
            && output
                .stderr
                .ends_with("20 client(s) created successfully\n"),
        "create output: {output:?}"
    );
    let created = output.stdout;
    let ids: BTreeSet<String> = created
        .lines()
        .filter(|line| line.len() == 32 && line.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_string)
        .collect();
    ensure!(
        ids.len() == 20 && created.lines().count() == 20,
        "20 distinct IDs and nothing else on stdout: {created}"
    );
    for id in &ids {
        let client = clients.get(id).await?;
        ensure!(
            client.state == ClientState::Waiting,
            "{id} is WAITING: {:?}",
            client.state
        );
    }

    // A chosen ID; taken twice is a conflict; a name and a count together are a usage error.
    cli.ok(&["clients", "create", "--client-id", "anna"])
        .await?;
    let taken = cli
        .fails(&["clients", "create", "--client-id", "anna"], CONFLICT)
        .await?;
    ensure!(taken.contains("already exists"), "{taken}");
    cli.fails(
        &["clients", "create", "--client-id", "bob", "-n", "2"],
        USAGE,
    )
    .await?;

    // list: table, JSON, YAML.
    let table = cli.ok(&["clients", "ls"]).await?;
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .context("a header")?
        .split("   ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    ensure!(
        header == ["ID", "STATE", "ADDRESS", "AGE", "WIREGUARD HANDSHAKE"],
        "header: {header:?}"
    );
    let rows: Vec<&str> = lines.collect();
    ensure!(rows.len() == 21, "21 rows: {table}");
    ensure!(
        rows.iter()
            .all(|row| row.split_whitespace().nth(1) == Some("WAITING")),
        "all WAITING: {table}"
    );
    let json: Vec<Value> =
        serde_json::from_str(&cli.ok(&["clients", "list", "-o", "json"]).await?)?;
    let listed: BTreeSet<String> = json
        .iter()
        .filter_map(|row| row["client_id"].as_str().map(str::to_string))
        .collect();
    ensure!(
        listed.len() == 21 && ids.is_subset(&listed) && listed.contains("anna"),
        "{json:?}"
    );
    let yaml: Vec<Value> =
        serde_saphyr::from_str(&cli.ok(&["clients", "list", "-o", "yaml"]).await?)?;
    ensure!(yaml == json, "YAML and JSON list the same");
    ensure!(
        json.iter().all(|row| row["created"]
            .as_str()
            .is_some_and(|created| created.parse::<jiff::Timestamp>().is_ok())),
        "JSON keeps the absolute creation time: {json:?}"
    );
    let names = cli.ok(&["clients", "list", "-o", "name"]).await?;
    ensure!(
        names.lines().count() == 21
            && names
                .lines()
                .any(|line| line == "gefyraclient.gefyra.dev/anna"),
        "-o name: {names}"
    );
    let bare = cli.ok(&["clients", "list", "--no-headers"]).await?;
    ensure!(
        bare.lines().count() == 21 && !bare.contains("STATE"),
        "--no-headers: {bare}"
    );
    ensure!(
        !table.contains(&json_token(&clients, "anna").await?),
        "no token in the list"
    );

    kubectl_completes_the_plugin(&cli).await?;

    // inspect: state, transitions, Events.
    let inspected = cli.ok(&["clients", "inspect", "anna"]).await?;
    for expected in [
        "Client:",
        "anna",
        "State:",
        "WAITING",
        "State transitions:",
        "CREATING",
        "Events:",
        "-> WAITING",
    ] {
        ensure!(
            inspected.contains(expected),
            "inspect shows {expected:?}:\n{inspected}"
        );
    }
    let as_json: Value =
        serde_json::from_str(&cli.ok(&["clients", "show", "anna", "-o", "json"]).await?)?;
    ensure!(
        as_json["state"] == "WAITING" && as_json["client_id"] == "anna",
        "{as_json}"
    );
    let missing = cli
        .fails(&["clients", "inspect", "nobody"], NOT_FOUND)
        .await?;
    ensure!(
        missing.contains("nobody") && missing.contains("does not exist"),
        "{missing}"
    );

    // config: without --host and without Stowaway's Service, a clear error naming --host.
    let no_host = cli.fails(&["clients", "config", "anna"], NOT_FOUND).await?;
    ensure!(no_host.contains("--host"), "{no_host}");

    // With --host and -o: mode 0600, Gefyra's keys and order, and a token that works.
    cli.ok(&[
        "clients",
        "config",
        "anna",
        "--host",
        "203.0.113.7",
        "-o",
        "anna.json",
    ])
    .await?;
    let path = cli.workdir.join("anna.json");
    let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "client file mode {mode:o}");
    let text = std::fs::read_to_string(&path)?;
    let file = parse_client_file(&text)?;
    ensure!(
        file["client_id"] == "anna" && file["provider"] == "stowaway",
        "{text}"
    );
    ensure!(file["namespace"] == ns.as_str(), "{text}");
    ensure!(file["gefyra_server"] == "203.0.113.7:31820", "{text}");
    ensure!(
        file["kubernetes_server"] == cluster.server().trim_end_matches('/'),
        "{text}"
    );
    ensure!(
        file["registry"].is_null() && file["wireguard_mtu"].is_null(),
        "{text}"
    );
    ensure!(
        decoded(&file, "ca_crt")?.contains("BEGIN CERTIFICATE"),
        "ca_crt is base64 PEM"
    );
    let as_anna = cluster.with_token(&decoded(&file, "token")?)?;
    Api::<GefyraClient>::namespaced(as_anna.clone(), &ns)
        .get("anna")
        .await
        .context("the client file's token reads its own GefyraClient")?;
    ensure!(
        Api::<GefyraClient>::namespaced(as_anna, &ns)
            .get(ids.first().context("an id")?)
            .await
            .is_err(),
        "the client file's token cannot read another client"
    );
    let printed = cli
        .ok(&[
            "clients",
            "write",
            "anna",
            "--host",
            "2001:db8::7",
            "-p",
            "40000",
            "--mtu",
            "1340",
            "-a",
            "https://api.example:6443",
        ])
        .await?;
    let printed = parse_client_file(printed.trim_end())?;
    ensure!(
        printed["gefyra_server"] == "[2001:db8::7]:40000",
        "{printed:?}"
    );
    ensure!(
        printed["wireguard_mtu"] == "1340",
        "the MTU is a string, as Gefyra writes it: {printed:?}"
    );
    ensure!(
        printed["kubernetes_server"] == "https://api.example:6443",
        "{printed:?}"
    );

    // Without --host: Stowaway's Service, a LoadBalancer's ingress first ...
    let services: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let service = Service {
        metadata: ObjectMeta {
            name: Some("gefyra-stowaway-wireguard".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            selector: Some([("app".to_string(), "stowaway".to_string())].into()),
            ports: Some(vec![ServicePort {
                name: Some("gefyra-wireguard".into()),
                protocol: Some("UDP".into()),
                port: 31820,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    services.create(&PostParams::default(), &service).await?;
    let pending = cli.fails(&["clients", "config", "anna"], NOT_FOUND).await?;
    ensure!(
        pending.contains("no ingress address") && pending.contains("--host"),
        "{pending}"
    );
    let ingress = Service {
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("198.51.100.20".into()),
                    ..LoadBalancerIngress::default()
                }]),
            }),
            ..ServiceStatus::default()
        }),
        ..Service::default()
    };
    services
        .patch_status(
            "gefyra-stowaway-wireguard",
            &PatchParams::default(),
            &Patch::Merge(&ingress),
        )
        .await?;
    let file = parse_client_file(cli.ok(&["clients", "config", "anna"]).await?.trim_end())?;
    ensure!(file["gefyra_server"] == "198.51.100.20:31820", "{file:?}");

    // ... else a node's ExternalIP with the NodePort.
    services
        .patch(
            "gefyra-stowaway-wireguard",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"type": "NodePort"}})),
        )
        .await?;
    let node_port = services
        .get("gefyra-stowaway-wireguard")
        .await?
        .spec
        .and_then(|spec| spec.ports)
        .and_then(|ports| ports.first().and_then(|port| port.node_port))
        .context("a NodePort was allocated")?;
    let nodes: Api<Node> = Api::all(admin.clone());
    let node_name = format!("{ns}-node");
    nodes
        .create(
            &PostParams::default(),
            &Node {
                metadata: ObjectMeta {
                    name: Some(node_name.clone()),
                    ..ObjectMeta::default()
                },
                // Nodes take their status on create.
                status: Some(NodeStatus {
                    addresses: Some(vec![
                        NodeAddress {
                            type_: "InternalIP".into(),
                            address: "10.0.0.9".into(),
                        },
                        NodeAddress {
                            type_: "ExternalIP".into(),
                            address: "198.51.100.9".into(),
                        },
                    ]),
                    ..NodeStatus::default()
                }),
                ..Node::default()
            },
        )
        .await?;
    let result = cli.ok(&["clients", "config", "anna"]).await;
    nodes.delete(&node_name, &DeleteParams::default()).await?;
    let file = parse_client_file(result?.trim_end())?;
    ensure!(
        file["gefyra_server"] == format!("198.51.100.9:{node_port}"),
        "{file:?}"
    );

    // Errors: forbidden (a client's own token may not list), no cluster, bad client files.
    let as_client =
        cluster.kubeconfig_with_token(&decoded(&parse_client_file(&text)?, "token")?)?;
    let limited = KubectlGefyra::new(&as_client, &ns)?;
    let forbidden = limited.fails(&["clients", "ls"], FORBIDDEN).await?;
    ensure!(forbidden.contains("forbidden"), "{forbidden}");
    let _ = std::fs::remove_file(&as_client);
    let unreachable_config = cli.workdir.join("unreachable.kubeconfig");
    let mut raw: Value = serde_saphyr::from_str(&std::fs::read_to_string(&cluster.kubeconfig)?)?;
    raw["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:1".into();
    std::fs::write(&unreachable_config, serde_saphyr::to_string(&raw)?)?;
    let down = KubectlGefyra::new(&unreachable_config, &ns)?;
    let no_cluster = down.fails(&["clients", "ls"], NO_CLUSTER).await?;
    ensure!(
        no_cluster.contains("cannot reach the Kubernetes API server"),
        "{no_cluster}"
    );
    let verbose = down.run(&["-v", "clients", "ls"]).await?;
    ensure!(
        verbose.code == NO_CLUSTER && verbose.stderr.contains("\n  caused by: "),
        "-v shows the cause: {verbose:?}"
    );
    let nowhere = KubectlGefyra::new(&cli.workdir.join("no-such.kubeconfig"), &ns)?;
    nowhere.fails(&["clients", "ls"], NO_CLUSTER).await?;
    let completion = nowhere.ok(&["completion", "bash"]).await?;
    ensure!(
        completion.contains("kubectl__gefyra"),
        "a bash completion script"
    );
    std::fs::write(cli.workdir.join("garbage.json"), "{\"client_id\": 1")?;
    let garbage = cli
        .fails(&["connect", "-f", "garbage.json"], BAD_CLIENT_FILE)
        .await?;
    ensure!(garbage.contains("garbage.json"), "{garbage}");
    cli.fails(&["disconnect", "-f", "missing.json"], BAD_CLIENT_FILE)
        .await?;
    let mut broken = parse_client_file(&text)?;
    broken["token"] = "not base64!".into();
    std::fs::write(
        cli.workdir.join("broken.json"),
        Value::Object(broken).to_string(),
    )?;
    let broken = cli
        .fails(&["connect", "-f", "broken.json"], BAD_CLIENT_FILE)
        .await?;
    ensure!(broken.contains("`token`"), "{broken}");

    // disconnect of a client that is not connected says so.
    let not_connected = cli.ok(&["clients", "disconnect", "anna"]).await?;
    ensure!(not_connected.contains("not connected"), "{not_connected}");

    // delete: every client, waiting until gone; credentials with them.
    let mut delete: Vec<&str> = vec!["clients", "rm", "anna"];
    delete.extend(ids.iter().map(String::as_str));
    let deleted = cli.ok(&delete).await?;
    for id in ids.iter().chain(["anna".to_string()].iter()) {
        ensure!(
            deleted.contains(&format!("Client {id} marked for deletion")),
            "{deleted}"
        );
        ensure!(
            clients.get_opt(id).await?.is_none(),
            "{id} is gone when delete returns"
        );
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(admin, &ns);
    eventually("the clients' ServiceAccounts are gone", WAIT, || async {
        Ok(accounts
            .get_opt("gefyra-client-anna")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    cli.fails(&["clients", "delete", "anna"], NOT_FOUND).await?;
    let empty = cli.run(&["clients", "ls"]).await?;
    ensure!(
        empty.code == 0 && empty.stdout.is_empty() && empty.stderr.contains("No GefyraClients"),
        "{empty:?}"
    );
    Ok(())
}

/// `wg-quick strip FILE` reads a wg-quick file as `wg-quick up` does and prints what it
/// hands to `wg`: the file must parse and its hooks must not reach `wg`. Where wg-quick is
/// not installed (only `wg`), this is skipped.
fn wg_quick_reads(path: &std::path::Path) -> Result<()> {
    let output = match std::process::Command::new("wg-quick")
        .arg("strip")
        .arg(path)
        .output()
    {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("wg-quick is not installed: not checking that it reads {path:?}");
            return Ok(());
        }
        other => other?,
    };
    let stripped = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success()
            && stripped.contains("AllowedIPs = ")
            && !stripped
                .lines()
                .any(|line| line.starts_with("PostUp") || line.starts_with("Address")),
        "wg-quick strip {path:?}: {output:?}"
    );
    Ok(())
}

/// kubectl's habits: `create --dry-run=client` prints manifests without an API server (and
/// the API server accepts them as they are), `--label`/`--sunset`/`--max-connection-age`,
/// `-l` on list and delete, `-o wide`, `-n` for the namespace, durations for `--timeout`.
#[tokio::test]
async fn admins_use_kubectls_habits() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("cli-habits").await?;
    let admin = cluster.admin()?;
    let _operator = Operator::start(&cluster, &ns, &[])?;
    let cli = KubectlGefyra::new(&cluster.kubeconfig, &ns)?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);

    // --dry-run=client needs no cluster at all: the kubeconfig does not exist.
    let offline = KubectlGefyra::new(&cli.workdir.join("no-such.kubeconfig"), &ns)?;
    let dry = offline
        .run(&[
            "clients",
            "create",
            "--client-id",
            "gitops",
            "--dry-run=client",
            "-o",
            "yaml",
            "--label",
            "team=b",
            "--sunset",
            "2030-01-01T00:00:00Z",
            "--max-connection-age",
            "1h",
        ])
        .await?;
    ensure!(
        dry.code == 0 && dry.stderr.contains("dry run"),
        "dry run: {dry:?}"
    );
    let manifest: GefyraClient = serde_saphyr::from_str(&dry.stdout)?;
    ensure!(
        manifest.metadata.name.as_deref() == Some("gitops")
            && manifest.metadata.namespace.as_deref() == Some(ns.as_str())
            && manifest.sunset.as_deref() == Some("2030-01-01T00:00:00Z")
            && manifest.max_connection_age == Some(3600)
            && !dry.stdout.contains("state"),
        "{}",
        dry.stdout
    );
    ensure!(
        clients.get_opt("gitops").await?.is_none(),
        "a dry run creates nothing"
    );
    let listed: Value = serde_json::from_str(
        &offline
            .ok(&["clients", "create", "-n", "2", "--dry-run", "-o", "json"])
            .await?,
    )?;
    ensure!(
        listed["kind"] == "List" && listed["items"].as_array().map(Vec::len) == Some(2),
        "{listed}"
    );
    // --dry-run=server: the API server checks the client and stores nothing.
    let checked: Value = serde_json::from_str(
        &cli.ok(&[
            "clients",
            "create",
            "--client-id",
            "checked",
            "--dry-run=server",
            "-o",
            "json",
        ])
        .await?,
    )?;
    ensure!(
        checked["metadata"]["name"] == "checked" && clients.get_opt("checked").await?.is_none(),
        "{checked}"
    );
    // What it printed is what GitOps applies: the API server and the operator take it as is.
    clients.create(&PostParams::default(), &manifest).await?;
    wait_for_state(&clients, "gitops", ClientState::Waiting).await?;

    // Labels, sunset (a duration from now), a maximum connection age, a duration timeout.
    let before = jiff::Timestamp::now();
    let output = cli
        .run(&[
            "clients",
            "create",
            "--client-id",
            "lab1",
            "--label",
            "team=a",
            "--label",
            "example.com/owner=anna",
            "--sunset",
            "2h",
            "--max-connection-age",
            "90m",
            "--timeout",
            "1m",
        ])
        .await?;
    ensure!(
        output.code == 0 && output.stdout == "lab1\n",
        "the ID alone on stdout: {output:?}"
    );
    let lab1 = clients.get("lab1").await?;
    let labels = lab1.metadata.labels.clone().unwrap_or_default();
    ensure!(
        labels.get("team").map(String::as_str) == Some("a")
            && labels.get("example.com/owner").map(String::as_str) == Some("anna"),
        "{labels:?}"
    );
    let sunset: jiff::Timestamp = lab1.sunset.as_deref().context("a sunset")?.parse()?;
    let expected = before + jiff::SignedDuration::from_hours(2);
    ensure!(
        (sunset.as_second() - expected.as_second()).abs() <= 5,
        "sunset 2h from now: {sunset}"
    );
    ensure!(lab1.max_connection_age == Some(5400), "{lab1:?}");
    cli.ok(&[
        "clients",
        "create",
        "--client-id",
        "lab2",
        "--label",
        "team=a",
    ])
    .await?;

    // -l on list; -o wide shows the reason and the sunset.
    let selected = cli
        .ok(&["clients", "list", "-l", "team=a", "-o", "name"])
        .await?;
    ensure!(
        selected == "gefyraclient.gefyra.dev/lab1\ngefyraclient.gefyra.dev/lab2\n",
        "-l team=a: {selected}"
    );
    let none = cli.run(&["clients", "list", "-l", "team=nobody"]).await?;
    ensure!(
        none.code == 0 && none.stdout.is_empty() && none.stderr.contains("matching team=nobody"),
        "{none:?}"
    );
    let wide = cli.ok(&["clients", "list", "-o", "wide"]).await?;
    let header: Vec<&str> = wide
        .lines()
        .next()
        .context("a header")?
        .split("   ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    ensure!(
        header
            == [
                "ID",
                "STATE",
                "ADDRESS",
                "AGE",
                "WIREGUARD HANDSHAKE",
                "REASON",
                "SUNSET"
            ],
        "{wide}"
    );
    let row = wide
        .lines()
        .find(|line| line.starts_with("lab1 "))
        .context("lab1's row")?;
    ensure!(
        row.contains(lab1.sunset.as_deref().unwrap_or("?")) && row.split_whitespace().count() == 7,
        "{wide}"
    );

    // -n NAMESPACE wins over the --namespace the helper adds.
    let elsewhere = KubectlGefyra::new(&cluster.kubeconfig, "no-such-namespace")?;
    let named = elsewhere
        .ok(&["clients", "list", "-n", &ns, "-o", "name"])
        .await?;
    ensure!(named.lines().count() == 3, "-n {ns}: {named}");
    elsewhere
        .ok(&["clients", "inspect", "-n", &ns, "lab2"])
        .await?;

    // delete -l: the matching clients only, waited for with a duration timeout.
    let deleted = cli
        .ok(&["clients", "delete", "-l", "team=a", "--timeout", "1m"])
        .await?;
    ensure!(
        deleted.contains("Client lab1 marked for deletion")
            && deleted.contains("Client lab2 marked for deletion"),
        "{deleted}"
    );
    ensure!(
        clients.get_opt("lab1").await?.is_none() && clients.get_opt("lab2").await?.is_none(),
        "gone when delete returns"
    );
    ensure!(clients.get_opt("gitops").await?.is_some(), "gitops kept");
    cli.ok(&["clients", "delete", "gitops"]).await?;
    Ok(())
}

async fn json_token(clients: &Api<GefyraClient>, name: &str) -> Result<String> {
    Ok(clients
        .get(name)
        .await?
        .service_account_data
        .context("credentials")?
        .token)
}

/// A developer connects with nothing but the client file (no kubeconfig at all): a real
/// wireguard-go peer configured from the file `connect -f` writes — a split tunnel, only the
/// cluster's ranges the operator publishes — reaches the cluster namespace through Stowaway,
/// by IP and by name; `disconnect -f` ends it.
#[tokio::test]
async fn connect_with_a_client_file_reaches_the_cluster_through_stowaway() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let mut deployment = Deployment::start(
        &cluster,
        "cli-connect",
        &["--status-interval".into(), "1".into()],
    )
    .await?;
    let ns = deployment
        .clients
        .namespace()
        .context("namespaced")?
        .to_string();
    // The lab's cluster network is the cluster's "Service range": the operator reserves it
    // and so publishes it to clients (Cluster.AllowedIPs).
    let cluster_subnet = deployment.lab.cluster_subnet();
    deployment.operator = Operator::start(
        &cluster,
        &ns,
        &[
            "--reserved-ranges",
            &format!("{cluster_subnet},10.244.0.0/16"),
        ],
    )?;
    let admin = KubectlGefyra::new(&cluster.kubeconfig, &ns)?;
    admin
        .ok(&["clients", "create", "--client-id", "dev"])
        .await?;
    let peer = deployment.lab.new_peer()?;
    let port = deployment.stowaway.port.to_string();
    admin
        .ok(&[
            "clients",
            "config",
            "dev",
            "--host",
            &peer.gateway.to_string(),
            "--port",
            &port,
            "-o",
            "dev.json",
        ])
        .await?;

    // The developer's machine: the client file and no kubeconfig.
    let developer = KubectlGefyra::new(&admin.workdir.join("no-kubeconfig"), &ns)?;
    std::fs::copy(
        admin.workdir.join("dev.json"),
        developer.workdir.join("dev.json"),
    )?;
    let connected = developer
        .connect_wg("dev.json", "dev.conf", &["--subnet", "172.29.0.0/16"])
        .await?;
    ensure!(connected.contains("is ACTIVE"), "{connected}");
    let wg_config = developer.workdir.join("dev.conf");
    let mode = std::fs::metadata(&wg_config)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "WireGuard config mode {mode:o}");
    let text = std::fs::read_to_string(&wg_config)?;
    let split = format!("AllowedIPs = 192.168.96.0/20, {cluster_subnet}, 10.244.0.0/16\n");
    ensure!(
        text.contains(&split),
        "only the cluster's ranges are routed ({split}): {text}"
    );
    ensure!(
        connected.contains("a split tunnel") && connected.contains("sudo ip link add "),
        "{connected}"
    );
    let private_key = text
        .lines()
        .find_map(|line| line.strip_prefix("PrivateKey = "))
        .context("the config holds the private key")?
        .to_string();
    let client = deployment.clients.get("dev").await?;
    ensure!(client.state == ClientState::Active, "ACTIVE");
    ensure!(
        !serde_json::to_string(&client)?.contains(&private_key),
        "the private key never reaches the cluster"
    );
    ensure!(
        client
            .provider_parameter
            .as_ref()
            .and_then(|p| p.get("subnet"))
            == Some(&Value::from("172.29.0.0/16")),
        "the subnet was asked for: {:?}",
        client.provider_parameter
    );
    let address = client
        .provider_config
        .as_ref()
        .and_then(|config| config.get("Interface.Address"))
        .and_then(Value::as_str)
        .context("a tunnel address")?
        .to_string();
    deployment
        .lab
        .configure_peer(&peer, &wg_config, &format!("{address}/32"))?;
    deployment.reaches_the_cluster(&peer.netns).await?;

    // The admin sees the connection: address in the list, a handshake, the Events.
    let cli = &admin;
    eventually("the list shows the handshake", WAIT, || async {
        let table = cli.ok(&["clients", "ls"]).await?;
        let row = table
            .lines()
            .find(|line| line.starts_with("dev "))
            .unwrap_or_default()
            .to_string();
        Ok(
            (row.contains(&address) && row.split_whitespace().nth(4).is_some_and(|h| h != "-"))
                .then_some(()),
        )
    })
    .await?;
    // The developer's status, with the client file's token alone.
    let status = developer.ok(&["status", "-f", "dev.json"]).await?;
    for expected in [
        "ACTIVE",
        &address,
        "Latest handshake:",
        "Token expires:",
        &cluster_subnet,
    ] {
        ensure!(
            status.contains(expected),
            "status shows {expected:?}:\n{status}"
        );
    }
    let status: Value = serde_json::from_str(
        &developer
            .ok(&["status", "-f", "dev.json", "-o", "json"])
            .await?,
    )?;
    ensure!(
        status["state"] == "ACTIVE"
            && status["tunnel_address"] == address.as_str()
            && status["latest_handshake"].is_string()
            && status["token_expires_at"].as_str().is_some_and(|at| at
                .parse::<jiff::Timestamp>()
                .is_ok_and(|at| at > jiff::Timestamp::now())),
        "{status}"
    );
    let inspected = admin.ok(&["clients", "inspect", "dev"]).await?;
    for expected in [
        "WAITING -> ENABLING",
        "ENABLING -> ACTIVE",
        "Latest handshake:",
        "172.29.0.0/16",
    ] {
        ensure!(
            inspected.contains(expected),
            "inspect shows {expected:?}:\n{inspected}"
        );
    }

    // disconnect -f: WAITING again, and the old key no longer gets through.
    let disconnected = developer
        .ok(&["disconnect", "-f", "dev.json", "--timeout", "1m"])
        .await?;
    ensure!(disconnected.contains("WAITING"), "{disconnected}");
    let status = developer.ok(&["status", "-f", "dev.json"]).await?;
    ensure!(
        status.contains("WAITING") && !status.contains("Tunnel address"),
        "{status}"
    );
    ensure!(
        deployment.clients.get("dev").await?.state == ClientState::Waiting,
        "WAITING"
    );
    let lab = &deployment.lab;
    eventually(
        "the disconnected peer no longer reaches 192.168.99.1",
        WAIT,
        || async {
            Ok(lab
                .exec_in(&peer.netns, "ping", &["-c", "1", "-W", "1", "192.168.99.1"])
                .is_err()
                .then_some(()))
        },
    )
    .await?;

    // Connect again (a fresh key), then the admin disconnects the client.
    developer
        .ok(&["connect", "-f", "dev.json", "--wg-config", "again.conf"])
        .await?;
    let again = std::fs::read_to_string(developer.workdir.join("again.conf"))?;
    ensure!(
        again.contains("Address = ")
            && again.contains(&split)
            && again.contains("resolvectl domain %i '~cluster.local'")
            && !again.contains("\nDNS = "),
        "wg-quick format, a split tunnel resolving cluster names through it: {again}"
    );
    ensure!(
        !again.contains(&private_key),
        "a fresh key pair per connect"
    );
    wg_quick_reads(&developer.workdir.join("again.conf"))?;
    // Opting into a full tunnel: everything and every DNS query, as Gefyra's Cargo.
    let full = developer
        .ok(&[
            "connect",
            "-f",
            "dev.json",
            "--wg-config",
            "full.conf",
            "--allowed-ips",
            "0.0.0.0/0,::/0",
        ])
        .await?;
    ensure!(
        full.contains("a full tunnel") && full.contains("sudo wg-quick up ./full.conf\n"),
        "{full}"
    );
    let full = std::fs::read_to_string(developer.workdir.join("full.conf"))?;
    ensure!(
        full.contains("AllowedIPs = 0.0.0.0/0, ::/0\n")
            && full.contains("\nDNS = 192.168.99.1\n")
            && !full.contains("PostUp"),
        "{full}"
    );
    let marked = admin.ok(&["clients", "disconnect", "dev"]).await?;
    ensure!(marked.contains("marked for disconnection"), "{marked}");
    wait_for_state(&deployment.clients, "dev", ClientState::Waiting).await?;

    // After delete, the client file is refused with a clear message.
    admin.ok(&["clients", "delete", "dev"]).await?;
    let stale = developer
        .fails(&["connect", "-f", "dev.json"], FORBIDDEN)
        .await?;
    ensure!(stale.contains("ask your Gefyra admin"), "{stale}");
    Ok(())
}

/// A bridge as a client would write it, for the probes that the admission policies are in
/// effect (dry runs: nothing is stored).
fn probe_bridge(ns: &str, client: &str, destination: &str) -> Result<DynamicObject> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "gefyra.dev/v1", "kind": "gefyrabridge",
        "metadata": {"name": format!("probe-{client}"), "namespace": ns,
            "labels": {"gefyra.dev/client": client, "gefyra.dev/bridge-mount": "web"}},
        "client": client, "destinationIP": destination, "target": "web",
        "portMappings": ["8080:80"],
    }))?)
}

/// Waits until a dry-run create of `bridge` is refused with a message holding `expected`
/// (a new admission policy takes a moment to be enforced).
async fn refused_by_policy(
    api: &Api<DynamicObject>,
    bridge: &DynamicObject,
    expected: &str,
) -> Result<()> {
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    eventually(
        &format!("a policy refuses with {expected:?}"),
        WAIT,
        || async {
            Ok(match api.create(&dry_run, bridge).await {
                Err(kube::Error::Api(status))
                    if status.code == 403 && status.message.contains(expected) =>
                {
                    Some(())
                }
                _ => None,
            })
        },
    )
    .await
}

/// The target workload of the mounts: a Deployment (container `web`, port 80) and its
/// Service. There is no node: its Pods, and the routers the mounts put in front of them,
/// never run, so a mount stays INSTALLING here (the data path is tested on a node).
async fn web_workload(admin: &kube::Client, namespace: &str) -> Result<()> {
    let deployment: K8sDeployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "nginx",
                    "ports": [{"name": "http", "containerPort": 80}]}]},
            },
        },
    }))?;
    Api::<K8sDeployment>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &deployment)
        .await?;
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 80}]},
    }))?;
    Api::<Service>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &service)
        .await?;
    Ok(())
}

/// Grants client `client` (of Gefyra's namespace `gefyra_ns`) bridging in `namespace`, as an
/// admin does with a RoleBinding of ClusterRole gefyra-bridge (here a Role with its rule).
async fn grant_bridging(
    admin: &kube::Client,
    namespace: &str,
    gefyra_ns: &str,
    client: &str,
) -> Result<()> {
    let name = format!("gefyra-bridge-{client}");
    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": namespace},
        "rules": [{"apiGroups": ["gefyra.dev"], "resources": ["gefyrabridges"], "verbs": ["bridge"]}],
    }))?;
    Api::<Role>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &role)
        .await?;
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "namespace": gefyra_ns,
            "name": GefyraClient::service_account_name_for(client)}],
    }))?;
    Api::<RoleBinding>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &binding)
        .await?;
    Ok(())
}

/// The tunnel address the operator gave a connected client.
async fn tunnel_address(clients: &Api<GefyraClient>, id: &str) -> Result<String> {
    clients
        .get(id)
        .await?
        .provider_config
        .as_ref()
        .and_then(|config| config.get("Interface.Address"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .context("a tunnel address")
}

/// `mount` and `bridge` against the real operator and the real admission policies. An admin
/// mounts a workload with the kubeconfig (Gefyra's mount shape; a missing target and a
/// missing container end the wait with where it is stuck and why); a developer bridges it
/// with nothing but a connected client's file: the exact wire shape (labels, portMappings
/// local first, Gefyra's one rule), INSTALLING while the mount is not ACTIVE, the operator's
/// MountNotFound, the admission refusals (another client's address, no grant, another
/// client's bridge), list and delete of the client's own bridges only.
#[tokio::test]
async fn admins_mount_and_developers_bridge_with_a_client_file() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("cli-bridges").await?;
    let demo = cluster.namespace("cli-bridges-demo").await?;
    let admin = cluster.admin()?;
    install_bridge_admission_policies(admin.clone(), &ns).await?;
    web_workload(&admin, &demo).await?;
    // Stowaway's bridges Service: the operator gives its address to the routers.
    let stowaway_bridges: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "gefyra-stowaway-bridges", "namespace": ns},
        "spec": {"selector": {"app": "stowaway"}, "ports": [{"name": "bridges", "port": 8082}]},
    }))?;
    Api::<Service>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &stowaway_bridges)
        .await?;
    let _operator = Operator::start(&cluster, &ns, &[])?;
    let cli = KubectlGefyra::new(&cluster.kubeconfig, &ns)?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), &ns);
    let resource = |kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("gefyra.dev", "v1", kind), plural)
    };
    let bridge_resource = resource("gefyrabridge", "gefyrabridges");
    let bridges: Api<DynamicObject> = Api::namespaced_with(admin.clone(), &ns, &bridge_resource);
    let mounts: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        &ns,
        &resource("gefyrabridgemount", "gefyrabridgemounts"),
    );

    // mount create --no-wait: Gefyra's body, Gefyra's KIND/NAME/CONTAINER understood.
    let created = cli
        .ok(&[
            "mount",
            "create",
            "--target",
            "deployment/web/web",
            "--target-namespace",
            &demo,
            "--name",
            "web",
            "--no-wait",
        ])
        .await?;
    ensure!(
        created.contains("GefyraBridgeMount web created"),
        "{created}"
    );
    let mount = mounts.get("web").await?;
    for (field, expected) in [
        ("target", serde_json::json!("deployment/web")),
        ("targetNamespace", serde_json::json!(demo)),
        ("targetContainer", serde_json::json!("web")),
        ("provider", serde_json::json!("carrier2mount")),
        ("providerParameter", serde_json::json!({})),
    ] {
        ensure!(mount.data[field] == expected, "{field}: {:?}", mount.data);
    }
    // No node runs its router: it stays INSTALLING, and mount list says so and why.
    let row = eventually("mount list shows web INSTALLING", WAIT, || async {
        let table = cli.ok(&["mount", "list"]).await?;
        Ok(table
            .lines()
            .find(|line| line.starts_with("web ") && line.contains(" INSTALLING "))
            .map(str::to_string))
    })
    .await?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    ensure!(
        cells[..6]
            == [
                "web",
                demo.as_str(),
                "deployment/web",
                "web",
                "INSTALLING",
                "Installing"
            ],
        "{row}"
    );
    let listed: Vec<Value> = serde_json::from_str(&cli.ok(&["mount", "ls", "-o", "json"]).await?)?;
    ensure!(
        listed.len() == 1 && listed[0]["name"] == "web" && listed[0]["target"] == "deployment/web",
        "{listed:?}"
    );

    // Waiting: a missing target times out saying where it is stuck and why; a missing
    // container ends the wait with the operator's reason.
    let stuck = cli
        .fails(
            &[
                "mount",
                "create",
                "--target",
                "deployment/nothing",
                "--target-namespace",
                &demo,
                "--name",
                "nothing",
                "--timeout",
                "3s",
            ],
            TIMEOUT,
        )
        .await?;
    ensure!(
        stuck.contains("GefyraBridgeMount nothing is not ACTIVE after 3s: it is MISSING (TargetNotFound: deployment/nothing does not exist in namespace")
            && stuck.contains("`kubectl gefyra mount delete nothing`"),
        "{stuck}"
    );
    let no_container = cli
        .fails(
            &[
                "mount",
                "create",
                "--target",
                "deployment/web",
                "--container",
                "nope",
                "--target-namespace",
                &demo,
                "--name",
                "nope",
            ],
            IN_ERROR,
        )
        .await?;
    ensure!(
        no_container.contains("GefyraBridgeMount nope is in state ERROR: ContainerNotFound: deployment/web has no container nope (it has: web)"),
        "{no_container}"
    );
    cli.fails(
        &[
            "mount",
            "create",
            "--target",
            "cronjob/x",
            "--target-namespace",
            &demo,
        ],
        USAGE,
    )
    .await?;
    let deleted = cli
        .ok(&[
            "mount",
            "delete",
            "nothing",
            "nope",
            "--wait",
            "--timeout",
            "30s",
        ])
        .await?;
    ensure!(
        deleted.contains("GefyraBridgeMount nothing deleted")
            && deleted.contains("GefyraBridgeMount nope deleted"),
        "{deleted}"
    );
    ensure!(
        mounts.get_opt("nothing").await?.is_none() && mounts.get_opt("nope").await?.is_none(),
        "gone when delete --wait returns"
    );
    cli.fails(&["mount", "delete", "nothing"], NOT_FOUND)
        .await?;

    // Two developers, each with a client file and no kubeconfig.
    for id in ["dev", "other"] {
        cli.ok(&["clients", "create", "--client-id", id]).await?;
        cli.ok(&[
            "clients",
            "config",
            id,
            "--host",
            "203.0.113.7",
            "-o",
            &format!("{id}.json"),
        ])
        .await?;
    }
    let developer = KubectlGefyra::new(&cli.workdir.join("no-kubeconfig"), &ns)?;
    for id in ["dev", "other"] {
        std::fs::copy(
            cli.workdir.join(format!("{id}.json")),
            developer.workdir.join(format!("{id}.json")),
        )?;
    }
    let not_connected = developer
        .fails(
            &[
                "bridge", "create", "-f", "dev.json", "--mount", "web", "-p", "80:8080",
            ],
            CONFLICT,
        )
        .await?;
    ensure!(
        not_connected.contains("GefyraClient dev is not connected (state WAITING): connect first with `kubectl gefyra connect -f dev.json`"),
        "{not_connected}"
    );
    for id in ["dev", "other"] {
        developer
            .connect_wg(&format!("{id}.json"), &format!("{id}.conf"), &[])
            .await?;
    }
    let dev_address = tunnel_address(&clients, "dev").await?;
    let other_address = tunnel_address(&clients, "other").await?;
    grant_bridging(&admin, &demo, &ns, "dev").await?;
    let as_other = cluster.with_token(&decoded(
        &parse_client_file(&std::fs::read_to_string(
            developer.workdir.join("other.json"),
        )?)?,
        "token",
    )?)?;
    let other_bridges: Api<DynamicObject> = Api::namespaced_with(as_other, &ns, &bridge_resource);
    refused_by_policy(
        &other_bridges,
        &probe_bridge(&ns, "other", &other_address)?,
        "is not granted to",
    )
    .await?;
    refused_by_policy(
        &bridges,
        &probe_bridge(&ns, "dev", &other_address)?,
        "is neither the tunnel address of client dev",
    )
    .await?;

    // bridge create --no-wait: the exact wire shape, Gefyra's default name.
    let created = developer
        .ok(&[
            "bridge",
            "create",
            "-f",
            "dev.json",
            "--mount",
            "web",
            "-p",
            "80:8080",
            "--match-path-prefix",
            "/api",
            "--match-header-exact",
            "x-gefyra:dev",
            "--no-wait",
        ])
        .await?;
    let name = created
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("GefyraBridge "))
        .and_then(|rest| rest.split(' ').next())
        .context("the bridge's name")?
        .to_string();
    ensure!(
        name.len() == "dev-web-".len() + 5
            && name.starts_with("dev-web-")
            && created.contains(&format!("port:    80 -> {dev_address}:8080"))
            && created.contains("HTTP requests matching x-gefyra=dev & path^=/api"),
        "{created}"
    );
    let bridge = bridges.get(&name).await?;
    ensure!(
        bridge.metadata.labels
            == Some(
                [
                    ("gefyra.dev/bridge-mount".to_string(), "web".to_string()),
                    ("gefyra.dev/client".to_string(), "dev".to_string()),
                ]
                .into()
            ),
        "{:?}",
        bridge.metadata.labels
    );
    for (field, expected) in [
        ("provider", serde_json::json!("carrier2")),
        ("connectionProvider", serde_json::json!("stowaway")),
        ("client", serde_json::json!("dev")),
        ("destinationIP", serde_json::json!(dev_address)),
        ("target", serde_json::json!("web")),
        ("portMappings", serde_json::json!(["8080:80"])),
        (
            "providerParameter",
            serde_json::json!({"rules": [{"match": [
                {"matchHeader": {"name": "x-gefyra", "value": "dev", "type": "exact"}},
                {"matchPath": {"path": "/api", "type": "prefix"}},
            ]}]}),
        ),
    ] {
        ensure!(bridge.data[field] == expected, "{field}: {:?}", bridge.data);
    }
    // The mount is not ACTIVE: the operator holds the bridge at INSTALLING and says why.
    let row = eventually("bridge list shows it INSTALLING", WAIT, || async {
        let table = developer.ok(&["bridge", "list", "-f", "dev.json"]).await?;
        Ok(table
            .lines()
            .find(|line| line.starts_with(&format!("{name} ")) && line.contains(" INSTALLING "))
            .map(str::to_string))
    })
    .await?;
    ensure!(
        row.split("   ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect::<Vec<_>>()
            == [
                name.as_str(),
                "web",
                "80->8080",
                "x-gefyra=dev & path^=/api",
                "INSTALLING",
                "WaitingForMount"
            ],
        "{row}"
    );
    // Waiting for it: the timeout names the state and the operator's message.
    let waiting = developer
        .fails(
            &[
                "bridge",
                "create",
                "mine",
                "-f",
                "dev.json",
                "--mount",
                "web",
                "-p",
                "80:8081",
                "--timeout",
                "3s",
            ],
            TIMEOUT,
        )
        .await?;
    ensure!(
        waiting.contains("GefyraBridge mine is not ACTIVE after 3s: it is INSTALLING (WaitingForMount: waiting for GefyraBridgeMount web to be ACTIVE (it is INSTALLING))"),
        "{waiting}"
    );
    // The router no node runs stands in: the mount is marked ACTIVE as the operator marks it
    // once its router is Ready (it keeps an ACTIVE mount so while the router is away). The
    // bridge the CLI waits for becomes ACTIVE, and it says what goes where.
    mounts
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "state": "ACTIVE",
                "status": {"reason": "Ready", "message": "a stand-in for the router", "ports": [80, 443]},
            })),
        )
        .await?;
    let active = developer
        .ok(&[
            "bridge",
            "create",
            "v2",
            "-f",
            "dev.json",
            "--mount",
            "web",
            "-p",
            "443:8443",
            "--match-path-prefix",
            "/v2",
        ])
        .await?;
    ensure!(
        active
            == format!(
                "GefyraBridge v2 is ACTIVE:\n  \
                 mount:   web (deployment/web in namespace {demo})\n  \
                 port:    443 -> {dev_address}:8443\n  \
                 traffic: HTTP requests matching path^=/v2; the rest goes to the workload\n"
            ),
        "{active}"
    );
    // A mount that does not exist: the operator's reason, exit code 9.
    let missing = developer
        .fails(
            &[
                "bridge", "create", "lost", "-f", "dev.json", "--mount", "nothing", "-p", "80:8080",
            ],
            IN_ERROR,
        )
        .await?;
    ensure!(
        missing.contains("GefyraBridge lost is in state ERROR: MountNotFound: GefyraBridgeMount nothing does not exist"),
        "{missing}"
    );
    // The admission policies: another client's address, and a client without the grant.
    let hijack = developer
        .fails(
            &[
                "bridge",
                "create",
                "-f",
                "dev.json",
                "--mount",
                "web",
                "-p",
                "80:8080",
                "--destination-ip",
                &other_address,
            ],
            FORBIDDEN,
        )
        .await?;
    ensure!(
        hijack.contains(&format!("was refused: destinationIP {other_address} is neither the tunnel address of client dev nor in a routed subnet")),
        "{hijack}"
    );
    let ungranted = developer
        .fails(
            &[
                "bridge",
                "create",
                "theirs",
                "-f",
                "other.json",
                "--mount",
                "web",
                "-p",
                "80:8080",
                "--no-wait",
            ],
            FORBIDDEN,
        )
        .await?;
    ensure!(
        ungranted.contains(&format!("bridging workloads in namespace {demo} is not granted to system:serviceaccount:{ns}:gefyra-client-other")),
        "{ungranted}"
    );
    grant_bridging(&admin, &demo, &ns, "other").await?;
    developer
        .ok(&[
            "bridge",
            "create",
            "theirs",
            "-f",
            "other.json",
            "--mount",
            "web",
            "-p",
            "443:8443",
            "--no-wait",
        ])
        .await?;

    let taken = developer
        .fails(
            &[
                "bridge", "create", "mine", "-f", "dev.json", "--mount", "web", "-p", "80:8082",
            ],
            CONFLICT,
        )
        .await?;
    ensure!(
        taken.contains("creating GefyraBridge mine failed: the name is taken"),
        "{taken}"
    );
    // list and delete: the client's own bridges only.
    let listed: Vec<Value> = serde_json::from_str(
        &developer
            .ok(&["bridge", "ls", "-f", "dev.json", "-o", "json"])
            .await?,
    )?;
    let names: BTreeSet<&str> = listed
        .iter()
        .filter_map(|row| row["name"].as_str())
        .collect();
    ensure!(
        names == BTreeSet::from([name.as_str(), "mine", "lost", "v2"]),
        "dev's bridges only: {listed:?}"
    );
    let not_yours = developer
        .fails(&["bridge", "delete", "theirs", "-f", "dev.json"], FORBIDDEN)
        .await?;
    ensure!(
        not_yours.contains("a client may change and delete only its own GefyraBridges"),
        "{not_yours}"
    );
    let deleted = developer
        .ok(&["bridge", "delete", &name, "-f", "dev.json", "--wait"])
        .await?;
    ensure!(
        deleted == format!("GefyraBridge {name} deleted\n"),
        "{deleted}"
    );
    ensure!(bridges.get_opt(&name).await?.is_none(), "gone");
    developer
        .fails(&["bridge", "rm", &name, "-f", "dev.json"], NOT_FOUND)
        .await?;
    let all = developer
        .ok(&["bridge", "rm", "--all", "-f", "dev.json", "--wait"])
        .await?;
    ensure!(
        ["mine", "lost", "v2"]
            .iter()
            .all(|bridge| all.contains(&format!("GefyraBridge {bridge} deleted\n"))),
        "{all}"
    );
    ensure!(
        bridges.get_opt("theirs").await?.is_some(),
        "another client's bridge is kept"
    );
    let none = developer.run(&["bridge", "list", "-f", "dev.json"]).await?;
    ensure!(
        none.code == 0
            && none.stdout.is_empty()
            && none.stderr.contains("No GefyraBridges of client dev"),
        "{none:?}"
    );

    // mount delete --wait: the operator restores the Services and removes the mount's
    // bridges before the mount goes.
    let deleted = cli.ok(&["mount", "rm", "web", "--wait"]).await?;
    ensure!(
        deleted.contains("GefyraBridgeMount web deleted"),
        "{deleted}"
    );
    ensure!(mounts.get_opt("web").await?.is_none(), "gone");
    eventually("the mount's bridges are gone with it", WAIT, || async {
        Ok(bridges.get_opt("theirs").await?.is_none().then_some(()))
    })
    .await?;
    let empty = cli.run(&["mount", "list"]).await?;
    ensure!(
        empty.code == 0 && empty.stderr.contains("No GefyraBridgeMounts"),
        "{empty:?}"
    );
    Ok(())
}

/// `connect --userspace` in the developer's namespace as uid 65534 with no capabilities:
/// the lab's cluster Service by name through the SOCKS5 proxy (the name resolved by the
/// cluster's DNS through the tunnel), through the HTTP CONNECT proxy and through a `-L`
/// forward; garbage and an oversized request on the proxies get an answer or a close and
/// leave it serving; SIGTERM (what Ctrl-C does) disconnects: the client is WAITING, the
/// process exits 0, its ports are free.
#[tokio::test]
async fn connect_in_userspace_reaches_the_cluster_by_name_without_privileges() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let mut deployment = Deployment::start(&cluster, "cli-userspace", &[]).await?;
    let ns = deployment
        .clients
        .namespace()
        .context("namespaced")?
        .to_string();
    let cluster_subnet = deployment.lab.cluster_subnet();
    deployment.operator = Operator::start(&cluster, &ns, &["--reserved-ranges", &cluster_subnet])?;
    let admin = KubectlGefyra::new(&cluster.kubeconfig, &ns)?;
    admin
        .ok(&["clients", "create", "--client-id", "dev"])
        .await?;
    let peer = deployment.lab.new_peer()?;
    admin
        .ok(&[
            "clients",
            "config",
            "dev",
            "--host",
            &peer.gateway.to_string(),
            "--port",
            &deployment.stowaway.port.to_string(),
            "-o",
            "dev.json",
        ])
        .await?;
    let home = std::env::temp_dir().join(format!("gefyra-userspace-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&home)?;
    std::fs::copy(admin.workdir.join("dev.json"), home.join("dev.json"))?;
    gefyra_e2e::lab::run(
        "chown",
        &["-R", "65534:65534", home.to_str().context("utf-8")?],
    )?;

    // Loopback ports of its own (tests run side by side on this machine).
    let free = || -> Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (socks, http, forward) = (free()?, free()?, free()?);
    let (socks, http) = (format!("127.0.0.1:{socks}"), format!("127.0.0.1:{http}"));
    let binary = kubectl_gefyra_binary();
    // On this machine (the API server and Stowaway are reachable here, as from a laptop);
    // the lab's cluster only through the tunnel.
    let mut command = gefyra_e2e::lab::unprivileged(&binary);
    command
        .args([
            "connect",
            "-f",
            "dev.json",
            "--userspace",
            "--cluster-domain",
            "lab.test",
            "--socks5",
            &socks,
            "--http-proxy",
            &http,
            "-L",
            &format!("{forward}:{}:8080", gefyra_e2e::lab::DNS_NAME),
        ])
        .current_dir(&home)
        .env_clear()
        .env("HOME", &home)
        .env("PATH", "/usr/bin:/bin");
    let mut connected = gefyra_e2e::lab::Process::spawn(&mut command, home.join("connect.log"))?;
    let started = std::time::Instant::now();
    while !connected.log_text().contains("Press Ctrl-C") {
        ensure!(
            connected.is_running() && started.elapsed() < WAIT,
            "connect --userspace is not up: {}",
            connected.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("http://{}:8080/", gefyra_e2e::lab::DNS_NAME);
    let curl = |args: &[&str]| {
        let mut all = vec!["--fail", "--silent", "--show-error", "--max-time", "20"];
        all.extend_from_slice(args);
        gefyra_e2e::lab::run("curl", &all)
    };
    let by_socks = curl(&[
        "--retry",
        "5",
        "--retry-all-errors",
        "--socks5-hostname",
        &socks,
        &url,
    ])?;
    ensure!(
        by_socks == "cluster",
        "through SOCKS5 by name: {by_socks:?}"
    );
    let by_connect = curl(&["--proxytunnel", "--proxy", &format!("http://{http}"), &url])?;
    ensure!(
        by_connect == "cluster",
        "through HTTP CONNECT: {by_connect:?}"
    );
    let by_forward = curl(&[&format!("http://127.0.0.1:{forward}/")])?;
    ensure!(by_forward == "cluster", "through -L: {by_forward:?}");

    // Hostile local clients: a plain GET at the CONNECT proxy, garbage at the SOCKS5 port.
    let refused = gefyra_e2e::lab::run(
        "curl",
        &[
            "--silent",
            "--max-time",
            "10",
            "--proxy",
            &format!("http://{http}"),
            &url,
        ],
    )?;
    ensure!(
        refused.contains("HTTP CONNECT proxy"),
        "a plain GET is refused with a reason: {refused:?}"
    );
    let garbage = gefyra_e2e::lab::run(
        "bash",
        &[
            "-c",
            &format!(
                "head -c 100000 /dev/urandom | timeout 5 curl --silent --max-time 5 telnet://{socks} >/dev/null; echo done"
            ),
        ],
    )?;
    ensure!(garbage.trim() == "done", "{garbage}");
    let still = curl(&["--socks5-hostname", &socks, &url])?;
    ensure!(still == "cluster", "still serving after garbage: {still:?}");

    // SIGTERM, as Ctrl-C: disconnected, WAITING, exit 0, the ports free.
    gefyra_e2e::lab::run("kill", &["-TERM", &connected.child.id().to_string()])?;
    let started = std::time::Instant::now();
    let code = loop {
        if let Some(status) = connected.child.try_wait()? {
            break status.code().unwrap_or(-1);
        }
        ensure!(
            started.elapsed() < WAIT,
            "still running: {}",
            connected.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(code == 0, "exit code {code}: {}", connected.log_text());
    let state = deployment.clients.get("dev").await?.state;
    ensure!(state == ClientState::Waiting, "after SIGTERM: {state}");
    for address in [socks.clone(), http.clone(), format!("127.0.0.1:{forward}")] {
        std::net::TcpListener::bind(&address)
            .with_context(|| format!("{address} still taken after SIGTERM"))?;
    }
    let _ = std::fs::remove_dir_all(&home);
    Ok(())
}
