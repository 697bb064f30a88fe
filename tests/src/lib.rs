//! The harness for tests against the local control plane (`tests/controlplane.sh`).
//!
//! `make test` starts one control plane for the whole run and exports its admin
//! kubeconfig as `GEFYRA_KUBECONFIG`; every test gets its own fresh namespace from it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

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
        let kubeconfig = PathBuf::from(path);
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
        Ok(name)
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
