use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    gefyra_carrier::run::main(gefyra_carrier::run::Cli::parse()).await
}
