//! `kubectl gefyra clients ...`: the admin's commands. They create, read, patch and delete
//! GefyraClient resources; everything else is the operator's work.

use std::time::Duration;

use base64::Engine;
use futures::future::join_all;
use gefyra_api::client_file::{ClientFile, TOKEN_MINTER};
use gefyra_api::{ClientState, GefyraClient};
use indicatif::{ProgressBar, ProgressStyle};
use k8s_openapi::api::core::v1::{Event, Node, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use crate::args::{
    ConfigArgs, CreateArgs, DeleteArgs, DryRun, InspectArgs, ListArgs, ManifestFormat, OutputFormat,
};
use crate::cluster::{Admin, request_token};
use crate::error::{CliError, Kind, Result};
use crate::files::write_private;
use crate::render::{ClientRow, Inspection, TableView, client_list, printable};
use crate::wait::{self, Goal};

/// Stowaway's Service and its WireGuard port, as Gefyra names them.
pub const STOWAWAY_SERVICE: &str = "gefyra-stowaway-wireguard";
pub const WIREGUARD_PORT_NAME: &str = "gefyra-wireguard";
pub const DEFAULT_WIREGUARD_PORT: u16 = 31820;

fn not_found(name: &str, namespace: &str) -> impl Fn(kube::Error) -> CliError {
    let what = format!("GefyraClient {name} in namespace {namespace}");
    move |error| match &error {
        kube::Error::Api(status) if status.code == 404 => CliError::new(
            Kind::NotFound,
            format!("{what} does not exist (`kubectl gefyra clients list` shows the clients)"),
        ),
        _ => CliError::kube(&format!("reading {what}"), error),
    }
}

/// A random ID as Gefyra makes them: 32 hex characters (a UUID v4 without dashes).
pub fn random_client_id() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The IDs `create` uses: the one asked for, or `-n` random ones.
fn client_ids(args: &CreateArgs) -> Result<Vec<String>> {
    if args.client_id.is_some() && args.quantity > 1 {
        return Err(CliError::new(
            Kind::Usage,
            "--client-id names one client; leave it out to create -n N clients with random IDs",
        ));
    }
    Ok(match &args.client_id {
        Some(id) => vec![id.clone()],
        None => (0..args.quantity).map(|_| random_client_id()).collect(),
    })
}

/// The GefyraClients `create` makes: Gefyra's body, plus the labels, sunset and maximum
/// connection age asked for.
pub fn desired_clients(
    ids: &[String],
    namespace: &str,
    args: &CreateArgs,
    now: jiff::Timestamp,
) -> Result<Vec<GefyraClient>> {
    let sunset = args
        .sunset
        .map(|sunset| sunset.at(now))
        .transpose()
        .map_err(|problem| CliError::new(Kind::Usage, problem))?;
    let max_connection_age = args
        .max_connection_age
        .map(|age| i64::try_from(age.as_secs()))
        .transpose()
        .map_err(|_| CliError::new(Kind::Usage, "--max-connection-age is too long"))?;
    let labels: std::collections::BTreeMap<String, String> = args.labels.iter().cloned().collect();
    Ok(ids
        .iter()
        .map(|id| {
            let mut client = GefyraClient::new(id, namespace);
            if !labels.is_empty() {
                client.metadata.labels = Some(labels.clone());
            }
            client.sunset = sunset.clone();
            client.max_connection_age = max_connection_age;
            client
        })
        .collect())
}

/// GefyraClients as manifests (one object, or a `List` as kubectl prints several), without
/// the operator's `state`: applied from Git, it would reset the client on every sync.
pub fn manifests(clients: &[GefyraClient], format: ManifestFormat) -> String {
    if format == ManifestFormat::Name {
        return clients
            .iter()
            .map(|client| {
                format!(
                    "gefyraclient.gefyra.dev/{}\n",
                    printable(&client.name_any())
                )
            })
            .collect();
    }
    let mut objects: Vec<Value> = clients
        .iter()
        .map(|client| {
            let mut object = serde_json::to_value(client).expect("a GefyraClient serializes");
            if let Some(map) = object.as_object_mut() {
                map.remove("state");
                if let Some(metadata) = map.get_mut("metadata").and_then(Value::as_object_mut) {
                    for server_side in ["uid", "resourceVersion", "generation", "managedFields"] {
                        metadata.remove(server_side);
                    }
                }
            }
            object
        })
        .collect();
    let value = if objects.len() == 1 {
        objects.remove(0)
    } else {
        json!({"apiVersion": "v1", "kind": "List", "items": objects})
    };
    match format {
        ManifestFormat::Yaml => serde_saphyr::to_string(&value).expect("a manifest serializes"),
        _ => serde_json::to_string_pretty(&value).expect("a manifest serializes") + "\n",
    }
}

/// `create --dry-run=client`: the clients, printed; the API server is not contacted.
pub fn create_offline(namespace: &str, args: &CreateArgs) -> Result<()> {
    let ids = client_ids(args)?;
    let clients = desired_clients(&ids, namespace, args, jiff::Timestamp::now())?;
    print_created(&clients, args.output);
    eprintln!(
        "{} client(s) not created (dry run: nothing was sent to the API server)",
        clients.len()
    );
    Ok(())
}

/// The IDs on stdout (one a line, for scripts), or the objects as `-o` asks.
fn print_created(clients: &[GefyraClient], output: Option<ManifestFormat>) {
    match output {
        Some(format) => print!("{}", manifests(clients, format)),
        None => {
            for client in clients {
                println!("{}", printable(&client.name_any()));
            }
        }
    }
}

pub async fn create(admin: &Admin, args: &CreateArgs) -> Result<()> {
    let ids = client_ids(args)?;
    let desired = desired_clients(&ids, &admin.namespace, args, jiff::Timestamp::now())?;
    let api = admin.clients();
    let dry_run = args.dry_run == Some(DryRun::Server);
    let params = PostParams {
        dry_run,
        ..PostParams::default()
    };
    let mut created = Vec::with_capacity(desired.len());
    for client in &desired {
        let id = client.name_any();
        let stored = api.create(&params, client).await.map_err(|error| match &error {
            kube::Error::Api(status) if status.code == 409 => CliError::new(
                Kind::Conflict,
                format!(
                    "GefyraClient {id} already exists in namespace {}: choose another --client-id, or delete it first",
                    admin.namespace
                ),
            ),
            kube::Error::Api(status) if status.code == 404 => CliError::new(
                Kind::NotFound,
                format!(
                    "cannot create GefyraClient {id}: {} (is Gefyra installed, does namespace {} exist?)",
                    status.message, admin.namespace
                ),
            ),
            _ => CliError::kube(&format!("creating GefyraClient {id}"), error),
        })?;
        if args.output.is_none() {
            println!("{id}");
        }
        created.push(stored);
    }
    if let Some(format) = args.output {
        print!("{}", manifests(&created, format));
    }
    if dry_run {
        eprintln!(
            "{} client(s) accepted by the API server and not created (dry run)",
            created.len()
        );
        return Ok(());
    }
    if !args.nowait {
        let progress = ProgressBar::new(ids.len() as u64).with_style(
            ProgressStyle::with_template(
                "{spinner} waiting for the credentials {bar:30} {pos}/{len} ({elapsed})",
            )
            .expect("a valid progress template"),
        );
        progress.enable_steady_tick(Duration::from_millis(120));
        let goal = Goal {
            description: "WAITING (credentials ready)",
            timeout: args.timeout,
            stale_version: None,
        };
        let waits = ids.iter().map(|id| {
            let (api, goal, progress) = (&api, &goal, &progress);
            async move {
                let result =
                    wait::until(api, id, goal, |client| client.state == ClientState::Waiting).await;
                progress.inc(1);
                result
            }
        });
        let results = join_all(waits).await;
        progress.finish_and_clear();
        if let Some(error) = results.into_iter().find_map(Result::err) {
            return Err(error);
        }
    }
    eprintln!("{} client(s) created successfully", ids.len());
    Ok(())
}

/// The clients (whose labels match `selector`, if given), oldest first.
pub async fn all_clients(admin: &Admin, selector: Option<&str>) -> Result<Vec<GefyraClient>> {
    let params = match selector {
        Some(selector) => ListParams::default().labels(selector),
        None => ListParams::default(),
    };
    let mut clients = admin
        .clients()
        .list(&params)
        .await
        .map_err(|error| {
            CliError::kube(
                &format!("listing GefyraClients in namespace {}", admin.namespace),
                error,
            )
        })?
        .items;
    clients.sort_by(|a, b| {
        (
            a.metadata.creation_timestamp.as_ref().map(|t| t.0),
            a.name_any(),
        )
            .cmp(&(
                b.metadata.creation_timestamp.as_ref().map(|t| t.0),
                b.name_any(),
            ))
    });
    Ok(clients)
}

pub async fn list(admin: &Admin, args: &ListArgs) -> Result<()> {
    let rows: Vec<ClientRow> = all_clients(admin, args.selector.as_deref())
        .await?
        .iter()
        .map(ClientRow::of)
        .collect();
    let tabular = matches!(args.output, OutputFormat::Table | OutputFormat::Wide);
    if rows.is_empty() && tabular {
        let matching = args
            .selector
            .as_deref()
            .map(|selector| format!(" matching {selector}"))
            .unwrap_or_default();
        eprintln!(
            "No GefyraClients{matching} found in namespace {}",
            admin.namespace
        );
        return Ok(());
    }
    let view = TableView {
        headers: !args.no_headers,
        ..TableView::now()
    };
    print!("{}", client_list(&rows, args.output, view));
    Ok(())
}

pub async fn inspect(admin: &Admin, args: &InspectArgs) -> Result<()> {
    let client = admin
        .clients()
        .get(&args.client_id)
        .await
        .map_err(not_found(&args.client_id, &admin.namespace))?;
    // Events are a courtesy: an admin who may not read them still sees the client.
    let events: Option<Vec<Event>> = match &client.metadata.uid {
        Some(uid) => Api::<Event>::namespaced(admin.client.clone(), &admin.namespace)
            .list(&ListParams::default().fields(&format!("involvedObject.uid={uid}")))
            .await
            .ok()
            .map(|list| list.items),
        None => None,
    };
    print!(
        "{}",
        Inspection::of(&client, events.as_deref()).render(args.output)
    );
    Ok(())
}

/// Where clients reach Stowaway, read from its Service: a LoadBalancer's ingress, else a
/// node's ExternalIP with the NodePort.
async fn stowaway_endpoint(admin: &Admin, port: Option<u16>) -> Result<String> {
    let pass_host = "pass --host with the address clients reach Stowaway at";
    let services: Api<Service> = Api::namespaced(admin.client.clone(), &admin.namespace);
    let service = services.get(STOWAWAY_SERVICE).await.map_err(|error| match &error {
        kube::Error::Api(status) if status.code == 404 => CliError::new(
            Kind::NotFound,
            format!(
                "there is no Service {STOWAWAY_SERVICE} in namespace {} to find Stowaway's address: {pass_host}",
                admin.namespace
            ),
        ),
        _ => CliError::kube(&format!("reading Service {STOWAWAY_SERVICE} ({pass_host})"), error),
    })?;
    let spec = service.spec.unwrap_or_default();
    let service_port = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|candidate| candidate.name.as_deref() == Some(WIREGUARD_PORT_NAME));
    if spec.type_.as_deref() == Some("LoadBalancer") {
        let ingress = service
            .status
            .and_then(|status| status.load_balancer)
            .and_then(|balancer| balancer.ingress)
            .and_then(|ingress| ingress.into_iter().next())
            .and_then(|ingress| ingress.hostname.or(ingress.ip))
            .ok_or_else(|| {
                CliError::new(
                    Kind::NotFound,
                    format!("the LoadBalancer Service {STOWAWAY_SERVICE} has no ingress address yet: wait, or {pass_host}"),
                )
            })?;
        let port = port
            .or(service_port.map(|service_port| service_port.port as u16))
            .unwrap_or(DEFAULT_WIREGUARD_PORT);
        return Ok(format!("{}:{port}", bracket(&ingress)));
    }
    let nodes: Api<Node> = Api::all(admin.client.clone());
    let nodes = nodes.list(&ListParams::default()).await.map_err(|error| {
        CliError::kube(
            &format!("listing Nodes to find Stowaway's NodePort address ({pass_host})"),
            error,
        )
    })?;
    let address = nodes
        .items
        .iter()
        .flat_map(|node| node.status.iter().flat_map(|status| status.addresses.iter().flatten()))
        .find(|address| address.type_ == "ExternalIP")
        .map(|address| address.address.clone())
        .ok_or_else(|| {
            CliError::new(
                Kind::NotFound,
                format!("no Node has an ExternalIP for the NodePort Service {STOWAWAY_SERVICE}: {pass_host}"),
            )
        })?;
    let port = port
        .or(service_port
            .and_then(|service_port| service_port.node_port)
            .map(|port| port as u16))
        .unwrap_or(DEFAULT_WIREGUARD_PORT);
    Ok(format!("{}:{port}", bracket(&address)))
}

/// IPv6 literals need brackets in `host:port`.
fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

pub async fn config(admin: &Admin, args: &ConfigArgs) -> Result<()> {
    let client = admin
        .clients()
        .get(&args.client_id)
        .await
        .map_err(not_found(&args.client_id, &admin.namespace))?;
    let Some(data) = client.service_account_data.clone() else {
        return Err(CliError::new(
            Kind::Conflict,
            format!(
                "GefyraClient {} has no credentials yet (state {}): wait until it is WAITING",
                args.client_id, client.state
            ),
        ));
    };
    let (token, credential) = if args.short_lived {
        let minted = mint_minter_token(admin, &client, args.minter_lifetime).await?;
        (
            base64::engine::general_purpose::STANDARD.encode(minted),
            Some(TOKEN_MINTER.to_string()),
        )
    } else {
        (data.token, None)
    };
    let gefyra_server = match &args.host {
        Some(host) => format!(
            "{}:{}",
            bracket(host),
            args.port.unwrap_or(DEFAULT_WIREGUARD_PORT)
        ),
        None => stowaway_endpoint(admin, args.port).await?,
    };
    let file = ClientFile {
        client_id: client.name_any(),
        kubernetes_server: args
            .kubernetes_api
            .clone()
            .unwrap_or_else(|| admin.server.clone()),
        provider: "stowaway".into(),
        namespace: client
            .namespace()
            .unwrap_or_else(|| admin.namespace.clone()),
        gefyra_server,
        token: Some(token),
        ca_crt: Some(data.ca_crt),
        registry: args.registry.clone(),
        wireguard_mtu: args.mtu.map(|mtu| mtu.to_string()),
        credential,
    };
    let json = file.to_gefyra_json();
    match &args.output {
        Some(path) => {
            write_private(path, json.as_bytes())?;
            eprintln!(
                "Client file for {} written to {} (mode 0600)",
                args.client_id,
                path.display()
            );
        }
        None => println!("{json}"),
    }
    Ok(())
}

/// A token for the client's token minter (TokenRequest by the admin): valid until the
/// client's sunset, else `lifetime` (default 365 days).
async fn mint_minter_token(
    admin: &Admin,
    client: &GefyraClient,
    lifetime: Option<u64>,
) -> Result<String> {
    let id = client.name_any();
    let minter = GefyraClient::token_minter_name_for(&id);
    let mut seconds = lifetime.unwrap_or(365 * 24 * 3600) as i64;
    if let Some(sunset) = client
        .sunset
        .as_deref()
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
    {
        seconds = seconds
            .min(sunset.as_second() - jiff::Timestamp::now().as_second())
            .max(600);
    }
    let minted = request_token(admin.client.clone(), &admin.namespace, &minter, seconds)
        .await
        .map_err(|error| match &error {
            kube::Error::Api(status) if status.code == 404 => CliError::new(
                Kind::NotFound,
                format!("GefyraClient {id} has no token minter ({minter}) yet: is the operator up to date and running?"),
            ),
            _ => CliError::kube(&format!("minting a token for {minter}"), error),
        })?;
    minted.map(|(token, _)| token).ok_or_else(|| {
        CliError::new(
            Kind::Failed,
            format!("the TokenRequest for {minter} returned no token"),
        )
    })
}

pub async fn disconnect(admin: &Admin, id: &str) -> Result<()> {
    let api = admin.clients();
    let client = api.get(id).await.map_err(not_found(id, &admin.namespace))?;
    if client.provider_parameter.is_none() {
        println!(
            "GefyraClient {id} is not connected (state {})",
            client.state
        );
        return Ok(());
    }
    api.patch(
        id,
        &PatchParams::default(),
        &Patch::Merge(json!({"providerParameter": null})),
    )
    .await
    .map_err(|error| CliError::kube(&format!("disconnecting GefyraClient {id}"), error))?;
    println!("GefyraClient {id} marked for disconnection");
    Ok(())
}

pub async fn delete(admin: &Admin, args: &DeleteArgs) -> Result<()> {
    let api = admin.clients();
    let ids: Vec<String> = match &args.selector {
        Some(selector) => {
            let ids: Vec<String> = all_clients(admin, Some(selector))
                .await?
                .iter()
                .map(ResourceExt::name_any)
                .collect();
            if ids.is_empty() {
                eprintln!(
                    "No GefyraClients matching {selector} found in namespace {}",
                    admin.namespace
                );
            }
            ids
        }
        None => args.client_ids.clone(),
    };
    let mut first_error = None;
    let mut deleted = Vec::new();
    for id in &ids {
        match api.delete(id, &DeleteParams::default()).await {
            Ok(_) => {
                println!("Client {id} marked for deletion");
                deleted.push(id);
            }
            Err(error) => {
                let error = not_found(id, &admin.namespace)(error);
                eprintln!("{}", error.render(false));
                first_error.get_or_insert(error);
            }
        }
    }
    if !args.nowait {
        let results = join_all(
            deleted
                .iter()
                .map(|id| wait::until_gone(&api, id, args.timeout)),
        )
        .await;
        for error in results.into_iter().filter_map(Result::err) {
            eprintln!("{}", error.render(false));
            first_error.get_or_insert(error);
        }
    }
    match first_error {
        // Each error was printed where it happened; the exit code is the first one's.
        Some(error) => Err(CliError {
            message: String::new(),
            ..error
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_look_like_gefyras() {
        let id = random_client_id();
        assert_eq!(id.len(), 32);
        assert!(
            id.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(&id[12..13], "4", "a UUID v4: {id}");
        assert_ne!(random_client_id(), id);
    }

    fn create_args(words: &[&str]) -> CreateArgs {
        use clap::Parser;
        let mut argv = vec!["kubectl-gefyra", "clients", "create"];
        argv.extend_from_slice(words);
        match crate::args::Cli::parse_from(argv).command {
            crate::args::Command::Clients(crate::args::ClientsCommand::Create(args)) => args,
            _ => unreachable!("a create command"),
        }
    }

    #[test]
    fn created_clients_carry_labels_sunset_and_connection_age() {
        let args = create_args(&[
            "--client-id",
            "anna",
            "--sunset",
            "8h",
            "--max-connection-age",
            "90m",
            "--label",
            "team=a",
            "--label",
            "example.com/owner=anna",
        ]);
        let now: jiff::Timestamp = "2026-12-07T15:00:00.5Z".parse().unwrap();
        let ids = client_ids(&args).unwrap();
        let clients = desired_clients(&ids, "gefyra", &args, now).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&manifests(&clients, ManifestFormat::Json)).unwrap(),
            json!({
                "apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
                "metadata": {"name": "anna", "namespace": "gefyra",
                    "labels": {"example.com/owner": "anna", "team": "a"}},
                "provider": "stowaway",
                "sunset": "2026-12-07T23:00:00Z",
                "maxConnectionAge": 5400
            })
        );
        let yaml = manifests(&clients, ManifestFormat::Yaml);
        let parsed: Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(parsed["metadata"]["name"], "anna");
        assert!(!yaml.contains("state"), "{yaml}");
    }

    #[test]
    fn several_clients_are_a_list_as_kubectl_prints_them() {
        let args = create_args(&["-n", "3"]);
        let ids = client_ids(&args).unwrap();
        let clients = desired_clients(&ids, "team", &args, jiff::Timestamp::now()).unwrap();
        let list: Value = serde_json::from_str(&manifests(&clients, ManifestFormat::Json)).unwrap();
        assert_eq!(list["kind"], "List");
        assert_eq!(list["items"].as_array().unwrap().len(), 3);
        assert_eq!(list["items"][2]["metadata"]["namespace"], "team");
        assert_eq!(
            list["items"][0],
            json!({
                "apiVersion": "gefyra.dev/v1", "kind": "gefyraclient",
                "metadata": {"name": ids[0], "namespace": "team"}, "provider": "stowaway"
            }),
            "Gefyra's body, nothing else"
        );
        assert_eq!(
            manifests(&clients[..1], ManifestFormat::Name),
            format!("gefyraclient.gefyra.dev/{}\n", ids[0])
        );
        let both = create_args(&["--client-id", "a", "-n", "2"]);
        assert_eq!(client_ids(&both).unwrap_err().kind, Kind::Usage);
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(bracket("2001:db8::1"), "[2001:db8::1]");
        assert_eq!(bracket("[2001:db8::1]"), "[2001:db8::1]");
        assert_eq!(bracket("stowaway.example"), "stowaway.example");
    }
}
