use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    stowaway::run::main(stowaway::run::Cli::parse()).await
}
