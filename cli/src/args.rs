//! The command line. `kubectl-gefyra` on the PATH makes it `kubectl gefyra ...`.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use gefyra_api::bridge_rules::PortMapping;
use ipnet::IpNet;

use crate::bridges::{parse_header_match, parse_port_mapping};
use crate::bridging::parse_object_name;
use crate::duration::{Sunset, parse_duration, parse_positive_duration, parse_sunset};

/// `KEY=VALUE` of a Kubernetes label: a key (an optional DNS-subdomain prefix and `/`, and a
/// name) and a value of at most 63 letters, digits, `-`, `_` or `.`, starting and ending
/// with a letter or digit (the value may be empty).
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let invalid = |what: &str| format!("{text:?} is not KEY=VALUE of a label: {what}");
    let (key, value) = text.split_once('=').ok_or_else(|| invalid("no '='"))?;
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let segment = |part: &str| {
        part.len() <= 63
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && part
                .chars()
                .next()
                .is_none_or(|c| c.is_ascii_alphanumeric())
            && part
                .chars()
                .last()
                .is_none_or(|c| c.is_ascii_alphanumeric())
    };
    if name.is_empty() || !segment(name) {
        return Err(invalid(
            "the key's name must be 1-63 letters, digits, '-', '_' or '.'",
        ));
    }
    if prefix
        .is_some_and(|prefix| prefix.len() > 253 || !gefyra_api::connection::is_dns_name(prefix))
    {
        return Err(invalid("the key's prefix must be a DNS subdomain"));
    }
    if !segment(value) {
        return Err(invalid(
            "the value must be at most 63 letters, digits, '-', '_' or '.'",
        ));
    }
    Ok((key.to_string(), value.to_string()))
}

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-gefyra",
    bin_name = "kubectl-gefyra",
    version,
    about = "Manage Gefyra clients and connect with a client file (Gefyra 2.x compatible)",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// The admin's kubeconfig (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The namespace Gefyra is installed in.
    #[arg(long, global = true, env = "GEFYRA_NAMESPACE", default_value = gefyra_api::client::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Show the causes of errors.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage GefyraClients (admin).
    #[command(subcommand)]
    Clients(ClientsCommand),
    /// Manage GefyraBridgeMounts: a router in front of a workload, so that developers can
    /// bridge its traffic (admin).
    #[command(subcommand)]
    Mount(MountCommand),
    /// Bridge a mount's traffic through your tunnel to a process on this machine, with a
    /// client file (connect first).
    #[command(subcommand)]
    Bridge(BridgeCommand),
    /// Connect this machine with a client file: generates a WireGuard key pair locally,
    /// asks the operator for a tunnel and writes a WireGuard configuration.
    Connect(ConnectArgs),
    /// Disconnect the client of a client file (its state returns to WAITING).
    Disconnect(FileArgs),
    /// The state of a client file's client: connected or not, its tunnel address, the last
    /// WireGuard handshake, when the file's token expires (with the file's own token only).
    Status(StatusArgs),
    /// Write a kubeconfig for a client file whose user is this CLI as a kubectl credential
    /// plugin (short-lived tokens for --short-lived client files).
    Kubeconfig {
        #[arg(short = 'f', long = "file", value_name = "CLIENT_FILE")]
        file: PathBuf,
        /// Write it here (mode 0600) instead of printing it.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// The kubectl credential plugin (ExecCredential): prints a token for the client file's
    /// client, minted short-lived and cached for --short-lived files.
    GetToken(GetTokenArgs),
    /// The credential plugin's token cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Print a shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The client file your admin gave you.
    #[arg(short = 'f', long = "file", value_name = "CLIENT_FILE")]
    pub file: PathBuf,
    /// `table` is the human-readable text.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct GetTokenArgs {
    #[arg(short = 'f', long = "file", value_name = "CLIENT_FILE")]
    pub file: PathBuf,
    /// Lifetime of a minted token, in seconds.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(600..=86400))]
    pub lifetime: u64,
    /// Mint a new token even if a cached one is still good.
    #[arg(long)]
    pub force_refresh: bool,
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Remove cached tokens: all of them, or those of one client file.
    Clear {
        #[arg(short = 'f', long = "file", value_name = "CLIENT_FILE")]
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClientsCommand {
    /// Create GefyraClients and wait until their credentials are ready (state WAITING).
    Create(CreateArgs),
    /// List the GefyraClients.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one GefyraClient: state, transitions, connection, recent Events.
    #[command(visible_aliases = ["show", "get"], alias = "describe")]
    Inspect(InspectArgs),
    /// Print or write the client file (Gefyra's format) for a GefyraClient.
    #[command(visible_alias = "write")]
    Config(ConfigArgs),
    /// Disconnect a GefyraClient (sets providerParameter to null).
    #[command(alias = "deactivate")]
    Disconnect {
        #[command(flatten)]
        namespace: ShortNamespace,
        client_id: String,
    },
    /// Delete GefyraClients: their credentials are destroyed and a connection is cut.
    #[command(visible_aliases = ["rm", "remove"])]
    Delete(DeleteArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The client's ID (a DNS-1123 name); default: a random 32-hex ID.
    #[arg(long, visible_alias = "name")]
    pub client_id: Option<String>,
    /// How many clients to create (random IDs).
    #[arg(short = 'n', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub quantity: u32,
    /// Do not wait for the clients to be ready.
    #[arg(long)]
    pub nowait: bool,
    /// How long to wait for the clients to be ready (90s, 5m, or seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Delete the clients at this time (RFC 3339) or after this long (8h, 30d).
    #[arg(long, value_name = "TIME|DURATION", value_parser = parse_sunset)]
    pub sunset: Option<Sunset>,
    /// Disconnect a client this long after it connected (90m, 8h, or seconds).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub max_connection_age: Option<Duration>,
    /// A label for the clients, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// `client`: print the GefyraClients instead of creating them (nothing is sent to the
    /// API server); `server`: the API server checks them and stores nothing.
    #[arg(long, value_enum, value_name = "STRATEGY", num_args = 0..=1, require_equals = true, default_missing_value = "client")]
    pub dry_run: Option<DryRun>,
    /// Print the GefyraClients (yaml, json) or their names instead of their IDs.
    #[arg(short, long, value_enum)]
    pub output: Option<ManifestFormat>,
}

/// How created (or dry-run) GefyraClients are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ManifestFormat {
    Yaml,
    Json,
    /// `gefyraclient.gefyra.dev/<ID>`, one a line.
    Name,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DryRun {
    /// Create the clients (kubectl's `--dry-run=none`).
    None,
    Client,
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    /// The table with more columns (`clients list`: the reason a client is not ready, its
    /// sunset).
    Wide,
    Json,
    Yaml,
    /// `gefyraclient.gefyra.dev/<ID>`, one a line, as `kubectl get -o name` prints.
    Name,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// `table` shows the age (as kubectl does); `json` and `yaml` the creation time.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// Leave out the table's header line.
    #[arg(long)]
    pub no_headers: bool,
    /// Only clients whose labels match (`team=a`, `team!=b`, `env in (dev,test)`).
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    #[command(flatten)]
    pub namespace: ShortNamespace,
}

/// `-n NAMESPACE`, kubectl's short `--namespace`, where Gefyra's CLI does not use `-n` for
/// something else (`clients create -n` is a quantity).
#[derive(Args, Debug, Clone, Default)]
pub struct ShortNamespace {
    /// The namespace Gefyra is installed in (the same as --namespace).
    #[arg(short = 'n', id = "short_namespace", value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub namespace: ShortNamespace,
    pub client_id: String,
    /// `table` is the human-readable text.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    #[command(flatten)]
    pub namespace: ShortNamespace,
    pub client_id: String,
    /// Write the client file here (mode 0600) instead of printing it.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The host clients reach Stowaway at (default: from Service gefyra-stowaway-wireguard).
    #[arg(long)]
    pub host: Option<String>,
    /// The UDP port clients reach Stowaway at (default: 31820, or the Service's).
    #[arg(short, long)]
    pub port: Option<u16>,
    /// The API server URL clients use (default: the server of your kubeconfig).
    #[arg(
        short = 'a',
        long = "kubernetes-api",
        alias = "kube-api",
        value_name = "URL"
    )]
    pub kubernetes_api: Option<String>,
    /// The WireGuard MTU clients use (default: WireGuard's choice).
    #[arg(long, value_parser = clap::value_parser!(u16).range(576..))]
    pub mtu: Option<u16>,
    /// The registry clients pull Gefyra's images from (Gefyra's CLI reads it).
    #[arg(long)]
    pub registry: Option<String>,
    /// Write a file whose only credential is the client's token minter: `kubectl gefyra
    /// kubeconfig -f FILE` then gives short-lived tokens (not Gefyra's format).
    #[arg(long)]
    pub short_lived: bool,
    /// Seconds the token minter's credential in a --short-lived file is valid (default:
    /// until the client's sunset, else 365 days).
    #[arg(long, requires = "short_lived", value_parser = clap::value_parser!(u64).range(600..))]
    pub minter_lifetime: Option<u64>,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub namespace: ShortNamespace,
    #[arg(required_unless_present = "selector", conflicts_with = "selector")]
    pub client_ids: Vec<String>,
    /// Delete the clients whose labels match instead (`team=a`).
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// Do not wait until the clients are gone.
    #[arg(long)]
    pub nowait: bool,
    /// How long to wait for each client to be gone (90s, 5m, or seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Subcommand, Debug)]
pub enum MountCommand {
    /// Put a router in front of a workload (its Services switched to it, its Pods untouched)
    /// and wait until it is ACTIVE.
    Create(MountCreateArgs),
    /// List the GefyraBridgeMounts.
    #[command(visible_alias = "ls")]
    List(MountListArgs),
    /// Delete GefyraBridgeMounts: the operator switches the workload's Services back, then
    /// removes the router and the mount's bridges.
    #[command(visible_aliases = ["rm", "remove"])]
    Delete(MountDeleteArgs),
}

#[derive(Args, Debug)]
pub struct MountCreateArgs {
    /// The workload: deployment/NAME, statefulset/NAME or pod/NAME (Gefyra's
    /// KIND/NAME/CONTAINER works too).
    #[arg(long, value_name = "KIND/NAME")]
    pub target: String,
    /// The workload's namespace (--namespace is the namespace Gefyra is installed in).
    #[arg(long, value_name = "NAMESPACE", value_parser = parse_namespace)]
    pub target_namespace: String,
    /// The container whose ports are bridged (default: any).
    #[arg(long)]
    pub container: Option<String>,
    /// The mount's name (default: <workload>-<namespace>-<5 random characters>).
    #[arg(long, short = 'N', value_parser = parse_object_name)]
    pub name: Option<String>,
    /// Do not wait for the mount to be ACTIVE.
    #[arg(long, alias = "nowait")]
    pub no_wait: bool,
    /// How long to wait for the mount to be ACTIVE (90s, 5m, or seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// A namespace name: a DNS label (at most 63 lower-case letters, digits and '-').
fn parse_namespace(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= 63
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-');
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is not a namespace name: at most 63 lower-case letters, digits and '-'"
        ))
    }
}

#[derive(Args, Debug)]
pub struct MountListArgs {
    /// `wide` adds the ports the router takes and the operator's message.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// Leave out the table's header line.
    #[arg(long)]
    pub no_headers: bool,
    #[command(flatten)]
    pub namespace: ShortNamespace,
}

#[derive(Args, Debug)]
pub struct MountDeleteArgs {
    #[command(flatten)]
    pub namespace: ShortNamespace,
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
    /// Wait until each mount is gone (its Services switched back, its router removed).
    #[arg(long)]
    pub wait: bool,
    /// How long to wait for each mount to be gone (90s, 5m, or seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Subcommand, Debug)]
pub enum BridgeCommand {
    /// Send a mount's traffic (every connection of the ports, or the HTTP requests matching
    /// the --match-* flags) to your process, and wait until the bridge is ACTIVE.
    Create(Box<BridgeCreateArgs>),
    /// List your bridges.
    #[command(visible_alias = "ls")]
    List(BridgeListArgs),
    /// Delete your bridges: their traffic goes to the workload again.
    #[command(visible_aliases = ["rm", "remove"])]
    Delete(BridgeDeleteArgs),
}

#[derive(Args, Debug)]
pub struct BridgeCreateArgs {
    /// The bridge's name (default: <client>-<mount>-<5 random characters>).
    #[arg(value_parser = parse_object_name)]
    pub name: Option<String>,
    /// The bridge's name, as Gefyra's CLI takes it.
    #[arg(short = 'N', long = "name", id = "name_flag", value_name = "NAME", conflicts_with = "name", value_parser = parse_object_name)]
    pub name_flag: Option<String>,
    /// The client file your admin gave you.
    #[arg(short = 'f', long = "file", value_name = "CLIENT_FILE")]
    pub file: PathBuf,
    /// The GefyraBridgeMount whose traffic is bridged (an admin creates it).
    #[arg(long, value_parser = parse_object_name)]
    pub mount: String,
    /// The workload's container port, then the port your process listens on, as Gefyra's
    /// CLI takes them (repeatable).
    #[arg(short = 'p', long = "ports", visible_alias = "port", value_name = "REMOTE:LOCAL", required = true, value_parser = parse_port_mapping)]
    pub ports: Vec<PortMapping>,
    /// Only requests with this header value (repeatable; all --match-* flags must hold).
    #[arg(long, value_name = "NAME:VALUE", value_parser = parse_header_match)]
    pub match_header_exact: Vec<(String, String)>,
    /// Only requests whose header value starts with VALUE.
    #[arg(long, value_name = "NAME:VALUE", value_parser = parse_header_match)]
    pub match_header_prefix: Vec<(String, String)>,
    /// Only requests with a header whose name and value match these regexes (unanchored).
    #[arg(long, value_name = "NAME:REGEX", value_parser = parse_header_match)]
    pub match_header_regex: Vec<(String, String)>,
    /// Only requests for this path (with its query).
    #[arg(long, value_name = "PATH")]
    pub match_path_exact: Vec<String>,
    /// Only requests whose path starts with PATH.
    #[arg(long, value_name = "PATH")]
    pub match_path_prefix: Vec<String>,
    /// Only requests whose path (with its query) matches REGEX (unanchored).
    #[arg(long, value_name = "REGEX")]
    pub match_path_regex: Vec<String>,
    /// Where on your side the traffic goes (default: your tunnel address; an address in your
    /// connect --subnet reaches a container or VM there).
    #[arg(long, value_name = "IP")]
    pub destination_ip: Option<Ipv4Addr>,
    /// Do not wait for the bridge to be ACTIVE.
    #[arg(long, alias = "nowait")]
    pub no_wait: bool,
    /// How long to wait for the bridge to be ACTIVE (90s, 5m, or seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct BridgeListArgs {
    /// The client file your admin gave you.
    #[arg(short = 'f', long = "file", value_name = "CLIENT_FILE")]
    pub file: PathBuf,
    /// `wide` adds where the traffic goes, the age and the operator's message. RULES shows
    /// `name=value` (exact), `^=` (prefix), `~` (regex); `&` joins what must all hold.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// Leave out the table's header line.
    #[arg(long)]
    pub no_headers: bool,
}

#[derive(Args, Debug)]
pub struct BridgeDeleteArgs {
    /// The bridge to delete.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub name: Option<String>,
    /// Delete all your bridges (never another client's).
    #[arg(short = 'A', long)]
    pub all: bool,
    /// The client file your admin gave you.
    #[arg(short = 'f', long = "file", value_name = "CLIENT_FILE")]
    pub file: PathBuf,
    /// Wait until each bridge is gone.
    #[arg(long)]
    pub wait: bool,
    /// How long to wait for each bridge to be gone (90s, 5m, or seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TunnelFormat {
    /// For `wg-quick up FILE` (address, DNS and MTU included).
    WgQuick,
    /// For `wg setconf INTERFACE FILE` (set the address yourself).
    Wg,
}

#[derive(Args, Debug)]
pub struct FileArgs {
    /// The client file your admin gave you.
    #[arg(short = 'f', long = "file", value_name = "CLIENT_FILE")]
    pub file: PathBuf,
    /// How long to wait for the operator (90s, 5m, or seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub file: FileArgs,
    /// The local range the cluster may reach through the tunnel (exclusive to you).
    #[arg(long, value_name = "CIDR")]
    pub subnet: Option<IpNet>,
    /// Where to write the WireGuard configuration (mode 0600; default: gefyra-<ID>.conf,
    /// <ID> cut to 8 characters so wg-quick can name the interface after it).
    #[arg(long, value_name = "FILE")]
    pub wg_config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "wg-quick")]
    pub format: TunnelFormat,
    /// What to route through the tunnel (default: the cluster's ranges the operator
    /// publishes, a split tunnel); `0.0.0.0/0,::/0` sends all traffic and every DNS query
    /// into the cluster, as Gefyra's Cargo does.
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    pub allowed_ips: Vec<IpNet>,
    /// The cluster's DNS domain: names under it resolve through the tunnel (split tunnel,
    /// systemd-resolved), others with this machine's resolver.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local", value_parser = crate::tunnel::parse_cluster_domain)]
    pub cluster_domain: String,
    /// Connect from this process, without root, Docker or a WireGuard device: it speaks
    /// WireGuard over a plain UDP socket and offers a SOCKS5 proxy, forwards (-L) and
    /// exposed ports (--expose); it runs until Ctrl-C, which disconnects.
    #[arg(long, conflicts_with_all = ["wg_config", "format"])]
    pub userspace: bool,
    /// With --userspace: where the SOCKS5 proxy listens (cluster names are resolved by the
    /// cluster's DNS: use socks5h / --socks5-hostname).
    #[arg(long, value_name = "ADDRESS", default_value = "127.0.0.1:1080")]
    pub socks5: std::net::SocketAddr,
    /// With --userspace: an HTTP CONNECT proxy too, listening here.
    #[arg(long, value_name = "ADDRESS", requires = "userspace")]
    pub http_proxy: Option<std::net::SocketAddr>,
    /// With --userspace: forward a local port to HOST:PORT in the cluster, as ssh -L does
    /// ([BIND:]PORT:HOST:PORT, BIND 127.0.0.1 by default; repeatable).
    #[arg(
        short = 'L',
        long = "forward",
        value_name = "[BIND:]PORT:HOST:PORT",
        requires = "userspace"
    )]
    pub forwards: Vec<crate::userspace::spec::LocalForward>,
    /// With --userspace: connections that arrive through the tunnel at your tunnel address
    /// on REMOTE (a bridge's destination) go to 127.0.0.1:LOCAL on this machine
    /// ([REMOTE:]LOCAL; repeatable).
    #[arg(long, value_name = "[REMOTE:]LOCAL", requires = "userspace")]
    pub expose: Vec<crate::userspace::spec::Expose>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn gefyras_spellings_parse() {
        for args in [
            &[
                "kubectl-gefyra",
                "clients",
                "create",
                "--client-id",
                "a",
                "--timeout",
                "5",
            ][..],
            &[
                "kubectl-gefyra",
                "clients",
                "create",
                "-n",
                "20",
                "--nowait",
            ],
            &["kubectl-gefyra", "clients", "ls", "-o", "json"],
            &["kubectl-gefyra", "clients", "show", "a"],
            &["kubectl-gefyra", "clients", "describe", "a", "-o", "yaml"],
            &[
                "kubectl-gefyra",
                "clients",
                "write",
                "a",
                "-o",
                "f.json",
                "--host",
                "h",
                "-p",
                "1",
            ],
            &[
                "kubectl-gefyra",
                "clients",
                "config",
                "a",
                "--kube-api",
                "https://x",
                "--mtu",
                "1340",
            ],
            &["kubectl-gefyra", "clients", "rm", "a", "b", "--nowait"],
            &[
                "kubectl-gefyra",
                "connect",
                "-f",
                "c.json",
                "--subnet",
                "172.30.0.0/16",
                "--format",
                "wg",
            ],
            &["kubectl-gefyra", "disconnect", "-f", "c.json"],
            &[
                "kubectl-gefyra",
                "clients",
                "config",
                "a",
                "--short-lived",
                "--minter-lifetime",
                "86400",
            ],
            &["kubectl-gefyra", "kubeconfig", "-f", "c.json", "-o", "kc"],
            &[
                "kubectl-gefyra",
                "get-token",
                "-f",
                "c.json",
                "--lifetime",
                "900",
                "--force-refresh",
            ],
            &["kubectl-gefyra", "cache", "clear"],
            &["kubectl-gefyra", "--namespace", "other", "clients", "list"],
            // kubectl's habits.
            &[
                "kubectl-gefyra",
                "clients",
                "list",
                "-n",
                "other",
                "-o",
                "wide",
            ],
            &["kubectl-gefyra", "clients", "ls", "-l", "team=a,env!=prod"],
            &["kubectl-gefyra", "clients", "inspect", "-n", "other", "a"],
            &[
                "kubectl-gefyra",
                "clients",
                "config",
                "a",
                "-n",
                "other",
                "--host",
                "h",
            ],
            &[
                "kubectl-gefyra",
                "clients",
                "disconnect",
                "-n",
                "other",
                "a",
            ],
            &[
                "kubectl-gefyra",
                "clients",
                "delete",
                "-n",
                "other",
                "-l",
                "team=a",
                "--timeout",
                "2m",
            ],
            &[
                "kubectl-gefyra",
                "clients",
                "create",
                "-n",
                "3",
                "--dry-run=client",
                "-o",
                "yaml",
                "--sunset",
                "8h",
                "--max-connection-age",
                "90m",
                "--label",
                "team=a",
                "--label",
                "example.com/owner=anna",
            ],
            &[
                "kubectl-gefyra",
                "clients",
                "create",
                "--dry-run",
                "--timeout",
                "90s",
            ],
            &[
                "kubectl-gefyra",
                "clients",
                "create",
                "--sunset",
                "2026-12-24T18:00:00Z",
            ],
            &[
                "kubectl-gefyra",
                "connect",
                "-f",
                "c.json",
                "--timeout",
                "5m",
            ],
            &["kubectl-gefyra", "status", "-f", "c.json", "-o", "json"],
            // Bridging: Gefyra's spellings (-N, --ports, --nowait, KIND/NAME/CONTAINER) too.
            &[
                "kubectl-gefyra",
                "bridge",
                "create",
                "-N",
                "mine",
                "-f",
                "c.json",
                "--mount",
                "web",
                "--ports",
                "80:8080",
                "--match-header-exact",
                "x-gefyra:dev",
                "--nowait",
                "--timeout",
                "90",
            ],
            &[
                "kubectl-gefyra",
                "bridge",
                "ls",
                "-f",
                "c.json",
                "-o",
                "wide",
            ],
            &[
                "kubectl-gefyra",
                "bridge",
                "rm",
                "-A",
                "-f",
                "c.json",
                "--wait",
            ],
            &["kubectl-gefyra", "bridge", "delete", "b", "-f", "c.json"],
            &[
                "kubectl-gefyra",
                "mount",
                "create",
                "--target",
                "deploy/web/web",
                "--target-namespace",
                "demo",
                "--no-wait",
            ],
            &["kubectl-gefyra", "mount", "ls", "-n", "other", "-o", "json"],
            &[
                "kubectl-gefyra",
                "mount",
                "rm",
                "a",
                "b",
                "--wait",
                "--timeout",
                "2m",
            ],
        ] {
            Cli::try_parse_from(args).unwrap_or_else(|error| panic!("{args:?}: {error}"));
        }
        for bad in [
            &["kubectl-gefyra", "connect", "-f", "c", "--subnet", "nope"][..],
            &[
                "kubectl-gefyra",
                "connect",
                "-f",
                "c",
                "--timeout",
                "5 minutes",
            ],
            &[
                "kubectl-gefyra",
                "clients",
                "create",
                "--label",
                "no-equals",
            ],
            &["kubectl-gefyra", "clients", "create", "--sunset", "someday"],
            &[
                "kubectl-gefyra",
                "clients",
                "create",
                "--max-connection-age",
                "0",
            ],
            &["kubectl-gefyra", "clients", "create", "--dry-run=maybe"],
            &["kubectl-gefyra", "clients", "create", "-o", "table"],
            // Names and a selector together are ambiguous; neither is nothing to delete.
            &["kubectl-gefyra", "clients", "delete", "a", "-l", "team=a"],
            &["kubectl-gefyra", "clients", "delete"],
            // A bridge to delete: a name or --all, not both, not neither; the client file.
            &["kubectl-gefyra", "bridge", "delete", "-f", "c.json"],
            &[
                "kubectl-gefyra",
                "bridge",
                "delete",
                "b",
                "--all",
                "-f",
                "c",
            ],
            &["kubectl-gefyra", "bridge", "list"],
            &[
                "kubectl-gefyra",
                "mount",
                "create",
                "--target",
                "deployment/web",
            ],
            &[
                "kubectl-gefyra",
                "mount",
                "create",
                "--target",
                "deployment/web",
                "--target-namespace",
                "Demo",
            ],
            &["kubectl-gefyra", "mount", "delete"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn create_n_is_a_quantity_and_n_elsewhere_a_namespace() {
        let Cli {
            command: Command::Clients(ClientsCommand::Create(create)),
            ..
        } = Cli::try_parse_from([
            "kubectl-gefyra",
            "clients",
            "create",
            "-n",
            "3",
            "--timeout",
            "2m",
        ])
        .unwrap()
        else {
            panic!("create");
        };
        assert_eq!(create.quantity, 3);
        assert_eq!(create.timeout, Duration::from_secs(120));
        let Cli {
            command: Command::Clients(ClientsCommand::List(list)),
            ..
        } = Cli::try_parse_from(["kubectl-gefyra", "clients", "list", "-n", "team"]).unwrap()
        else {
            panic!("list");
        };
        assert_eq!(list.namespace.namespace.as_deref(), Some("team"));
    }

    #[test]
    fn labels_are_kubernetes_labels() {
        assert_eq!(
            parse_label("team=a"),
            Ok(("team".to_string(), "a".to_string()))
        );
        assert_eq!(
            parse_label("example.com/owner=anna.b_c-d"),
            Ok(("example.com/owner".to_string(), "anna.b_c-d".to_string()))
        );
        assert_eq!(
            parse_label("empty="),
            Ok(("empty".to_string(), String::new()))
        );
        for bad in [
            "team",
            "=a",
            "-x=a",
            "team=a b",
            "team=-a",
            "bad prefix/x=a",
            "x=a\nb",
        ] {
            assert!(parse_label(bad).is_err(), "{bad:?}");
        }
        assert!(parse_label(&format!("k={}", "a".repeat(64))).is_err());
    }
}
