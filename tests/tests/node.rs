//! On a real node (tests/node.sh: kubelet, containerd, CNI, kube-proxy, CoreDNS), against
//! the Pods the chart installs from the locally built image: they run restricted (as 65532,
//! read-only root filesystem, checked on the processes themselves); a developer with nothing
//! but the client file reaches a Service by name through NodePort 31820 and the Stowaway Pod;
//! the Stowaway Pod replaced, the peer's traffic resumes with the config it has; two operator
//! replicas roll and hand over leadership; `helm uninstall` keeps the CRD and the namespace.
//! The admin's steps also with Gefyra's own CLI (`GEFYRA_CLI`, tests/gefyra-cli.sh).
//!
//! `make test` runs these on a cluster of their own with a node (`make e2e-node`); they are
//! ignored elsewhere: `tests/node.sh run -- cargo test -p gefyra-e2e --test node -- --ignored`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use gefyra_api::GefyraClient;
use gefyra_e2e::lab::{Lab, Peer};
use gefyra_e2e::{
    Cluster, DockerDaemon, GefyraCli, KubectlGefyra, eventually, gefyra_cli_program, repo_root,
    run_tool as run,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{DeleteParams, ListParams};

const NAMESPACE: &str = "gefyra";
/// The node's address (tests/node.sh): NodePorts listen there.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 249, 0, 1);
/// The node's Service and Pod ranges, routed through the tunnel as a developer would.
const CLUSTER_RANGES: [&str; 2] = ["10.0.0.0/24", "10.244.0.0/24"];
const WEB: &str = "http://web.demo.svc.cluster.local/";
const WAIT: Duration = Duration::from_secs(180);

fn cluster_dir() -> Result<PathBuf> {
    Ok(PathBuf::from(
        std::env::var_os("GEFYRA_CLUSTER_DIR")
            .context("GEFYRA_CLUSTER_DIR: run under tests/node.sh run")?,
    ))
}

/// `ctr` against the node's containerd.
fn ctr(args: &[&str]) -> Result<String> {
    let socket = cluster_dir()?.join("node/containerd.sock");
    let mut all = vec!["-a", socket.to_str().context("utf-8")?, "-n", "k8s.io"];
    all.extend_from_slice(args);
    gefyra_e2e::lab::run("ctr", &all)
}

fn chart() -> String {
    repo_root()
        .join("charts/gefyra-operator")
        .to_string_lossy()
        .into_owned()
}

/// helm install/upgrade with the image the node has (imported, never pulled).
async fn helm_install(cluster: &Cluster, verb: &str, extra: &str) -> Result<String> {
    let values = format!(
        "namespace.create=true,namespace.name={NAMESPACE},image.repository=gefyra-operator,\
         image.tag=local,image.pullPolicy=Never,operator.reservedRanges={{{}}}{extra}",
        CLUSTER_RANGES.join(",")
    );
    run(
        "helm",
        &cluster.kubeconfig,
        &[
            verb,
            "gefyra",
            &chart(),
            "--namespace",
            "default",
            "--set",
            &values,
            "--wait",
            "--timeout",
            "180s",
        ],
    )
    .await
}

/// Every container of every Pod in `namespace` runs as 65532 on a read-only root
/// filesystem: read from the container's process on the node (/proc), not from the spec.
async fn pods_run_restricted(pods: &Api<Pod>) -> Result<usize> {
    let tasks = ctr(&["tasks", "ls"])?;
    let mut checked = 0;
    for pod in pods.list(&ListParams::default()).await? {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let statuses = pod
            .status
            .and_then(|status| status.container_statuses)
            .unwrap_or_default();
        for status in statuses {
            ensure!(status.ready, "{name}/{} is Ready", status.name);
            let id = status
                .container_id
                .as_deref()
                .and_then(|id| id.strip_prefix("containerd://"))
                .context("a containerd container ID")?;
            let pid = tasks
                .lines()
                .find_map(|line| {
                    let mut fields = line.split_whitespace();
                    (fields.next() == Some(id)).then(|| fields.next()).flatten()
                })
                .with_context(|| format!("the task of {name}/{}:\n{tasks}", status.name))?;
            let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
            let uid = proc_status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .context("Uid")?;
            ensure!(
                uid.split_whitespace().all(|id| id == "65532"),
                "{name}/{} runs as {uid}",
                status.name
            );
            let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
            let root = mountinfo
                .lines()
                .find(|line| line.split_whitespace().nth(4) == Some("/"))
                .context("the root mount")?;
            let options = root.split_whitespace().nth(5).unwrap_or_default();
            ensure!(
                options.split(',').any(|option| option == "ro"),
                "{name}/{}: root filesystem mounted {options}",
                status.name
            );
            checked += 1;
        }
    }
    Ok(checked)
}

/// The laptop fetches the demo Service by name (its resolver is 192.168.99.1, through the
/// tunnel) and the web Pod by its IP.
fn laptop_reaches_web(lab: &Lab, netns: &str, pod_ip: &str) -> Result<()> {
    let by_name = lab.exec_in(netns, "curl", &["-sf", "--max-time", "3", WEB])?;
    ensure!(by_name.trim() == "web", "{WEB}: {by_name:?}");
    let by_ip = lab.exec_in(
        netns,
        "curl",
        &["-sf", "--max-time", "3", &format!("http://{pod_ip}:8080/")],
    )?;
    ensure!(by_ip.trim() == "web", "the web Pod at {pod_ip}: {by_ip:?}");
    Ok(())
}

async fn wait_reaches_web(lab: &Lab, netns: &str, pod_ip: &str, timeout: Duration) -> Result<()> {
    eventually(&format!("{netns} reaches {WEB}"), timeout, || async {
        Ok(laptop_reaches_web(lab, netns, pod_ip).ok())
    })
    .await
    .with_context(|| lab.peer_report(netns))
}

/// A developer's machine: `connect -f FILE` (no kubeconfig), then wireguard-go in a
/// namespace of its own configured from the file it wrote, the node's ranges routed through
/// the tunnel and names resolved through the tunnel's DNS address.
async fn laptop(
    lab: &mut Lab,
    developer: &KubectlGefyra,
    clients: &Api<GefyraClient>,
    id: &str,
) -> Result<Peer> {
    let file = format!("{id}.json");
    let wg_config = format!("{id}.conf");
    let connected = developer.connect_wg(&file, &wg_config, &[]).await?;
    ensure!(connected.contains("is ACTIVE"), "{connected}");
    let address = clients
        .get(id)
        .await?
        .provider_config
        .as_ref()
        .and_then(|config| config.get("Interface.Address"))
        .and_then(|value| value.as_str().map(str::to_string))
        .context("a tunnel address")?;
    let peer = lab.new_peer()?;
    lab.configure_peer(
        &peer,
        &developer.workdir.join(&wg_config),
        &format!("{address}/32"),
    )?;
    for range in CLUSTER_RANGES {
        lab.exec_in(
            &peer.netns,
            "ip",
            &["route", "add", range, "dev", &peer.interface],
        )?;
    }
    lab.use_resolver(&peer.netns, IpAddr::V4(Ipv4Addr::new(192, 168, 99, 1)))?;
    Ok(peer)
}

async fn leader(leases: &Api<Lease>) -> Result<Option<String>> {
    Ok(leases
        .get_opt("gefyra-operator-leader")
        .await?
        .and_then(|lease| lease.spec)
        .and_then(|spec| spec.holder_identity))
}

#[tokio::test]
#[ignore = "needs a node: make test runs it (make e2e-node)"]
async fn the_chart_runs_on_a_node_and_a_developer_reaches_a_service_by_name() -> Result<()> {
    let cluster = Cluster::from_env().await?;
    let admin = cluster.admin()?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);

    // The demo workload and the chart with its defaults (namespace created, restricted).
    let demo = repo_root().join("deploy/demo/web.yaml");
    run(
        "kubectl",
        &cluster.kubeconfig,
        &[
            "apply",
            "--server-side",
            "-f",
            demo.to_str().context("utf-8")?,
        ],
    )
    .await?;
    let started = Instant::now();
    helm_install(&cluster, "install", "").await?;
    println!(
        "helm install --wait: every Pod Ready in {:?}",
        started.elapsed()
    );
    let namespace: Api<Namespace> = Api::all(admin.clone());
    let labels = namespace
        .get(NAMESPACE)
        .await?
        .metadata
        .labels
        .unwrap_or_default();
    ensure!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str)
            == Some("restricted"),
        "namespace {NAMESPACE} enforces restricted: {labels:?}"
    );
    let checked = pods_run_restricted(&pods).await?;
    ensure!(
        checked == 2,
        "the operator's and Stowaway's containers: {checked}"
    );
    // helm test: the chart's check Pod (from the same image) finds both components ready
    // through their metrics Services, by name (cluster DNS), past the chart's
    // NetworkPolicies (which this node's CNI does not enforce; they are applied).
    let tested = run(
        "helm",
        &cluster.kubeconfig,
        &[
            "test",
            "gefyra",
            "--namespace",
            "default",
            "--timeout",
            "120s",
        ],
    )
    .await?;
    ensure!(
        tested.contains("gefyra-readiness-check") && tested.contains("Phase:          Succeeded"),
        "helm test:\n{tested}"
    );
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        Api::namespaced(admin.clone(), NAMESPACE);
    ensure!(
        policies.list(&ListParams::default()).await?.items.len() == 2,
        "the chart's NetworkPolicies are applied"
    );
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "demo");
    run(
        "kubectl",
        &cluster.kubeconfig,
        &[
            "-n",
            "demo",
            "rollout",
            "status",
            "deployment/web",
            "--timeout=120s",
        ],
    )
    .await?;
    ensure!(deployments.get("web").await?.status.is_some(), "web runs");
    let web_pods: Api<Pod> = Api::namespaced(admin.clone(), "demo");
    let web_ip = web_pods
        .list(&ListParams::default().labels("app=web"))
        .await?
        .items
        .into_iter()
        .find_map(|pod| pod.status.and_then(|status| status.pod_ip))
        .context("the web Pod's IP")?;

    // The admin's steps: a client and its file, Stowaway found at the node's NodePort.
    let gefyra = KubectlGefyra::new(&cluster.kubeconfig, NAMESPACE)?;
    gefyra
        .ok(&["clients", "create", "--client-id", "dev"])
        .await?;
    gefyra
        .ok(&[
            "clients",
            "config",
            "dev",
            "--host",
            &NODE_IP.to_string(),
            "--port",
            "31820",
            "-o",
            "dev.json",
        ])
        .await?;

    // The developer's machine: the client file, no kubeconfig; wireguard-go in a namespace
    // of its own, configured from the file `connect -f` writes; names resolved through the
    // tunnel's DNS address.
    let developer = KubectlGefyra::new(&gefyra.workdir.join("no-kubeconfig"), NAMESPACE)?;
    std::fs::copy(
        gefyra.workdir.join("dev.json"),
        developer.workdir.join("dev.json"),
    )?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), NAMESPACE);
    let mut lab = Lab::new()?;
    let peer = laptop(&mut lab, &developer, &clients, "dev").await?;
    wait_reaches_web(&lab, &peer.netns, &web_ip, Duration::from_secs(60)).await?;

    // The same with Gefyra's own CLI for the admin's steps: its `clients create` and
    // `clients config` make the file a second developer connects with.
    let docker = DockerDaemon::start().await?;
    let home = lab.dir.join("gefyra-home");
    std::fs::create_dir_all(&home)?;
    let theirs = GefyraCli {
        program: gefyra_cli_program()?,
        cluster: &cluster,
        docker: &docker,
        home: &home,
    };
    theirs
        .run(&[
            "clients",
            "create",
            "--client-id",
            "gdev",
            "--timeout",
            "60",
        ])
        .await?;
    let printed = theirs
        .run(&[
            "clients",
            "config",
            "gdev",
            "--host",
            &NODE_IP.to_string(),
            "--port",
            "31820",
        ])
        .await?;
    let file = printed
        .lines()
        .find(|line| line.starts_with('{'))
        .with_context(|| format!("gefyra clients config prints a client file:\n{printed}"))?;
    gefyra_e2e::lab::write_secret(&developer.workdir.join("gdev.json"), file)?;
    let second = laptop(&mut lab, &developer, &clients, "gdev").await?;
    wait_reaches_web(&lab, &second.netns, &web_ip, Duration::from_secs(60)).await?;

    // Stowaway's data plane in its Pod: a worker per CPU the Pod may use, and the kernel
    // took the program that steers each peer's datagrams to its worker (unprivileged).
    let stowaway_log = run(
        "kubectl",
        &cluster.kubeconfig,
        &[
            "-n",
            NAMESPACE,
            "logs",
            "deployment/gefyra-stowaway",
            "--tail=-1",
        ],
    )
    .await?;
    let workers = stowaway::shard::default_workers();
    ensure!(
        stowaway_log.contains(&format!("\"workers\":{workers}"))
            && !stowaway_log.contains("refused to steer"),
        "Stowaway runs {workers} steered workers:\n{stowaway_log}"
    );

    // Stowaway's Pod deleted: a new one comes up with the same key, and the peer's traffic
    // resumes with the config it has.
    let started = Instant::now();
    pods.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("app.kubernetes.io/name=gefyra-stowaway"),
    )
    .await?;
    wait_reaches_web(&lab, &peer.netns, &web_ip, WAIT).await?;
    println!(
        "Stowaway's Pod deleted: the peer reaches {WEB} again after {:?}",
        started.elapsed()
    );

    // Two operator replicas: helm upgrade rolls them (readiness does not wait for the
    // lease), the leader's Pod deleted → it releases the Lease and the other leads at once.
    let started = Instant::now();
    // With chart options the Pods really get: their labels and RUST_LOG from logLevel.
    helm_install(
        &cluster,
        "upgrade",
        ",operator.replicas=2,operator.podLabels.gefyra\\.dev/team=node-test,operator.logLevel=debug",
    )
    .await?;
    println!(
        "helm upgrade to two operator replicas: rolled in {:?}",
        started.elapsed()
    );
    Api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>::namespaced(admin.clone(), NAMESPACE)
        .get("gefyra-operator")
        .await
        .context("a PodDisruptionBudget for two operators")?;
    let labelled = pods
        .list(&ListParams::default().labels("gefyra.dev/team=node-test"))
        .await?
        .items;
    ensure!(
        labelled.len() == 2,
        "operator.podLabels on both replicas: {}",
        labelled.len()
    );
    let logged = run(
        "kubectl",
        &cluster.kubeconfig,
        &[
            "-n",
            NAMESPACE,
            "logs",
            "-l",
            "gefyra.dev/team=node-test",
            "--tail=-1",
        ],
    )
    .await?;
    ensure!(
        logged.contains("\"level\":\"DEBUG\""),
        "operator.logLevel=debug reaches RUST_LOG: no DEBUG line in\n{}",
        logged.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    let leases: Api<Lease> = Api::namespaced(admin.clone(), NAMESPACE);
    let first = eventually("an operator replica leads", WAIT, || async {
        leader(&leases).await
    })
    .await?;
    let started = Instant::now();
    pods.delete(&first, &DeleteParams::default()).await?;
    let second = eventually("another replica leads", WAIT, || async {
        Ok(leader(&leases).await?.filter(|holder| holder != &first))
    })
    .await?;
    let handover = started.elapsed();
    println!("leader {first} deleted: {second} leads after {handover:?}");
    // The deleted Pod's operator releases the Lease on SIGTERM: no waiting for it to expire.
    ensure!(
        handover < Duration::from_secs(10),
        "the standby led {handover:?} after the leader's Pod was deleted (the lease lasts 15 s)"
    );
    // No client is stuck: a second one is served by the new leader end to end.
    gefyra
        .ok(&["clients", "create", "--client-id", "dev2"])
        .await?;
    wait_reaches_web(&lab, &peer.netns, &web_ip, Duration::from_secs(60)).await?;

    // helm uninstall: the Pods go, the CRD and the namespace (with the clients) stay.
    run(
        "helm",
        &cluster.kubeconfig,
        &[
            "uninstall",
            "gefyra",
            "--namespace",
            "default",
            "--wait",
            "--timeout",
            "180s",
        ],
    )
    .await?;
    eventually("the chart's Pods are gone", WAIT, || async {
        Ok(pods
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    ensure!(
        crds.get_opt("gefyraclients.gefyra.dev").await?.is_some(),
        "the CRD is kept"
    );
    ensure!(
        namespace.get_opt(NAMESPACE).await?.is_some(),
        "the namespace is kept"
    );
    ensure!(
        clients.get_opt("dev").await?.is_some(),
        "the clients are kept"
    );
    Ok(())
}
