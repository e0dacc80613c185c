//! `bench session-api`: sessions created and deleted through the HTTP API of real gateway
//! processes (release build, sim driver, every session paired) sharing a real redis-server, with
//! a real HTTP backend on loopback (`test_support::receiver::Receiver`, in this process).
//!
//! Two gateways run; every call goes to the first (`gw-a`), and the second (`gw-b`) follows the
//! session book, so the ownership locks split the sessions between them.
//!
//! - `create`: `--sessions` `POST /v1/sessions` with `--concurrency` in flight: calls per second
//!   and the calls' latency (p50/p99), then the seconds from the first call until the backend
//!   has an `active` status for every session, and how the locks split them;
//! - `delete`: the same number of `DELETE /v1/sessions/{id}`, then the seconds until the backend
//!   has `logged_out` for every session and no session is locked any more. With
//!   `--pause-before-delete` every session is paused first (`PATCH`, until none is locked), so
//!   each delete connects a paused session only to unlink its device.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use test_support::RedisServer;
use test_support::gateway::{GatewayProcess, build_binaries_into, own_profile_dir};
use test_support::receiver::Receiver;
use tokio::time::Instant;

const TOKEN: &str = "bench-token";

#[derive(Debug, clap::Args)]
pub struct SessionApiArgs {
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// API calls in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Give up waiting for the backend after this long (per phase).
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Use the gateway binary already in this profile dir.
    #[arg(long)]
    no_build: bool,
    /// Pause every session before deleting them all (deletes of idle, paired sessions).
    #[arg(long)]
    pause_before_delete: bool,
}

pub fn run(args: SessionApiArgs) -> anyhow::Result<()> {
    if args.sessions == 0 || args.concurrency == 0 {
        bail!("--sessions and --concurrency must be at least 1");
    }
    let profile_dir = own_profile_dir()?;
    let bin = if args.no_build {
        profile_dir.join("gateway")
    } else {
        eprintln!("building gateway into {} ...", profile_dir.display());
        build_binaries_into(&profile_dir, &["gateway"])?.remove(0)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(measure(&args, &bin))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn start_gateway(
    bin: &std::path::Path,
    redis: &RedisServer,
    receiver: &Receiver,
    identity: &str,
) -> anyhow::Result<GatewayProcess> {
    let (redis_url, backend) = (redis.url(), receiver.url());
    let args = [
        "standalone",
        "--redis-url",
        &redis_url,
        "--backend-url",
        &backend,
        "--api-token",
        TOKEN,
        "--sim-unpaired-share",
        "0",
        "--identity",
        identity,
        // Level-triggered re-sync would repeat statuses the counts below look for.
        "--resync-interval-s",
        "0",
    ];
    Ok(GatewayProcess::start_path(bin, &args, &[("RUST_LOG", "warn")]).await?)
}

/// Runs `calls` with `concurrency` in flight; returns the calls' latencies (ms) and failures.
async fn drive(
    requests: Vec<reqwest::RequestBuilder>,
    concurrency: usize,
    expect: u16,
) -> (Vec<f64>, usize) {
    let results: Vec<(f64, bool)> = futures::stream::iter(requests)
        .map(|request| async move {
            let started = Instant::now();
            let ok = match request.send().await {
                Ok(response) => response.status().as_u16() == expect,
                Err(_) => false,
            };
            (started.elapsed().as_secs_f64() * 1000.0, ok)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let failed = results.iter().filter(|(_, ok)| !ok).count();
    (results.into_iter().map(|(ms, _)| ms).collect(), failed)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    (sorted[index] * 10.0).round() / 10.0
}

fn latency(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    json!({"p50": quantile(&ms, 0.5), "p99": quantile(&ms, 0.99), "max": quantile(&ms, 1.0)})
}

/// Sessions for which the backend received `status`.
fn with_status(receiver: &Receiver, status: &str) -> HashSet<String> {
    receiver
        .items("/status/batch")
        .into_iter()
        .filter(|item| item["status"] == status)
        .filter_map(|item| item["sessionId"].as_str().map(str::to_owned))
        .collect()
}

async fn wait_for(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> (bool, String),
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (ok, progress) = done();
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what}: not done after {timeout:?} ({progress})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Holders of the sessions' locks: (held by gw-a, held by gw-b).
async fn owners(redis: &fred::clients::Client, ids: &[String]) -> anyhow::Result<(usize, usize)> {
    use fred::interfaces::KeysInterface;
    let (mut a, mut b) = (0, 0);
    for id in ids {
        let holder: Option<String> = redis
            .get(gateway::session::ownership::owner_key(id))
            .await?;
        match holder {
            Some(h) if h.starts_with("gw-a:") => a += 1,
            Some(h) if h.starts_with("gw-b:") => b += 1,
            _ => {}
        }
    }
    Ok((a, b))
}

async fn measure(args: &SessionApiArgs, bin: &std::path::Path) -> anyhow::Result<Value> {
    let redis = RedisServer::start().await?;
    let receiver = Arc::new(Receiver::start().await?);
    let a = start_gateway(bin, &redis, &receiver, "gw-a").await?;
    let _b = start_gateway(bin, &redis, &receiver, "gw-b").await?;
    let redis_client = gateway::redis::connect(&redis.url()).await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let ids: Vec<String> = (0..args.sessions).map(|i| format!("api-{i:06}")).collect();
    let timeout = Duration::from_secs(args.timeout_s);

    // Create.
    let t0 = Instant::now();
    let creates = ids
        .iter()
        .map(|id| {
            client
                .post(a.url("/v1/sessions"))
                .bearer_auth(TOKEN)
                .json(&json!({"sessionId": id}))
        })
        .collect();
    let (create_ms, create_failed) = drive(creates, args.concurrency, 201).await;
    let create_seconds = t0.elapsed().as_secs_f64();
    let total = ids.len();
    wait_for("every session active at the backend", timeout, || {
        let n = with_status(&receiver, "active").len();
        (n >= total, format!("{n}/{total}"))
    })
    .await
    .context("create")?;
    let seconds_to_all_active = t0.elapsed().as_secs_f64();
    let (on_a, on_b) = owners(&redis_client, &ids).await?;

    let paused = if args.pause_before_delete {
        let t = Instant::now();
        let pauses = ids
            .iter()
            .map(|id| {
                client
                    .patch(a.url(&format!("/v1/sessions/{id}")))
                    .bearer_auth(TOKEN)
                    .json(&json!({"paused": true}))
            })
            .collect();
        let (_, pause_failed) = drive(pauses, args.concurrency, 200).await;
        let deadline = Instant::now() + timeout;
        loop {
            let (locked_a, locked_b) = owners(&redis_client, &ids).await?;
            if locked_a + locked_b == 0 {
                break;
            }
            if Instant::now() >= deadline {
                bail!("pause: {} sessions still locked", locked_a + locked_b);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        json!({
            "failed_calls": pause_failed,
            "seconds_to_all_unlocked": (t.elapsed().as_secs_f64() * 100.0).round() / 100.0,
        })
    } else {
        Value::Null
    };

    // Delete.
    let t1 = Instant::now();
    let deletes = ids
        .iter()
        .map(|id| {
            client
                .delete(a.url(&format!("/v1/sessions/{id}")))
                .bearer_auth(TOKEN)
        })
        .collect();
    let (delete_ms, delete_failed) = drive(deletes, args.concurrency, 202).await;
    let delete_seconds = t1.elapsed().as_secs_f64();
    wait_for("every session logged out at the backend", timeout, || {
        let n = with_status(&receiver, "logged_out").len();
        (n >= total, format!("{n}/{total}"))
    })
    .await
    .context("delete")?;
    let seconds_to_all_logged_out = t1.elapsed().as_secs_f64();
    let (still_a, still_b) = owners(&redis_client, &ids).await?;

    Ok(json!({
        "sessions": total,
        "concurrency": args.concurrency,
        "gateways": 2,
        "pause_before_delete": paused,
        "create": {
            "calls_per_second": (total as f64 / create_seconds).round(),
            "call_latency_ms": latency(create_ms),
            "failed_calls": create_failed,
            "seconds_of_calls": (create_seconds * 100.0).round() / 100.0,
            "seconds_to_all_active": (seconds_to_all_active * 100.0).round() / 100.0,
            "locked_by": {"gw-a": on_a, "gw-b": on_b},
        },
        "delete": {
            "calls_per_second": (total as f64 / delete_seconds).round(),
            "call_latency_ms": latency(delete_ms),
            "failed_calls": delete_failed,
            "seconds_of_calls": (delete_seconds * 100.0).round() / 100.0,
            "seconds_to_all_logged_out": (seconds_to_all_logged_out * 100.0).round() / 100.0,
            "still_locked": still_a + still_b,
        },
        "backend_requests": receiver.attempts(),
    }))
}
