//! The command line. `kubectl-gefyra` on the PATH makes it `kubectl gefyra ...`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

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
    Disconnect { client_id: String },
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
    /// Seconds to wait for the clients to be ready.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
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
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    pub client_id: String,
    /// `table` is the human-readable text.
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
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
    #[arg(required = true)]
    pub client_ids: Vec<String>,
    /// Do not wait until the clients are gone.
    #[arg(long)]
    pub nowait: bool,
    /// Seconds to wait for each client to be gone.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
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
    /// Seconds to wait for the operator.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
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
        ] {
            Cli::try_parse_from(args).unwrap_or_else(|error| panic!("{args:?}: {error}"));
        }
        assert!(
            Cli::try_parse_from(["kubectl-gefyra", "connect", "-f", "c", "--subnet", "nope"])
                .is_err()
        );
    }
}
