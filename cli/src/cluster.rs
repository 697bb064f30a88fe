//! Connections to the API server: the admin's (a kubeconfig) and a developer's (the
//! credentials of a client file, sent only to the server and CA the file names).

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use gefyra_api::GefyraClient;
use gefyra_api::client_file::ClientFile;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::config::{
    AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster,
    NamedContext,
};
use kube::{Api, Client, Config};

use crate::args::Global;
use crate::error::{CliError, Kind, Result, error_chain};

/// The admin's view: a client for the kubeconfig's cluster and that cluster's URL as the
/// kubeconfig spells it (what a client file records as `kubernetes_server`).
pub struct Admin {
    pub client: Client,
    pub server: String,
    pub namespace: String,
}

impl Admin {
    pub async fn connect(global: &Global) -> Result<Self> {
        let no_cluster = |what: String, error: &dyn std::error::Error| {
            CliError::new(Kind::NoCluster, what).with_detail(error_chain(error))
        };
        let kubeconfig = match &global.kubeconfig {
            Some(path) => Kubeconfig::read_from(path).map_err(|error| {
                no_cluster(
                    format!("cannot read the kubeconfig {}", path.display()),
                    &error,
                )
            })?,
            None => match Kubeconfig::read() {
                Ok(kubeconfig) => kubeconfig,
                Err(error) => {
                    // Inside a Pod, the ServiceAccount is the admin.
                    if let Ok(config) = Config::incluster() {
                        let server = config
                            .cluster_url
                            .to_string()
                            .trim_end_matches('/')
                            .to_string();
                        return Ok(Self {
                            client: client_for(config)?,
                            server,
                            namespace: global.namespace.clone(),
                        });
                    }
                    return Err(no_cluster(
                        "no kubeconfig found: set KUBECONFIG or pass --kubeconfig FILE".into(),
                        &error,
                    ));
                }
            },
        };
        let options = KubeConfigOptions {
            context: global.context.clone(),
            ..KubeConfigOptions::default()
        };
        let server = server_of(&kubeconfig, global.context.as_deref()).ok_or_else(|| {
            CliError::new(
                Kind::NoCluster,
                match &global.context {
                    Some(context) => format!("the kubeconfig has no context {context:?} with a cluster server"),
                    None => "the kubeconfig has no current context with a cluster server: pass --context".into(),
                },
            )
        })?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|error| no_cluster("the kubeconfig is not usable".into(), &error))?;
        Ok(Self {
            client: client_for(config)?,
            server,
            namespace: global.namespace.clone(),
        })
    }

    pub fn clients(&self) -> Api<GefyraClient> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

/// The `server` of the context's cluster, exactly as written in the kubeconfig.
fn server_of(kubeconfig: &Kubeconfig, context: Option<&str>) -> Option<String> {
    let context_name = context.or(kubeconfig.current_context.as_deref())?;
    let cluster_name = kubeconfig
        .contexts
        .iter()
        .find(|named| named.name == context_name)?
        .context
        .as_ref()?
        .cluster
        .clone();
    kubeconfig
        .clusters
        .iter()
        .find(|named| named.name == cluster_name)?
        .cluster
        .as_ref()?
        .server
        .clone()
}

fn client_for(config: Config) -> Result<Client> {
    Client::try_from(config).map_err(|error| {
        CliError::new(
            Kind::NoCluster,
            "cannot set up the connection to the API server",
        )
        .with_detail(error_chain(&error))
    })
}

/// A token minted with the TokenRequest API for ServiceAccount `account`, with the expiry
/// the API server granted. `Ok(None)`: the server answered without a token.
pub async fn request_token(
    client: Client,
    namespace: &str,
    account: &str,
    seconds: i64,
) -> std::result::Result<Option<(String, Option<jiff::Timestamp>)>, kube::Error> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(seconds),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let minted = Api::<ServiceAccount>::namespaced(client, namespace)
        .create_token_request(account, &PostParams::default(), &request)
        .await?;
    Ok(minted.status.and_then(|status| {
        let token = status.token.filter(|token| !token.is_empty())?;
        Some((token, status.expiration_timestamp.map(|time| time.0)))
    }))
}

/// Reads and checks a client file.
pub fn read_client_file(path: &Path) -> Result<ClientFile> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        CliError::new(
            Kind::BadClientFile,
            format!("cannot read the client file {}: {error}", path.display()),
        )
    })?;
    ClientFile::parse(&text).map_err(|error| {
        CliError::new(
            Kind::BadClientFile,
            format!("{} is not a usable client file: {error}", path.display()),
        )
    })
}

/// A client acting with the client file's own credentials, on its own GefyraClient.
pub async fn as_file_client(file: &ClientFile) -> Result<Api<GefyraClient>> {
    Ok(Api::namespaced(file_client(file).await?, &file.namespace))
}

/// A connection to the client file's server, trusting only its CA, authenticating with its
/// token.
pub async fn file_client(file: &ClientFile) -> Result<Client> {
    let credentials = file
        .credentials()
        .map_err(|error| CliError::new(Kind::BadClientFile, error.to_string()))?;
    let name = "gefyra".to_string();
    let kubeconfig = Kubeconfig {
        clusters: vec![NamedCluster {
            name: name.clone(),
            cluster: Some(Cluster {
                server: Some(file.kubernetes_server.clone()),
                certificate_authority_data: Some(STANDARD.encode(&credentials.ca_pem)),
                ..Cluster::default()
            }),
            other: Default::default(),
        }],
        auth_infos: vec![NamedAuthInfo {
            name: name.clone(),
            auth_info: Some(AuthInfo {
                token: Some(credentials.token.into()),
                ..AuthInfo::default()
            }),
            other: Default::default(),
        }],
        contexts: vec![NamedContext {
            name: name.clone(),
            context: Some(Context {
                cluster: name.clone(),
                user: Some(name.clone()),
                namespace: Some(file.namespace.clone()),
                ..Context::default()
            }),
            other: Default::default(),
        }],
        current_context: Some(name),
        ..Kubeconfig::default()
    };
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|error| {
            CliError::new(
                Kind::BadClientFile,
                "the client file's server or CA certificate is not usable",
            )
            .with_detail(error_chain(&error))
        })?;
    client_for(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_is_read_from_the_chosen_context() {
        let kubeconfig: Kubeconfig = serde_saphyr::from_str(
            r#"
clusters:
- name: a
  cluster: {server: "https://a.example:6443"}
- name: b
  cluster: {server: "https://b.example/"}
contexts:
- name: one
  context: {cluster: a, user: u}
- name: two
  context: {cluster: b, user: u}
current-context: one
users: [{name: u, user: {token: t}}]
"#,
        )
        .unwrap();
        assert_eq!(
            server_of(&kubeconfig, None).as_deref(),
            Some("https://a.example:6443")
        );
        assert_eq!(
            server_of(&kubeconfig, Some("two")).as_deref(),
            Some("https://b.example/")
        );
        assert_eq!(server_of(&kubeconfig, Some("three")), None);
    }
}
