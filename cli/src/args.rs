//! The command line. `kubectl-gefyra` on the PATH makes it `kubectl gefyra ...`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

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
