//! The kubectl credential plugin: `kubeconfig -f` writes a kubeconfig whose user runs
//! `get-token -f`, which answers kubectl's ExecCredential request. For a short-lived client
//! file it mints a token for the client's ServiceAccount with the file's token-minter
//! credential and caches it; for a Gefyra-format file it hands out the file's token.
//! Credentials go only to the server and CA the client file names.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use gefyra_api::GefyraClient;
use gefyra_api::client_file::ClientFile;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::args::GetTokenArgs;
use crate::cluster::{file_client, read_client_file, request_token};
use crate::error::{CliError, Kind, Result};
use crate::files::write_private;

pub const EXEC_V1: &str = "client.authentication.k8s.io/v1";
pub const EXEC_V1BETA1: &str = "client.authentication.k8s.io/v1beta1";

/// What kubectl told the plugin (`KUBERNETES_EXEC_INFO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecInfo {
    pub api_version: String,
    /// The cluster kubectl will send the token to (with `provideClusterInfo: true`).
    pub server: Option<String>,
    pub certificate_authority_data: Option<String>,
}

/// Reads `KUBERNETES_EXEC_INFO`; without it (run by hand) the answer is v1.
pub fn parse_exec_info(text: Option<&str>) -> Result<ExecInfo> {
    let Some(text) = text.filter(|text| !text.trim().is_empty()) else {
        return Ok(ExecInfo {
            api_version: EXEC_V1.into(),
            server: None,
            certificate_authority_data: None,
        });
    };
    let info: Value = serde_json::from_str(text).map_err(|error| {
        CliError::new(
            Kind::Usage,
            format!("KUBERNETES_EXEC_INFO is not JSON: {error}"),
        )
    })?;
    let api_version = info["apiVersion"].as_str().unwrap_or(EXEC_V1).to_string();
    if api_version != EXEC_V1 && api_version != EXEC_V1BETA1 {
        return Err(CliError::new(
            Kind::Usage,
            format!(
                "kubectl asked for ExecCredential {api_version}; this plugin speaks {EXEC_V1} and {EXEC_V1BETA1}"
            ),
        ));
    }
    let cluster = &info["spec"]["cluster"];
    Ok(ExecInfo {
        api_version,
        server: cluster["server"].as_str().map(str::to_string),
        certificate_authority_data: cluster["certificate-authority-data"]
            .as_str()
            .map(str::to_string),
    })
}

/// The ExecCredential kubectl reads from stdout, in the version it asked for.
pub fn exec_credential(api_version: &str, token: &str, expires_at: Option<Timestamp>) -> String {
    let mut status = json!({ "token": token });
    if let Some(at) = expires_at {
        status["expirationTimestamp"] = json!(at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
    }
    let credential = json!({
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "status": status,
    });
    let mut text = serde_json::to_string_pretty(&credential).expect("JSON serializes");
    text.push('\n');
    text
}

/// Refuses to hand a token to a cluster that is not the client file's.
pub fn check_cluster(info: &ExecInfo, file: &ClientFile) -> Result<()> {
    let normalize = |url: &str| url.trim_end_matches('/').to_string();
    if let Some(server) = &info.server
        && normalize(server) != normalize(&file.kubernetes_server)
    {
        return Err(CliError::new(
            Kind::Forbidden,
            format!(
                "refusing to hand out credentials for {} to a kubeconfig whose server is {server}; write the kubeconfig with `kubectl gefyra kubeconfig -f FILE`",
                file.kubernetes_server
            ),
        ));
    }
    if let (Some(ca), Some(expected)) = (&info.certificate_authority_data, &file.ca_crt)
        && ca.trim() != expected.trim()
    {
        return Err(CliError::new(
            Kind::Forbidden,
            "refusing to hand out credentials: the kubeconfig's CA certificate is not the client file's",
        ));
    }
    Ok(())
}

/// A kubeconfig for `file` whose user is this program as a credential plugin.
pub fn kubeconfig_yaml(file: &ClientFile, command: &Path, client_file: &Path) -> String {
    let name = format!("gefyra-{}", file.client_id);
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": name,
            "cluster": {
                "server": file.kubernetes_server,
                "certificate-authority-data": file.ca_crt.as_deref().map(str::trim),
            }
        }],
        "users": [{
            "name": name,
            "user": {
                "exec": {
                    "apiVersion": EXEC_V1,
                    "command": command.display().to_string(),
                    "args": ["get-token", "--file", client_file.display().to_string()],
                    "interactiveMode": "Never",
                    "provideClusterInfo": true,
                    "installHint": "kubectl-gefyra (the Gefyra companion CLI) provides the credentials of this kubeconfig: install it, or write the kubeconfig again with `kubectl gefyra kubeconfig -f CLIENT_FILE`.",
                }
            }
        }],
        "contexts": [{
            "name": name,
            "context": { "cluster": name, "user": name, "namespace": file.namespace }
        }],
        "current-context": name,
    });
    serde_saphyr::to_string(&config).expect("YAML serializes")
}

pub async fn write_kubeconfig(path: &Path, output: Option<&Path>) -> Result<()> {
    let file = read_client_file(path)?;
    let failed =
        |what: &str, error: std::io::Error| CliError::new(Kind::Failed, format!("{what}: {error}"));
    let command =
        std::env::current_exe().map_err(|error| failed("finding this program's path", error))?;
    let client_file = std::path::absolute(path)
        .map_err(|error| failed("resolving the client file's path", error))?;
    let yaml = kubeconfig_yaml(&file, &command, &client_file);
    match output {
        Some(output) => {
            write_private(output, yaml.as_bytes())?;
            eprintln!(
                "Kubeconfig for GefyraClient {} written to {} (mode 0600){}",
                file.client_id,
                output.display(),
                if file.is_short_lived() {
                    "; tokens are short-lived"
                } else {
                    ""
                }
            );
        }
        None => print!("{yaml}"),
    }
    Ok(())
}

/// A cached token and when it was minted.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CachedToken {
    pub token: String,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

impl CachedToken {
    /// Reused only with a tenth of its lifetime (at least a minute) left.
    pub fn reusable(&self, now: Timestamp) -> bool {
        let lifetime = self.expires_at.duration_since(self.issued_at);
        let margin = (lifetime / 10).max(SignedDuration::from_secs(60));
        now + margin < self.expires_at
    }
}

/// `$KUBECACHEDIR/gefyra`, else `~/.kube/cache/gefyra`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KUBECACHEDIR").filter(|dir| !dir.is_empty()) {
        return Ok(PathBuf::from(dir).join("gefyra"));
    }
    let home = std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .ok_or_else(|| {
            CliError::new(
                Kind::Failed,
                "neither KUBECACHEDIR nor HOME is set: no place for the token cache",
            )
        })?;
    Ok(PathBuf::from(home).join(".kube/cache/gefyra"))
}

/// One cache entry per server, namespace and client: readable name plus a digest.
pub fn cache_key(file: &ClientFile) -> String {
    let identity = format!(
        "{}\n{}\n{}",
        file.kubernetes_server.trim_end_matches('/'),
        file.namespace,
        file.client_id
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, identity.as_bytes());
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let readable: String = file
        .client_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!("{readable}-{hex}")
}

fn io_failed(what: String) -> impl Fn(std::io::Error) -> CliError {
    move |error| CliError::new(Kind::Failed, format!("{what}: {error}"))
}

/// The cache directory, created `0700` (and tightened if it was not).
fn open_cache_dir() -> Result<PathBuf> {
    let dir = cache_dir()?;
    std::fs::create_dir_all(&dir).map_err(io_failed(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_failed(format!("restricting {}", dir.display())))?;
    Ok(dir)
}

/// Holds the exclusive lock of one cache entry (released when dropped).
struct EntryLock(File);

impl EntryLock {
    fn acquire(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(io_failed(format!(
                "opening the lock file {}",
                path.display()
            )))?;
        file.lock()
            .map_err(io_failed(format!("locking {}", path.display())))?;
        Ok(Self(file))
    }
}

impl Drop for EntryLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// A cache entry, if it is there and readable; a corrupt one is a miss.
fn read_entry(path: &Path) -> Option<CachedToken> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

async fn mint(file: &ClientFile, lifetime: u64) -> Result<CachedToken> {
    let client = file_client(file).await?;
    let account = GefyraClient::service_account_name_for(&file.client_id);
    let issued_at = Timestamp::now();
    let minted = request_token(client, &file.namespace, &account, lifetime as i64)
        .await
        .map_err(|error| match &error {
            kube::Error::Api(status) if matches!(status.code, 401 | 403 | 404) => CliError::new(
                Kind::Revoked,
                format!(
                    "the credentials of GefyraClient {} were revoked (the API server answered {}): the client was deleted or its client file expired; ask your Gefyra admin for a new client file",
                    file.client_id, status.code
                ),
            )
            .with_detail(&error),
            _ => CliError::kube(&format!("minting a token for {account}"), error),
        })?;
    let (token, expires_at) =
        minted.ok_or_else(|| CliError::new(Kind::Failed, "the TokenRequest returned no token"))?;
    Ok(CachedToken {
        token,
        issued_at,
        expires_at: expires_at
            .unwrap_or_else(|| issued_at + SignedDuration::from_secs(lifetime as i64)),
    })
}

pub async fn get_token(args: &GetTokenArgs) -> Result<()> {
    let file = read_client_file(&args.file)?;
    let info = parse_exec_info(std::env::var("KUBERNETES_EXEC_INFO").ok().as_deref())?;
    check_cluster(&info, &file)?;
    if !file.is_short_lived() {
        // Gefyra's format: the file's own token, valid until the client is deleted.
        let token = file
            .credentials()
            .map_err(|error| CliError::new(Kind::BadClientFile, error.to_string()))?
            .token;
        print!("{}", exec_credential(&info.api_version, &token, None));
        return Ok(());
    }
    let dir = open_cache_dir()?;
    let key = cache_key(&file);
    let entry_path = dir.join(format!("{key}.json"));
    // One minting at a time per entry: concurrent kubectl calls wait here, then reuse.
    let _lock = EntryLock::acquire(&dir.join(format!("{key}.lock")))?;
    if !args.force_refresh
        && let Some(cached) = read_entry(&entry_path)
        && cached.reusable(Timestamp::now())
    {
        print!(
            "{}",
            exec_credential(&info.api_version, &cached.token, Some(cached.expires_at))
        );
        return Ok(());
    }
    let minted = match mint(&file, args.lifetime).await {
        Ok(minted) => minted,
        Err(error) => {
            if error.kind == Kind::Revoked {
                let _ = std::fs::remove_file(&entry_path);
            }
            return Err(error);
        }
    };
    let text = serde_json::to_string(&minted).expect("JSON serializes");
    write_private(&entry_path, text.as_bytes())?;
    print!(
        "{}",
        exec_credential(&info.api_version, &minted.token, Some(minted.expires_at))
    );
    Ok(())
}

pub fn clear_cache(file: Option<&Path>) -> Result<()> {
    let dir = cache_dir()?;
    let prefix = match file {
        Some(path) => Some(cache_key(&read_client_file(path)?)),
        None => None,
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(io_failed(format!("reading {}", dir.display()))(error)),
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let ours = name.ends_with(".json") || name.ends_with(".lock");
        let matches = prefix
            .as_ref()
            .is_none_or(|key| name.starts_with(&format!("{key}.")));
        if ours && matches {
            std::fs::remove_file(entry.path()).map_err(io_failed(format!("removing {name}")))?;
            removed += usize::from(name.ends_with(".json"));
        }
    }
    eprintln!("{removed} cached token(s) removed from {}", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> ClientFile {
        ClientFile::parse(
            r#"{"client_id": "dev", "kubernetes_server": "https://127.0.0.1:6443", "provider": "stowaway",
            "namespace": "gefyra", "gefyra_server": "203.0.113.7:31820", "token": "dG9rZW4=",
            "ca_crt": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==", "registry": null, "wireguard_mtu": null,
            "credential": "token-minter"}"#,
        )
        .unwrap()
    }

    #[test]
    fn exec_info_defaults_to_v1_and_refuses_unknown_versions() {
        assert_eq!(parse_exec_info(None).unwrap().api_version, EXEC_V1);
        let beta = parse_exec_info(Some(
            r#"{"apiVersion":"client.authentication.k8s.io/v1beta1","kind":"ExecCredential","spec":{"interactive":false}}"#,
        ))
        .unwrap();
        assert_eq!(beta.api_version, EXEC_V1BETA1);
        assert!(
            parse_exec_info(Some(r#"{"apiVersion":"client.authentication.k8s.io/v2"}"#)).is_err()
        );
    }

    #[test]
    fn credentials_go_only_to_the_files_cluster() {
        let info = |server: &str, ca: Option<&str>| ExecInfo {
            api_version: EXEC_V1.into(),
            server: Some(server.into()),
            certificate_authority_data: ca.map(str::to_string),
        };
        check_cluster(&info("https://127.0.0.1:6443/", None), &file()).unwrap();
        check_cluster(
            &info(
                "https://127.0.0.1:6443",
                Some("LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="),
            ),
            &file(),
        )
        .unwrap();
        let other = check_cluster(&info("https://evil.example", None), &file()).unwrap_err();
        assert_eq!(other.kind, Kind::Forbidden);
        assert!(check_cluster(&info("https://127.0.0.1:6443", Some("b3RoZXI=")), &file()).is_err());
    }

    #[test]
    fn cached_tokens_are_reused_only_with_a_margin() {
        let issued_at: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let token = CachedToken {
            token: "t".into(),
            issued_at,
            expires_at: issued_at + SignedDuration::from_hours(1),
        };
        assert!(token.reusable(issued_at + SignedDuration::from_mins(50)));
        assert!(!token.reusable(issued_at + SignedDuration::from_mins(55)));
        assert!(!token.reusable(issued_at + SignedDuration::from_hours(2)));
    }

    #[test]
    fn cache_keys_differ_per_server_and_client_and_are_file_names() {
        let a = cache_key(&file());
        let mut other_server = file();
        other_server.kubernetes_server = "https://10.0.0.1:6443".into();
        let mut other_client = file();
        other_client.client_id = "../../etc".into();
        assert_ne!(a, cache_key(&other_server));
        let b = cache_key(&other_client);
        assert_ne!(a, b);
        assert!(!b.contains('/'), "{b}");
        assert!(a.starts_with("dev-"));
    }

    #[test]
    fn the_kubeconfig_runs_this_plugin_non_interactively() {
        let yaml = kubeconfig_yaml(
            &file(),
            Path::new("/usr/local/bin/kubectl-gefyra"),
            Path::new("/home/dev/client.json"),
        );
        let config: Value = serde_saphyr::from_str(&yaml).unwrap();
        let exec = &config["users"][0]["user"]["exec"];
        assert_eq!(exec["apiVersion"], EXEC_V1);
        assert_eq!(exec["interactiveMode"], "Never");
        assert_eq!(exec["provideClusterInfo"], true);
        assert_eq!(
            exec["args"],
            json!(["get-token", "--file", "/home/dev/client.json"])
        );
        assert!(
            exec["installHint"]
                .as_str()
                .unwrap()
                .contains("kubectl-gefyra")
        );
        assert_eq!(
            config["clusters"][0]["cluster"]["server"],
            "https://127.0.0.1:6443"
        );
        assert_eq!(config["contexts"][0]["context"]["namespace"], "gefyra");
        assert!(!yaml.contains("dG9rZW4="), "no token in the kubeconfig");
    }
}
