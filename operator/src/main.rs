#![forbid(unsafe_code)]
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = operator::app::Args::parse();
    operator::app::run(args)
        .await
        .map_err(|e| anyhow::anyhow!("operator: {e}"))
}
