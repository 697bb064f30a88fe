//! `kubectl gefyra connect -f` / `disconnect -f`: the developer's side, with nothing but the
//! client file's credentials. The WireGuard private key is generated here and only written
//! to the local configuration file; the operator receives the public key.

use std::path::PathBuf;
use std::time::Duration;

use gefyra_api::connection::{
    ContractError, ProviderConfig, ProviderParameter, WireGuardKey, format_allowed_ips,
};
use gefyra_api::wireguard::{ConfigFormat, TunnelConfig, generate_key_pair};
use gefyra_api::{ClientState, GefyraClient};
use ipnet::IpNet;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use crate::args::{ConnectArgs, FileArgs, TunnelFormat};
use crate::cluster::{as_file_client, read_client_file};
use crate::error::{CliError, Kind, Result};
use crate::files::write_private;
use crate::tunnel::{self, Dns, LocalTunnel};
use crate::wait::{self, Goal};

/// Reads the client's own GefyraClient, explaining a refusal in terms of the client file.
pub(crate) async fn own_client(api: &Api<GefyraClient>, id: &str) -> Result<GefyraClient> {
    api.get(id).await.map_err(|error| match &error {
        kube::Error::Api(status) if matches!(status.code, 401 | 403 | 404) => CliError::new(
            if status.code == 404 { Kind::NotFound } else { Kind::Forbidden },
            format!(
                "GefyraClient {id} does not exist or the client file is stale (the API server answered {}): ask your Gefyra admin for a new client file",
                status.code
            ),
        )
        .with_detail(&error),
        _ => CliError::kube(&format!("reading GefyraClient {id}"), error),
    })
}

/// Waits while the operator is busy with the client (creating, connecting, disconnecting).
async fn settled(api: &Api<GefyraClient>, id: &str, timeout: Duration) -> Result<GefyraClient> {
    let client = own_client(api, id).await?;
    match client.state {
        ClientState::Waiting | ClientState::Active | ClientState::Error => Ok(client),
        ClientState::Terminating => Err(CliError::new(
            Kind::Conflict,
            format!(
                "GefyraClient {id} is being deleted: ask your Gefyra admin for a new client file"
            ),
        )),
        _ => {
            let goal = Goal {
                description: "WAITING, ACTIVE or ERROR",
                timeout,
                stale_version: client.metadata.resource_version.clone(),
            };
            wait::until(api, id, &goal, |client| {
                matches!(
                    client.state,
                    ClientState::Waiting | ClientState::Active | ClientState::Error
                )
            })
            .await
        }
    }
}

/// The client's `providerConfig`, if it parses; the error names the bad field.
fn provider_config(client: &GefyraClient) -> Option<Result<ProviderConfig, ContractError>> {
    client.provider_config.as_ref().map(ProviderConfig::parse)
}

/// A client connected with a key of this machine's making: what either way of bringing
/// the tunnel up needs.
pub(crate) struct Activated {
    pub api: Api<GefyraClient>,
    pub id: String,
    pub private_key: WireGuardKey,
    pub public_key: WireGuardKey,
    pub config: ProviderConfig,
    /// Where the client file says Stowaway is.
    pub endpoint: gefyra_api::connection::Endpoint,
    pub mtu: Option<u16>,
}

/// Asks the operator to connect the client file's client with a new key pair and waits
/// until it is ACTIVE with it.
pub(crate) async fn activate(args: &ConnectArgs) -> Result<Activated> {
    let file = read_client_file(&args.file.file)?;
    let mtu = file
        .mtu()
        .map_err(|error| CliError::new(Kind::BadClientFile, error.to_string()))?;
    let api = as_file_client(&file).await?;
    let id = file.client_id.as_str();
    let timeout = args.file.timeout;
    let before = settled(&api, id, timeout).await?;

    let keys = generate_key_pair();
    let (public_key, private_key): (WireGuardKey, WireGuardKey) = (
        keys.public.parse().expect("a generated key"),
        keys.private.parse().expect("a generated key"),
    );
    let parameter = json!({
        "providerParameter": ProviderParameter {
            subnet: args.subnet,
            public_key: Some(public_key),
        }
        .to_map()
    });
    let patched = api
        .patch(id, &PatchParams::default(), &Patch::Merge(&parameter))
        .await
        .map_err(|error| CliError::kube(&format!("asking to connect GefyraClient {id}"), error))?;
    let goal = Goal {
        description: "ACTIVE with this machine's key",
        timeout,
        stale_version: if before.state == ClientState::Error {
            patched.metadata.resource_version.clone()
        } else {
            None
        },
    };
    // A providerConfig that does not parse ends the wait too: it is reported, not waited out.
    let active = wait::until(&api, id, &goal, |client| {
        client.state == ClientState::Active
            && match provider_config(client) {
                Some(Ok(config)) => config.public_key == public_key,
                Some(Err(_)) => true,
                None => false,
            }
    })
    .await?;
    // Every value that goes into the file is parsed (addresses, keys, host:port), so a
    // hostile providerConfig or client file cannot add a line that `wg-quick` would run.
    let config = provider_config(&active)
        .and_then(Result::ok)
        .ok_or_else(|| {
            let problem = provider_config(&active).and_then(Result::err).map_or_else(
                || "it has no providerConfig".to_string(),
                |error| error.to_string(),
            );
            CliError::new(
                Kind::Failed,
                format!("GefyraClient {id} is ACTIVE but {problem}; is the operator compatible?"),
            )
        })?;
    let endpoint = file
        .endpoint()
        .map_err(|error| CliError::new(Kind::BadClientFile, error.to_string()))?;
    Ok(Activated {
        id: id.to_string(),
        api,
        private_key,
        public_key,
        config,
        endpoint,
        mtu,
    })
}

pub async fn connect(args: &ConnectArgs) -> Result<()> {
    let activated = activate(args).await?;
    if args.userspace {
        return crate::userspace::run(args, activated).await;
    }
    let Activated {
        id,
        private_key,
        config,
        endpoint,
        mtu,
        ..
    } = activated;
    let id = id.as_str();
    let address = config.address;
    let prefix = if address.is_ipv6() { 128 } else { 32 };
    let routes = tunnel::routes(&args.allowed_ips, &config);
    if let Some(warning) = &routes.warning {
        eprintln!("warning: {warning}");
    }
    let dns = if tunnel::is_full_tunnel(&routes.nets) {
        Dns::Everything
    } else {
        Dns::ClusterDomain(args.cluster_domain.clone())
    };
    let local = LocalTunnel {
        tunnel: TunnelConfig {
            private_key,
            address: IpNet::new(address, prefix).expect("a host prefix is valid"),
            mtu,
            server_public_key: config.server_public_key,
            preshared_key: Some(config.preshared_key),
            // The client file says where this client reaches Stowaway, as in Gefyra.
            endpoint,
            allowed_ips: routes.nets.clone(),
        },
        dns,
    };
    let format = match args.format {
        TunnelFormat::WgQuick => ConfigFormat::WgQuick,
        TunnelFormat::Wg => ConfigFormat::Wg,
    };
    let path = args
        .wg_config
        .clone()
        .unwrap_or_else(|| default_config_path(id));
    if format == ConfigFormat::WgQuick
        && let Some(problem) = tunnel::wg_quick_problem(&path)
    {
        eprintln!("warning: {problem}");
    }
    write_private(&path, local.render(format).as_bytes())?;
    let tunnel_kind = if tunnel::is_full_tunnel(&routes.nets) {
        "a full tunnel: all traffic".to_string()
    } else {
        format!("a split tunnel: {}", format_allowed_ips(&routes.nets))
    };
    println!(
        "GefyraClient {id} is ACTIVE: tunnel address {address}, {tunnel_kind}; WireGuard configuration in {} (mode 0600)",
        path.display()
    );
    println!(
        "Bring the tunnel up with:\n  {}\nTake it down with:\n  {}",
        tunnel::bring_up(format, &path, address, &routes.nets),
        tunnel::take_down(format, &path),
    );
    Ok(())
}

/// `gefyra-<ID>.conf` with the ID cut to 8 characters: wg-quick names the interface after
/// the file, and interface names have at most 15.
pub fn default_config_path(id: &str) -> PathBuf {
    let short: String = id.chars().take(8).collect();
    PathBuf::from(format!("gefyra-{short}.conf"))
}

pub async fn disconnect(args: &FileArgs) -> Result<()> {
    let file = read_client_file(&args.file)?;
    let api = as_file_client(&file).await?;
    let id = file.client_id.as_str();
    let timeout = args.timeout;
    let client = settled(&api, id, timeout).await?;
    if client.provider_parameter.is_none() && client.state == ClientState::Waiting {
        println!("GefyraClient {id} is not connected (state WAITING)");
        return Ok(());
    }
    let patched = api
        .patch(
            id,
            &PatchParams::default(),
            &Patch::Merge(json!({"providerParameter": Value::Null})),
        )
        .await
        .map_err(|error| {
            CliError::kube(&format!("asking to disconnect GefyraClient {id}"), error)
        })?;
    let goal = Goal {
        description: "WAITING (disconnected)",
        timeout,
        stale_version: patched.metadata.resource_version.clone(),
    };
    wait::until(&api, id, &goal, |client| {
        client.state == ClientState::Waiting
    })
    .await?;
    let default = default_config_path(id);
    let take_down = if default.exists() {
        tunnel::take_down(ConfigFormat::WgQuick, &default)
    } else {
        "sudo wg-quick down <the file connect wrote>".to_string()
    };
    println!(
        "GefyraClient {id} is disconnected (state WAITING); take the tunnel down locally: {take_down}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_configs_name_a_valid_interface() {
        let path = default_config_path("0123456789abcdef0123456789abcdef");
        assert_eq!(path, PathBuf::from("gefyra-01234567.conf"));
        let interface = path.file_stem().unwrap().to_str().unwrap();
        assert!(interface.len() <= 15);
    }
}
