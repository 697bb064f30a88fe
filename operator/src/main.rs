use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    gefyra_operator::run::main(gefyra_operator::run::Cli::parse()).await
}
