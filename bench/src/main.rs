#![forbid(unsafe_code)]
//! Load generators and measurements; each subcommand prints one JSON object on stdout.
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bench", about = "Measurements of the WhatsApp gateway system, printed as JSON")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.what {}
}
