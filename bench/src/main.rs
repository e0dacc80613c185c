#![forbid(unsafe_code)]
//! Load generators and measurements; each subcommand prints one JSON object on stdout.
use clap::{Parser, Subcommand};

mod assign;
mod cache;
mod delivery;
mod operator;
mod session_api;
mod sessions;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Measurements of the WhatsApp gateway system, printed as JSON"
)]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// The pure shard assignment alone: placement time, moves on scaling, load balance.
    Assign(assign::AssignArgs),
    /// The real delivery pipeline with simulated sessions against a loopback backend: requests,
    /// latency, losses per batching policy.
    Delivery(delivery::DeliveryArgs),
    /// The cache core: two instances sharing a real Redis under a Zipf lookup mix while states
    /// change: hit ratios, fallback calls, lookup latency, stale reads, propagation delay.
    Cache(cache::CacheArgs),
    /// Sessions inside the real gateway (supervisor with Redis ownership, pipeline to a loopback
    /// backend): RSS per session and time until every session showed its first QR code.
    Sessions(sessions::SessionsArgs),
    /// The operator and gateway shards as processes (sim driver) against a real kube-apiserver:
    /// time until every session is assigned and Connected, apiserver writes per session, steady
    /// status writes, moves and load balance when a shard is added.
    Operator(operator::OperatorArgs),
    /// Sessions created and deleted through the HTTP API of two standalone gateway processes
    /// sharing a real Redis: call rate and latency, time until the backend saw them all.
    SessionApi(session_api::SessionApiArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.what {
        What::Assign(args) => assign::run(args),
        What::Delivery(args) => delivery::run(args),
        What::Cache(args) => cache::run(args),
        What::Sessions(args) => sessions::run(args),
        What::SessionApi(args) => session_api::run(args),
        What::Operator(args) => operator::run(args),
    }
}
