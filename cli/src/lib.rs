//! kubectl-gefyra: the companion CLI for GefyraClient resources. It only creates, patches,
//! reads and deletes GefyraClients (and reads Stowaway's Service to find its address);
//! all real work is the operator's.

pub mod args;
pub mod clients;
pub mod cluster;
pub mod connect;
pub mod credential;
pub mod error;
pub mod files;
pub mod render;
pub mod wait;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::args::{Cli, ClientsCommand, Command};
use crate::cluster::Admin;
use crate::error::Result;

async fn dispatch(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Clients(command) => {
            let admin = Admin::connect(&cli.global).await?;
            match command {
                ClientsCommand::Create(args) => clients::create(&admin, args).await,
                ClientsCommand::List(args) => clients::list(&admin, args).await,
                ClientsCommand::Inspect(args) => clients::inspect(&admin, args).await,
                ClientsCommand::Config(args) => clients::config(&admin, args).await,
                ClientsCommand::Disconnect { client_id } => {
                    clients::disconnect(&admin, client_id).await
                }
                ClientsCommand::Delete(args) => clients::delete(&admin, args).await,
            }
        }
        Command::Connect(args) => connect::connect(args).await,
        Command::Disconnect(args) => connect::disconnect(args).await,
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

/// Parses the command line, runs it, and turns the outcome into an exit code.
pub async fn main() -> ExitCode {
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
