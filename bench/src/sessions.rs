//! `bench sessions`: what a session costs inside the real gateway, and how fast a fleet comes up.
//!
//! What runs, in this process: `gateway::app::Pipeline` (router, batcher, delivery with its PNG
//! QR rendering, Redis spill) configured by the gateway's own `Cli`, and the real `Supervisor` with
//! Redis ownership locks, fenced credentials and its event gate, driving `--count` sessions of the
//! chosen driver, all wanted at once (as after a pod restart) through the connection-attempt cap.
//! Outside this process: the backend, a `test_support::receiver::Receiver` on loopback started in
//! a child process (this binary with `--serve-receiver`), so the requests it keeps in memory are
//! not counted; and a redis-server of its own (`test_support::RedisServer`), or `REDIS_URL`.
//!
//! - `rss_per_session_kib`: growth of this process's VmRSS (`/proc/self/status`) from just before
//!   the sessions are wanted to after every session showed its first QR code and the pipeline
//!   delivered it, divided by `count`. For `sim` every session starts unpaired and nobody scans.
//! - `seconds_to_all_qr`: from wanting the sessions to the last session's first QR code passing
//!   the supervisor's gate (counted by a tap in front of the pipeline).
//!
//! `--driver whatsapp` runs the real `whatsapp-rust` client inside the real gateway *binary*
//! (`gateway standalone --driver whatsapp`, Redis store, supervisor, cache, delivery) against the
//! project's fake WhatsApp server on loopback (`test_support::fake_whatsapp`, in this process).
//! The fake's certificate is not WhatsApp's, so that binary is built with the test-only feature
//! `fake-server-tests` into a target directory of its own (`<target>/fake-server`): the feature
//! never reaches the gateway binary of a normal build. Per-session RSS is the gateway process's
//! VmRSS with `count` sessions each showing a QR code, minus the same binary's VmRSS with no
//! session, divided by `count`; `seconds_to_all_qr` runs from the process start to the backend
//! receiver holding the first QR code of every session (so it includes the QR lane's batching).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use gateway::app::Pipeline;
use gateway::config::{Cli, Mode};
use gateway::events::GatewayEvent;
use gateway::session::EventSink;
use gateway::session::credentials::RestoringSim;
use gateway::session::sim::SimConfig;
use gateway::session::supervisor::Supervisor;
use serde_json::json;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriverArg {
    Sim,
    Whatsapp,
}

#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    #[arg(long, value_enum, default_value = "sim")]
    driver: DriverArg,
    #[arg(long, default_value_t = 20_000)]
    count: usize,
    /// In-memory locks and credentials instead of a redis-server.
    #[arg(long)]
    no_redis: bool,
    /// The supervisor's cap on concurrent connection attempts.
    #[arg(long, default_value_t = 64)]
    max_connect_attempts: usize,
    /// Give up waiting for the first QR codes after this long.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Internal: only run the loopback receiver, print its URL, and serve until stdin closes.
    #[arg(long, hide = true)]
    serve_receiver: bool,
}

pub fn run(args: SessionsArgs) -> anyhow::Result<()> {
    if args.serve_receiver {
        return serve_receiver();
    }
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    if args.driver == DriverArg::Whatsapp {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let report = runtime.block_on(measure_whatsapp(&args))?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut receiver = ReceiverProcess::start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(measure(&args, &receiver.url));
    drop(runtime);
    receiver.stop();
    println!("{}", serde_json::to_string_pretty(&report?)?);
    Ok(())
}

/// The receiver in a child process: its memory is the backend's, not the gateway's.
struct ReceiverProcess {
    child: std::process::Child,
    url: String,
}

impl ReceiverProcess {
    fn start() -> anyhow::Result<Self> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["sessions", "--serve-receiver"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the receiver process")?;
        let stdout = child.stdout.take().context("receiver stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let url = line.trim().to_string();
        if !url.starts_with("http://") {
            let _ = child.kill();
            bail!("receiver process did not report its URL: `{url}`");
        }
        Ok(ReceiverProcess { child, url })
    }

    fn stop(&mut self) {
        // Closing stdin ends it; kill in case it does not.
        drop(self.child.stdin.take());
        std::thread::sleep(Duration::from_millis(100));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_receiver() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let receiver = runtime.block_on(test_support::receiver::Receiver::start())?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", receiver.url())?;
    stdout.flush()?;
    // Serve until the parent closes stdin (or dies).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(receiver);
    Ok(())
}

fn rss_kib() -> u64 {
    rss_in("/proc/self/status")
}

async fn measure(args: &SessionsArgs, backend_url: &str) -> anyhow::Result<serde_json::Value> {
    let (redis_server, redis_url) = if args.no_redis {
        (None, None)
    } else {
        match std::env::var("REDIS_URL") {
            Ok(url) if !url.is_empty() => (None, Some(url)),
            _ => {
                let server = test_support::RedisServer::start()
                    .await
                    .context("starting redis-server (set REDIS_URL, or pass --no-redis)")?;
                let url = server.url();
                (Some(server), Some(url))
            }
        }
    };
    let attempts = args.max_connect_attempts.to_string();
    let mut argv = vec![
        "gateway",
        "standalone",
        "--backend-url",
        backend_url,
        "--identity",
        "bench-sessions",
        "--resync-interval-s",
        "0",
        "--rate-limit-rps",
        "100000",
        "--rate-limit-burst",
        "10000",
        "--max-connect-attempts",
        &attempts,
        "--log-format",
        "text",
    ];
    if let Some(url) = &redis_url {
        argv.extend(["--redis-url", url.as_str()]);
    }
    let cli = Cli::try_parse_from(argv).context("gateway command line")?;
    let Mode::Standalone(standalone) = cli.mode else {
        unreachable!("parsed a standalone command line")
    };
    let settings = standalone.common.validate()?;
    let redis = match &settings.redis_url {
        Some(url) => Some(gateway::redis::connect(url).await?),
        None => None,
    };
    let mut registry = gateway::metrics::new_registry();
    let pipeline = Pipeline::start(&settings, redis.clone(), &mut registry, None).await?;

    // Tap in front of the pipeline: counts first QR codes, forwards everything unchanged.
    let first_qr = Arc::new(AtomicUsize::new(0));
    let (tap, mut tapped) = EventSink::channel(settings.batch.input_capacity);
    let forward = {
        let sink = pipeline.event_sink();
        let first_qr = first_qr.clone();
        tokio::spawn(async move {
            while let Some(event) = tapped.recv().await {
                if let GatewayEvent::Qr(qr) = &event
                    && qr.seq == 1
                {
                    first_qr.fetch_add(1, Ordering::Relaxed);
                }
                if sink.emit(event).await.is_err() {
                    return;
                }
            }
        })
    };

    let options = gateway::app::supervisor_options(&settings, redis.as_ref(), &mut registry);
    let sim = RestoringSim::new(
        SimConfig {
            unpaired_share: 1.0,
            scan_probability: 0.0,
            ..SimConfig::default()
        },
        options.credentials.clone(),
    )?;
    let supervisor = Supervisor::with_options(Arc::new(sim), tap, options);
    let ids: Vec<String> = (0..args.count).map(|i| format!("bench-{i:06}")).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = rss_kib();

    let began = Instant::now();
    for id in &ids {
        supervisor.want(id);
    }
    let deadline = began + Duration::from_secs(args.timeout_s);
    while first_qr.load(Ordering::Relaxed) < args.count {
        if Instant::now() >= deadline {
            bail!(
                "only {} of {} sessions showed a QR code within {} s",
                first_qr.load(Ordering::Relaxed),
                args.count,
                args.timeout_s
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds_to_all_qr = began.elapsed().as_secs_f64();

    // Until the backend has them all (qr_pending and the first QR of every session).
    let delivery = pipeline.delivery.clone();
    let wanted = 2 * args.count as u64;
    let delivered_by = Instant::now() + Duration::from_secs(120);
    while delivery.delivered_items() < wanted && Instant::now() < delivered_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered = delivery.delivered_items();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib();
    let live = supervisor.live();
    let locks = supervisor.ownership().held();

    let drain_began = Instant::now();
    supervisor
        .drain(
            Duration::from_secs(30),
            pipeline.shutdown(Vec::new(), Duration::from_secs(30)),
        )
        .await;
    let drain_seconds = drain_began.elapsed().as_secs_f64();
    let _ = forward.await;
    drop(redis_server);

    let per_session = rss_after.saturating_sub(rss_before) as f64 / args.count as f64;
    Ok(json!({
        "driver": "sim",
        "count": args.count,
        "rss_per_session_kib": (per_session * 100.0).round() / 100.0,
        "seconds_to_all_qr": (seconds_to_all_qr * 1000.0).round() / 1000.0,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "sessions_running": live,
        "locks_held": locks,
        "items_delivered": delivered,
        "redis": redis_url.is_some(),
        "max_connect_attempts": settings.max_connect_attempts,
        "qr_format": "png",
        "drain_seconds": (drain_seconds * 1000.0).round() / 1000.0,
    }))
}

/// The gateway binary with the fake server's certificate accepted, in `<target>/fake-server`.
fn fake_server_gateway() -> anyhow::Result<std::path::PathBuf> {
    let profile_dir = test_support::gateway::own_profile_dir()?;
    let target = profile_dir
        .parent()
        .context("the bench binary lives in <target>/<profile>")?;
    let dir = target.join("fake-server").join("release");
    eprintln!(
        "building the gateway with the test-only feature fake-server-tests into {}",
        dir.display()
    );
    let mut bins = test_support::gateway::build_binaries_with_features(
        &dir,
        &["gateway"],
        &["fake-server-tests"],
    )?;
    Ok(bins.remove(0))
}

fn rss_of(pid: u32) -> u64 {
    rss_in(&format!("/proc/{pid}/status"))
}

/// VmRSS in KiB from a `/proc/<pid>/status` file (0 if unreadable).
fn rss_in(status_path: &str) -> u64 {
    std::fs::read_to_string(status_path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

async fn measure_whatsapp(args: &SessionsArgs) -> anyhow::Result<serde_json::Value> {
    use test_support::fake_whatsapp::FakeWhatsapp;
    use test_support::gateway::GatewayProcess;

    let bin = fake_server_gateway()?;
    let redis = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => (None, url),
        _ => {
            let server = test_support::RedisServer::start()
                .await
                .context("starting redis-server (or set REDIS_URL)")?;
            let url = server.url();
            (Some(server), url)
        }
    };
    let fake = FakeWhatsapp::start().await?;
    let receiver = test_support::receiver::Receiver::start().await?;
    let attempts = args.max_connect_attempts.to_string();
    let backend = receiver.url();
    let common = |identity: &'static str| {
        vec![
            "standalone",
            "--driver",
            "whatsapp",
            "--whatsapp-version",
            "2.3000.0",
            "--backend-url",
            backend.as_str(),
            "--redis-url",
            redis.1.as_str(),
            "--identity",
            identity,
            "--resync-interval-s",
            "0",
            "--rate-limit-rps",
            "100000",
            "--rate-limit-burst",
            "10000",
            "--max-connect-attempts",
            attempts.as_str(),
        ]
    };
    let fake_url = fake.url();

    // The same binary and configuration with no session: the baseline.
    let mut baseline_args = common("bench-wa-baseline");
    baseline_args.extend(["--whatsapp-url", fake_url.as_str()]);
    let baseline = GatewayProcess::start_path(&bin, &baseline_args, &[]).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_empty = rss_of(baseline.child.id());
    drop(baseline);

    let ids: Vec<String> = (0..args.count)
        .map(|i| format!("wa-bench-{i:05}"))
        .collect();
    let sessions = ids.join(",");
    let mut run_args = common("bench-wa");
    run_args.extend(["--whatsapp-url", fake_url.as_str()]);
    let began = Instant::now();
    let gateway =
        GatewayProcess::start_path(&bin, &run_args, &[("WA_SESSIONS", sessions.as_str())]).await?;
    let deadline = began + Duration::from_secs(args.timeout_s);
    let first_qr_sessions = |receiver: &test_support::receiver::Receiver| {
        receiver
            .items("/qr/batch")
            .iter()
            .filter(|i| i["seq"] == 1)
            .filter_map(|i| i["sessionId"].as_str().map(str::to_owned))
            .collect::<std::collections::HashSet<String>>()
            .len()
    };
    let mut seen = 0;
    while seen < args.count {
        if Instant::now() >= deadline {
            bail!(
                "only {seen} of {} sessions had a QR code at the backend within {} s\n{}",
                args.count,
                args.timeout_s,
                gateway
                    .log()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen = first_qr_sessions(&receiver);
    }
    let seconds_to_all_qr = began.elapsed().as_secs_f64();
    // Settled: every session waiting for a scan, its first QR delivered.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_full = rss_of(gateway.child.id());
    let pending = receiver
        .last_status_by_session()
        .values()
        .filter(|s| *s == "qr_pending")
        .count();
    let handshakes = fake
        .stats()
        .handshakes
        .load(std::sync::atomic::Ordering::Relaxed);

    let stop_began = Instant::now();
    gateway.child.signal("TERM")?;
    let mut gateway = gateway;
    let exited = tokio::task::spawn_blocking(move || {
        let status = gateway.child.wait_timeout(Duration::from_secs(60));
        (status, gateway)
    })
    .await?;
    let drain_seconds = stop_began.elapsed().as_secs_f64();
    let exited_cleanly = matches!(exited.0, Ok(Some(_)));
    drop(redis.0);

    let per_session = rss_full.saturating_sub(rss_empty) as f64 / args.count as f64;
    Ok(json!({
        "driver": "whatsapp",
        "count": args.count,
        "rss_per_session_kib": (per_session * 100.0).round() / 100.0,
        "seconds_to_all_qr": (seconds_to_all_qr * 1000.0).round() / 1000.0,
        "rss_no_sessions_kib": rss_empty,
        "rss_with_sessions_kib": rss_full,
        "sessions_qr_pending_at_backend": pending,
        "fake_server_handshakes": handshakes,
        "redis": true,
        "max_connect_attempts": args.max_connect_attempts,
        "qr_format": "png",
        "drain_seconds": (drain_seconds * 1000.0).round() / 1000.0,
        "exited_cleanly": exited_cleanly,
        "targets": {
            "rss_per_session_kib_max": 100,
            "seconds_to_all_qr_max": 5,
            "met": per_session <= 100.0 && seconds_to_all_qr <= 5.0,
        },
    }))
}
