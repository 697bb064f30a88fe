//! The harness for tests against the local control plane (`tests/controlplane.sh`).
//!
//! `make test` starts one control plane for the whole run and exports its admin
//! kubeconfig as `GEFYRA_KUBECONFIG`; every test gets its own fresh namespace from it.

pub mod attacker;
pub mod docs;
pub mod lab;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use gefyra_api::{ClientState, GefyraClient};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use kube::{Api, Client, Config};
use serde_json::json;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The control-plane script every entry point shares.
pub fn controlplane_script() -> PathBuf {
    repo_root().join("tests/controlplane.sh")
}

/// A running control plane, as described by its admin kubeconfig.
pub struct Cluster {
    pub kubeconfig: PathBuf,
    config: Config,
}

impl Cluster {
    /// The control plane `make test` (or `tests/controlplane.sh run`) started for this run.
    pub async fn from_env() -> Result<Self> {
        let Some(path) = std::env::var_os("GEFYRA_KUBECONFIG") else {
            bail!(
                "GEFYRA_KUBECONFIG is not set: these tests need the local control plane; \
                 run `make test`, or `tests/controlplane.sh run -- cargo test -p gefyra-e2e`"
            );
        };
        Self::from_kubeconfig(Path::new(&path)).await
    }

    /// The control plane whose admin kubeconfig is `path`.
    pub async fn from_kubeconfig(path: &Path) -> Result<Self> {
        let kubeconfig = path.to_path_buf();
        let raw = Kubeconfig::read_from(&kubeconfig)
            .with_context(|| format!("reading kubeconfig {}", kubeconfig.display()))?;
        let config = Config::from_custom_kubeconfig(raw, &KubeConfigOptions::default()).await?;
        Ok(Self { kubeconfig, config })
    }

    /// A client with the admin identity (O=system:masters).
    pub fn admin(&self) -> Result<Client> {
        Ok(Client::try_from(self.config.clone())?)
    }

    /// A client that authenticates with nothing but `token` (same server and CA).
    pub fn with_token(&self, token: &str) -> Result<Client> {
        let mut config = self.config.clone();
        config.auth_info = AuthInfo {
            token: Some(token.to_string().into()),
            ..AuthInfo::default()
        };
        Ok(Client::try_from(config)?)
    }

    /// Mints a token for ServiceAccount `account` in `namespace` with the TokenRequest API.
    pub async fn mint_token(&self, namespace: &str, account: &str, seconds: i64) -> Result<String> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        use k8s_openapi::api::core::v1::ServiceAccount;
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(seconds),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let minted = Api::<ServiceAccount>::namespaced(self.admin()?, namespace)
            .create_token_request(account, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {namespace}/{account}"))?;
        minted
            .status
            .and_then(|status| status.token)
            .context("TokenRequest returned no token")
    }

    /// Writes a kubeconfig for the same server and CA whose user has only `token`.
    pub fn kubeconfig_with_token(&self, token: &str) -> Result<PathBuf> {
        let mut raw = Kubeconfig::read_from(&self.kubeconfig)?;
        for named in &mut raw.auth_infos {
            named.auth_info = Some(AuthInfo {
                token: Some(token.to_string().into()),
                ..AuthInfo::default()
            });
        }
        let path = std::env::temp_dir().join(format!(
            "gefyra-kubeconfig-{:08x}.yaml",
            rand::random::<u32>()
        ));
        std::fs::write(&path, serde_saphyr::to_string(&raw)?)?;
        Ok(path)
    }

    /// The API server's URL.
    pub fn server(&self) -> String {
        self.config.cluster_url.to_string()
    }

    /// A fresh namespace for one test, named after it.
    pub async fn namespace(&self, test: &str) -> Result<String> {
        let suffix: u32 = rand::random();
        let name = format!("{}-{:08x}", test.replace('_', "-"), suffix);
        let namespaces: Api<Namespace> = Api::all(self.admin()?);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("gefyra.dev/test".to_string(), "true".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating test namespace {name}"))?;
        install_admission_policy(self.admin()?, &name).await?;
        Ok(name)
    }
}

/// A tool built with the control plane (`kubectl`, `helm`, ...).
pub fn controlplane_tool(name: &str) -> Result<PathBuf> {
    let output = std::process::Command::new(controlplane_script())
        .arg("bin-dir")
        .output()
        .context("running tests/controlplane.sh bin-dir")?;
    ensure!(
        output.status.success(),
        "tests/controlplane.sh bin-dir failed"
    );
    Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()).join(name))
}

/// A control plane of a test's own (`tests/controlplane.sh up`), for tests that need one
/// nothing else touches (cluster-scoped objects, fixed NodePorts); stopped when dropped.
/// Runs helm or kubectl (of the local control plane) against `kubeconfig`; fails with the
/// output unless it exits 0.
pub async fn run_tool(program: &str, kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new(controlplane_tool(program)?)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("gefyra-helm-cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("gefyra-helm-config"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("gefyra-helm-data"),
        )
        .output()
        .await
        .with_context(|| format!("running {program} {args:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "{program} {args:?} failed:\n{text}"
    );
    Ok(text)
}

pub struct OwnControlPlane {
    pub dir: PathBuf,
    pub cluster: Cluster,
}

impl OwnControlPlane {
    pub async fn start() -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("gefyra-own-plane-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        let output = tokio::process::Command::new(controlplane_script())
            .arg("up")
            .arg(&dir)
            .output()
            .await
            .context("running tests/controlplane.sh up")?;
        let plane = Self {
            cluster: Cluster {
                kubeconfig: dir.join("kubeconfig"),
                config: Config::new("https://127.0.0.1".parse()?),
            },
            dir,
        };
        ensure!(
            output.status.success(),
            "tests/controlplane.sh up failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let mut plane = plane;
        plane.cluster = Cluster::from_kubeconfig(&plane.cluster.kubeconfig).await?;
        Ok(plane)
    }
}

impl Drop for OwnControlPlane {
    fn drop(&mut self) {
        let _ = std::process::Command::new(controlplane_script())
            .arg("down")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `check` every 100 ms until it returns `Ok(Some(_))`, or fails after `timeout`
/// with what the last check said.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => "condition not met yet".to_string(),
            Err(error) => format!("{error:#}"),
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The HTTP status of a failed API call, if it was answered by the API server.
pub fn api_status(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Process ids whose command line mentions `needle` (read from /proc).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own = std::process::id();
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// A binary of this workspace next to the running test binary (target/<profile>/<name>).
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let mut dir = exe.parent().expect("an executable has a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>/deps");
    }
    dir.join(name)
}

/// A binary of this workspace: `$override_variable` if set, else `name` next to this test
/// binary, which must exist (`make e2e` builds it with package `package`).
pub fn workspace_binary(name: &str, package: &str, override_variable: &str) -> PathBuf {
    if let Some(binary) = std::env::var_os(override_variable) {
        return PathBuf::from(binary);
    }
    let binary = sibling_binary(name);
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p {package}` (make e2e does)",
        binary.display()
    );
    binary
}

/// The operator binary built next to this test binary (`make e2e` builds it first).
pub fn operator_binary() -> PathBuf {
    workspace_binary(
        "gefyra-operator",
        "gefyra-operator",
        "GEFYRA_OPERATOR_BINARY",
    )
}

/// The `kubectl-gefyra` binary built next to this test binary.
pub fn kubectl_gefyra_binary() -> PathBuf {
    workspace_binary("kubectl-gefyra", "kubectl-gefyra", "KUBECTL_GEFYRA_BINARY")
}

/// `kubectl-gefyra` run as a user runs it: `KUBECONFIG` set, `--namespace` given, in a
/// working directory of its own.
pub struct KubectlGefyra {
    pub kubeconfig: PathBuf,
    pub namespace: String,
    pub workdir: PathBuf,
}

/// What a command printed and how it exited.
#[derive(Debug)]
pub struct CommandOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl KubectlGefyra {
    pub fn new(kubeconfig: &Path, namespace: &str) -> Result<Self> {
        let workdir =
            std::env::temp_dir().join(format!("kubectl-gefyra-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&workdir)?;
        Ok(Self {
            kubeconfig: kubeconfig.to_path_buf(),
            namespace: namespace.to_string(),
            workdir,
        })
    }

    pub async fn run(&self, args: &[&str]) -> Result<CommandOutput> {
        let output = tokio::process::Command::new(kubectl_gefyra_binary())
            .args(args)
            .args(["--namespace", &self.namespace])
            .env("KUBECONFIG", &self.kubeconfig)
            .current_dir(&self.workdir)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .context("running kubectl-gefyra")?;
        Ok(CommandOutput {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Runs `args`, which must succeed; returns stdout.
    pub async fn ok(&self, args: &[&str]) -> Result<String> {
        let output = self.run(args).await?;
        ensure!(
            output.code == 0,
            "kubectl-gefyra {args:?} failed: {output:?}"
        );
        Ok(output.stdout)
    }

    /// `connect -f FILE --format wg --wg-config WG_CONFIG EXTRA...` (a `wg setconf` file),
    /// which must succeed; returns stdout.
    pub async fn connect_wg(&self, file: &str, wg_config: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec![
            "connect",
            "-f",
            file,
            "--format",
            "wg",
            "--wg-config",
            wg_config,
        ];
        args.extend_from_slice(extra);
        self.ok(&args).await
    }

    /// Runs `args`, which must fail with exit code `code` and one line on stderr; returns it.
    pub async fn fails(&self, args: &[&str], code: i32) -> Result<String> {
        let output = self.run(args).await?;
        ensure!(
            output.code == code,
            "kubectl-gefyra {args:?} should exit {code}: {output:?}"
        );
        let line = output.stderr.trim_end();
        ensure!(
            line.starts_with("error: ") && !line.contains('\n'),
            "kubectl-gefyra {args:?}: one readable line on stderr: {output:?}"
        );
        Ok(line.to_string())
    }
}

impl Drop for KubectlGefyra {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.workdir);
    }
}

/// The keys of a client file, in Gefyra's order.
pub const CLIENT_FILE_KEYS: [&str; 9] = [
    "client_id",
    "kubernetes_server",
    "provider",
    "namespace",
    "gefyra_server",
    "token",
    "ca_crt",
    "registry",
    "wireguard_mtu",
];

/// Parses a client file (Gefyra's format), checking it has exactly Gefyra's keys in
/// Gefyra's order (on the text: a parsed map keeps no order).
pub fn parse_client_file(text: &str) -> Result<serde_json::Map<String, serde_json::Value>> {
    let file: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).with_context(|| format!("a client file is JSON: {text}"))?;
    let positions: Vec<usize> = CLIENT_FILE_KEYS
        .iter()
        .map(|key| text.find(&format!("\"{key}\": ")).unwrap_or(usize::MAX))
        .collect();
    ensure!(
        positions.is_sorted() && !positions.contains(&usize::MAX) && file.len() == 9,
        "client file keys are Gefyra's, in its order: {text}"
    );
    Ok(file)
}

/// A base64 field of a client file (`token`, `ca_crt`), decoded.
pub fn decoded(file: &serde_json::Map<String, serde_json::Value>, key: &str) -> Result<String> {
    let text = file[key]
        .as_str()
        .with_context(|| format!("{key} is a string"))?;
    Ok(String::from_utf8(
        base64::engine::general_purpose::STANDARD.decode(text)?,
    )?)
}

/// A loopback TCP port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

/// Connects (a parameter) or disconnects (`null`) a client by patching its
/// `providerParameter`, as a client would.
pub async fn set_provider_parameter(
    api: &Api<GefyraClient>,
    name: &str,
    parameter: serde_json::Value,
) -> Result<()> {
    use kube::api::{Patch, PatchParams};
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "providerParameter": parameter })),
    )
    .await
    .with_context(|| format!("connecting {name}"))?;
    Ok(())
}

/// GETs `path` from an HTTP server on the loopback port; `(status, body)`.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("an HTTP status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of one metric series (`name{labels}` exactly as exposed) served on the loopback
/// port's `/metrics`, 0 if absent.
pub async fn metric(port: u16, series: &str) -> Result<f64> {
    let (_, body) = http_get(port, "/metrics").await?;
    Ok(body
        .lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0))
}

/// The operator's requests to the API server by verb (every status code together), from
/// the text of its /metrics.
pub fn api_requests_by_verb(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    let mut by_verb = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("gefyra_operator_api_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let verb = labels
            .split(',')
            .find_map(|pair| pair.strip_prefix("verb=\""))
            .and_then(|verb| verb.strip_suffix('"'));
        if let (Some(verb), Ok(value)) = (verb, value.parse::<f64>()) {
            *by_verb.entry(verb.to_string()).or_insert(0.0) += value;
        }
    }
    by_verb
}

/// Creates the ServiceAccount, Roles and RoleBinding of a component's `rbac` output in
/// `namespace`, and its ClusterRole once (nothing else is accepted).
pub async fn apply_identity(admin: Client, namespace: &str, yaml: &str) -> Result<()> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml)?;
    let pp = PostParams::default();
    for document in documents {
        match document["kind"].as_str() {
            Some("ServiceAccount") => drop(
                Api::<ServiceAccount>::namespaced(admin.clone(), namespace)
                    .create(&pp, &serde_json::from_value(document)?)
                    .await?,
            ),
            Some("Role") => drop(
                Api::<Role>::namespaced(admin.clone(), namespace)
                    .create(&pp, &serde_json::from_value(document)?)
                    .await?,
            ),
            Some("RoleBinding") => drop(
                Api::<RoleBinding>::namespaced(admin.clone(), namespace)
                    .create(&pp, &serde_json::from_value(document)?)
                    .await?,
            ),
            // The bridging grant (`gefyra-bridge`), cluster-wide and the same for every
            // install: created once, whichever test comes first.
            Some("ClusterRole") => {
                let api = Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(admin.clone());
                match api.create(&pp, &serde_json::from_value(document)?).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(status)) if status.code == 409 => {}
                    Err(error) => return Err(error.into()),
                }
            }
            other => bail!("unexpected object in an `rbac` output: {other:?}"),
        }
    }
    Ok(())
}

/// An operator process for one namespace; killed when dropped.
pub struct Operator {
    pub child: tokio::process::Child,
    pub http_port: u16,
    pub log: PathBuf,
}

impl Operator {
    /// Starts `gefyra-operator` against the cluster, for `namespace`, with `extra` flags.
    pub fn start(cluster: &Cluster, namespace: &str, extra: &[&str]) -> Result<Self> {
        Self::start_with(&cluster.kubeconfig, namespace, extra)
    }

    /// Starts `gefyra-operator` with the identity in `kubeconfig`.
    pub fn start_with(kubeconfig: &Path, namespace: &str, extra: &[&str]) -> Result<Self> {
        let http_port = free_port();
        let log = std::env::temp_dir().join(format!("gefyra-operator-{namespace}-{http_port}.log"));
        let log_file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(operator_binary())
            .args([
                "--namespace",
                namespace,
                "--http-address",
                &format!("127.0.0.1:{http_port}"),
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .context("starting gefyra-operator")?;
        Ok(Self {
            child,
            http_port,
            log,
        })
    }

    /// GETs one of the operator's HTTP endpoints; `(status, body)`.
    pub async fn http_get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.http_port, path).await
    }

    /// Kills the process outright (SIGKILL), as a crash would.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Stops the process as Kubernetes stops a Pod (SIGTERM) and waits for it to exit.
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().context("the operator has exited already")?;
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        ensure!(sent.success(), "kill -TERM {pid} failed");
        Ok(
            tokio::time::timeout(Duration::from_secs(30), self.child.wait())
                .await
                .context("the operator did not exit within 30 s of SIGTERM")??,
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Installs (server-side apply) the admission policy and binding that restrict what a
/// client's own identity may change in `namespace`, as the chart does for its namespace.
pub async fn install_admission_policy(admin: Client, namespace: &str) -> Result<()> {
    apply_policy(
        admin,
        gefyra_api::admission::policy(namespace),
        gefyra_api::admission::binding(namespace),
    )
    .await
}

/// Installs (server-side apply) the four bridge policies and their bindings for the bridges
/// and mounts of `namespace`, as the chart does for its namespace. The two whose params are
/// custom resources may refuse everything for a while after their CRD first appears (the
/// API server's RESTMapper refresh): a test waits for a policy's own message.
pub async fn install_bridge_policies(admin: Client, namespace: &str) -> Result<()> {
    for (policy, binding) in gefyra_api::admission::bridge_policies(namespace) {
        apply_policy(admin.clone(), policy, binding).await?;
    }
    Ok(())
}

async fn apply_policy(
    admin: Client,
    policy: ValidatingAdmissionPolicy,
    binding: ValidatingAdmissionPolicyBinding,
) -> Result<()> {
    use kube::api::{Patch, PatchParams};
    let params = PatchParams::apply("gefyra-e2e").force();
    let name = policy.metadata.name.clone().unwrap_or_default();
    Api::<ValidatingAdmissionPolicy>::all(admin.clone())
        .patch(&name, &params, &Patch::Apply(policy))
        .await
        .with_context(|| format!("applying ValidatingAdmissionPolicy {name}"))?;
    let name = binding.metadata.name.clone().unwrap_or_default();
    Api::<ValidatingAdmissionPolicyBinding>::all(admin)
        .patch(&name, &params, &Patch::Apply(binding))
        .await
        .with_context(|| format!("applying ValidatingAdmissionPolicyBinding {name}"))?;
    Ok(())
}

/// Installs (server-side apply) the four bridge admission policies and their bindings for the
/// bridges and mounts of `namespace` (a client's own bridges only, the bridging grant,
/// destinations in the client's own ranges), as the chart does for its namespace.
pub async fn install_bridge_admission_policies(admin: Client, namespace: &str) -> Result<()> {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    use kube::api::{Patch, PatchParams};
    let params = PatchParams::apply("gefyra-e2e").force();
    for (policy, binding) in gefyra_api::admission::bridge_policies(namespace) {
        let name = policy.metadata.name.clone().unwrap_or_default();
        Api::<ValidatingAdmissionPolicy>::all(admin.clone())
            .patch(&name, &params, &Patch::Apply(&policy))
            .await
            .with_context(|| format!("applying ValidatingAdmissionPolicy {name}"))?;
        let name = binding.metadata.name.clone().unwrap_or_default();
        Api::<ValidatingAdmissionPolicyBinding>::all(admin.clone())
            .patch(&name, &params, &Patch::Apply(&binding))
            .await
            .with_context(|| format!("applying ValidatingAdmissionPolicyBinding {name}"))?;
    }
    Ok(())
}

/// Installs (server-side apply) the GefyraClient, GefyraBridge and GefyraBridgeMount CRDs
/// and waits until they are served.
pub async fn install_crd(cluster: &Cluster) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.admin()?);
    let [bridges, mounts] = gefyra_api::bridge::crds();
    for crd in [gefyra_api::crd::crd(), bridges, mounts] {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply("gefyra-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await?;
        eventually(
            &format!("the CRD {name} is established"),
            Duration::from_secs(30),
            || async {
                let crd = crds.get(&name).await?;
                let established = crd
                    .status
                    .and_then(|status| status.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|condition| {
                        condition.type_ == "Established" && condition.status == "True"
                    });
                Ok(established.then_some(()))
            },
        )
        .await?;
    }
    Ok(())
}

/// A private Docker daemon (Debian's `dockerd`, no bridge, no iptables, its own socket and
/// data directory). The real Gefyra CLI refuses to start without a Docker daemon, even for
/// `gefyra clients ...`, which only talks to the API server. Stopped with SIGTERM when
/// dropped, so it takes its containerd down with it.
/// Gefyra's own CLI (`gefyra`, from PyPI) as an admin runs it: `KUBECONFIG`, a Docker daemon
/// (it wants one even for `clients ...`) and a home of its own.
pub struct GefyraCli<'a> {
    pub program: String,
    pub cluster: &'a Cluster,
    pub docker: &'a DockerDaemon,
    pub home: &'a Path,
}

impl GefyraCli<'_> {
    /// Runs `gefyra ARGS`; fails with its output unless it exits 0.
    pub async fn run(&self, args: &[&str]) -> Result<String> {
        let std::process::Output {
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

/// The `gefyra` program `make test` installed (tests/gefyra-cli.sh).
pub fn gefyra_cli_program() -> Result<String> {
    std::env::var("GEFYRA_CLI").context(
        "GEFYRA_CLI is not set: run through `make test`, which installs the CLI with tests/gefyra-cli.sh",
    )
}

pub struct DockerDaemon {
    child: std::process::Child,
    root: PathBuf,
    pub host: String,
    /// The bridge of the daemon's default network, ours to delete (see `with_bridge`).
    bridge: Option<String>,
}

/// Gefyra's Cargo bind-mounts this host path; Docker makes it a directory if it is missing.
const HOST_DOCKER_SOCKET: &str = "/var/run/docker.sock";

impl DockerDaemon {
    pub async fn start() -> Result<Self> {
        Self::start_with(&["--bridge=none"], None).await
    }

    /// A daemon that can run Gefyra's Cargo: a default bridge network of its own (Cargo's
    /// network is not set up without one) on `10.211.0.1/24`, runc cut to this machine's
    /// capability bounding set (`tests/runc-bounded.sh`), since Cargo is privileged, and the
    /// host's `/var/run/docker.sock` too, since Cargo mounts that path to patch the routes of
    /// `gefyra run` containers (refused while another Docker daemon answers there).
    pub async fn with_bridge() -> Result<Self> {
        let host_socket = Path::new(HOST_DOCKER_SOCKET);
        if host_socket.is_dir() {
            // An empty directory an earlier Docker made for Cargo's mount.
            let _ = std::fs::remove_dir(host_socket);
        } else if host_socket.exists() {
            ensure!(
                tokio::net::UnixStream::connect(host_socket).await.is_err(),
                "a Docker daemon answers on {HOST_DOCKER_SOCKET}: Gefyra's Cargo would mount it \
                 instead of the test's; stop it (systemctl stop docker docker.socket) and run again"
            );
            std::fs::remove_file(host_socket)
                .with_context(|| format!("removing the stale socket {HOST_DOCKER_SOCKET}"))?;
        }
        let bridge = format!("gfdock{:04x}", rand::random::<u16>());
        for args in [
            vec!["link", "add", &bridge, "type", "bridge"],
            vec!["addr", "add", "10.211.0.1/24", "dev", &bridge],
            vec!["link", "set", &bridge, "up"],
        ] {
            let status = std::process::Command::new("ip").args(&args).status()?;
            ensure!(status.success(), "ip {args:?} failed");
        }
        let runtime = repo_root().join("tests/runc-bounded.sh");
        let result = Self::start_with(
            &[
                &format!("--bridge={bridge}"),
                &format!("--host=unix://{HOST_DOCKER_SOCKET}"),
                &format!("--add-runtime=bounded={}", runtime.display()),
                "--default-runtime=bounded",
            ],
            Some(bridge.clone()),
        )
        .await;
        if result.is_err() {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &bridge])
                .status();
        }
        result
    }

    /// `docker`, talking to this daemon.
    pub fn docker(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("docker");
        command.env("DOCKER_HOST", &self.host);
        command
    }

    async fn start_with(network: &[&str], bridge: Option<String>) -> Result<Self> {
        let dockerd = ["/usr/sbin/dockerd", "/usr/bin/dockerd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.exists())
            .context("dockerd is not installed: run `make prereqs` (Debian package docker.io)")?;
        let root =
            std::env::temp_dir().join(format!("gefyra-dockerd-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&root)?;
        let socket = root.join("docker.sock");
        let log = std::fs::File::create(root.join("dockerd.log"))?;
        let child = std::process::Command::new(dockerd)
            .arg(format!("--host=unix://{}", socket.display()))
            .arg(format!("--data-root={}", root.join("data").display()))
            .arg(format!("--exec-root={}", root.join("exec").display()))
            .arg(format!("--pidfile={}", root.join("dockerd.pid").display()))
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--storage-driver=vfs",
            ])
            .args(network)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd")?;
        let daemon = Self {
            child,
            host: format!("unix://{}", socket.display()),
            root,
            bridge,
        };
        let ready = eventually(
            "dockerd answers on its socket",
            Duration::from_secs(30),
            || async {
                Ok(tokio::net::UnixStream::connect(&socket)
                    .await
                    .ok()
                    .map(drop))
            },
        )
        .await;
        if let Err(error) = ready {
            let log = std::fs::read_to_string(daemon.root.join("dockerd.log")).unwrap_or_default();
            bail!("{error}; dockerd log:\n{log}");
        }
        Ok(daemon)
    }
}

impl Drop for DockerDaemon {
    fn drop(&mut self) {
        if self.bridge.is_some() {
            // Containers and networks first: a network's bridge outlives the daemon.
            let _ = std::process::Command::new("sh")
                .args([
                    "-c",
                    "docker ps -aq | xargs -r docker rm -f; docker network prune -f",
                ])
                .env("DOCKER_HOST", &self.host)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
        if let Some(bridge) = &self.bridge {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", bridge])
                .status();
            // Our daemon's second socket (dockerd leaves it behind when killed), or an empty
            // directory Docker made for Cargo's mount.
            let host_socket = Path::new(HOST_DOCKER_SOCKET);
            if host_socket.is_dir() {
                let _ = std::fs::remove_dir(host_socket);
            } else if host_socket.exists() {
                let _ = std::fs::remove_file(host_socket);
            }
        }
    }
}

// ---- GefyraClient helpers shared by the tests ----

pub const WAIT: Duration = Duration::from_secs(60);

/// Exactly the body Gefyra's CLI sends.
pub fn gefyra_cli_body(name: &str, namespace: &str) -> serde_json::Value {
    json!({"apiVersion":"gefyra.dev/v1","kind":"gefyraclient",
        "metadata":{"name":name,"namespace":namespace},"provider":"stowaway","status":{}})
}

pub fn dynamic_api(client: Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gefyra.dev", "v1", "gefyraclient"),
        "gefyraclients",
    );
    Api::namespaced_with(client, namespace, &resource)
}

pub async fn create_client(client: Client, namespace: &str, name: &str) -> Result<()> {
    let object: DynamicObject = serde_json::from_value(gefyra_cli_body(name, namespace))?;
    dynamic_api(client, namespace)
        .create(&PostParams::default(), &object)
        .await?;
    Ok(())
}

pub async fn wait_for_state(
    api: &Api<GefyraClient>,
    name: &str,
    state: ClientState,
) -> Result<GefyraClient> {
    eventually(&format!("client {name} reaches {state}"), WAIT, || async {
        let client = api.get(name).await?;
        Ok((client.state == state).then_some(client))
    })
    .await
}

/// WAITING with a `Ready=True` condition that describes the object's current generation.
pub async fn wait_for_ready(api: &Api<GefyraClient>, name: &str) -> Result<GefyraClient> {
    eventually(
        &format!("client {name} is WAITING and Ready"),
        WAIT,
        || async {
            let client = api.get(name).await?;
            let ready = client.ready_condition().is_some_and(|ready| {
                ready.status == "True" && ready.observed_generation == client.metadata.generation
            });
            Ok((client.state == ClientState::Waiting && ready).then_some(client))
        },
    )
    .await
}

pub async fn wait_gone<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(&format!("{name} is gone"), WAIT, || async {
        Ok(api.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

pub fn token_of(client: &GefyraClient) -> Result<String> {
    let data = client
        .service_account_data
        .as_ref()
        .context("serviceAccountData is set")?;
    let token = base64::engine::general_purpose::STANDARD.decode(&data.token)?;
    Ok(String::from_utf8(token)?)
}
