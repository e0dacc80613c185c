#![forbid(unsafe_code)]
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    gateway::install_crypto_provider();
    let cli = gateway::config::Cli::parse();
    gateway::app::run(cli)
        .await
        .map_err(|e| anyhow::anyhow!("gateway: {e}"))
}
