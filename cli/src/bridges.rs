//! `kubectl gefyra bridge ...`: the developer's bridges, with nothing but the client file's
//! credentials. A GefyraBridge sends a mount's traffic — every connection of its ports, or
//! the HTTP requests its rules match — through the client's tunnel to `destinationIP`, where
//! the developer's process listens. The operator checks and activates it; this only writes,
//! reads and deletes the client's own bridges.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use gefyra_api::ClientState;
use gefyra_api::bridge::{BRIDGE_KIND, BridgeFields, CLIENT_LABEL, MOUNT_LABEL, MountFields};
use gefyra_api::bridge_rules::{
    MAX_MATCHES_PER_RULE, MAX_PORT_MAPPINGS, PortMapping, Rules, port_mappings as port_mappings_of,
};
use gefyra_api::client::API_VERSION;
use gefyra_api::client_file::ClientFile;
use gefyra_api::connection::ProviderConfig;
use kube::api::{DeleteParams, DynamicObject, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::args::{BridgeCreateArgs, BridgeDeleteArgs, BridgeListArgs, OutputFormat};
use crate::bridging::{
    Goal, Progress, bridge_resource, mount_resource, name_part, random_suffix, refused, wait_error,
    watch,
};
use crate::cluster::{file_client, read_client_file};
use crate::error::{CliError, Kind, Result};
use crate::render::{ListRow, TableView, list as render_list, or_dash, printable};

/// How a rule entry compares (`type` on the wire; absent means exact).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchType {
    #[default]
    Exact,
    Prefix,
    Regex,
}

/// One entry of a rule, in carrier2's wire layout (`{"matchHeader": {..}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Match {
    #[serde(rename = "matchHeader")]
    Header {
        name: String,
        value: String,
        #[serde(rename = "type", default)]
        kind: MatchType,
    },
    #[serde(rename = "matchPath")]
    Path {
        path: String,
        #[serde(rename = "type", default)]
        kind: MatchType,
    },
}

/// One rule: all its entries must hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(rename = "match")]
    pub entries: Vec<Match>,
}

/// A bridge's `providerParameter`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderParameter {
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Match {
    /// The flag that writes this entry, as typed (for error messages).
    fn flag(&self) -> String {
        let (what, kind, text) = match self {
            Match::Header { name, value, kind } => ("header", kind, format!("{name}:{value}")),
            Match::Path { path, kind } => ("path", kind, path.clone()),
        };
        let kind = match kind {
            MatchType::Exact => "exact",
            MatchType::Prefix => "prefix",
            MatchType::Regex => "regex",
        };
        format!("--match-{what}-{kind} {text:?}")
    }

    /// A short form for the list: `x-gefyra=dev`, `x-gefyra^=dev` (prefix), `x-gefyra~dev.*`
    /// (regex); `path=/a`, `path^=/a`, `path~^/a`.
    fn summary(&self) -> String {
        let operator = |kind: &MatchType| match kind {
            MatchType::Exact => "=",
            MatchType::Prefix => "^=",
            MatchType::Regex => "~",
        };
        match self {
            Match::Header { name, value, kind } => format!("{name}{}{value}", operator(kind)),
            Match::Path { path, kind } => format!("path{}{path}", operator(kind)),
        }
    }
}

/// `NAME:VALUE` of a `--match-header-*` flag: the name is up to the first `:` (a header
/// name holds none), the value the rest.
pub fn parse_header_match(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!(
            "{text:?} is not NAME:VALUE (a header name, a colon, the value; e.g. x-gefyra:peer1)"
        )),
    }
}

/// `REMOTE:LOCAL` of `-p`, in Gefyra's order: the workload's container port, then the port
/// the developer's process listens on.
pub fn parse_port_mapping(text: &str) -> Result<PortMapping, String> {
    let port = |part: &str| {
        part.parse::<u16>()
            .ok()
            .filter(|port| *port != 0 && part.bytes().all(|b| b.is_ascii_digit()))
    };
    text.split_once(':')
        .and_then(|(remote, local)| {
            Some(PortMapping {
                remote: port(remote)?,
                local: port(local)?,
            })
        })
        .ok_or_else(|| {
            format!(
                "{text:?} is not REMOTE:LOCAL: the workload's container port, then the port your process listens on, both 1-65535 (e.g. -p 80:8080)"
            )
        })
}

/// The entries of the one rule Gefyra's CLI writes from its flags, in its order: headers
/// exact, regex, prefix, then paths exact, prefix, regex. All of them must hold.
pub fn matches_of(args: &BridgeCreateArgs) -> Vec<Match> {
    let headers = |pairs: &[(String, String)], kind: MatchType| {
        pairs
            .iter()
            .map(move |(name, value)| Match::Header {
                name: name.clone(),
                value: value.clone(),
                kind,
            })
            .collect::<Vec<_>>()
    };
    let paths = |paths: &[String], kind: MatchType| {
        paths
            .iter()
            .map(move |path| Match::Path {
                path: path.clone(),
                kind,
            })
            .collect::<Vec<_>>()
    };
    [
        headers(&args.match_header_exact, MatchType::Exact),
        headers(&args.match_header_regex, MatchType::Regex),
        headers(&args.match_header_prefix, MatchType::Prefix),
        paths(&args.match_path_exact, MatchType::Exact),
        paths(&args.match_path_prefix, MatchType::Prefix),
        paths(&args.match_path_regex, MatchType::Regex),
    ]
    .concat()
}

/// The `providerParameter` of `entries`: one rule holding them all, as Gefyra's CLI writes
/// it; none without entries (the bridge takes all traffic of its ports). Each entry is
/// checked as the operator will check it, and refused naming its flag.
pub fn provider_parameter(entries: &[Match]) -> Result<Option<ProviderParameter>> {
    if entries.is_empty() {
        return Ok(None);
    }
    if entries.len() > MAX_MATCHES_PER_RULE {
        return Err(CliError::new(
            Kind::Usage,
            format!(
                "{} --match-* flags: a bridge's rule holds at most {MAX_MATCHES_PER_RULE}",
                entries.len()
            ),
        ));
    }
    for entry in entries {
        let one = ProviderParameter {
            rules: vec![Rule {
                entries: vec![entry.clone()],
            }],
        };
        let value = serde_json::to_value(&one).expect("a rule serializes");
        Rules::compile(Some(&value)).map_err(|error| {
            CliError::new(
                Kind::Usage,
                format!("{}: {}", printable(&entry.flag()), error.problem()),
            )
        })?;
    }
    Ok(Some(ProviderParameter {
        rules: vec![Rule {
            entries: entries.to_vec(),
        }],
    }))
}

/// The port mappings, each container port once, as `portMappings` holds them
/// (`"<local>:<remote>"`).
pub fn port_mappings(mappings: &[PortMapping]) -> Result<Vec<String>> {
    if mappings.len() > MAX_PORT_MAPPINGS {
        return Err(CliError::new(
            Kind::Usage,
            format!(
                "{} -p mappings: a bridge holds at most {MAX_PORT_MAPPINGS}",
                mappings.len()
            ),
        ));
    }
    for (index, mapping) in mappings.iter().enumerate() {
        if let Some(earlier) = mappings[..index]
            .iter()
            .find(|earlier| earlier.remote == mapping.remote)
        {
            return Err(CliError::new(
                Kind::Usage,
                format!(
                    "-p {}:{} and -p {}:{} both bridge container port {}: one local port per container port",
                    earlier.remote, earlier.local, mapping.remote, mapping.local, mapping.remote
                ),
            ));
        }
    }
    Ok(mappings
        .iter()
        .map(|mapping| format!("{}:{}", mapping.local, mapping.remote))
        .collect())
}

/// The name Gefyra's CLI would choose: `<client>-<mount>-<5 random>`, cut to 63 characters.
pub fn default_name(client: &str, mount: &str, suffix: &str) -> String {
    let client = name_part(client, 25);
    let room = 63 - client.len() - suffix.len() - 2;
    format!("{client}-{}-{suffix}", name_part(mount, room))
}

/// What `bridge create` asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeRequest {
    pub name: String,
    pub namespace: String,
    pub client: String,
    pub mount: String,
    pub destination: Ipv4Addr,
    pub port_mappings: Vec<String>,
    pub provider_parameter: Option<ProviderParameter>,
}

impl BridgeRequest {
    /// The GefyraBridge in Gefyra 2.x's layout (what Gefyra's CLI writes, without its Docker
    /// container's label): the client's own, labelled so that it and its mount find it.
    pub fn body(&self) -> Value {
        let mut body = json!({
            "apiVersion": API_VERSION,
            "kind": BRIDGE_KIND,
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {MOUNT_LABEL: self.mount, CLIENT_LABEL: self.client},
            },
            "provider": "carrier2",
            "connectionProvider": "stowaway",
            "client": self.client,
            "destinationIP": self.destination.to_string(),
            "target": self.mount,
            "portMappings": self.port_mappings,
        });
        if let Some(parameter) = &self.provider_parameter {
            body["providerParameter"] =
                serde_json::to_value(parameter).expect("a providerParameter serializes");
        }
        body
    }
}

/// `80->8080, 443->8443`: container port to local port, the order of `-p`.
fn ports_summary(mappings: &[PortMapping]) -> String {
    mappings
        .iter()
        .map(|mapping| format!("{}->{}", mapping.remote, mapping.local))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What traffic a bridge takes: its rules (any holds; all entries of one), or all.
fn rules_summary(parameter: Option<&Value>) -> String {
    let parameter: Option<ProviderParameter> =
        parameter.and_then(|value| serde_json::from_value(value.clone()).ok());
    let rules = parameter
        .map(|parameter| parameter.rules)
        .unwrap_or_default();
    if rules.is_empty() {
        return "all traffic".to_string();
    }
    rules
        .iter()
        .map(|rule| {
            rule.entries
                .iter()
                .map(Match::summary)
                .collect::<Vec<_>>()
                .join(" & ")
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// One line of `bridge list`.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct BridgeRow {
    pub name: String,
    pub mount: String,
    /// `REMOTE->LOCAL`, the order of `-p`.
    pub ports: String,
    pub rules: String,
    pub destination: String,
    pub state: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub created: Option<String>,
}

impl BridgeRow {
    pub fn of(bridge: &DynamicObject) -> Self {
        let fields: BridgeFields = serde_json::from_value(bridge.data.clone()).unwrap_or_default();
        let progress = Progress::of(bridge);
        Self {
            name: bridge.name_any(),
            mount: fields.target.clone(),
            // Only what the operator would accept is shown.
            ports: ports_summary(&port_mappings_of(&fields.port_mappings).unwrap_or_default()),
            rules: rules_summary(fields.provider_parameter.as_ref()),
            destination: fields.destination_ip.clone(),
            state: progress.state().to_string(),
            reason: progress.status.reason,
            message: progress.status.message,
            created: bridge
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|time| time.0.to_string()),
        }
    }
}

impl ListRow for BridgeRow {
    const KIND: &'static str = BRIDGE_KIND;
    const COLUMNS: &'static [&'static str] =
        &["NAME", "MOUNT", "PORTS", "RULES", "STATE", "REASON"];
    /// Where the traffic goes, the age, the operator's message.
    const WIDE_COLUMNS: &'static [&'static str] = &["DESTINATION", "AGE", "MESSAGE"];

    fn name(&self) -> &str {
        &self.name
    }

    fn cells(&self, wide: bool, view: &TableView) -> Vec<String> {
        let mut cells = vec![
            self.name.clone(),
            self.mount.clone(),
            self.ports.clone(),
            self.rules.clone(),
            self.state.clone(),
            or_dash(&self.reason),
        ];
        if wide {
            cells.extend([
                self.destination.clone(),
                view.age(self.created.as_deref()),
                or_dash(&self.message),
            ]);
        }
        cells
    }
}

/// What a bridge routes where, for the developer: the mount (and its workload, when it could
/// be read), each container port to its local address, and which traffic.
pub fn routing(
    bridge: &BridgeRequest,
    mount: Option<&MountFields>,
    mappings: &[PortMapping],
) -> String {
    let workload = mount
        .filter(|mount| !mount.target.is_empty())
        .map(|mount| {
            format!(
                " ({} in namespace {})",
                mount.target, mount.target_namespace
            )
        })
        .unwrap_or_default();
    let mut text = format!("  mount:   {}{workload}\n", bridge.mount);
    for mapping in mappings {
        text.push_str(&format!(
            "  port:    {} -> {}:{}\n",
            mapping.remote, bridge.destination, mapping.local
        ));
    }
    let traffic = match &bridge.provider_parameter {
        None => "all traffic of these ports (any TCP)".to_string(),
        Some(parameter) => format!(
            "HTTP requests matching {}; the rest goes to the workload",
            rules_summary(Some(
                &serde_json::to_value(parameter).expect("a providerParameter serializes")
            ))
        ),
    };
    text.push_str(&format!("  traffic: {traffic}\n"));
    printable_lines(&text)
}

/// `text` with each line made printable (values come from the command line and the cluster).
fn printable_lines(text: &str) -> String {
    text.lines()
        .map(|line| format!("{}\n", printable(line)))
        .collect()
}

fn bridges_api(client: Client, file: &ClientFile) -> Api<DynamicObject> {
    Api::namespaced_with(client, &file.namespace, &bridge_resource())
}

/// The client's tunnel address, read with its own identity: where its bridges go unless
/// `--destination-ip` says otherwise.
async fn tunnel_address(client: Client, file: &ClientFile, path: &Path) -> Result<Ipv4Addr> {
    let id = file.client_id.as_str();
    let clients = Api::namespaced(client, &file.namespace);
    let own = crate::connect::own_client(&clients, id).await?;
    let config = own
        .provider_config
        .as_ref()
        .and_then(|config| ProviderConfig::parse(config).ok())
        .filter(|_| own.state == ClientState::Active);
    match config.map(|config| config.address) {
        Some(IpAddr::V4(address)) => Ok(address),
        Some(IpAddr::V6(address)) => Err(CliError::new(
            Kind::Conflict,
            format!(
                "GefyraClient {id}'s tunnel address {address} is IPv6 and a bridge's destinationIP is IPv4: pass --destination-ip"
            ),
        )),
        None => Err(CliError::new(
            Kind::Conflict,
            format!(
                "GefyraClient {id} is not connected (state {}): connect first with `kubectl gefyra connect -f {}`, then bridge",
                own.state,
                path.display()
            ),
        )),
    }
}

pub async fn create(args: &BridgeCreateArgs) -> Result<()> {
    let file = read_client_file(&args.file)?;
    let entries = matches_of(args);
    let provider_parameter = provider_parameter(&entries)?;
    let port_mappings = port_mappings(&args.ports)?;
    let client = file_client(&file).await?;
    let destination = match args.destination_ip {
        Some(address) => address,
        None => tunnel_address(client.clone(), &file, &args.file).await?,
    };
    let name = args
        .name
        .clone()
        .or_else(|| args.name_flag.clone())
        .unwrap_or_else(|| default_name(&file.client_id, &args.mount, &random_suffix()));
    let request = BridgeRequest {
        name: name.clone(),
        namespace: file.namespace.clone(),
        client: file.client_id.clone(),
        mount: args.mount.clone(),
        destination,
        port_mappings,
        provider_parameter,
    };
    let api = bridges_api(client.clone(), &file);
    let object: DynamicObject =
        serde_json::from_value(request.body()).expect("a bridge is a DynamicObject");
    create_admitted(&api, &object)
        .await
        .map_err(|error| refused(&format!("creating GefyraBridge {name}"), error))?;
    let file_arg = args.file.display().to_string();
    if args.no_wait {
        println!(
            "GefyraBridge {} created; not waiting for it to be ACTIVE (`kubectl gefyra bridge list -f {}` shows its state)",
            printable(&name),
            printable(&file_arg)
        );
        print!("{}", routing(&request, None, &args.ports));
        return Ok(());
    }
    let hint = format!(
        "the bridge stays: `kubectl gefyra bridge list -f {file_arg}` shows it, `kubectl gefyra bridge delete {name} -f {file_arg}` removes it"
    );
    if let Err(end) = watch(&api, &name, Goal::State("ACTIVE"), args.timeout).await? {
        return Err(wait_error(
            &format!("GefyraBridge {name}"),
            "ACTIVE",
            args.timeout,
            end,
            &hint,
        ));
    }
    // The mount's workload, for the report (a courtesy: the client may read mounts).
    let mount: Option<MountFields> =
        Api::<DynamicObject>::namespaced_with(client, &file.namespace, &mount_resource())
            .get_opt(&args.mount)
            .await
            .ok()
            .flatten()
            .and_then(|mount| serde_json::from_value(mount.data).ok());
    println!("GefyraBridge {} is ACTIVE:", printable(&name));
    print!("{}", routing(&request, mount.as_ref(), &args.ports));
    Ok(())
}

/// The client's own bridges (by label), oldest first.
async fn own_bridges(api: &Api<DynamicObject>, file: &ClientFile) -> Result<Vec<DynamicObject>> {
    let selector = format!("{CLIENT_LABEL}={}", file.client_id);
    let mut bridges = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|error| {
            CliError::kube(
                &format!("listing the GefyraBridges of client {}", file.client_id),
                error,
            )
        })?
        .items;
    bridges.sort_by_key(|bridge| {
        (
            bridge.metadata.creation_timestamp.as_ref().map(|t| t.0),
            bridge.name_any(),
        )
    });
    Ok(bridges)
}

pub async fn list(args: &BridgeListArgs) -> Result<()> {
    let file = read_client_file(&args.file)?;
    let api = bridges_api(file_client(&file).await?, &file);
    let rows: Vec<BridgeRow> = own_bridges(&api, &file)
        .await?
        .iter()
        .map(BridgeRow::of)
        .collect();
    if rows.is_empty() && matches!(args.output, OutputFormat::Table | OutputFormat::Wide) {
        eprintln!("No GefyraBridges of client {}", printable(&file.client_id));
        return Ok(());
    }
    let view = TableView {
        headers: !args.no_headers,
        ..TableView::now()
    };
    print!("{}", render_list(&rows, args.output, view));
    Ok(())
}

pub async fn delete(args: &BridgeDeleteArgs) -> Result<()> {
    let file = read_client_file(&args.file)?;
    let api = bridges_api(file_client(&file).await?, &file);
    let file_arg = args.file.display().to_string();
    let names: Vec<String> = match &args.name {
        Some(name) => vec![name.clone()],
        None => {
            let names: Vec<String> = own_bridges(&api, &file)
                .await?
                .iter()
                .map(ResourceExt::name_any)
                .collect();
            if names.is_empty() {
                eprintln!("No GefyraBridges of client {}", printable(&file.client_id));
            }
            names
        }
    };
    for name in &names {
        api.delete(name, &DeleteParams::default())
            .await
            .map_err(|error| match &error {
                kube::Error::Api(status) if status.code == 404 => CliError::new(
                    Kind::NotFound,
                    format!(
                        "GefyraBridge {name} does not exist (`kubectl gefyra bridge list -f {file_arg}` shows yours)"
                    ),
                ),
                _ => refused(&format!("deleting GefyraBridge {name}"), error),
            })?;
        if args.wait {
            if let Err(end) = watch(&api, name, Goal::Gone, args.timeout).await? {
                return Err(wait_error(
                    &format!("GefyraBridge {name}"),
                    "gone",
                    args.timeout,
                    end,
                    "is the operator running?",
                ));
            }
            println!("GefyraBridge {} deleted", printable(name));
        } else {
            println!("GefyraBridge {} marked for deletion", printable(name));
        }
    }
    Ok(())
}

/// How long a bridge refused by the destinations policy is tried again: the API server
/// checks the destination against its own cache of the GefyraClients, which may not yet
/// show a connection made a moment ago (`connect`, then `bridge create`).
const DESTINATION_CACHE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Creates `object`, trying again within [`DESTINATION_CACHE_GRACE`] while the destinations
/// policy refuses it (any other refusal is final at once).
async fn create_admitted(
    api: &kube::Api<DynamicObject>,
    object: &DynamicObject,
) -> Result<DynamicObject, kube::Error> {
    let deadline = std::time::Instant::now() + DESTINATION_CACHE_GRACE;
    loop {
        match api.create(&PostParams::default(), object).await {
            Err(kube::Error::Api(status))
                if status.code == 403
                    && status.message.contains("gefyra-bridge-destinations-")
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            result => return result,
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn create_args(words: &[&str]) -> std::result::Result<BridgeCreateArgs, clap::Error> {
        let mut argv = vec!["kubectl-gefyra", "bridge", "create", "-f", "c.json"];
        argv.extend_from_slice(words);
        match crate::args::Cli::try_parse_from(argv)?.command {
            crate::args::Command::Bridge(crate::args::BridgeCommand::Create(args)) => Ok(*args),
            _ => unreachable!("a bridge create command"),
        }
    }

    fn request(args: &BridgeCreateArgs) -> Result<BridgeRequest> {
        Ok(BridgeRequest {
            name: default_name("dev", &args.mount, "a1b2c"),
            namespace: "gefyra".into(),
            client: "dev".into(),
            mount: args.mount.clone(),
            destination: args
                .destination_ip
                .unwrap_or(Ipv4Addr::new(192, 168, 96, 2)),
            port_mappings: port_mappings(&args.ports)?,
            provider_parameter: provider_parameter(&matches_of(args))?,
        })
    }

    #[test]
    fn ports_are_given_remote_first_and_written_local_first() {
        let args =
            create_args(&["--mount", "web", "-p", "80:8080", "--ports", "443:8443"]).unwrap();
        assert_eq!(
            args.ports,
            [
                PortMapping {
                    remote: 80,
                    local: 8080
                },
                PortMapping {
                    remote: 443,
                    local: 8443
                }
            ]
        );
        let body = request(&args).unwrap().body();
        assert_eq!(body["portMappings"], json!(["8080:80", "8443:443"]));
    }

    #[test]
    fn the_whole_bridge_is_gefyras_wire_shape() {
        let args = create_args(&[
            "--mount",
            "web",
            "-p",
            "80:8080",
            "--match-path-prefix",
            "/api",
            "--match-header-exact",
            "x-gefyra:dev",
            "--destination-ip",
            "172.30.0.9",
        ])
        .unwrap();
        assert_eq!(
            request(&args).unwrap().body(),
            json!({
                "apiVersion": "gefyra.dev/v1",
                "kind": "gefyrabridge",
                "metadata": {
                    "name": "dev-web-a1b2c",
                    "namespace": "gefyra",
                    "labels": {"gefyra.dev/bridge-mount": "web", "gefyra.dev/client": "dev"},
                },
                "provider": "carrier2",
                "connectionProvider": "stowaway",
                "client": "dev",
                "destinationIP": "172.30.0.9",
                "target": "web",
                "portMappings": ["8080:80"],
                "providerParameter": {"rules": [{"match": [
                    {"matchHeader": {"name": "x-gefyra", "value": "dev", "type": "exact"}},
                    {"matchPath": {"path": "/api", "type": "prefix"}},
                ]}]},
            })
        );
        // Without --match-* flags: no providerParameter, all traffic of the ports.
        let all = create_args(&["--mount", "web", "-p", "5432:5432"]).unwrap();
        let body = request(&all).unwrap().body();
        assert!(body.get("providerParameter").is_none(), "{body}");
    }

    #[test]
    fn match_flags_make_one_rule_in_gefyras_order() {
        // Gefyra's CLI: headers exact, regex, prefix, then paths exact, prefix, regex, each
        // flag's values in the order given, all in one rule.
        let args = create_args(&[
            "--mount",
            "web",
            "-p",
            "80:8080",
            "--match-path-regex",
            "^/v[0-9]+/",
            "--match-header-prefix",
            "x-team:pay",
            "--match-path-exact",
            "/health",
            "--match-header-regex",
            "x-gefyra:^dev-(a|b)$",
            "--match-header-exact",
            "x-gefyra:dev",
            "--match-path-prefix",
            "/api",
            "--match-header-exact",
            "x-user:anna:b",
        ])
        .unwrap();
        let parameter =
            serde_json::to_value(provider_parameter(&matches_of(&args)).unwrap()).unwrap();
        assert_eq!(
            parameter,
            json!({"rules": [{"match": [
                {"matchHeader": {"name": "x-gefyra", "value": "dev", "type": "exact"}},
                {"matchHeader": {"name": "x-user", "value": "anna:b", "type": "exact"}},
                {"matchHeader": {"name": "x-gefyra", "value": "^dev-(a|b)$", "type": "regex"}},
                {"matchHeader": {"name": "x-team", "value": "pay", "type": "prefix"}},
                {"matchPath": {"path": "/health", "type": "exact"}},
                {"matchPath": {"path": "/api", "type": "prefix"}},
                {"matchPath": {"path": "^/v[0-9]+/", "type": "regex"}},
            ]}]})
        );
        // What the operator compiles is what was written.
        assert!(!Rules::compile(Some(&parameter)).unwrap().is_empty());
        assert_eq!(
            rules_summary(Some(&parameter)),
            "x-gefyra=dev & x-user=anna:b & x-gefyra~^dev-(a|b)$ & x-team^=pay & path=/health & path^=/api & path~^/v[0-9]+/"
        );
    }

    #[test]
    fn bad_input_is_refused_naming_the_flag() {
        for (words, expected) in [
            (&["--mount", "web", "-p", "80"][..], "is not REMOTE:LOCAL"),
            (&["--mount", "web", "-p", "80:0"], "is not REMOTE:LOCAL"),
            (&["--mount", "web", "-p", "+80:8080"], "is not REMOTE:LOCAL"),
            (&["--mount", "web", "-p", "80:70000"], "is not REMOTE:LOCAL"),
            (&["--mount", "web"], "--ports"),
            (&["-p", "80:8080"], "--mount"),
            (&["--mount", "Web", "-p", "80:8080"], "not a valid name"),
            (
                &[
                    "--mount",
                    "web",
                    "-p",
                    "80:8080",
                    "--match-header-exact",
                    "x-gefyra",
                ],
                "is not NAME:VALUE",
            ),
            (
                &[
                    "--mount",
                    "web",
                    "-p",
                    "80:8080",
                    "--match-header-exact",
                    ":dev",
                ],
                "is not NAME:VALUE",
            ),
            (
                &[
                    "--mount",
                    "web",
                    "-p",
                    "80:8080",
                    "--destination-ip",
                    "fd00::1",
                ],
                "invalid IPv4",
            ),
            (
                &["b1", "-N", "b2", "--mount", "web", "-p", "80:8080"],
                "cannot be used",
            ),
        ] {
            let error = create_args(words).expect_err("refused").to_string();
            assert!(error.contains(expected), "{words:?}: {error}");
        }
        for (words, expected) in [
            (
                &["--mount", "web", "-p", "80:8080", "-p", "80:9090"][..],
                "-p 80:8080 and -p 80:9090 both bridge container port 80",
            ),
            (
                &[
                    "--mount",
                    "web",
                    "-p",
                    "80:8080",
                    "--match-path-prefix",
                    "api/",
                ],
                "--match-path-prefix \"api/\": must start with \"/\"",
            ),
            (
                &[
                    "--mount",
                    "web",
                    "-p",
                    "80:8080",
                    "--match-header-regex",
                    "x:(a",
                ],
                "--match-header-regex \"x:(a\": the regex does not compile",
            ),
            (
                &[
                    "--mount",
                    "web",
                    "-p",
                    "80:8080",
                    "--match-header-exact",
                    "x gefyra:dev",
                ],
                "is not an HTTP header name",
            ),
        ] {
            let args = create_args(words).unwrap();
            let error = request(&args).expect_err("refused");
            assert_eq!(error.kind, Kind::Usage);
            assert!(
                error.message.contains(expected),
                "{words:?}: {}",
                error.message
            );
        }
        let mut many = vec!["--mount", "web", "-p", "80:8080"];
        for _ in 0..9 {
            many.extend(["--match-path-prefix", "/a"]);
        }
        let error = request(&create_args(&many).unwrap()).unwrap_err();
        assert!(error.message.contains("at most 8"), "{}", error.message);
    }

    #[test]
    fn default_names_are_gefyras_and_fit_a_label() {
        assert_eq!(default_name("dev", "web", "a1b2c"), "dev-web-a1b2c");
        let long = default_name(&"c".repeat(32), &"m".repeat(63), "a1b2c");
        assert_eq!(long.len(), 63, "{long}");
        assert!(long.starts_with(&format!("{}-", "c".repeat(25))), "{long}");
        assert_eq!(default_name("dev", "web-.-x", "a1b2c"), "dev-web-.-x-a1b2c");
        assert!(
            crate::bridging::parse_object_name(&default_name(
                "dev",
                &format!("{}-x", "m".repeat(30)),
                "a1b2c"
            ))
            .is_ok()
        );
    }

    fn bridge(name: &str, data: Value) -> DynamicObject {
        let mut object = DynamicObject::new(name, &bridge_resource());
        object.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-07T14:58:00Z".parse().unwrap(),
            ));
        object.data = data;
        object
    }

    #[test]
    fn the_list_shows_ports_rules_state_and_why() {
        let rows = [
            BridgeRow::of(&bridge(
                "dev-web-a1b2c",
                json!({
                    "client": "dev", "target": "web", "destinationIP": "192.168.96.2",
                    "portMappings": ["8080:80", "8443:443"],
                    "providerParameter": {"rules": [
                        {"match": [{"matchHeader": {"name": "x-gefyra", "value": "dev"}}]},
                        {"match": [{"matchPath": {"path": "/api", "type": "prefix"}}]},
                    ]},
                    "state": "INSTALLING",
                    "status": {"reason": "WaitingForMount", "message": "waiting for GefyraBridgeMount web to be ACTIVE (it is INSTALLING)"},
                }),
            )),
            BridgeRow::of(&bridge(
                "dev-db-x9y8z",
                json!({
                    "client": "dev", "target": "db", "destinationIP": "192.168.96.2",
                    "portMappings": ["5432:5432"],
                }),
            )),
        ];
        let view = TableView {
            now: "2026-12-07T15:00:00Z".parse().unwrap(),
            headers: true,
        };
        assert_eq!(
            render_list(&rows, OutputFormat::Table, view),
            "NAME            MOUNT   PORTS                 RULES                       STATE        REASON\n\
             dev-web-a1b2c   web     80->8080, 443->8443   x-gefyra=dev | path^=/api   INSTALLING   WaitingForMount\n\
             dev-db-x9y8z    db      5432->5432            all traffic                 REQUESTED    -\n"
        );
        let wide = render_list(&rows, OutputFormat::Wide, view);
        assert!(
            wide.lines().nth(1).unwrap().ends_with(
                "192.168.96.2   2m    waiting for GefyraBridgeMount web to be ACTIVE (it is INSTALLING)"
            ),
            "{wide}"
        );
        let json: Value =
            serde_json::from_str(&render_list(&rows, OutputFormat::Json, view)).unwrap();
        assert_eq!(json[0]["ports"], "80->8080, 443->8443");
        assert_eq!(json[1]["rules"], "all traffic");
    }

    #[test]
    fn the_report_says_what_goes_where() {
        let args = create_args(&[
            "--mount",
            "web",
            "-p",
            "80:8080",
            "--match-header-exact",
            "x-gefyra:dev",
        ])
        .unwrap();
        let request = request(&args).unwrap();
        let mount = MountFields {
            target_namespace: "demo".into(),
            target: "deployment/web".into(),
            ..MountFields::default()
        };
        assert_eq!(
            routing(&request, Some(&mount), &args.ports),
            "  mount:   web (deployment/web in namespace demo)\n  \
             port:    80 -> 192.168.96.2:8080\n  \
             traffic: HTTP requests matching x-gefyra=dev; the rest goes to the workload\n"
        );
        let all = create_args(&["--mount", "db", "-p", "5432:15432"]).unwrap();
        assert!(
            routing(&super::tests::request(&all).unwrap(), None, &all.ports)
                .ends_with("  port:    5432 -> 192.168.96.2:15432\n  traffic: all traffic of these ports (any TCP)\n")
        );
    }
}
