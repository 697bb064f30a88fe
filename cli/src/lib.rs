//! kubectl-gefyra: the companion CLI for GefyraClient, GefyraBridgeMount and GefyraBridge
//! resources. It only creates, patches, reads and deletes them (and reads Stowaway's Service
//! to find its address); all real work is the operator's.

pub mod args;
pub mod bridges;
pub mod bridging;
pub mod clients;
pub mod cluster;
pub mod complete;
pub mod connect;
pub mod credential;
pub mod duration;
pub mod error;
pub mod files;
pub mod mounts;
pub mod render;
pub mod status;
pub mod tunnel;
pub mod userspace;
pub mod wait;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::args::{BridgeCommand, Cli, ClientsCommand, Command, MountCommand, ShortNamespace};
use crate::cluster::Admin;
use crate::error::Result;

/// The `-n NAMESPACE` of a `clients` subcommand, if it has one.
fn short_namespace(command: &ClientsCommand) -> Option<&ShortNamespace> {
    match command {
        ClientsCommand::Create(_) => None,
        ClientsCommand::List(args) => Some(&args.namespace),
        ClientsCommand::Inspect(args) => Some(&args.namespace),
        ClientsCommand::Config(args) => Some(&args.namespace),
        ClientsCommand::Disconnect { namespace, .. } => Some(namespace),
        ClientsCommand::Delete(args) => Some(&args.namespace),
    }
}

async fn dispatch(cli: &Cli) -> Result<()> {
    match &cli.command {
        // Nothing is sent to the API server: no kubeconfig is needed either.
        Command::Clients(ClientsCommand::Create(args))
            if args.dry_run == Some(args::DryRun::Client) =>
        {
            clients::create_offline(&cli.global.namespace, args)
        }
        Command::Clients(command) => {
            let mut global = cli.global.clone();
            if let Some(namespace) = short_namespace(command).and_then(|n| n.namespace.clone()) {
                global.namespace = namespace;
            }
            let admin = Admin::connect(&global).await?;
            match command {
                ClientsCommand::Create(args) => clients::create(&admin, args).await,
                ClientsCommand::List(args) => clients::list(&admin, args).await,
                ClientsCommand::Inspect(args) => clients::inspect(&admin, args).await,
                ClientsCommand::Config(args) => clients::config(&admin, args).await,
                ClientsCommand::Disconnect { client_id, .. } => {
                    clients::disconnect(&admin, client_id).await
                }
                ClientsCommand::Delete(args) => clients::delete(&admin, args).await,
            }
        }
        Command::Mount(command) => {
            let mut global = cli.global.clone();
            let short = match command {
                MountCommand::Create(_) => None,
                MountCommand::List(args) => args.namespace.namespace.clone(),
                MountCommand::Delete(args) => args.namespace.namespace.clone(),
            };
            if let Some(namespace) = short {
                global.namespace = namespace;
            }
            let admin = Admin::connect(&global).await?;
            match command {
                MountCommand::Create(args) => mounts::create(&admin, args).await,
                MountCommand::List(args) => mounts::list(&admin, args).await,
                MountCommand::Delete(args) => mounts::delete(&admin, args).await,
            }
        }
        // The client file says where and who: no kubeconfig, no --namespace.
        Command::Bridge(BridgeCommand::Create(args)) => bridges::create(args).await,
        Command::Bridge(BridgeCommand::List(args)) => bridges::list(args).await,
        Command::Bridge(BridgeCommand::Delete(args)) => bridges::delete(args).await,
        Command::Connect(args) => connect::connect(args).await,
        Command::Disconnect(args) => connect::disconnect(args).await,
        Command::Status(args) => status::status(args).await,
        Command::Kubeconfig { file, output } => {
            credential::write_kubeconfig(file, output.as_deref()).await
        }
        Command::GetToken(args) => credential::get_token(args).await,
        Command::Cache(args::CacheCommand::Clear { file }) => {
            credential::clear_cache(file.as_deref())
        }
        Command::Completion { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "kubectl-gefyra",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

/// The names (and states, as descriptions) of `names` in the cluster, read as the command
/// would: clients and mounts with the kubeconfig, bridges and (given `-f`) mounts with the
/// client file.
async fn cluster_names(
    names: complete::Names,
    options: complete::ClusterOptions,
) -> Result<Vec<(String, String)>> {
    use complete::Names;
    use kube::ResourceExt;
    let file = match &options.file {
        Some(path) => Some(cluster::read_client_file(std::path::Path::new(path))?),
        None => None,
    };
    let global = args::Global {
        kubeconfig: options.kubeconfig.map(std::path::PathBuf::from),
        context: options.context,
        namespace: options
            .namespace
            .or_else(|| std::env::var("GEFYRA_NAMESPACE").ok())
            .unwrap_or_else(|| gefyra_api::client::DEFAULT_NAMESPACE.to_string()),
        verbose: 0,
    };
    match names {
        Names::Clients => {
            let admin = Admin::connect(&global).await?;
            Ok(clients::all_clients(&admin, None)
                .await?
                .iter()
                .map(|client| (client.name_any(), client.state.to_string()))
                .collect())
        }
        Names::Mounts => object_names(file.as_ref(), &global, bridging::mount_resource(), "").await,
        // Only a client file's own bridges can be deleted with it.
        Names::Bridges => match &file {
            Some(file) => {
                let own = format!("{}={}", gefyra_api::bridge::CLIENT_LABEL, file.client_id);
                object_names(Some(file), &global, bridging::bridge_resource(), &own).await
            }
            None => Ok(Vec::new()),
        },
    }
}

/// The names and states of the mounts or bridges (matching `selector`) in Gefyra's
/// namespace, read with the client file if given, else with the kubeconfig.
async fn object_names(
    file: Option<&gefyra_api::client_file::ClientFile>,
    global: &args::Global,
    resource: kube::api::ApiResource,
    selector: &str,
) -> Result<Vec<(String, String)>> {
    use kube::ResourceExt;
    let (client, namespace) = match file {
        Some(file) => (cluster::file_client(file).await?, file.namespace.clone()),
        None => {
            let admin = Admin::connect(global).await?;
            (admin.client, admin.namespace)
        }
    };
    let api: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(client, &namespace, &resource);
    let listed = api
        .list(&kube::api::ListParams::default().labels(selector))
        .await
        .map_err(|error| error::CliError::kube("listing names", error))?;
    Ok(listed
        .items
        .iter()
        .map(|object| {
            let state = bridging::Progress::of(object).state().to_string();
            (object.name_any(), state)
        })
        .collect())
}

/// `kubectl gefyra <TAB>` (see [`complete`]): the candidates for `words`, in Cobra's
/// protocol. Completion is silent: a cluster that cannot be read offers no names.
async fn complete_words(words: &[String]) -> ExitCode {
    use complete::Wanted;
    let (wanted, options) = complete::wanted(&complete::definition(), words);
    let (candidates, directive) = match wanted {
        Wanted::Candidates {
            candidates,
            directive,
        } => (candidates, directive),
        Wanted::Names { names, prefix } => {
            let listed = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                cluster_names(names, options),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
            let matching = listed
                .into_iter()
                .filter(|(name, _)| name.starts_with(&prefix))
                .collect();
            (matching, complete::NO_FILES)
        }
    };
    print!("{}", complete::render(&candidates, directive));
    ExitCode::SUCCESS
}

/// Parses the command line, runs it, and turns the outcome into an exit code. Run as
/// `kubectl_complete-gefyra` (a symlink to this binary), or with `__complete` first, it
/// completes instead.
pub async fn main() -> ExitCode {
    let words: Vec<String> = std::env::args_os()
        .map(|word| word.to_string_lossy().into_owned())
        .collect();
    let invoked_as = words
        .first()
        .and_then(|program| std::path::Path::new(program).file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    if invoked_as.starts_with("kubectl_complete-") {
        return complete_words(words.get(1..).unwrap_or_default()).await;
    }
    if words.get(1).is_some_and(|word| word == "__complete") {
        return complete_words(words.get(2..).unwrap_or_default()).await;
    }
    let cli = Cli::parse();
    match dispatch(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if !error.message.is_empty() {
                eprintln!("{}", error.render(cli.global.verbose > 0));
            }
            error.exit_code()
        }
    }
}
