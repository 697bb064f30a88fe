//! Wire compatibility: the real `gefyra` CLI from PyPI (installed by `tests/gefyra-cli.sh`)
//! manages clients against our operator on the real control plane, and kubectl-gefyra
//! does the same flows with the same results (client files byte for byte).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gefyra_api::{ClientState, GefyraClient};
use gefyra_e2e::{
    Cluster, DockerDaemon, GefyraCli, KubectlGefyra, Operator, api_status, decoded, eventually,
    gefyra_cli_program, install_crd, parse_client_file, wait_for_state,
};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, PostParams};

/// Gefyra's CLI always works in this namespace.
const GEFYRA_NAMESPACE: &str = "gefyra";
const WAIT: Duration = Duration::from_secs(60);

/// Connects client `id` as a developer does with our CLI: a client file written by the admin
/// (`clients config ID CONFIG_ARGS`), then `connect -f` without `--subnet` and without any
/// kubeconfig.
async fn connect_without_subnet(
    admin: &KubectlGefyra,
    id: &str,
    config_args: &[&str],
) -> Result<()> {
    let file = format!("{id}.json");
    let mut args = vec!["clients", "config", id, "-o", &file];
    args.extend_from_slice(config_args);
    admin.ok(&args).await?;
    let developer = KubectlGefyra::new(&admin.workdir.join("no-kubeconfig"), &admin.namespace)?;
    std::fs::copy(admin.workdir.join(&file), developer.workdir.join(&file))?;
    let wg_config = format!("{id}.conf");
    developer.connect_wg(&file, &wg_config, &[]).await?;
    Ok(())
}

#[tokio::test]
async fn the_real_gefyra_cli_manages_clients_and_connects_through_its_cargo() -> Result<()> {
    let program = gefyra_cli_program()?;
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
    // Gefyra's CLI needs gefyra-compat; its connect (below) the subnet webhook, reached by URL
    // here (the chart uses a Service), and a Docker that can run its Cargo.
    gefyra_e2e::install_admission_policy(admin.clone(), GEFYRA_NAMESPACE).await?;
    let webhook_address: std::net::SocketAddr =
        format!("127.0.0.1:{}", gefyra_e2e::free_port()).parse()?;
    let configuration =
        gefyra_operator::webhook::url_configuration(GEFYRA_NAMESPACE, webhook_address);
    let configuration_name = configuration.metadata.name.clone().context("a name")?;
    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    configurations
        .patch(
            &configuration_name,
            &kube::api::PatchParams::apply("gefyra-e2e").force(),
            &kube::api::Patch::Apply(&configuration),
        )
        .await?;
    let operator = Operator::start(
        &cluster,
        GEFYRA_NAMESPACE,
        &[
            "--client-rbac",
            "gefyra-compat",
            "--webhook-address",
            &webhook_address.to_string(),
        ],
    )?;
    let docker = DockerDaemon::with_bridge().await?;
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
    let file = parse_client_file(json_text)?;
    ensure!(file["client_id"] == id, "client_id: {file:?}");
    ensure!(
        file["gefyra_server"] == "203.0.113.7:31820",
        "gefyra_server: {file:?}"
    );
    ensure!(file["namespace"] == GEFYRA_NAMESPACE, "namespace: {file:?}");
    let as_client = cluster.with_token(&decoded(&file, "token")?)?;
    Api::<GefyraClient>::namespaced(as_client, GEFYRA_NAMESPACE)
        .get(id)
        .await
        .context("the client file's token reads its own GefyraClient")?;

    // The same flows with kubectl-gefyra give the same results, both ways round.
    let ours = KubectlGefyra::new(&cluster.kubeconfig, GEFYRA_NAMESPACE)?;
    let ours_id = "ours0123456789abcdef";
    ours.ok(&["clients", "create", "--client-id", ours_id])
        .await?;
    let listed = gefyra.run(&["clients", "ls"]).await?;
    for client in [id, ours_id] {
        let row = listed
            .lines()
            .find(|line| line.starts_with(client))
            .with_context(|| format!("`gefyra clients ls` lists {client}:\n{listed}"))?;
        ensure!(
            row.contains("WAITING"),
            "listed as WAITING by gefyra: {row}"
        );
    }
    let our_rows: Vec<serde_json::Value> =
        serde_json::from_str(&ours.ok(&["clients", "ls", "-o", "json"]).await?)?;
    for client in [id, ours_id] {
        ensure!(
            our_rows
                .iter()
                .any(|row| row["client_id"] == client && row["state"] == "WAITING"),
            "kubectl-gefyra lists {client} as WAITING: {our_rows:?}"
        );
    }
    // Client files: byte for byte what Gefyra's CLI writes, for either tool's clients.
    for client in [id, ours_id] {
        for options in [
            &["--host", "203.0.113.7"][..],
            &[
                "--host",
                "stowaway.example",
                "--port",
                "40000",
                "--mtu",
                "1340",
                "--kubernetes-api",
                "https://api.example:6443",
            ],
        ] {
            let mut args = vec!["clients", "config", client];
            args.extend_from_slice(options);
            let theirs = gefyra.run(&args).await?;
            let theirs = theirs
                .lines()
                .find(|line| line.starts_with('{'))
                .with_context(|| format!("gefyra {args:?} prints a client file:\n{theirs}"))?;
            let mine = ours.ok(&args).await?;
            ensure!(
                mine.trim_end() == theirs,
                "the client files differ for {args:?}:\ngefyra:         {theirs}\nkubectl-gefyra: {mine}"
            );
        }
    }
    // A client connected with kubectl-gefyra is disconnected by Gefyra's CLI.
    ours.ok(&[
        "clients",
        "config",
        ours_id,
        "--host",
        "203.0.113.7",
        "-o",
        "ours.json",
    ])
    .await?;
    let connected = ours
        .ok(&["connect", "-f", "ours.json", "--subnet", "172.28.0.0/16"])
        .await?;
    ensure!(connected.contains("is ACTIVE"), "{connected}");
    let inspected = gefyra
        .run(&["clients", "inspect", ours_id, "-o", "json"])
        .await?;
    ensure!(
        inspected.contains("\"state\": \"ACTIVE\""),
        "gefyra sees ACTIVE: {inspected}"
    );
    let disconnected = gefyra.run(&["clients", "disconnect", ours_id]).await?;
    ensure!(
        disconnected.contains("marked for disconnection"),
        "{disconnected}"
    );
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), GEFYRA_NAMESPACE);
    wait_for_state(&clients, ours_id, ClientState::Waiting).await?;

    // Each tool deletes the other's client.
    let deleted = gefyra.run(&["clients", "delete", ours_id]).await?;
    ensure!(
        deleted.contains(&format!("GefyraClient {ours_id} marked for deletion")),
        "delete output: {deleted}"
    );
    let deleted = ours.ok(&["clients", "delete", id]).await?;
    ensure!(
        deleted.contains(&format!("Client {id} marked for deletion")),
        "delete output: {deleted}"
    );
    let accounts: Api<ServiceAccount> = Api::namespaced(admin, GEFYRA_NAMESPACE);
    for client in [id, ours_id] {
        eventually(
            "the client and its ServiceAccount are gone",
            WAIT,
            || async {
                let gone = clients.get_opt(client).await?.is_none()
                    && accounts
                        .get_opt(&format!("gefyra-client-{client}"))
                        .await?
                        .is_none();
                Ok(gone.then_some(()))
            },
        )
        .await?;
    }

    gefyras_own_connect(
        &cluster,
        GEFYRA_NAMESPACE,
        &gefyra.program,
        &docker,
        &operator,
    )
    .await?;
    configurations
        .delete(&configuration_name, &kube::api::DeleteParams::default())
        .await?;
    let _ = std::fs::remove_dir_all(&home);
    Ok(())
}

/// A mixed fleet: a client connected by `kubectl gefyra connect` without `--subnet` must
/// not break Gefyra's subnet negotiation, which reads `providerParameter["subnet"]` of every
/// ACTIVE client; and Gefyra's listing of a client's GefyraBridges must succeed. Gefyra's
/// own functions run with another client's credentials (`gefyra-compat`, the mode Gefyra's
/// CLI needs).
#[tokio::test]
async fn a_mixed_fleet_leaves_gefyras_subnet_negotiation_and_bridge_listing_working() -> Result<()>
{
    let program = gefyra_cli_program()?;
    let python = Path::new(&program).with_file_name("python");
    let cluster = Cluster::from_env().await?;
    install_crd(&cluster).await?;
    let ns = cluster.namespace("mixed-fleet").await?;
    let _operator = Operator::start(&cluster, &ns, &["--client-rbac", "gefyra-compat"])?;
    let admin = KubectlGefyra::new(&cluster.kubeconfig, &ns)?;
    for id in ["ours", "theirs", "raw"] {
        admin.ok(&["clients", "create", "--client-id", id]).await?;
    }
    connect_without_subnet(&admin, "ours", &["--host", "127.0.0.1"]).await?;

    let clients: Api<GefyraClient> = Api::namespaced(cluster.admin()?, &ns);
    let theirs = wait_for_state(&clients, "theirs", ClientState::Waiting).await?;
    // A client that connects with a raw patch of its own token and no `subnet` key (an
    // older CLI, a hand-written request): the API server records `subnet: ""` all the same,
    // so Gefyra's CLI of every other client can still read it.
    let raw = wait_for_state(&clients, "raw", ClientState::Waiting).await?;
    let as_raw: Api<GefyraClient> =
        Api::namespaced(cluster.with_token(&gefyra_e2e::token_of(&raw)?)?, &ns);
    let raw_key = gefyra_api::wireguard::generate_key_pair().public;
    gefyra_e2e::set_provider_parameter(&as_raw, "raw", serde_json::json!({"publicKey": raw_key}))
        .await?;
    let raw = wait_for_state(&clients, "raw", ClientState::Active).await?;
    ensure!(
        raw.provider_parameter
            == serde_json::json!({"publicKey": raw_key, "subnet": ""})
                .as_object()
                .cloned(),
        "stored: {:?}",
        raw.provider_parameter
    );

    // A GefyraBridge of theirs in Gefyra's wire layout (as Gefyra's CLI creates one): served,
    // and put in ERROR by the operator with a reason that says what to do (the client is not
    // connected).
    let bridges_api: Api<DynamicObject> = Api::namespaced_with(
        cluster.admin()?,
        &ns,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gefyra.dev", "v1", "gefyrabridge"),
            "gefyrabridges",
        ),
    );
    let bridge: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "gefyra.dev/v1", "kind": "gefyrabridge",
        "metadata": {"name": "theirs-web", "namespace": ns, "labels": {"gefyra.dev/client": "theirs", "gefyra.dev/bridge-mount": "web"}},
        "provider": "carrier2", "connectionProvider": "stowaway", "client": "theirs",
        "target": "web", "targetNamespace": "demo", "destinationIP": "172.30.0.2",
        "portMappings": ["8080:80"],
    }))?;
    bridges_api.create(&PostParams::default(), &bridge).await?;
    let refused = eventually("the bridge is refused", WAIT, || async {
        let bridge = bridges_api.get("theirs-web").await?;
        Ok((bridge.data["state"] == "ERROR").then_some(bridge))
    })
    .await?;
    ensure!(
        refused.data["status"]["reason"] == "ClientNotConnected"
            && refused.data["status"]["message"]
                .as_str()
                .is_some_and(|message| message.contains("connect first")),
        "{:?}",
        refused.data
    );

    let kubeconfig = cluster.kubeconfig_with_token(&gefyra_e2e::token_of(&theirs)?)?;
    // Gefyra's own functions: the subnets of the ACTIVE clients (read while it picks its
    // own) and the client's bridges (listed when it disconnects).
    let script = "import json, sys, types, kubernetes\n\
        from gefyra.local.networking import _get_client_networks\n\
        from gefyra.local.bridge import get_all_gefyrabridges\n\
        kubernetes.config.load_kube_config(config_file=sys.argv[1])\n\
        config = types.SimpleNamespace(K8S_CUSTOM_OBJECT_API=kubernetes.client.CustomObjectsApi(), NAMESPACE=sys.argv[2], CLIENT_ID='theirs')\n\
        bridges = [bridge['metadata']['name'] for bridge in get_all_gefyrabridges(config)]\n\
        print(json.dumps({'subnets': _get_client_networks(config), 'bridges': bridges}))\n";
    let output = tokio::process::Command::new(&python)
        .args(["-c", script])
        .arg(&kubeconfig)
        .arg(&ns)
        .output()
        .await?;
    let _ = std::fs::remove_file(&kubeconfig);
    ensure!(
        output.status.success(),
        "Gefyra's subnet listing failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    ensure!(
        seen == serde_json::json!({"subnets": ["", ""], "bridges": ["theirs-web"]}),
        "what Gefyra's CLI sees: {seen}"
    );
    Ok(())
}

/// This machine's first global IPv4 address: where a container reaches the host.
fn host_address() -> Result<std::net::Ipv4Addr> {
    let output = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            line.split_whitespace()
                .nth(3)?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .context("this machine has a global IPv4 address")
}

/// Gefyra's own connect, all the way: its CLI from PyPI starts its Cargo container (a
/// stand-in built from Debian's packages, `tests/cargo-image.sh`) under a private dockerd,
/// negotiates a subnet — retrying by itself when our webhook refuses a taken one with 500 —
/// in a namespace where a `kubectl gefyra connect` client is ACTIVE too, brings the tunnel up
/// to Stowaway, passes its own probe of 192.168.99.1, reaches a server on the cluster side
/// through Stowaway from Cargo and from a `gefyra run` app container, disconnects (removing
/// the app container) and connects again.
async fn gefyras_own_connect(
    cluster: &Cluster,
    ns: &str,
    program: &str,
    docker: &DockerDaemon,
    operator: &Operator,
) -> Result<()> {
    let rootfs = std::env::var("GEFYRA_CARGO_ROOTFS").context(
        "GEFYRA_CARGO_ROOTFS is not set: run through `make test`, which builds it with tests/cargo-image.sh",
    )?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), ns);
    // Stowaway on a UDP port of this machine.
    let wireguard_port = std::net::UdpSocket::bind("0.0.0.0:0")?.local_addr()?.port();
    let stowaway_http = gefyra_e2e::free_port();
    let _stowaway = tokio::process::Command::new(gefyra_e2e::lab::stowaway_binary())
        .args([
            "--namespace",
            ns,
            "--resolver",
            "127.0.0.1:53",
            "--status-interval",
            "1",
            "--bridges-listen",
            "127.0.0.1:0",
        ])
        .args(["--listen", &format!("0.0.0.0:{wireguard_port}")])
        .args(["--http-address", &format!("127.0.0.1:{stowaway_http}")])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let metric = |series: &'static str| gefyra_e2e::metric(stowaway_http, series);
    eventually("Stowaway is ready", WAIT, || async {
        let ready = gefyra_e2e::http_get(stowaway_http, "/readyz").await.ok();
        Ok(ready.filter(|(code, _)| *code == 200).map(drop))
    })
    .await?;
    let host = host_address()?;
    // The cluster side: a server in a network namespace of its own (Stowaway never lets a
    // peer reach Stowaway's own addresses, this machine's included).
    let mut lab = gefyra_e2e::lab::Lab::new()?;
    let cluster_netns = lab.cluster_netns();
    let cluster_address = lab.cluster_address();
    lab.serve(
        &cluster_netns,
        std::net::IpAddr::V4(cluster_address),
        "through-stowaway",
    )?;

    // A client routing 172.18.0.0/15: Docker's first networks (172.18/16, 172.19/16) are
    // taken in the cluster, though no ACTIVE client lists them as its subnet string.
    gefyra_e2e::create_client(admin.clone(), ns, "blocker").await?;
    let (_, blocker_key) = gefyra_e2e::lab::key_pair();
    wait_for_state(&clients, "blocker", ClientState::Waiting).await?;
    gefyra_e2e::set_provider_parameter(
        &clients,
        "blocker",
        serde_json::json!({"subnet": "172.18.0.0/15", "publicKey": blocker_key}),
    )
    .await?;
    wait_for_state(&clients, "blocker", ClientState::Active).await?;
    // A client of ours, connected without a subnet (the mixed fleet).
    let ours = KubectlGefyra::new(&cluster.kubeconfig, ns)?;
    let port = wireguard_port.to_string();
    let host_text = host.to_string();
    let endpoint = ["--host", host_text.as_str(), "--port", port.as_str()];
    ours.ok(&["clients", "create", "--client-id", "ours"])
        .await?;
    connect_without_subnet(&ours, "ours", &endpoint).await?;
    // Gefyra's client: its file only.
    ours.ok(&["clients", "create", "--client-id", "g1"]).await?;
    let mut config = vec!["clients", "config", "g1", "-o", "g1.json"];
    config.extend_from_slice(&endpoint);
    ours.ok(&config).await?;
    // The webhook answers once the operator has published its CA.
    let probe = clients.clone();
    eventually(
        "the subnet webhook refuses a taken subnet",
        WAIT,
        || async {
            let dry_run = kube::api::PatchParams {
                dry_run: true,
                ..Default::default()
            };
            let body = serde_json::json!({"providerParameter": {"subnet": "172.18.0.0/16"}});
            let refused = probe
                .patch("g1", &dry_run, &kube::api::Patch::Merge(body))
                .await;
            Ok(refused
                .err()
                .filter(|error| api_status(error) == Some(500))
                .map(drop))
        },
    )
    .await
    .with_context(|| operator.log_text())?;

    // Gefyra's CLI, as a developer runs it: the client file, its Docker, no kubeconfig.
    let image = "gefyra-cargo-standin:2.5.6";
    let imported = docker
        .docker()
        .args([
            "import",
            "--change",
            "ENTRYPOINT [\"/usr/local/bin/entrypoint.sh\"]",
        ])
        .args(["--change", "WORKDIR /", &rootfs, image])
        .output()
        .await?;
    ensure!(
        imported.status.success(),
        "docker import: {}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let home = ours.workdir.join("developer");
    std::fs::create_dir_all(&home)?;
    let file = ours.workdir.join("g1.json");
    let gefyra = |args: Vec<String>| {
        let mut command = std::process::Command::new(program);
        command
            .args(&args)
            .env("DOCKER_HOST", &docker.host)
            .env("HOME", &home)
            .env_remove("KUBECONFIG")
            .current_dir(&home);
        async move {
            let output = tokio::task::spawn_blocking(move || command.output()).await??;
            ensure!(
                output.status.success(),
                "gefyra {args:?} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        }
    };
    let connect_args = || -> Vec<String> {
        [
            "connections",
            "connect",
            "-f",
            &file.to_string_lossy(),
            "-n",
            "g1",
            "--cargo-image",
            image,
            "--timeout",
            "30",
        ]
        .map(str::to_string)
        .to_vec()
    };
    gefyra(connect_args())
        .await
        .with_context(|| operator.log_text())?;
    let connected = clients.get("g1").await?;
    let subnet = connected
        .provider_parameter
        .as_ref()
        .and_then(|parameter| parameter.get("subnet"))
        .and_then(|subnet| subnet.as_str())
        .unwrap_or_default()
        .to_string();
    ensure!(
        connected.state == ClientState::Active
            && !subnet.starts_with("172.18.")
            && !subnet.starts_with("172.19."),
        "Gefyra's CLI retried past the taken subnets: {:?} {subnet}",
        connected.state
    );
    ensure!(metric("gefyra_stowaway_handshakes_total{result=\"completed\"}").await? >= 1.0);

    // From a container, through the tunnel and Stowaway, to the cluster side: the server's
    // body, and a TCP flow opened in Stowaway (not, say, straight over the Docker bridge).
    let fetch = format!(
        "exec 3<>/dev/tcp/{cluster_address}/8080; printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    );
    let fetch_through_stowaway = |container: &'static str| {
        let mut exec = docker.docker();
        exec.args(["exec", container, "bash", "-c", &fetch]);
        async move {
            let series = "gefyra_stowaway_flows_total{protocol=\"tcp\",result=\"opened\"}";
            let opened_before = metric(series).await?;
            let fetched = exec.output().await?;
            let body = String::from_utf8_lossy(&fetched.stdout);
            ensure!(
                body.ends_with("through-stowaway"),
                "{container} fetched {body:?}: {}",
                String::from_utf8_lossy(&fetched.stderr)
            );
            ensure!(
                metric(series).await? > opened_before,
                "{container}'s fetch went through Stowaway"
            );
            anyhow::Ok(())
        }
    };
    fetch_through_stowaway("gefyra-cargo-g1").await?;

    // `gefyra run`: an app container on Gefyra's network whose default route Cargo patches,
    // so it reaches the cluster side through the tunnel and Stowaway (the subnet Gefyra's CLI
    // negotiated is the peer's routed range there).
    gefyra(
        [
            "run",
            "-d",
            "-i",
            image,
            "-N",
            "gefyra-app",
            "-n",
            ns,
            "-c",
            "sleep infinity",
            "--connection-name",
            "g1",
        ]
        .map(str::to_string)
        .to_vec(),
    )
    .await?;
    fetch_through_stowaway("gefyra-app").await?;

    // Disconnect (it lists the client's GefyraBridges, then removes the app container),
    // connect again, remove: the client follows.
    gefyra(
        ["connections", "disconnect", "g1", "--yes"]
            .map(str::to_string)
            .to_vec(),
    )
    .await?;
    wait_for_state(&clients, "g1", ClientState::Waiting).await?;
    let left = docker
        .docker()
        .args(["ps", "-aq", "--filter", "name=^gefyra-app$"])
        .output()
        .await?;
    ensure!(
        left.status.success() && left.stdout.trim_ascii().is_empty(),
        "disconnect removed the app container: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    // A reconnect names the connection only (Gefyra keeps its client file).
    gefyra(
        ["connections", "connect", "-n", "g1", "--timeout", "30"]
            .map(str::to_string)
            .to_vec(),
    )
    .await?;
    wait_for_state(&clients, "g1", ClientState::Active).await?;
    gefyra(["connections", "rm", "g1"].map(str::to_string).to_vec()).await?;
    Ok(())
}
