//! On a real node (tests/node.sh: kubelet, containerd, CNI, kube-proxy, CoreDNS), against
//! the Pods the chart installs from the locally built image: they run restricted (as 65532,
//! read-only root filesystem, checked on the processes themselves); a developer with nothing
//! but the client file reaches a Service by name through NodePort 31820 and the Stowaway Pod;
//! the Stowaway Pod replaced, the peer's traffic resumes with the config it has; two operator
//! replicas roll and hand over leadership; `helm uninstall` keeps the CRD and the namespace.
//! The admin's steps also with Gefyra's own CLI (`GEFYRA_CLI`, tests/gefyra-cli.sh).
//! The README's and docs/*.md's marked commands run as written (`the_docs_commands_run_as_written`).
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
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};

const NAMESPACE: &str = "gefyra";
/// The node's address (tests/node.sh): NodePorts listen there.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 249, 0, 1);
/// The node's Service and Pod ranges, routed through the tunnel as a developer would.
const CLUSTER_RANGES: [&str; 2] = ["10.0.0.0/24", "10.244.0.0/24"];
const WEB: &str = "http://web.demo.svc.cluster.local/";
const WAIT: Duration = Duration::from_secs(180);

/// The tests here share one cluster and its fixed names (namespace `gefyra`, release
/// `gefyra`, NodePort 31820): one at a time.
static NODE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let _one_at_a_time = NODE_CLUSTER.lock().await;
    let cluster = Cluster::from_env().await?;
    without_gefyra(&cluster).await?;
    let admin = cluster.admin()?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);

    // The demo workload and the chart with its defaults (namespace created, restricted).
    apply_demo(&cluster).await?;
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
    demo_rolled_out(&cluster).await?;
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

/// The pages whose marked commands run, in this order: the install page's `helm install`
/// first (the README's first client needs it), the full uninstall (upgrade.md) last.
const DOC_PAGES: [&str; 7] = [
    "docs/install.md",
    "README.md",
    "docs/bridging.md",
    "docs/userspace.md",
    "docs/cli.md",
    "docs/troubleshooting.md",
    "docs/upgrade.md",
];
/// How long one block may take.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(300);

/// Every `sh` block of the README and docs/ carries a marker (no node needed).
#[test]
fn every_command_block_of_the_docs_says_whether_the_docs_test_runs_it() -> Result<()> {
    let (run, not_run) = gefyra_e2e::docs::runnable_blocks(&repo_root(), &DOC_PAGES)?;
    ensure!(!run.is_empty(), "no block to run");
    ensure!(
        not_run.len() < run.len(),
        "few blocks are not run: {} not run against {} run",
        not_run.len(),
        run.len()
    );
    Ok(())
}

/// No Gefyra left on the cluster: no release, no namespace `gefyra` (clients another test
/// kept there, without an operator, lose their finalizer). The CRDs stay: a release of the
/// same name adopts them.
async fn without_gefyra(cluster: &Cluster) -> Result<()> {
    let admin = cluster.admin()?;
    // The grants the tests and the docs give in `demo` (a failed test leaves its own).
    let _ = run(
        "kubectl",
        &cluster.kubeconfig,
        &[
            "-n",
            "demo",
            "delete",
            "rolebinding/gefyra-bridge-alice",
            "rolebinding/gefyra-bridge-bob",
            "rolebinding/gefyra-bridge-carol",
            "rolebinding/gefyra-bridge-dev",
            "--ignore-not-found",
        ],
    )
    .await;
    let released = run(
        "helm",
        &cluster.kubeconfig,
        &["status", "gefyra", "--namespace", "default"],
    )
    .await
    .is_ok();
    if released {
        // The operator still runs: it removes each mount's router (switching the Services
        // back), revokes each client and releases its ranges.
        let _ = run(
            "kubectl",
            &cluster.kubeconfig,
            &[
                "delete",
                "gefyrabridgemounts",
                "--all",
                "--namespace",
                NAMESPACE,
                "--wait",
                "--timeout=120s",
            ],
        )
        .await;
        let _ = run(
            "kubectl",
            &cluster.kubeconfig,
            &[
                "delete",
                "gefyraclients",
                "--all",
                "--namespace",
                NAMESPACE,
                "--wait",
                "--timeout=120s",
            ],
        )
        .await;
        run(
            "helm",
            &cluster.kubeconfig,
            &["uninstall", "gefyra", "--namespace", "default", "--wait"],
        )
        .await?;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    if crds.get_opt("gefyraclients.gefyra.dev").await?.is_some() {
        let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), NAMESPACE);
        for client in clients.list(&ListParams::default()).await? {
            let name = client.metadata.name.clone().unwrap_or_default();
            clients
                .patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
                )
                .await?;
        }
    }
    if crds
        .get_opt("gefyrabridgemounts.gefyra.dev")
        .await?
        .is_some()
    {
        let mounts = bridge_api(admin.clone(), "gefyrabridgemounts", "gefyrabridgemount");
        for mount in mounts.list(&ListParams::default()).await? {
            let name = mount.metadata.name.clone().unwrap_or_default();
            mounts
                .patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
                )
                .await?;
        }
    }
    let namespaces: Api<Namespace> = Api::all(admin);
    if namespaces.get_opt(NAMESPACE).await?.is_some() {
        let _ = namespaces.delete(NAMESPACE, &DeleteParams::default()).await;
        eventually("namespace gefyra is gone", WAIT, || async {
            Ok(namespaces.get_opt(NAMESPACE).await?.is_none().then_some(()))
        })
        .await?;
    }
    Ok(())
}

/// A directory that looks like a checkout to the docs' commands (`charts/...`,
/// `$PWD/target/debug`, `tests/...`): the repository's top-level entries linked into it;
/// what the commands write stays in it. `HOME` is a fresh directory inside.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("gefyra-docs-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(dir.join(".docs-test/bin"))?;
        std::fs::create_dir_all(dir.join(".docs-test/home"))?;
        for entry in std::fs::read_dir(repo_root())? {
            let entry = entry?;
            if entry.file_name() == ".git" {
                continue;
            }
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name()))?;
        }
        // The developer's machine has systemd-resolved (the split tunnel's PostUp runs
        // `resolvectl dns IFACE 192.168.99.1` and `resolvectl domain IFACE ~cluster.local`)
        // or resolvconf (a full tunnel's `DNS =` line). Ours stand in for them in the
        // developer's namespace: the server they are given becomes that namespace's
        // resolv.conf (the one `ip netns exec` mounts there), never the machine's; in a
        // namespace of its own every name may go to it.
        let shims = [
            (
                "resolvectl",
                "case \"$1\" in dns) shift 2; for server in \"$@\"; do echo \"nameserver $server\"; done \
                 >\"${GEFYRA_TEST_RESOLV_CONF:?}\" ;; esac\n",
            ),
            (
                "resolvconf",
                "case \"$1\" in -a) cat >\"${GEFYRA_TEST_RESOLV_CONF:?}\" ;; esac\n",
            ),
        ];
        for (name, body) in shims {
            let shim = dir.join(".docs-test/bin").join(name);
            std::fs::write(
                &shim,
                format!(
                    "#!/bin/sh\n# The docs test's {name}: the network namespace's resolv.conf only.\n{body}"
                ),
            )?;
            std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        Ok(Self { dir })
    }
}

/// Runs one block as written (`set -euo pipefail` first) with bash, on the admin's machine
/// or in the developer's namespace; its output, or an error naming the block.
async fn run_block(
    scratch: &Scratch,
    number: usize,
    block: &gefyra_e2e::docs::Block,
    cluster_dir: &std::path::Path,
    developer_netns: &str,
) -> Result<String> {
    use gefyra_e2e::docs::Marker;
    let script = scratch.dir.join(format!(".docs-test/block-{number:02}.sh"));
    std::fs::write(&script, format!("set -euo pipefail\n{}", block.text))?;
    let tools = gefyra_e2e::controlplane_tool("kubectl")?
        .parent()
        .context("the tools' directory")?
        .to_path_buf();
    let plugin = gefyra_e2e::kubectl_gefyra_binary()
        .parent()
        .context("kubectl-gefyra's directory")?
        .to_path_buf();
    let system = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    let mut command = match block.marker {
        Marker::Netns => {
            let mut command = tokio::process::Command::new("ip");
            command.args(["netns", "exec", developer_netns, "bash"]);
            command
        }
        _ => tokio::process::Command::new("bash"),
    };
    command
        .arg(&script)
        .current_dir(&scratch.dir)
        .env_clear()
        .env("HOME", scratch.dir.join(".docs-test/home"))
        .env("LANG", "C.UTF-8")
        .env("CLUSTER_DIR", cluster_dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if block.marker == Marker::Netns {
        command
            .env(
                "PATH",
                format!(
                    "{}:{}:{}:{system}",
                    scratch.dir.join(".docs-test/bin").display(),
                    plugin.display(),
                    tools.display()
                ),
            )
            .env(
                "GEFYRA_TEST_RESOLV_CONF",
                format!("/etc/netns/{developer_netns}/resolv.conf"),
            );
    } else {
        command
            .env(
                "PATH",
                format!("{}:{}:{system}", plugin.display(), tools.display()),
            )
            .env("KUBECONFIG", cluster_dir.join("kubeconfig"));
    }
    let where_ = if block.marker == Marker::Netns {
        " (in the developer's network namespace)"
    } else {
        ""
    };
    println!("==> {}:{}{where_}\n{}", block.page, block.line, block.text);
    let output = tokio::time::timeout(BLOCK_TIMEOUT, command.output())
        .await
        .with_context(|| {
            format!(
                "{}:{}: not done within {BLOCK_TIMEOUT:?}",
                block.page, block.line
            )
        })??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{text}");
    ensure!(
        output.status.success(),
        "{}:{}{where_} failed ({}):\n{}\n--- its output:\n{text}",
        block.page,
        block.line,
        output.status,
        block.text
    );
    Ok(text)
}

/// The processes left in a network namespace (wireguard-go of a `wg-quick up` whose `down`
/// never ran): all started by this test.
fn stop_processes_in(netns: &str) {
    if let Ok(pids) = gefyra_e2e::lab::run("ip", &["netns", "pids", netns]) {
        for pid in pids.split_whitespace() {
            let _ = std::process::Command::new("kill").arg(pid).status();
        }
    }
}

/// The README's and docs/*.md's marked commands, as written, in the order of DOC_PAGES: the
/// install page's `helm install` with the local image, the README's first client (create,
/// client file, connect, `wg-quick up` in the developer's namespace, the demo Service by
/// name, down and disconnect), the CLI's and troubleshooting's commands, the full
/// uninstall. On the cluster `make up` makes: a node and the demo Service.
#[tokio::test]
#[ignore = "needs a node: make test runs it (make e2e-node)"]
async fn the_docs_commands_run_as_written() -> Result<()> {
    let _one_at_a_time = NODE_CLUSTER.lock().await;
    let (blocks, not_run) = gefyra_e2e::docs::runnable_blocks(&repo_root(), &DOC_PAGES)?;
    for block in &not_run {
        if let gefyra_e2e::docs::Marker::NotRun(why) = &block.marker {
            println!("not run: {}:{} — {why}", block.page, block.line);
        }
    }
    let cluster = Cluster::from_env().await?;
    let cluster_dir = cluster_dir()?;
    ensure!(
        cluster_dir.join("kubeconfig") == cluster.kubeconfig,
        "the docs' KUBECONFIG is $CLUSTER_DIR/kubeconfig: {} is not {}",
        cluster_dir.join("kubeconfig").display(),
        cluster.kubeconfig.display()
    );
    without_gefyra(&cluster).await?;
    // What `make up` adds besides the chart (tests/system.sh): the demo workload.
    apply_demo(&cluster).await?;
    demo_rolled_out(&cluster).await?;

    let scratch = Scratch::new()?;
    let mut lab = Lab::new()?;
    // The developer's machine: a namespace reaching the node's address; its resolv.conf
    // exists (so `ip netns exec` mounts it) with a resolver that answers nothing, until
    // wg-quick's DNS line replaces it.
    let developer = lab.new_peer()?;
    lab.use_resolver(&developer.netns, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)))?;
    let mut result = Ok(());
    for (number, block) in blocks.iter().enumerate() {
        if let Err(error) = run_block(&scratch, number, block, &cluster_dir, &developer.netns).await
        {
            result = Err(error);
            break;
        }
    }
    stop_processes_in(&developer.netns);
    drop(lab);
    if result.is_err() {
        // The other test starts from no Gefyra; the scratch directory stays for a look.
        let _ = without_gefyra(&cluster).await;
        println!("the docs test's directory: {}", scratch.dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&scratch.dir);
    }
    result
}

/// Runs `code` with Gefyra's own modules (the pinned CLI's Python, `GEFYRA_CLI`), with
/// `config` as its functions take it (`K8S_CUSTOM_OBJECT_API`, `K8S_CORE_API` of
/// `kubeconfig`, `NAMESPACE`) and `args` from `sys.argv[3]` on; its output.
async fn gefyras_code(kubeconfig: &std::path::Path, code: &str, args: &[&str]) -> Result<String> {
    let program = gefyra_cli_program()?;
    let python = std::path::Path::new(&program).with_file_name("python");
    let script = format!(
        "import sys, types, kubernetes\n\
         kubernetes.config.load_kube_config(config_file=sys.argv[1])\n\
         config = types.SimpleNamespace(K8S_CUSTOM_OBJECT_API=kubernetes.client.CustomObjectsApi(), K8S_CORE_API=kubernetes.client.CoreV1Api(), NAMESPACE=sys.argv[2])\n\
         {code}"
    );
    let output = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(&script)
        .arg(kubeconfig)
        .arg(NAMESPACE)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {}", python.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "Gefyra's code failed:\n{code}\n--- its output:\n{text}"
    );
    Ok(text)
}

/// The bridge kinds as the tests write them (Gefyra's wire layout).
/// `deploy/demo/web.yaml` applied: the demo workload `make up` adds (tests/system.sh).
async fn apply_demo(cluster: &Cluster) -> Result<()> {
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
    Ok(())
}

/// Waits until the demo Deployment `web` has rolled out.
async fn demo_rolled_out(cluster: &Cluster) -> Result<()> {
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
    Ok(())
}

/// The demo workload as `make up` makes it, anew (a Pod or a switched Service an earlier
/// run left is replaced), and the chart installed with `values` (`,key=value...`).
async fn demo_and_chart(cluster: &Cluster, values: &str) -> Result<()> {
    run(
        "kubectl",
        &cluster.kubeconfig,
        &[
            "-n",
            "demo",
            "delete",
            "pod/others",
            "service/web",
            "--ignore-not-found",
            "--wait",
        ],
    )
    .await?;
    apply_demo(cluster).await?;
    helm_install(cluster, "install", values).await?;
    demo_rolled_out(cluster).await?;
    Ok(())
}

fn bridge_api(client: kube::Client, plural: &str, kind: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client,
        NAMESPACE,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gefyra.dev", "v1", kind),
            plural,
        ),
    )
}

/// A Pod in namespace `demo` from the node's busybox image, restricted as the namespace
/// demands, running `script` with `sh -c`.
fn busybox_pod(name: &str, script: &str) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "client", "image": "gefyra-local/busybox:1", "imagePullPolicy": "IfNotPresent",
                "args": ["sh", "-c", script],
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }))?)
}

/// What `wget` fetches from `url` in a Pod of namespace `demo` with each header (`None`:
/// without): one short-lived Pod runs them all, its log read back.
async fn from_a_pod(pods: &Api<Pod>, name: &str, requests: &[Option<&str>]) -> Result<Vec<String>> {
    let script = requests
        .iter()
        .map(|header| match header {
            Some(header) => {
                format!("echo \"$(busybox timeout 10 busybox wget -q -O - --header '{header}' http://web/ 2>&1)\"")
            }
            None => "echo \"$(busybox timeout 10 busybox wget -q -O - http://web/ 2>&1)\"".to_string(),
        })
        .collect::<Vec<_>>()
        .join("; ");
    let _ = pods.delete(name, &DeleteParams::default()).await;
    gefyra_e2e::wait_gone(pods, name).await?;
    pods.create(&PostParams::default(), &busybox_pod(name, &script)?)
        .await?;
    eventually(&format!("Pod {name} completes"), WAIT, || async {
        let phase = pods.get(name).await?.status.and_then(|s| s.phase);
        Ok(matches!(phase.as_deref(), Some("Succeeded") | Some("Failed")).then_some(()))
    })
    .await?;
    let log = pods.logs(name, &Default::default()).await?;
    pods.delete(name, &DeleteParams::default()).await?;
    Ok(log.lines().map(|line| line.trim().to_string()).collect())
}

/// `state` of a bridge or mount, once it is there (ERROR fails with its reason).
async fn wait_state(api: &Api<DynamicObject>, name: &str, state: &str) -> Result<Duration> {
    let started = Instant::now();
    eventually(&format!("{name} is {state}"), WAIT, || async {
        let Some(object) = api.get_opt(name).await? else {
            return Ok(None);
        };
        let now = object.data["state"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        anyhow::ensure!(
            now != "ERROR" || state == "ERROR",
            "{name} is ERROR: {}",
            object.data["status"]
        );
        Ok((now == state).then_some(()))
    })
    .await?;
    Ok(started.elapsed())
}

/// The UIDs and restart counts of the web Pods: what mounting and bridging must not change.
async fn web_pods(pods: &Api<Pod>) -> Result<Vec<(String, i32)>> {
    let mut seen: Vec<(String, i32)> = pods
        .list(&ListParams::default().labels("app=web"))
        .await?
        .items
        .into_iter()
        .map(|pod| {
            let restarts = pod
                .status
                .and_then(|s| s.container_statuses)
                .unwrap_or_default()
                .iter()
                .map(|c| c.restart_count)
                .sum();
            (pod.metadata.uid.unwrap_or_default(), restarts)
        })
        .collect();
    seen.sort();
    Ok(seen)
}

/// A bridge of `client` on mount `web` as Gefyra's CLI writes one: its client's local server
/// at `address:8080` gets the container port 8080's requests that carry `header` (all of
/// them without).
fn bridge_body(
    name: &str,
    client: &str,
    address: &str,
    header: Option<(&str, &str)>,
) -> Result<DynamicObject> {
    let rules = header.map(|(header, value)| {
        serde_json::json!({"rules": [{"match": [{"matchHeader": {"name": header, "value": value, "type": "exact"}}]}]})
    });
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "gefyra.dev/v1", "kind": "gefyrabridge",
        "metadata": {"name": name, "namespace": NAMESPACE,
            "labels": {"gefyra.dev/bridge-mount": "web", "gefyra.dev/client": client}},
        "provider": "carrier2", "connectionProvider": "stowaway",
        "providerParameter": rules.unwrap_or_else(|| serde_json::json!({})),
        "client": client, "destinationIP": address, "target": "web",
        "targetNamespace": "", "targetContainer": "",
        "portMappings": ["8080:8080"],
    }))?)
}

/// Bridging on a node, as users do it: the admin mounts deployment/web (a router in front,
/// the Service switched; the Pods untouched) and grants two clients bridging in `demo`;
/// each developer, with their client's own token, bridges the requests carrying their
/// header to the server on their laptop (a real wireguard-go peer; Alice with Gefyra's own
/// code, waiting for its Ready Event); requests without go to the original. A revoked
/// grant stops a bridge (the operator's LocalSubjectAccessReview); a rule-less bridge takes
/// all traffic; a laptop that disconnects releases its bridge; unbridge and unmount return
/// everything to the original. Meanwhile a Pod
/// requests the Service without a header, and not one of its requests fails; the web Pods
/// keep their UIDs and restart counts.
#[tokio::test]
#[ignore = "needs a node: make e2e-node"]
async fn bridges_send_a_workloads_requests_to_developers_and_leave_its_pods_alone() -> Result<()> {
    let _one_at_a_time = NODE_CLUSTER.lock().await;
    let cluster = Cluster::from_env().await?;
    without_gefyra(&cluster).await?;
    let admin = cluster.admin()?;
    // gefyra-compat: Gefyra's code waits for a bridge's Event, which a client reads only there.
    demo_and_chart(
        &cluster,
        ",bridging.namespaces={demo},operator.clientRbac=gefyra-compat",
    )
    .await?;
    let demo_pods: Api<Pod> = Api::namespaced(admin.clone(), "demo");
    let before = web_pods(&demo_pods).await?;

    // The admin: two clients, their files, and the grant to bridge in `demo`.
    let gefyra = KubectlGefyra::new(&cluster.kubeconfig, NAMESPACE)?;
    let developer = KubectlGefyra::new(&gefyra.workdir.join("no-kubeconfig"), NAMESPACE)?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), NAMESPACE);
    let mut lab = Lab::new()?;
    let mut laptops = Vec::new();
    for id in ["alice", "bob"] {
        gefyra.ok(&["clients", "create", "--client-id", id]).await?;
        gefyra
            .ok(&[
                "clients",
                "config",
                id,
                "--host",
                &NODE_IP.to_string(),
                "--port",
                "31820",
                "-o",
                &format!("{id}.json"),
            ])
            .await?;
        std::fs::copy(
            gefyra.workdir.join(format!("{id}.json")),
            developer.workdir.join(format!("{id}.json")),
        )?;
        run(
            "kubectl",
            &cluster.kubeconfig,
            &[
                "-n",
                "demo",
                "create",
                "rolebinding",
                &format!("gefyra-bridge-{id}"),
                "--clusterrole=gefyra-bridge",
                &format!("--serviceaccount={NAMESPACE}:gefyra-client-{id}"),
            ],
        )
        .await?;
        let peer = laptop(&mut lab, &developer, &clients, id).await?;
        let client = clients.get(id).await?;
        let address = client
            .provider_config
            .as_ref()
            .and_then(|config| config.get("Interface.Address"))
            .and_then(|value| value.as_str())
            .context("a tunnel address")?
            .to_string();
        // The developer's local server, on the tunnel address: its body is its name.
        lab.serve(&peer.netns, address.parse()?, id)?;
        let own = cluster.with_token(&gefyra_e2e::token_of(&client)?)?;
        laptops.push((id, peer, address, own));
    }

    // Other users: a Pod requesting the Service without a header, all along (a line per
    // request: a dot per answer, an F per failure; lines, as the container runtime cuts a
    // longer line into 16 KiB pieces).
    let load = busybox_pod(
        "others",
        "while true; do if busybox timeout 10 busybox wget -q -O /dev/null http://web/ 2>/dev/null; then echo .; else echo \"F $(busybox date -u +%T)\"; fi; done",
    )?;
    demo_pods.create(&PostParams::default(), &load).await?;
    let answered = || async {
        let log = demo_pods
            .logs("others", &Default::default())
            .await
            .unwrap_or_default();
        (
            log.lines().filter(|line| *line == ".").count(),
            log.lines()
                .filter(|line| line.starts_with('F'))
                .map(str::to_string)
                .collect::<Vec<_>>(),
        )
    };
    eventually("the others' requests are answered", WAIT, || async {
        Ok((answered().await.0 > 20).then_some(()))
    })
    .await?;

    // The admin mounts the workload with Gefyra's own code (its body for `gefyra mount
    // create`): a router in front, the Service switched to it.
    let mounts = bridge_api(admin.clone(), "gefyrabridgemounts", "gefyrabridgemount");
    gefyras_code(
        &cluster.kubeconfig,
        "from gefyra.local.mount import get_gbridgemount_body, handle_create_gefyrabridgemount\n\
         body = get_gbridgemount_body(config, 'web', 'deployment/web', 'carrier2mount', 'demo', 'web')\n\
         handle_create_gefyrabridgemount(config, body, 'deployment/web')\n",
        &[],
    )
    .await?;
    let mounted_in = wait_state(&mounts, "web", "ACTIVE").await?;
    println!(
        "[{} UTC] mount create → ACTIVE (router Ready, Service switched): {mounted_in:?}",
        utc_clock()
    );
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(admin.clone(), "demo");
    let selector = services
        .get("web")
        .await?
        .spec
        .and_then(|s| s.selector)
        .unwrap_or_default();
    ensure!(
        selector.get("gefyra.dev/carrier").map(String::as_str) == Some("web"),
        "Service web selects the router: {selector:?}"
    );
    let nobody = from_a_pod(
        &demo_pods,
        "check-mounted",
        &[None, Some("x-gefyra: alice")],
    )
    .await?;
    ensure!(nobody == ["web", "web"], "mounted, not bridged: {nobody:?}");

    // Each developer bridges their header, with their own client's token.
    let mut created = Vec::new();
    // Alice's with Gefyra's own code and her token, as `gefyra bridge create` sends it (its
    // body, its create, then its wait for the `Ready` Event); Bob's as a manifest.
    for (id, _, address, own) in &laptops {
        let bridges = bridge_api(own.clone(), "gefyrabridges", "gefyrabridge");
        let started = Instant::now();
        if *id == "alice" {
            let kubeconfig =
                cluster.kubeconfig_with_token(&gefyra_e2e::token_of(&clients.get(id).await?)?)?;
            let waited = gefyras_code(
                &kubeconfig,
                "from gefyra.types.bridge import GefyraBridge, ExactMatchHeader\n\
                 from gefyra.local.bridge import handle_create_gefyrabridge\n\
                 client, address = sys.argv[3], sys.argv[4]\n\
                 bridge = GefyraBridge(name=client, client=client, local_container_ip=address, local_container_name='app', port_mappings=['8080:8080'], target='web', rules=[[ExactMatchHeader(name='x-gefyra', value=client)]])\n\
                 raw = handle_create_gefyrabridge(config, bridge.get_k8s_bridge_body(config), 'web')\n\
                 created = GefyraBridge.from_raw(raw, config)\n\
                 print('timed out' if created.watch_events(print, timeout=60) else 'Ready')\n",
                &[id, address],
            )
            .await?;
            let _ = std::fs::remove_file(&kubeconfig);
            ensure!(
                waited.trim_end().ends_with("Ready"),
                "Gefyra's wait for its bridge: {waited}"
            );
        } else {
            bridges
                .create(
                    &PostParams::default(),
                    &bridge_body(id, id, address, Some(("x-gefyra", id)))?,
                )
                .await
                .with_context(|| format!("{id} creates a bridge with its own token"))?;
        }
        wait_state(&bridges, id, "ACTIVE").await?;
        created.push((id.to_string(), started.elapsed()));
    }
    println!("[{} UTC] bridge create → ACTIVE: {created:?}", utc_clock());
    let answers = from_a_pod(
        &demo_pods,
        "check-bridged",
        &[
            Some("x-gefyra: alice"),
            Some("x-gefyra: bob"),
            None,
            Some("x-gefyra: carol"),
        ],
    )
    .await?;
    ensure!(
        answers == ["alice", "bob", "web", "web"],
        "each developer gets the requests with their header, everyone else the original: {answers:?}"
    );

    // The admin revokes Bob's grant: the operator's own check (a LocalSubjectAccessReview
    // for Bob's identity) puts his bridge in ERROR NotGranted, and it is routed no more.
    let admin_bridges = bridge_api(admin.clone(), "gefyrabridges", "gefyrabridge");
    let started = Instant::now();
    run(
        "kubectl",
        &cluster.kubeconfig,
        &["-n", "demo", "delete", "rolebinding", "gefyra-bridge-bob"],
    )
    .await?;
    wait_state(&admin_bridges, "bob", "ERROR").await?;
    let reason = admin_bridges.get("bob").await?.data["status"]["reason"].clone();
    ensure!(
        reason == "NotGranted",
        "bob's bridge without the grant: {reason}"
    );
    println!(
        "[{} UTC] bob's grant revoked → his bridge ERROR NotGranted after {:?}",
        utc_clock(),
        started.elapsed()
    );
    let answers = from_a_pod(
        &demo_pods,
        "check-revoked",
        &[Some("x-gefyra: bob"), Some("x-gefyra: alice")],
    )
    .await?;
    ensure!(
        answers == ["web", "alice"],
        "bob's bridge no longer routed, alice's kept: {answers:?}"
    );

    // Alice's header bridge goes; a rule-less bridge of hers takes every request.
    let (_, _, alice_address, alice_own) = &laptops[0];
    let alice_bridges = bridge_api(alice_own.clone(), "gefyrabridges", "gefyrabridge");
    let started = Instant::now();
    alice_bridges
        .delete("alice", &DeleteParams::default())
        .await?;
    gefyra_e2e::wait_gone(&alice_bridges, "alice").await?;
    let answers = from_a_pod(&demo_pods, "check-unbridged", &[Some("x-gefyra: alice")]).await?;
    ensure!(
        answers == ["web"],
        "alice's header after her bridge went: {answers:?}"
    );
    println!(
        "[{} UTC] bridge delete → traffic back to the original (checked from a new Pod) within {:?}",
        utc_clock(),
        started.elapsed()
    );
    alice_bridges
        .create(
            &PostParams::default(),
            &bridge_body("alice-all", "alice", alice_address, None)?,
        )
        .await?;
    wait_state(&alice_bridges, "alice-all", "ACTIVE").await?;
    let answers = from_a_pod(&demo_pods, "check-all", &[None, Some("x-gefyra: bob")]).await?;
    ensure!(
        answers == ["alice", "alice"],
        "a rule-less bridge takes all traffic: {answers:?}"
    );

    // Alice's laptop disconnects: her bridge is released, all traffic goes to the original.
    let started = Instant::now();
    developer.ok(&["disconnect", "-f", "alice.json"]).await?;
    gefyra_e2e::wait_gone(&admin_bridges, "alice-all").await?;
    println!(
        "[{} UTC] alice disconnected → her bridge released after {:?}",
        utc_clock(),
        started.elapsed()
    );
    let answers = from_a_pod(
        &demo_pods,
        "check-released",
        &[None, Some("x-gefyra: alice")],
    )
    .await?;
    ensure!(
        answers == ["web", "web"],
        "alice's bridge released: {answers:?}"
    );

    // Unmount: the Service selects the web Pods again, the router goes.
    let started = Instant::now();
    mounts.delete("web", &DeleteParams::default()).await?;
    gefyra_e2e::wait_gone(&mounts, "web").await?;
    println!(
        "[{} UTC] mount delete → gone (Service switched back, router drained): {:?}",
        utc_clock(),
        started.elapsed()
    );
    let selector = services
        .get("web")
        .await?
        .spec
        .and_then(|s| s.selector)
        .unwrap_or_default();
    ensure!(
        selector == std::collections::BTreeMap::from([("app".to_string(), "web".to_string())]),
        "Service web selects its own Pods again: {selector:?}"
    );
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "demo");
    ensure!(
        deployments.get_opt("gefyra-carrier-web").await?.is_none(),
        "the router is gone"
    );
    let answers = from_a_pod(
        &demo_pods,
        "check-unmounted",
        &[None, Some("x-gefyra: alice")],
    )
    .await?;
    ensure!(answers == ["web", "web"], "unmounted: {answers:?}");

    // Nobody else noticed: every request of the others answered, the Pods untouched.
    let (ok, failures) = answered().await;
    let failed = failures.len();
    demo_pods.delete("others", &DeleteParams::default()).await?;
    println!(
        "the others' requests during mount, bridges, release, unbridge, unmount: {ok} answered, {failed} failed"
    );
    ensure!(
        failed == 0,
        "{failed} of the others' requests failed ({ok} answered), at (UTC): {failures:?}"
    );
    // Alice's grant goes with her (Bob's went above): the docs' steps grant it again.
    run(
        "kubectl",
        &cluster.kubeconfig,
        &[
            "-n",
            "demo",
            "delete",
            "rolebinding",
            "gefyra-bridge-alice",
            "--ignore-not-found",
        ],
    )
    .await?;
    let after = web_pods(&demo_pods).await?;
    ensure!(
        before == after,
        "the web Pods' UIDs and restart counts: {before:?} → {after:?}"
    );
    Ok(())
}

/// The time of day (UTC, HH:MM:SS), to line the test's steps up with the others' failures.
fn utc_clock() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs() % 86_400)
        .unwrap_or_default();
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// `/proc/PID/status`'s `Uid:` and `CapEff:` lines of a process.
fn credentials_of(pid: u32) -> Result<(String, String)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    Ok((field("Uid:"), field("CapEff:")))
}

/// `kubectl gefyra connect -f carol.json --userspace ...` as nobody, in `home`, its output
/// in `log`; running once it printed its listeners.
async fn connect_in_userspace(
    home: &std::path::Path,
    log: &str,
) -> Result<gefyra_e2e::lab::Process> {
    let mut command = gefyra_e2e::lab::unprivileged(&gefyra_e2e::kubectl_gefyra_binary());
    command
        .args([
            "connect",
            "-f",
            "carol.json",
            "--userspace",
            "--socks5",
            "127.0.0.1:11080",
            "-L",
            "18000:web.demo.svc.cluster.local:80",
            "--expose",
            "8080:18080",
        ])
        .current_dir(home)
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/bin:/bin");
    let mut process = gefyra_e2e::lab::Process::spawn(&mut command, home.join(log))?;
    let started = Instant::now();
    loop {
        ensure!(
            process.is_running(),
            "connect --userspace ended: {}",
            process.log_text()
        );
        if process.log_text().contains("Press Ctrl-C") {
            break;
        }
        ensure!(
            started.elapsed() < WAIT,
            "connect --userspace not up within {WAIT:?}: {}",
            process.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(process)
}

/// Waits for a process to end by itself; its exit code.
async fn exit_code_of(process: &mut gefyra_e2e::lab::Process, within: Duration) -> Result<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = process.child.try_wait()? {
            return Ok(status.code().unwrap_or(-1));
        }
        ensure!(
            started.elapsed() < within,
            "still running after {within:?}: {}",
            process.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A developer with no root, no capabilities, no Docker and no WireGuard device (uid
/// 65534): `connect --userspace` reaches the demo Service by name through its SOCKS5
/// proxy and a `-L` forward, and its `--expose`d local server receives the requests a
/// bridge of the developer's own sends it from a Pod; Ctrl-C (SIGINT) leaves the client
/// WAITING and the bridge released; a deleted client ends the process with exit code 10.
#[tokio::test]
#[ignore = "needs a node: make e2e-node"]
async fn a_developer_without_privileges_connects_in_userspace_and_receives_a_bridge() -> Result<()>
{
    let _one_at_a_time = NODE_CLUSTER.lock().await;
    let cluster = Cluster::from_env().await?;
    without_gefyra(&cluster).await?;
    let admin = cluster.admin()?;
    demo_and_chart(&cluster, ",bridging.namespaces={demo}").await?;

    // The admin: Carol's client, her file (handed to her: her home, hers alone), her grant
    // to bridge in `demo`, the mount.
    let gefyra = KubectlGefyra::new(&cluster.kubeconfig, NAMESPACE)?;
    gefyra
        .ok(&["clients", "create", "--client-id", "carol"])
        .await?;
    gefyra
        .ok(&[
            "clients",
            "config",
            "carol",
            "--host",
            &NODE_IP.to_string(),
            "--port",
            "31820",
            "-o",
            "carol.json",
        ])
        .await?;
    let home = std::env::temp_dir().join(format!("gefyra-carol-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&home)?;
    std::fs::copy(gefyra.workdir.join("carol.json"), home.join("carol.json"))?;
    gefyra_e2e::lab::run(
        "chown",
        &["-R", "65534:65534", home.to_str().context("utf-8")?],
    )?;
    run(
        "kubectl",
        &cluster.kubeconfig,
        &[
            "-n",
            "demo",
            "create",
            "rolebinding",
            "gefyra-bridge-carol",
            "--clusterrole=gefyra-bridge",
            &format!("--serviceaccount={NAMESPACE}:gefyra-client-carol"),
        ],
    )
    .await?;
    gefyra
        .ok(&[
            "mount",
            "create",
            "--target",
            "deployment/web",
            "--target-namespace",
            "demo",
            "--name",
            "web",
        ])
        .await?;

    // Carol's machine: her local server (as nobody too) and the userspace connect.
    let mut server_command = gefyra_e2e::lab::unprivileged(&gefyra_e2e::lab::lab_binary());
    server_command.args([
        "serve",
        "--http",
        "127.0.0.1:18080",
        "--udp-echo",
        "127.0.0.1:17007",
        "--name",
        "carol",
    ]);
    let _server = gefyra_e2e::lab::Process::spawn(&mut server_command, home.join("server.log"))?;
    eventually("Carol's local server answers", WAIT, || async {
        Ok(gefyra_e2e::lab::run("curl", &["--silent", "--fail", "http://127.0.0.1:18080/"]).ok())
    })
    .await?;
    let started = Instant::now();
    let mut connected = connect_in_userspace(&home, "connect.log").await?;
    println!("connect --userspace up after {:?}", started.elapsed());
    let (uid, capabilities) = credentials_of(connected.child.id())?;
    ensure!(
        uid == "65534 65534 65534 65534" && capabilities == "0000000000000000",
        "connect runs unprivileged: Uid {uid}, CapEff {capabilities}"
    );

    // The demo Service by name through the SOCKS5 proxy, and through the -L forward.
    let through_socks = gefyra_e2e::lab::run(
        "curl",
        &[
            "--fail",
            "--silent",
            "--show-error",
            "--max-time",
            "20",
            "--retry",
            "5",
            "--retry-all-errors",
            "--socks5-hostname",
            "127.0.0.1:11080",
            WEB,
        ],
    )?;
    ensure!(
        through_socks.trim() == "web",
        "through SOCKS5: {through_socks:?}"
    );
    let through_forward = gefyra_e2e::lab::run(
        "curl",
        &[
            "--fail",
            "--silent",
            "--show-error",
            "--max-time",
            "20",
            "http://127.0.0.1:18000/",
        ],
    )?;
    ensure!(
        through_forward.trim() == "web",
        "through -L: {through_forward:?}"
    );

    // Carol bridges her header to her tunnel address, port 8080: the exposed local server.
    let mut bridge = gefyra_e2e::lab::unprivileged(&gefyra_e2e::kubectl_gefyra_binary());
    bridge
        .args([
            "bridge",
            "create",
            "carol-web",
            "-f",
            "carol.json",
            "--mount",
            "web",
            "-p",
            "8080:8080",
            "--match-header-exact",
            "x-gefyra:carol",
        ])
        .current_dir(&home)
        .env_clear()
        .env("HOME", &home);
    let output = bridge.output()?;
    ensure!(
        output.status.success(),
        "bridge create as carol: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let demo_pods: Api<Pod> = Api::namespaced(admin.clone(), "demo");
    let answers = from_a_pod(
        &demo_pods,
        "check-userspace",
        &[Some("x-gefyra: carol"), None],
    )
    .await?;
    ensure!(
        answers == ["carol", "web"],
        "from a Pod, with Carol's header and without: {answers:?}"
    );

    // Ctrl-C: the process disconnects and ends; the client is WAITING, the bridge released.
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), NAMESPACE);
    gefyra_e2e::lab::run("kill", &["-INT", &connected.child.id().to_string()])?;
    let code = exit_code_of(&mut connected, Duration::from_secs(60)).await?;
    ensure!(
        code == 0,
        "Ctrl-C exits 0: {code}, {}",
        connected.log_text()
    );
    let state = clients.get("carol").await?.state;
    ensure!(
        state == gefyra_api::ClientState::Waiting,
        "after Ctrl-C the client is WAITING: {state}"
    );
    let bridges = bridge_api(admin.clone(), "gefyrabridges", "gefyrabridge");
    gefyra_e2e::wait_gone(&bridges, "carol-web").await?;
    let answers = from_a_pod(
        &demo_pods,
        "check-userspace-gone",
        &[Some("x-gefyra: carol")],
    )
    .await?;
    ensure!(answers == ["web"], "Carol disconnected: {answers:?}");
    // Nothing is left behind: the ports are free again.
    for port in [11080, 18000] {
        std::net::TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("port {port} still taken after Ctrl-C"))?;
    }

    // Connected again, then the admin deletes the client: the process ends with the exit
    // code of revoked credentials.
    let mut connected = connect_in_userspace(&home, "connect-again.log").await?;
    // Stowaway's Pod replaced: the lost session comes back by itself (a new handshake).
    let gefyra_pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
    let started = Instant::now();
    gefyra_pods
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app.kubernetes.io/name=gefyra-stowaway"),
        )
        .await?;
    eventually("the SOCKS5 proxy reaches web again", WAIT, || async {
        Ok(gefyra_e2e::lab::run(
            "curl",
            &[
                "--fail",
                "--silent",
                "--max-time",
                "5",
                "--socks5-hostname",
                "127.0.0.1:11080",
                WEB,
            ],
        )
        .ok()
        .filter(|body| body.trim() == "web"))
    })
    .await?;
    println!(
        "Stowaway's Pod deleted: connect --userspace reaches {WEB} again after {:?}",
        started.elapsed()
    );
    gefyra.ok(&["clients", "delete", "carol"]).await?;
    let code = exit_code_of(&mut connected, Duration::from_secs(60)).await?;
    ensure!(
        code == 10,
        "a deleted client ends connect --userspace with exit code 10: {code}, {}",
        connected.log_text()
    );
    println!("deleted client → the process ended with exit code {code}");

    gefyra.ok(&["mount", "delete", "web", "--wait"]).await?;
    run(
        "kubectl",
        &cluster.kubeconfig,
        &[
            "-n",
            "demo",
            "delete",
            "rolebinding/gefyra-bridge-carol",
            "--ignore-not-found",
        ],
    )
    .await?;
    let _ = std::fs::remove_dir_all(&home);
    Ok(())
}
