//! Packaging against real control planes of their own (the chart installs cluster-scoped
//! objects and a fixed NodePort): helm lint/install/upgrade/uninstall, Pod Security
//! "restricted" admission of the Pods the ReplicaSet controller creates, `kubectl apply -f
//! deploy/`, the chart's RBAC doing the operator's and Stowaway's whole job
//! (impersonation), and generated files without drift.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gefyra_api::{ClientState, GefyraClient};
use gefyra_e2e::lab::{key_pair, stowaway_binary};
use gefyra_e2e::{
    Cluster, DockerDaemon, Operator, OwnControlPlane, create_client, eventually, free_port,
    http_get, operator_binary, repo_root, run_tool as run, set_provider_parameter, wait_for_state,
    wait_gone,
};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::Role;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ListParams, PostParams};
use kube::config::Kubeconfig;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const CRD: &str = "gefyraclients.gefyra.dev";
const NAMESPACE: &str = "gefyra";

fn chart() -> PathBuf {
    repo_root().join("charts/gefyra-operator")
}

/// Every Deployment's ReplicaSet made its Pod: PodSecurity admission accepted it.
async fn pods_admitted(cluster: &Cluster, namespace: &str) -> Result<()> {
    let admin = cluster.admin()?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), namespace);
    let sets: Api<ReplicaSet> = Api::namespaced(admin.clone(), namespace);
    for name in ["gefyra-operator", "gefyra-stowaway"] {
        let selector = format!("app.kubernetes.io/name={name}");
        let (pods, sets) = (&pods, &sets);
        eventually(&format!("a Pod of {name} exists"), WAIT, || {
            let selector = selector.clone();
            async move {
                let created = pods
                    .list(&ListParams::default().labels(&selector))
                    .await?
                    .items;
                if created.is_empty() {
                    // Say why, if the ReplicaSet controller was refused.
                    for set in sets
                        .list(&ListParams::default().labels(&selector))
                        .await?
                        .items
                    {
                        for condition in set.status.and_then(|s| s.conditions).unwrap_or_default() {
                            ensure!(
                                condition.type_ != "ReplicaFailure",
                                "{name}'s ReplicaSet cannot create Pods: {:?}",
                                condition.message
                            );
                        }
                    }
                }
                Ok(created.into_iter().next())
            }
        })
        .await?;
    }
    // Admission is really enforcing here: a Pod with default security settings is refused.
    let unhardened: Pod = serde_json::from_value(json!({
        "metadata": {"name": "unhardened"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))?;
    let refused = pods.create(&PostParams::default(), &unhardened).await;
    ensure!(
        matches!(&refused, Err(kube::Error::Api(status)) if status.code == 403 && status.message.contains("PodSecurity \"restricted")),
        "an unhardened Pod is refused by PodSecurity \"restricted\": {refused:?}"
    );
    Ok(())
}

/// The objects of the chart exist; Stowaway's Service is what Gefyra's clients look for.
async fn installed(cluster: &Cluster, namespace: &str) -> Result<()> {
    let admin = cluster.admin()?;
    let ns = Api::<Namespace>::all(admin.clone()).get(namespace).await?;
    let labels = ns.metadata.labels.unwrap_or_default();
    ensure!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str)
            == Some("restricted"),
        "namespace {namespace} enforces restricted: {labels:?}"
    );
    let crd = Api::<CustomResourceDefinition>::all(admin.clone())
        .get(CRD)
        .await?;
    ensure!(
        crd.metadata
            .annotations
            .unwrap_or_default()
            .get("helm.sh/resource-policy")
            .map(String::as_str)
            == Some("keep"),
        "the CRD is kept on uninstall"
    );
    for name in ["gefyra-operator", "gefyra-stowaway"] {
        Api::<ServiceAccount>::namespaced(admin.clone(), namespace)
            .get(name)
            .await?;
        Api::<Role>::namespaced(admin.clone(), namespace)
            .get(name)
            .await?;
        Api::<Deployment>::namespaced(admin.clone(), namespace)
            .get(name)
            .await?;
        Api::<Service>::namespaced(admin.clone(), namespace)
            .get(&format!("{name}-metrics"))
            .await?;
    }
    let stowaway = Api::<Deployment>::namespaced(admin.clone(), namespace)
        .get("gefyra-stowaway")
        .await?;
    let spec = stowaway.spec.context("a spec")?;
    ensure!(spec.replicas == Some(1), "one Stowaway");
    ensure!(
        spec.strategy.and_then(|s| s.type_).as_deref() == Some("Recreate"),
        "Stowaway is replaced, never doubled"
    );
    let service = Api::<Service>::namespaced(admin, namespace)
        .get("gefyra-stowaway-wireguard")
        .await?;
    let spec = service.spec.context("a spec")?;
    let port = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .next()
        .context("a port")?;
    ensure!(
        port.name.as_deref() == Some("gefyra-wireguard")
            && port.protocol.as_deref() == Some("UDP")
            && port.port == 31820
            && port.node_port == Some(31820),
        "UDP 31820 named gefyra-wireguard: {port:?}"
    );
    ensure!(
        spec.type_.as_deref() == Some("NodePort"),
        "{:?}",
        spec.type_
    );
    ensure!(
        spec.external_traffic_policy.as_deref() == Some("Local"),
        "{:?}",
        spec.external_traffic_policy
    );
    Ok(())
}

/// Whether object `name` of kind `K` is gone from the chart's namespace.
async fn absent<K>(admin: &kube::Client, name: &str) -> Result<bool>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Ok(Api::<K>::namespaced(admin.clone(), NAMESPACE)
        .get_opt(name)
        .await?
        .is_none())
}

/// A kubeconfig of the admin that impersonates ServiceAccount `account`.
fn impersonating(cluster: &Cluster, namespace: &str, account: &str) -> Result<PathBuf> {
    let mut raw = Kubeconfig::read_from(&cluster.kubeconfig)?;
    for named in &mut raw.auth_infos {
        if let Some(user) = named.auth_info.as_mut() {
            user.impersonate = Some(format!("system:serviceaccount:{namespace}:{account}"));
        }
    }
    let path = std::env::temp_dir().join(format!(
        "gefyra-as-{account}-{:08x}.kubeconfig",
        rand::random::<u32>()
    ));
    std::fs::write(&path, serde_saphyr::to_string(&raw)?)?;
    Ok(path)
}

/// The documents `helm template` printed, as JSON values.
fn documents(rendered: &str) -> Result<Vec<serde_json::Value>> {
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(rendered)?;
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

fn of_kind<'a>(
    documents: &'a [serde_json::Value],
    kind: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

/// Each chart option lands where it belongs (read from the rendered objects, not the text).
async fn chart_options_render<F, T>(template: &F) -> Result<()>
where
    F: Fn(&'static str) -> T,
    T: std::future::Future<Output = Result<String>>,
{
    let defaults = documents(&template("").await?)?;
    let operator = of_kind(&defaults, "Deployment", "gefyra-operator").context("operator")?;
    let container = &operator["spec"]["template"]["spec"]["containers"][0];
    ensure!(
        container["args"].as_array().is_some_and(|args| args
            .iter()
            .any(|a| a == "--reserved-ranges=10.244.0.0/16,10.96.0.0/12")),
        "the default reserved ranges: {container}"
    );
    ensure!(
        container["env"].as_array().is_some_and(|env| env
            .iter()
            .any(|e| e["name"] == "RUST_LOG" && e["value"] == "info")),
        "logLevel sets RUST_LOG: {container}"
    );
    for name in ["gefyra-operator", "gefyra-stowaway"] {
        let policy = of_kind(&defaults, "NetworkPolicy", name)
            .with_context(|| format!("NetworkPolicy {name} by default"))?;
        ensure!(
            policy["spec"]["policyTypes"] == json!(["Ingress"]),
            "{policy}"
        );
    }
    let stowaway_policy =
        of_kind(&defaults, "NetworkPolicy", "gefyra-stowaway").context("policy")?;
    ensure!(
        stowaway_policy["spec"]["ingress"][0]
            == json!({"ports": [{"protocol": "UDP", "port": 31820}]}),
        "WireGuard from anywhere, nothing else from anywhere: {stowaway_policy}"
    );
    ensure!(
        stowaway_policy["spec"]["ingress"][1]["from"]
            == json!([
                {"podSelector": {"matchLabels": {"gefyra.dev/readiness-check": "true"}}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ]),
        "metrics only from the test Pod and namespace monitoring: {stowaway_policy}"
    );
    ensure!(
        stowaway_policy["spec"]["ingress"][2]
            == json!({"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": 8082}]}),
        "the bridges port from Pods in any namespace (the routers'): {stowaway_policy}"
    );
    let bridges =
        of_kind(&defaults, "Service", "gefyra-stowaway-bridges").context("the bridges Service")?;
    ensure!(
        bridges["spec"]["type"] == "ClusterIP"
            && bridges["spec"]["ports"]
                == json!([{"name": "bridges", "protocol": "TCP", "port": 8082, "targetPort": "bridges"}]),
        "the bridges port, inside the cluster only: {bridges}"
    );
    ensure!(
        of_kind(&defaults, "PodDisruptionBudget", "gefyra-operator").is_none(),
        "no PodDisruptionBudget for one replica"
    );
    let check = of_kind(&defaults, "Pod", "gefyra-readiness-check").context("the helm test Pod")?;
    ensure!(
        check["metadata"]["annotations"]["helm.sh/hook"] == "test"
            && check["spec"]["containers"][0]["args"][0] == "check-ready",
        "{check}"
    );
    let replicated = documents(&template("operator.replicas=2").await?)?;
    let budget = of_kind(&replicated, "PodDisruptionBudget", "gefyra-operator")
        .context("a PodDisruptionBudget above one replica")?;
    ensure!(budget["spec"]["minAvailable"] == 1, "{budget}");
    let closed = documents(&template("networkPolicy.enabled=false,tests.enabled=false").await?)?;
    ensure!(
        !closed
            .iter()
            .any(|d| d["kind"] == "NetworkPolicy" || d["kind"] == "Pod"),
        "networkPolicy and tests can be turned off"
    );

    let digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let options = documents(
        &template(
            "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef,\
             operator.podAnnotations.example\\.com/a=b,operator.podLabels.team=dev,\
             operator.priorityClassName=gefyra-high,stowaway.priorityClassName=gefyra-high,\
             operator.serviceAccount.annotations.example\\.com/role=r,\
             stowaway.serviceAccount.annotations.example\\.com/role=s,\
             operator.extraEnv[0].name=EXTRA,operator.extraEnv[0].value=x1,\
             stowaway.logLevel=debug,stowaway.extraEnv[0].name=EXTRA,stowaway.extraEnv[0].value=x2,\
             operator.topologySpreadConstraints[0].maxSkew=1,\
             operator.topologySpreadConstraints[0].topologyKey=kubernetes.io/hostname,\
             operator.topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway,\
             operator.reservedRanges={10.0.0.0/24}",
        )
        .await?,
    )?;
    let pod_spec = |name: &str| -> Result<&serde_json::Value> {
        Ok(
            &of_kind(&options, "Deployment", name).with_context(|| name.to_string())?["spec"]["template"],
        )
    };
    let operator = pod_spec("gefyra-operator")?;
    let stowaway = pod_spec("gefyra-stowaway")?;
    ensure!(
        operator["metadata"]["annotations"]["example.com/a"] == "b"
            && operator["metadata"]["labels"]["team"] == "dev"
            && operator["metadata"]["labels"]["app.kubernetes.io/name"] == "gefyra-operator",
        "pod annotations and labels: {}",
        operator["metadata"]
    );
    for (pod, env) in [(operator, "x1"), (stowaway, "x2")] {
        let spec = &pod["spec"];
        ensure!(spec["priorityClassName"] == "gefyra-high", "{spec}");
        ensure!(
            spec["containers"][0]["image"] == format!("gefyra-operator@{digest}"),
            "the image by digest: {}",
            spec["containers"][0]["image"]
        );
        ensure!(
            spec["containers"][0]["env"]
                .as_array()
                .is_some_and(|all| all
                    .iter()
                    .any(|e| e["name"] == "EXTRA" && e["value"] == env)),
            "extraEnv: {}",
            spec["containers"][0]
        );
    }
    ensure!(
        stowaway["spec"]["containers"][0]["env"][0]
            == json!({"name": "RUST_LOG", "value": "debug"}),
        "{}",
        stowaway["spec"]["containers"][0]
    );
    ensure!(
        operator["spec"]["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname",
        "{}",
        operator["spec"]
    );
    ensure!(
        operator["spec"]["containers"][0]["args"]
            .as_array()
            .is_some_and(|args| args.iter().any(|a| a == "--reserved-ranges=10.0.0.0/24")),
        "reservedRanges"
    );
    for (name, role) in [("gefyra-operator", "r"), ("gefyra-stowaway", "s")] {
        let account = of_kind(&options, "ServiceAccount", name).context("a ServiceAccount")?;
        ensure!(
            account["metadata"]["annotations"]["example.com/role"] == role,
            "ServiceAccount annotations: {account}"
        );
    }

    // A mirrored, air-gapped cluster: the image from the mirror, the pull secrets of both
    // levels, labels on every object, the ServiceMonitor where the monitoring stack is.
    let mirrored = documents(
        &template(
            "global.imageRegistry=mirror.example.com,image.repository=team/gefyra,\
             global.imagePullSecrets[0].name=mirror,imagePullSecrets[0].name=own,\
             commonLabels.cost-center=dev-tools,serviceMonitor.enabled=true,\
             serviceMonitor.namespace=monitoring,serviceMonitor.scrapeTimeout=10s,\
             serviceMonitor.relabelings[0].action=labeldrop,serviceMonitor.relabelings[0].regex=pod",
        )
        .await?,
    )?;
    for (name, component) in [
        ("gefyra-operator", "operator"),
        ("gefyra-stowaway", "stowaway"),
    ] {
        let deployment = of_kind(&mirrored, "Deployment", name).context("a Deployment")?;
        let pod = &deployment["spec"]["template"];
        ensure!(
            pod["spec"]["containers"][0]["image"] == "mirror.example.com/team/gefyra:0.1.0"
                && pod["spec"]["imagePullSecrets"] == json!([{"name": "mirror"}, {"name": "own"}])
                && pod["metadata"]["labels"]["app.kubernetes.io/component"] == component
                && deployment["metadata"]["labels"]["app.kubernetes.io/component"] == component,
            "{name}: {pod}"
        );
    }
    ensure!(
        mirrored
            .iter()
            .all(|d| d["metadata"]["labels"]["cost-center"] == "dev-tools"),
        "commonLabels on every object"
    );
    let monitor = of_kind(&mirrored, "ServiceMonitor", "gefyra").context("ServiceMonitor")?;
    let installed_in = &of_kind(&mirrored, "Deployment", "gefyra-operator").context("operator")?["metadata"]
        ["namespace"];
    ensure!(
        monitor["metadata"]["namespace"] == "monitoring"
            && &monitor["spec"]["namespaceSelector"]["matchNames"][0] == installed_in
            && monitor["spec"]["endpoints"][0]["scrapeTimeout"] == "10s"
            && monitor["spec"]["endpoints"][0]["relabelings"][0]["action"] == "labeldrop",
        "{monitor}"
    );
    Ok(())
}

/// The metric names in the PrometheusRule's expressions and the dashboard's queries, each
/// checked against what the components serve on /metrics (and declare).
fn monitoring_asks_for_exported_series(rendered: &str, exported: &str) -> Result<()> {
    let documents = documents(rendered)?;
    let rule = of_kind(&documents, "PrometheusRule", "gefyra").context("the PrometheusRule")?;
    let mut queries: Vec<String> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .context("rules")?
        .iter()
        .filter_map(|rule| rule["expr"].as_str().map(str::to_string))
        .collect();
    ensure!(queries.len() >= 6, "{rule}");
    let dashboard = of_kind(&documents, "ConfigMap", "gefyra-grafana-dashboard")
        .context("the dashboard ConfigMap")?;
    ensure!(
        dashboard["metadata"]["labels"]["grafana_dashboard"] == "1",
        "{}",
        dashboard["metadata"]
    );
    let dashboard: serde_json::Value = serde_json::from_str(
        dashboard["data"]["gefyra.json"]
            .as_str()
            .context("gefyra.json")?,
    )?;
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            queries.push(target["expr"].as_str().context("expr")?.to_string());
        }
    }
    // Served now, or declared and served once a series exists (a counter of drops before
    // the first drop).
    let operator_metrics = gefyra_operator::metrics::Metrics::default();
    let stowaway_metrics = stowaway::metrics::Metrics::default();
    let families: std::collections::BTreeSet<&str> = exported
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .chain(
            operator_metrics
                .declared_families()
                .iter()
                .map(String::as_str),
        )
        .chain(
            stowaway_metrics
                .declared_families()
                .iter()
                .map(String::as_str),
        )
        .collect();
    let mut asked = 0;
    for query in &queries {
        for name in query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|token| {
                ["gefyra_operator_", "gefyra_stowaway_", "process_"]
                    .iter()
                    .any(|prefix| token.starts_with(prefix))
            })
        {
            let family = name.strip_suffix("_bucket").unwrap_or(name);
            ensure!(
                families.contains(family),
                "{query:?} asks for {name}, which neither component exports"
            );
            asked += 1;
        }
    }
    ensure!(asked >= 20, "{asked} series asked for");
    Ok(())
}

/// `promtool check metrics` (Debian's prometheus package) on the text of a /metrics: no
/// lint problem (a counter without `_total`, a unit not in base units, no help text, ...).
fn promtool_finds_no_problem(served: &str) -> Result<()> {
    use std::io::Write;
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running promtool (make prereqs installs Debian's prometheus package)")?;
    promtool
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(served.as_bytes())?;
    let output = promtool.wait_with_output()?;
    ensure!(
        output.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// `promtool test rules` with tests/prometheus/rules-test.yaml on the rule groups of the
/// chart's PrometheusRule as rendered for namespace gefyra: each alert fires in a broken
/// installation, none in a healthy one.
#[tokio::test]
async fn the_prometheus_rules_fire_as_their_tests_expect() -> Result<()> {
    let chart = chart();
    let rendered = run(
        "helm",
        std::path::Path::new("/dev/null"),
        &[
            "template",
            "gefyra",
            chart.to_str().context("a UTF-8 path")?,
            "--namespace",
            NAMESPACE,
            "--kube-version",
            "1.36.3",
            "--set",
            "prometheusRule.enabled=true",
        ],
    )
    .await?;
    let documents = documents(&rendered)?;
    let rule = of_kind(&documents, "PrometheusRule", "gefyra").context("the PrometheusRule")?;
    let tests = repo_root().join("tests/prometheus/rules-test.yaml");
    let tests_text = std::fs::read_to_string(&tests)?;
    // Every alert of the chart fires at least once in the tests.
    let expected: serde_json::Value = serde_saphyr::from_str(&tests_text)?;
    let firing: std::collections::BTreeSet<&str> = expected["tests"]
        .as_array()
        .context("tests")?
        .iter()
        .flat_map(|test| test["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|case| case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .filter_map(|case| case["alertname"].as_str())
        .collect();
    for alert in rule["spec"]["groups"]
        .as_array()
        .context("groups")?
        .iter()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
        .filter_map(|rule| rule["alert"].as_str())
    {
        ensure!(
            firing.contains(alert),
            "{} never fires {alert}",
            tests.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("gefyra-rules-test-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("rules.yaml"),
        serde_json::to_string(&json!({"groups": rule["spec"]["groups"]}))?,
    )?;
    std::fs::write(dir.join("rules-test.yaml"), &tests_text)?;
    let output = std::process::Command::new("promtool")
        .args(["test", "rules", "rules-test.yaml"])
        .current_dir(&dir)
        .output()
        .context("running promtool (make prereqs installs Debian's prometheus package)")?;
    std::fs::remove_dir_all(&dir)?;
    ensure!(
        output.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn the_chart_installs_upgrades_and_uninstalls_and_its_rbac_suffices() -> Result<()> {
    let plane = OwnControlPlane::start().await?;
    let cluster = &plane.cluster;
    let kubeconfig = cluster.kubeconfig.clone();
    let chart = chart();
    let chart_path = chart.to_str().context("a UTF-8 path")?;

    for values in [
        &[][..],
        &[
            "--set",
            "serviceMonitor.enabled=true,stowaway.service.type=LoadBalancer,operator.replicas=2,namespace.create=true,namespace.name=other,prometheusRule.enabled=true,grafanaDashboard.enabled=true,operator.clientRbac=gefyra-compat,image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ],
    ] {
        let mut args = vec!["lint", chart_path, "--strict", "--kube-version", "1.36.3"];
        args.extend_from_slice(values);
        let linted = run("helm", &kubeconfig, &args).await?;
        ensure!(
            linted.contains("0 chart(s) failed") && !linted.contains("[WARNING]"),
            "{linted}"
        );
    }
    let rejected = run(
        "helm",
        &kubeconfig,
        &[
            "template",
            chart_path,
            "--kube-version",
            "1.36.3",
            "--set",
            "operator.clientRbac=everything",
        ],
    )
    .await;
    ensure!(
        rejected
            .as_ref()
            .is_err_and(|e| e.to_string().contains("clientRbac")),
        "values.schema.json rejects a bad value: {rejected:?}"
    );

    let template = |set: &'static str| {
        let kubeconfig = kubeconfig.clone();
        async move {
            let mut args = vec!["template", "gefyra", chart_path, "--kube-version", "1.36.3"];
            if !set.is_empty() {
                args.extend(["--set", set]);
            }
            run("helm", &kubeconfig, &args).await
        }
    };
    ensure!(
        !template("").await?.contains("--leader-elect"),
        "one operator: no leader election"
    );
    ensure!(
        template("operator.replicas=2")
            .await?
            .contains("- --leader-elect"),
        "leader election with more than one operator"
    );
    let defaults = template("").await?;
    for expected in [
        "- --deny-metadata-services=true",
        "- --peer-max-tcp-flows=256",
        "- --peer-max-buffer-bytes=134217728",
        "- --tcp-idle-timeout=300",
        "- --per-client-metrics=true",
    ] {
        ensure!(
            defaults.contains(expected),
            "Stowaway's egress policy and limits render {expected:?}"
        );
    }
    ensure!(!defaults.contains("--allow="), "no allow list by default");
    ensure!(
        !defaults.contains("- --deny="),
        "the metadata services are Stowaway's own default, not a copy in the chart"
    );
    ensure!(
        template("stowaway.metrics.perClient=false")
            .await?
            .contains("- --per-client-metrics=false"),
        "the per-client series can be turned off"
    );
    let restricted = template(
        "stowaway.egress.allow={10.96.0.0/12,10.244.0.0/16},stowaway.limits.perPeer.udpFlows=8",
    )
    .await?;
    for expected in [
        "- --allow=10.96.0.0/12",
        "- --allow=10.244.0.0/16",
        "- --peer-max-udp-flows=8",
    ] {
        ensure!(
            restricted.contains(expected),
            "chart values render {expected:?}"
        );
    }
    let balanced = template(
        "stowaway.service.type=LoadBalancer,stowaway.service.annotations.example\\.com/lb=udp,stowaway.service.loadBalancerSourceRanges={203.0.113.0/24}",
    )
    .await?;
    for expected in [
        "type: LoadBalancer",
        "example.com/lb: udp",
        "- 203.0.113.0/24",
    ] {
        ensure!(
            balanced.contains(expected),
            "LoadBalancer option renders {expected:?}:\n{balanced}"
        );
    }
    let monitored = template("serviceMonitor.enabled=true").await?;
    ensure!(
        monitored.contains("kind: ServiceMonitor"),
        "the optional ServiceMonitor"
    );
    chart_options_render(&template).await?;
    let observed = template("prometheusRule.enabled=true,grafanaDashboard.enabled=true").await?;

    // Install from the default namespace; the chart creates "gefyra", labelled restricted.
    let installed_text = run(
        "helm",
        &kubeconfig,
        &[
            "install",
            "gefyra",
            chart_path,
            "--namespace",
            "default",
            "--set",
            "namespace.create=true,namespace.name=gefyra",
        ],
    )
    .await?;
    ensure!(
        installed_text.contains("kubectl gefyra --namespace gefyra clients create"),
        "NOTES tell how to create a client:\n{installed_text}"
    );
    installed(cluster, NAMESPACE).await?;
    pods_admitted(cluster, NAMESPACE).await?;

    // The operator and Stowaway, run here as the chart's ServiceAccounts, do their whole job.
    let as_operator = impersonating(cluster, NAMESPACE, "gefyra-operator")?;
    let mut operator = Operator::start_with(&as_operator, NAMESPACE, &[])?;
    let as_stowaway = impersonating(cluster, NAMESPACE, "gefyra-stowaway")?;
    let stowaway_http = free_port();
    let stowaway_log =
        std::env::temp_dir().join(format!("gefyra-packaging-stowaway-{stowaway_http}.log"));
    let _stowaway = tokio::process::Command::new(stowaway_binary())
        .args([
            "--namespace",
            NAMESPACE,
            "--listen",
            "127.0.0.1:0",
            "--status-interval",
            "1",
            "--bridges-listen",
            "127.0.0.1:0",
        ])
        .args(["--http-address", &format!("127.0.0.1:{stowaway_http}")])
        .env("KUBECONFIG", &as_stowaway)
        .stdout(std::fs::File::create(&stowaway_log)?)
        .stderr(std::fs::File::create(stowaway_log.with_extension("err"))?)
        .kill_on_drop(true)
        .spawn()?;
    let admin = cluster.admin()?;
    let clients: Api<GefyraClient> = Api::namespaced(admin.clone(), NAMESPACE);
    create_client(admin.clone(), NAMESPACE, "chart-rbac").await?;
    wait_for_state(&clients, "chart-rbac", ClientState::Waiting)
        .await
        .with_context(|| operator.log_text())?;
    let (_, public) = key_pair();
    set_provider_parameter(
        &clients,
        "chart-rbac",
        json!({"publicKey": public, "subnet": "172.27.0.0/16"}),
    )
    .await?;
    wait_for_state(&clients, "chart-rbac", ClientState::Active)
        .await
        .with_context(|| operator.log_text())?;
    // The chart's admission policy holds: the client's own token may not change its sunset.
    let client = clients.get("chart-rbac").await?;
    let as_client: Api<GefyraClient> = Api::namespaced(
        cluster.with_token(&gefyra_e2e::token_of(&client)?)?,
        NAMESPACE,
    );
    eventually(
        "the chart's admission policy refuses a client's sunset",
        WAIT,
        || async {
            let patched = as_client
                .patch(
                    "chart-rbac",
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(json!({"sunset": "2199-01-01T00:00:00Z"})),
                )
                .await;
            Ok(patched
                .err()
                .filter(|error| error.to_string().contains("sunset may be changed only"))
                .map(drop))
        },
    )
    .await?;
    eventually(
        "Stowaway (as its ServiceAccount) is ready with the peer",
        WAIT,
        || async {
            let ready = http_get(stowaway_http, "/readyz")
                .await
                .map(|(code, _)| code == 200)
                .unwrap_or(false);
            let metrics = http_get(stowaway_http, "/metrics")
                .await
                .map(|(_, body)| body)
                .unwrap_or_default();
            Ok((ready
                && metrics
                    .lines()
                    .any(|line| line == "gefyra_stowaway_peers 1"))
            .then_some(()))
        },
    )
    .await
    .with_context(|| {
        std::fs::read_to_string(stowaway_log.with_extension("err")).unwrap_or_default()
    })?;
    // Every series the PrometheusRule and the dashboard ask for is one the components
    // export, and what each serves passes promtool's lint.
    let operator_metrics = http_get(operator.http_port, "/metrics").await?.1;
    let stowaway_metrics = http_get(stowaway_http, "/metrics").await?.1;
    for (component, served) in [
        ("operator", &operator_metrics),
        ("Stowaway", &stowaway_metrics),
    ] {
        promtool_finds_no_problem(served).with_context(|| format!("the {component}'s /metrics"))?;
    }
    // The per-client series appear with a handshake, which this peer never makes.
    let with_a_peer = stowaway::metrics::Metrics::default().render(
        &[(
            "chart-rbac".to_string(),
            stowaway::endpoint::PeerStats {
                since_handshake: Some(Duration::from_secs(1)),
                received: 1,
                sent: 1,
                endpoint: None,
            },
        )]
        .into(),
        std::time::SystemTime::now(),
    );
    ensure!(
        with_a_peer.contains("gefyra_stowaway_peer_received_bytes_total{client=\"chart-rbac\"} 1")
    );
    promtool_finds_no_problem(&with_a_peer).context("Stowaway's per-client series")?;
    monitoring_asks_for_exported_series(&observed, &(operator_metrics + &stowaway_metrics))?;
    set_provider_parameter(&clients, "chart-rbac", serde_json::Value::Null).await?;
    wait_for_state(&clients, "chart-rbac", ClientState::Waiting).await?;
    clients.delete("chart-rbac", &Default::default()).await?;
    wait_gone(&clients, "chart-rbac")
        .await
        .with_context(|| operator.log_text())?;
    let log = operator.log_text();
    ensure!(
        !log.contains("forbidden"),
        "the operator was refused something:\n{log}"
    );
    operator.kill().await?;

    // helm upgrade with a changed CRD updates the CRD.
    let upgraded_chart =
        std::env::temp_dir().join(format!("gefyra-chart-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&upgraded_chart)?;
    let copy = upgraded_chart.join("gefyra-operator");
    ensure!(
        std::process::Command::new("cp")
            .arg("-r")
            .arg(&chart)
            .arg(&copy)
            .status()?
            .success(),
        "copying the chart"
    );
    let crd_template = copy.join("templates/crd.yaml");
    let text = std::fs::read_to_string(&crd_template)?;
    ensure!(
        text.contains("description: The lifecycle state\n"),
        "the CRD template has the State column"
    );
    std::fs::write(
        &crd_template,
        text.replace(
            "description: The lifecycle state\n",
            "description: The lifecycle state (upgraded)\n",
        ),
    )?;
    run(
        "helm",
        &kubeconfig,
        &[
            "upgrade",
            "gefyra",
            copy.to_str().context("utf-8")?,
            "--namespace",
            "default",
            "--reuse-values",
        ],
    )
    .await?;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let crd = crds.get(CRD).await?;
    ensure!(
        serde_json::to_string(&crd.spec)?.contains("The lifecycle state (upgraded)"),
        "helm upgrade changed the CRD"
    );
    let _ = std::fs::remove_dir_all(&upgraded_chart);

    // helm uninstall keeps the CRD (and the namespace with the clients), removes the rest.
    run(
        "helm",
        &kubeconfig,
        &["uninstall", "gefyra", "--namespace", "default", "--wait"],
    )
    .await?;
    crds.get(CRD).await.context("the CRD is kept")?;
    let policy = gefyra_api::admission::policy_name(NAMESPACE);
    ensure!(
        Api::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy>::all(
            admin.clone()
        )
        .get_opt(&policy)
        .await?
        .is_none(),
        "the admission policy {policy} is removed"
    );
    Api::<Namespace>::all(admin.clone())
        .get(NAMESPACE)
        .await
        .context("the namespace is kept")?;
    for name in ["gefyra-operator", "gefyra-stowaway"] {
        ensure!(absent::<Deployment>(&admin, name).await?, "{name} removed");
        ensure!(absent::<Role>(&admin, name).await?, "{name} Role removed");
        ensure!(
            absent::<ServiceAccount>(&admin, name).await?,
            "{name} SA removed"
        );
    }
    ensure!(
        Api::<Service>::namespaced(admin, NAMESPACE)
            .get_opt("gefyra-stowaway-wireguard")
            .await?
            .is_none(),
        "the Service is removed"
    );
    for path in [as_operator, as_stowaway] {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Helm 4 lints, installs and uninstalls the chart as Helm 3 does; neither major needs
/// `--kube-version` to render it for GitOps (Helm 3 assumes Kubernetes 1.20 without a
/// cluster, Helm 4 1.37), and a cluster older than 1.31 is refused by what its discovery
/// says, with a message.
#[tokio::test]
async fn helm_4_installs_the_chart_and_neither_major_needs_a_kube_version() -> Result<()> {
    let plane = OwnControlPlane::start().await?;
    let cluster = &plane.cluster;
    let kubeconfig = cluster.kubeconfig.clone();
    let chart = chart();
    let chart_path = chart.to_str().context("a UTF-8 path")?;
    for helm in ["helm", "helm4"] {
        let rendered = run(helm, &kubeconfig, &["template", "gefyra", chart_path]).await?;
        ensure!(
            documents(&rendered)?
                .iter()
                .any(|d| d["kind"] == "Deployment"),
            "{helm} template without --kube-version"
        );
        // What a cluster's discovery says (`helm template` alone knows no kinds): one that
        // lacks ValidatingAdmissionPolicy v1, and a 1.30 that has it but not CEL's CIDR
        // library.
        for (version, kinds) in [
            ("1.36.3", "v1/ConfigMap"),
            (
                "1.30.9",
                "v1/ConfigMap,admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
            ),
        ] {
            let old = run(
                helm,
                &kubeconfig,
                &[
                    "template",
                    "gefyra",
                    chart_path,
                    "--kube-version",
                    version,
                    "--api-versions",
                    kinds,
                ],
            )
            .await;
            ensure!(
                old.as_ref()
                    .is_err_and(|e| e.to_string().contains("needs Kubernetes 1.31 or later")),
                "{helm} on {version} serving {kinds}: {old:?}"
            );
        }
    }
    let linted = run("helm4", &kubeconfig, &["lint", chart_path, "--strict"]).await?;
    ensure!(
        linted.contains("0 chart(s) failed") && !linted.contains("[WARNING]"),
        "{linted}"
    );
    let notes = run(
        "helm4",
        &kubeconfig,
        &[
            "install",
            "gefyra",
            chart_path,
            "--namespace",
            "default",
            "--set",
            "namespace.create=true,namespace.name=gefyra",
        ],
    )
    .await?;
    ensure!(notes.contains("clients create"), "NOTES:\n{notes}");
    installed(cluster, NAMESPACE).await?;
    run(
        "helm4",
        &kubeconfig,
        &["uninstall", "gefyra", "--namespace", "default", "--wait"],
    )
    .await?;
    let admin = cluster.admin()?;
    ensure!(
        absent::<Deployment>(&admin, "gefyra-operator").await?,
        "uninstalled"
    );
    Ok(())
}

#[tokio::test]
async fn deploy_applies_server_side_on_a_fresh_control_plane() -> Result<()> {
    let plane = OwnControlPlane::start().await?;
    let cluster = &plane.cluster;
    let deploy = repo_root().join("deploy");
    let applied = run(
        "kubectl",
        &cluster.kubeconfig,
        &[
            "apply",
            "--server-side",
            "--field-manager=gefyra-test",
            "-f",
            deploy.to_str().context("utf-8")?,
        ],
    )
    .await?;
    ensure!(applied.contains("customresourcedefinition.apiextensions.k8s.io/gefyraclients.gefyra.dev serverside-applied"), "{applied}");
    installed(cluster, NAMESPACE).await?;
    pods_admitted(cluster, NAMESPACE).await?;
    // The examples are valid GefyraClients.
    run(
        "kubectl",
        &cluster.kubeconfig,
        &[
            "apply",
            "--server-side",
            "--field-manager=gefyra-test",
            "-f",
            deploy.join("examples").to_str().context("utf-8")?,
        ],
    )
    .await?;
    let clients: Api<GefyraClient> = Api::namespaced(cluster.admin()?, NAMESPACE);
    ensure!(
        !clients.list(&ListParams::default()).await?.items.is_empty(),
        "the examples created clients"
    );
    Ok(())
}

/// `make generate` is the only way these files change: regenerated into a scratch
/// directory, they must equal what is committed.
#[tokio::test]
async fn generated_files_are_current() -> Result<()> {
    let scratch =
        std::env::temp_dir().join(format!("gefyra-generate-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&scratch)?;
    let output = tokio::process::Command::new(repo_root().join("tests/generate.sh"))
        .arg(&scratch)
        .env("GEFYRA_OPERATOR_BINARY", operator_binary())
        .env("STOWAWAY_BINARY", stowaway_binary())
        .env(
            "GEFYRA_VALUES_TABLE_BINARY",
            env!("CARGO_BIN_EXE_values-table"),
        )
        .output()
        .await?;
    ensure!(
        output.status.success(),
        "tests/generate.sh: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for path in [
        "crds/gefyraclients.yaml",
        "charts",
        "deploy/gefyra-operator.yaml",
    ] {
        let diff = tokio::process::Command::new("diff")
            .arg("-r")
            .arg(repo_root().join(path))
            .arg(scratch.join(path))
            .output()
            .await?;
        ensure!(
            diff.status.success(),
            "{path} is stale: run `make generate` and commit the result\n{}",
            String::from_utf8_lossy(&diff.stdout)
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// The image builds offline — `FROM scratch`, nothing pulled — from `make static`'s
/// binaries (`tests/image.sh`, what `make image` runs), and each binary runs from it as
/// 65532 with nothing else in the image (no shell).
#[tokio::test]
async fn the_image_builds_offline_from_the_static_binaries_and_runs_as_65532() -> Result<()> {
    let built = tokio::process::Command::new(repo_root().join("tests/image.sh"))
        .output()
        .await?;
    ensure!(
        built.status.success(),
        "tests/image.sh failed (run make static first): {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let tarball = String::from_utf8(built.stdout)?.trim().to_string();
    let docker = DockerDaemon::start().await?;
    let run_docker = |args: Vec<String>| {
        let mut command = docker.docker();
        command.args(&args);
        async move {
            let output = command.output().await?;
            anyhow::Ok((
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).trim().to_string(),
            ))
        }
    };
    let args = |text: &str| text.split(' ').map(str::to_string).collect::<Vec<_>>();
    let (loaded, _) = run_docker(args(&format!("load --input {tarball}"))).await?;
    ensure!(loaded, "docker load {tarball}");
    let (_, config) = run_docker(
        [
            "image",
            "inspect",
            "--format",
            "{{.Config.User}}|{{json .Config.Entrypoint}}|{{len .RootFS.Layers}}",
            "gefyra-operator:local",
        ]
        .map(str::to_string)
        .to_vec(),
    )
    .await?;
    ensure!(
        config == "65532:65532|[\"/usr/local/bin/gefyra-operator\"]|1",
        "user, entrypoint and one layer: {config}"
    );
    for binary in [
        "gefyra-operator",
        "stowaway",
        "gefyra-carrier",
        "kubectl-gefyra",
    ] {
        let (ran, version) = run_docker(args(&format!(
            "run --rm --network none --entrypoint /usr/local/bin/{binary} gefyra-operator:local --version"
        )))
        .await?;
        ensure!(
            ran && version.contains(env!("CARGO_PKG_VERSION")),
            "{binary} --version in the image: {version:?}"
        );
    }
    let (whoami, _) = run_docker(args(
        "run --rm --network none --entrypoint /bin/sh gefyra-operator:local -c true",
    ))
    .await?;
    ensure!(!whoami, "the image has no shell");
    Ok(())
}

/// `make dist`'s archives install with krew — which checks each archive against the
/// manifest's sha256 and the manifest itself — for both platforms; the installed plugin
/// runs (arm64 under qemu), through kubectl on amd64. A manifest whose sum is not the
/// archive's is refused. The committed plugins/gefyra.yaml agrees with the generated one
/// but for the sums.
#[tokio::test]
async fn the_plugin_installs_with_krew_from_the_dist_archives() -> Result<()> {
    let dist = repo_root().join("target/dist");
    let manifest = dist.join("gefyra.yaml");
    let generated = std::fs::read_to_string(&manifest)
        .with_context(|| format!("{} is missing: run make dist first", manifest.display()))?;
    let committed = std::fs::read_to_string(repo_root().join("plugins/gefyra.yaml"))?;
    let without_sums = |text: &str| {
        text.lines()
            .filter(|line| !line.trim_start().starts_with("sha256:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    ensure!(
        without_sums(&committed) == without_sums(&generated),
        "plugins/gefyra.yaml is stale: after make dist, copy target/dist/gefyra.yaml there"
    );
    let version = env!("CARGO_PKG_VERSION");
    let krew = gefyra_e2e::controlplane_tool("krew")?;
    let scratch = std::env::temp_dir().join(format!("gefyra-krew-{:08x}", rand::random::<u32>()));
    let install = |arch: &'static str, manifest: PathBuf, root: &str| {
        let root = scratch.join(root);
        let archive = dist.join(format!("kubectl-gefyra_v{version}_linux_{arch}.tar.gz"));
        let krew = krew.clone();
        async move {
            std::fs::create_dir_all(&root)?;
            let output = tokio::process::Command::new(&krew)
                .arg("install")
                .arg(format!("--manifest={}", manifest.display()))
                .arg(format!("--archive={}", archive.display()))
                .env("KREW_ROOT", &root)
                .env("HOME", &root)
                .env("KREW_OS", "linux")
                .env("KREW_ARCH", arch)
                .stdin(std::process::Stdio::null())
                .output()
                .await?;
            anyhow::Ok((
                output.status.success(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
                root,
            ))
        }
    };
    for arch in ["amd64", "arm64"] {
        let (installed, log, root) = install(arch, manifest.clone(), arch).await?;
        ensure!(installed, "krew install ({arch}): {log}");
        let plugin = root.join("bin/kubectl-gefyra");
        let ran = if arch == "amd64" {
            tokio::process::Command::new(&plugin)
                .arg("--version")
                .output()
                .await?
        } else {
            tokio::process::Command::new("qemu-aarch64-static")
                .arg(&plugin)
                .arg("--version")
                .output()
                .await?
        };
        ensure!(
            String::from_utf8_lossy(&ran.stdout).trim() == format!("kubectl-gefyra {version}"),
            "the {arch} plugin runs: {ran:?}"
        );
        if arch == "amd64" {
            let path = format!(
                "{}:{}",
                root.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            );
            let through_kubectl =
                tokio::process::Command::new(gefyra_e2e::controlplane_tool("kubectl")?)
                    .args(["gefyra", "--version"])
                    .env("PATH", &path)
                    .output()
                    .await?;
            ensure!(
                String::from_utf8_lossy(&through_kubectl.stdout).trim()
                    == format!("kubectl-gefyra {version}"),
                "kubectl gefyra --version: {through_kubectl:?}"
            );
            // The archive's completion helper, as kubectl would run it.
            let helper = root.join(format!("store/gefyra/v{version}/kubectl_complete-gefyra"));
            let completed = tokio::process::Command::new(&helper)
                .arg("cl")
                .env("PATH", &path)
                .output()
                .await?;
            ensure!(
                String::from_utf8_lossy(&completed.stdout).starts_with("clients\t"),
                "{} cl: {completed:?}",
                helper.display()
            );
        }
    }
    // A manifest whose sum is not the archive's: krew refuses to install it.
    let forged = scratch.join("forged.yaml");
    let mut lines: Vec<String> = generated.lines().map(str::to_string).collect();
    for line in lines
        .iter_mut()
        .filter(|line| line.trim_start().starts_with("sha256:"))
    {
        let indent = line.len() - line.trim_start().len();
        *line = format!("{}sha256: {}", " ".repeat(indent), "a".repeat(64));
    }
    std::fs::write(&forged, lines.join("\n") + "\n")?;
    let (installed, log, _) = install("amd64", forged, "forged").await?;
    ensure!(
        !installed && log.contains("checksum"),
        "krew refuses an archive whose sum is not the manifest's: {log}"
    );
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}
