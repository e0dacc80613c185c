//! `bench delivery`: the real gateway delivery pipeline (router, batcher, delivery with rate limit,
//! retries and Redis spill, backend client) driven by the `sim` driver, sending to a real HTTP
//! receiver on loopback. Prints one JSON object on stdout; logs go to stderr.
//!
//! What runs, in one process:
//! - a receiver (`test_support::receiver::Receiver`) on its own single-thread tokio runtime, so
//!   the "backend" does not share the gateway's scheduler; it answers 200 after
//!   `--backend-delay-ms` and records each request with its arrival time (unix ms);
//! - a redis-server of its own (`test_support::RedisServer`), or `REDIS_URL` when set, behind the
//!   spill (`gateway::redis::connect`);
//! - `gateway::app::Pipeline::start` with settings parsed and validated by the gateway's own
//!   `Cli` (`gateway standalone --backend-url ... --batch-policy ...`);
//! - N sim sessions (`SimDriver::start`) reporting into a sink of the bench, which records each
//!   event's key and creation time and forwards it unchanged to `pipeline.event_sink()`.
//!
//! Timeline: session starts are spread evenly over `--ramp-s` (20 s: one QR rotation, so that
//! rotations are spread evenly over time afterwards), then the fleet runs until `--warmup-s`
//! (60 s: the first QR of a pairing cycle is valid 60 s, so from then on QR rotations arrive at a
//! steady rate and the start-up connects are over). The measurement window is the next
//! `--seconds`; `burst` triggers `SimDriver::trigger_burst(--burst-window-ms)` at its start.
//! After the window the fleet keeps running for `--tail-s` (10 s, longer than the seed policy's
//! 5 s interval) so events of the window are delivered by the policy itself, not by the shutdown
//! flush; then sessions are stopped and the pipeline is shut down gracefully, which flushes
//! everything pending, before anything is counted.
//!
//! What is counted:
//! - `events`, latencies: events *created* in the window; latency = creation (the event's tokio
//!   `created` instant converted to unix time when it is forwarded) to its first arrival at the
//!   receiver (recorded after the receiver's processing delay, just before the 200 is written).
//!   Items are matched by key: status = session id + status + `at`, QR = session id + seq +
//!   `expiresAt` (both as on the wire).
//! - `requests`, `requests_per_second`: requests that arrived at the receiver in the window.
//! - `lost`, `duplicates`: over the whole run (warm-up, window, tail, shutdown flush). `lost` =
//!   events forwarded - distinct items delivered - superseded (batcher, all lanes) - expired
//!   (batcher and spill); `duplicates` = receiver items that repeat a key already received.
//!
//! With `--webhook-share`, that share of the sessions names its own webhook (a second receiver
//! that hangs or is down during the window): the top-level figures are then the other sessions',
//! `webhook` the webhook sessions' own, and `lost` covers both receivers.
//!
//! The workload (`mix` in the output) is the simulator's default `SimConfig`, unchanged; see
//! [`steady_mix`] for why it is a fair picture of a fleet.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use gateway::app::Pipeline;
use gateway::batch::{FlushReason, Lane};
use gateway::config::{Cli, Mode};
use gateway::events::{GatewayEvent, Priority};
use gateway::session::sim::{SimConfig, SimDriver};
use gateway::session::{EventSink, SessionDriver};
use serde_json::{Value, json};
use test_support::receiver::Receiver;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyArg {
    Adaptive,
    Seed,
    Naive,
}

impl PolicyArg {
    fn as_str(self) -> &'static str {
        match self {
            PolicyArg::Adaptive => "adaptive",
            PolicyArg::Seed => "seed",
            PolicyArg::Naive => "naive",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The documented realistic mix (the simulator's defaults), in steady state.
    Steady,
    /// The same fleet; at the start of the window every connected session drops within
    /// `--burst-window-ms` and reconnects 0.5-5 s later (WhatsApp or node outage).
    Burst,
}

impl Scenario {
    fn as_str(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::Burst => "burst",
        }
    }
}

/// What the per-session webhook does during the window (`--webhook-share`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WebhookMode {
    /// Answers 200, like the backend.
    Ok,
    /// Closes every connection at once.
    Down,
    /// Never answers: each attempt waits for the gateway's request timeout (10 s).
    Hang,
}

impl WebhookMode {
    fn as_str(self) -> &'static str {
        match self {
            WebhookMode::Ok => "ok",
            WebhookMode::Down => "down",
            WebhookMode::Hang => "hang",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QrFormatArg {
    Png,
    Raw,
}

#[derive(Debug, clap::Args)]
pub struct DeliveryArgs {
    /// Simulated sessions.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Length of the measurement window, after the warm-up.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    #[arg(long, value_enum, default_value_t = PolicyArg::Adaptive)]
    policy: PolicyArg,
    #[arg(long, value_enum, default_value_t = Scenario::Steady)]
    scenario: Scenario,
    /// Session starts are spread evenly over this many seconds.
    #[arg(long, default_value_t = 20)]
    ramp_s: u64,
    /// The window starts this many seconds after the first session started.
    #[arg(long, default_value_t = 60)]
    warmup_s: u64,
    /// The fleet keeps running this long after the window so its events are delivered by the
    /// policy rather than by the shutdown flush.
    #[arg(long, default_value_t = 10)]
    tail_s: u64,
    /// Burst scenario: every connected session drops within this window.
    #[arg(long, default_value_t = 1_000)]
    burst_window_ms: u64,
    /// Burst scenario: the `burst_phase` numbers cover this many seconds from the burst (drops in
    /// 1 s, reconnects within 5 s more, and the delivery of both).
    #[arg(long, default_value_t = 10)]
    burst_phase_s: u64,
    /// Time the receiver takes per request before answering 200. 10 ms is a lean Laravel
    /// controller doing one bulk upsert on a warm worker on the same network; 0 measures the
    /// gateway alone.
    #[arg(long, default_value_t = 10)]
    backend_delay_ms: u64,
    /// Token bucket toward the backend, equal for every policy. High by default so the comparison
    /// measures batching, not the limiter (the gateway's own default is 200 rps, burst 50).
    #[arg(long, default_value_t = 100_000)]
    rate_limit_rps: u32,
    #[arg(long, default_value_t = 100_000)]
    rate_limit_burst: u32,
    /// Periodic re-sync of every session's status (0 = off, the default, so the numbers show the
    /// events themselves; the gateway's default is 300 s).
    #[arg(long, default_value_t = 0)]
    resync_interval_s: u64,
    /// How QR codes go on the wire: PNG data URLs (the gateway's default, as the seed) or raw.
    #[arg(long, value_enum, default_value_t = QrFormatArg::Png)]
    qr_format: QrFormatArg,
    /// Seed of the simulator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Adaptive: override `BatchConfig::high_linger` (default 0 ms).
    #[arg(long)]
    high_linger_ms: Option<u64>,
    /// Adaptive: override `BatchConfig::qr_max_delay` (default 800 ms).
    #[arg(long)]
    qr_max_delay_ms: Option<u64>,
    /// Adaptive: override `BatchConfig::normal_max_delay` (default 1000 ms).
    #[arg(long)]
    normal_max_delay_ms: Option<u64>,
    /// Adaptive: override `BatchConfig::max_batch_items` (default 500).
    #[arg(long)]
    max_batch_items: Option<usize>,
    /// Override the steady mix's share of sessions awaiting a scan (default 0.2). Printed under
    /// `mix`, whose `source` then says the defaults were overridden.
    #[arg(long)]
    unpaired_share: Option<f64>,
    /// Override the steady mix's mean connected time in seconds (default 1800).
    #[arg(long)]
    mean_connected_s: Option<u64>,
    /// Longest the graceful shutdown may take.
    #[arg(long, default_value_t = 120)]
    shutdown_grace_s: u64,
    /// Share of the sessions (spread evenly) that name their own webhook (`spec.webhook`): a
    /// second receiver. The top-level figures are then those of the other sessions (the
    /// backend's); `webhook` has the webhook sessions' own. `lost` covers both.
    #[arg(long, default_value_t = 0.0)]
    webhook_share: f64,
    /// What the webhook does during the window; it answers 200 again from the tail on, and the
    /// bench waits for its spill to drain before shutting down.
    #[arg(long, value_enum, default_value_t = WebhookMode::Hang)]
    webhook_mode: WebhookMode,
}

/// The steady mix: `SimConfig::default()` as the simulator documents it, unchanged, with the
/// bench's seed. Why it is a fair fleet (and if anything a heavy one):
/// - 20% of sessions start awaiting a scan (`unpaired_share`): an onboarding-heavy SaaS where many
///   tenants have a number registered but not linked yet; QR codes rotate as WhatsApp does (first
///   valid 60 s, then 20 s, six per cycle, then `inactive`/`qr_exhausted`, a new cycle 30 s later),
///   and each shown code is scanned with probability 0.15 (most people never scan, those who do
///   scan one of the first codes). This makes QR the dominant stream, the one batching is for.
/// - Paired sessions connect within 2 s of start, then stay up for an exponentially distributed
///   time with a mean of 30 min (drops are memoryless like network failures; 30 min is on the
///   flaky side for a server-side WhatsApp Web connection), reconnecting after 0.5-5 s (uniform).
/// - 1% of drops are logouts (the phone unlinked the device), which start a new pairing cycle.
pub fn steady_mix(seed: u64) -> SimConfig {
    SimConfig {
        seed,
        ..SimConfig::default()
    }
}

fn mix_json(mix: &SimConfig) -> Value {
    let ms = |d: Duration| d.as_millis() as u64;
    json!({
        "source": if *mix == steady_mix(mix.seed) {
            "gateway::session::sim::SimConfig::default()"
        } else {
            "SimConfig::default() with --unpaired-share/--mean-connected-s overrides"
        },
        "seed": mix.seed,
        "unpaired_share": mix.unpaired_share,
        "first_qr_validity_ms": ms(mix.first_qr_validity),
        "rotated_qr_validity_ms": ms(mix.rotated_qr_validity),
        "qr_codes_per_cycle": mix.qr_codes_per_cycle,
        "scan_probability_per_qr": mix.scan_probability,
        "qr_restart_after_ms": mix.qr_restart_after.map(ms),
        "connect_delay_max_ms": ms(mix.connect_delay_max),
        "mean_connected_ms": ms(mix.mean_connected),
        "reconnect_delay_ms": [ms(mix.reconnect_delay_min), ms(mix.reconnect_delay_max)],
        "logout_probability_per_drop": mix.logout_probability,
    })
}

/// Unix time in milliseconds, with sub-millisecond precision.
fn unix_ms_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Qr,
    High,
    Normal,
}

#[derive(Clone, Copy)]
struct Forwarded {
    created_ms: f64,
    kind: Kind,
}

/// The session id in a wire key (`s|<session>|...` or `q|<session>|...`).
fn session_of(key: &str) -> &str {
    key.split('|').nth(1).unwrap_or_default()
}

/// Every event forwarded to the pipeline, by wire key.
#[derive(Default, Clone)]
struct EventLog {
    events: HashMap<String, Forwarded>,
    forwarded: u64,
    /// Two events with one key (would be miscounted as a duplicate delivery); expected 0.
    key_collisions: u64,
}

/// The key of a wire item, as the receiver sees it.
fn wire_key(item: &Value) -> Option<String> {
    let session = item["sessionId"].as_str()?;
    if let Some(status) = item["status"].as_str() {
        let at = item["at"].as_str()?;
        Some(format!("s|{session}|{status}|{at}"))
    } else {
        let seq = item["seq"].as_u64()?;
        let expires = item["expiresAt"].as_str()?;
        Some(format!("q|{session}|{seq}|{expires}"))
    }
}

impl EventLog {
    /// The events of the sessions in `ids`, and the others'.
    fn split(&self, ids: &std::collections::HashSet<String>) -> (EventLog, EventLog) {
        let (mut inside, mut outside) = (EventLog::default(), EventLog::default());
        for (key, event) in &self.events {
            let part = if ids.contains(session_of(key)) {
                &mut inside
            } else {
                &mut outside
            };
            part.events.insert(key.clone(), *event);
            part.forwarded += 1;
        }
        (inside, outside)
    }

    fn record(&mut self, event: &GatewayEvent) {
        let created_ms = unix_ms_f64() - event.created().elapsed().as_secs_f64() * 1000.0;
        let kind = match event {
            GatewayEvent::Qr(_) => Kind::Qr,
            GatewayEvent::Status(status) if status.priority == Priority::High => Kind::High,
            GatewayEvent::Status(_) => Kind::Normal,
        };
        // The event serializes to the wire item (the QR payload is rendered later, but the key
        // does not use it).
        let key = serde_json::to_value(event)
            .ok()
            .as_ref()
            .and_then(wire_key)
            .expect("events serialize to keyed wire items");
        self.forwarded += 1;
        if self
            .events
            .insert(key, Forwarded { created_ms, kind })
            .is_some()
        {
            self.key_collisions += 1;
        }
    }
}

fn percentiles(mut values: Vec<f64>) -> Value {
    if values.is_empty() {
        return json!({"p50": null, "p99": null, "max": null, "count": 0});
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let index = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
        (values[index] * 10.0).round() / 10.0
    };
    json!({
        "p50": at(0.50),
        "p99": at(0.99),
        "max": at(1.0),
        "count": values.len(),
    })
}

/// One accepted request as the bench needs it.
struct Arrival {
    at_ms: f64,
    qr: bool,
    keys: Vec<Option<String>>,
}

struct Analysis {
    /// First arrival of each key.
    first_arrival: HashMap<String, f64>,
    duplicates: u64,
    unmatched: u64,
    receiver_items: u64,
}

fn analyse<'a>(log: &EventLog, arrivals: impl IntoIterator<Item = &'a Arrival>) -> Analysis {
    let mut first_arrival: HashMap<String, f64> = HashMap::with_capacity(log.events.len());
    let mut duplicates = 0;
    let mut unmatched = 0;
    let mut receiver_items = 0;
    for arrival in arrivals {
        for key in &arrival.keys {
            receiver_items += 1;
            let Some(key) = key else {
                unmatched += 1;
                continue;
            };
            if !log.events.contains_key(key) {
                unmatched += 1;
            }
            match first_arrival.get_mut(key) {
                Some(first) => {
                    duplicates += 1;
                    *first = first.min(arrival.at_ms);
                }
                None => {
                    first_arrival.insert(key.clone(), arrival.at_ms);
                }
            }
        }
    }
    Analysis {
        first_arrival,
        duplicates,
        unmatched,
        receiver_items,
    }
}

/// Events, requests and latencies of events created (requests arrived) in `[from, to)`.
fn window(log: &EventLog, analysis: &Analysis, arrivals: &[Arrival], from: f64, to: f64) -> Value {
    let mut latencies: HashMap<Kind, Vec<f64>> = HashMap::new();
    let mut events = 0u64;
    let mut undelivered = 0u64;
    let mut by_kind: HashMap<Kind, u64> = HashMap::new();
    for (key, event) in &log.events {
        if event.created_ms < from || event.created_ms >= to {
            continue;
        }
        events += 1;
        *by_kind.entry(event.kind).or_default() += 1;
        match analysis.first_arrival.get(key) {
            Some(at) => latencies
                .entry(event.kind)
                .or_default()
                .push((at - event.created_ms).max(0.0)),
            None => undelivered += 1,
        }
    }
    let in_window: Vec<&Arrival> = arrivals
        .iter()
        .filter(|a| a.at_ms >= from && a.at_ms < to)
        .collect();
    let requests = in_window.len() as u64;
    let requests_qr = in_window.iter().filter(|a| a.qr).count() as u64;
    let seconds = (to - from) / 1000.0;
    let mut take = |kind| percentiles(latencies.remove(&kind).unwrap_or_default());
    json!({
        "seconds": seconds,
        "events": events,
        "events_qr": by_kind.get(&Kind::Qr).copied().unwrap_or(0),
        "events_status_high": by_kind.get(&Kind::High).copied().unwrap_or(0),
        "events_status_normal": by_kind.get(&Kind::Normal).copied().unwrap_or(0),
        "requests": requests,
        "requests_per_second": ((requests as f64 / seconds) * 100.0).round() / 100.0,
        "requests_qr": requests_qr,
        "requests_status": requests - requests_qr,
        "qr_latency_ms": take(Kind::Qr),
        "status_high_latency_ms": take(Kind::High),
        "status_normal_latency_ms": take(Kind::Normal),
        "undelivered": undelivered,
    })
}

/// Reads one counter (summed over its labels) from the gateway's metrics text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn run(args: DeliveryArgs) -> anyhow::Result<()> {
    gateway::app::init_logging(false);
    // The backend gets its own runtime (one worker thread): it is another process in real life.
    let backend_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("receiver")
        .enable_all()
        .build()?;
    let receiver = backend_runtime
        .block_on(Receiver::start())
        .context("starting the HTTP receiver")?;
    receiver.set_processing_delay(Duration::from_millis(args.backend_delay_ms));
    let webhook = backend_runtime
        .block_on(Receiver::start())
        .context("starting the webhook receiver")?;
    webhook.set_processing_delay(Duration::from_millis(args.backend_delay_ms));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(measure(&args, &receiver, &webhook))?;
    drop(runtime);
    drop(receiver);
    drop(webhook);
    drop(backend_runtime);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn measure(
    args: &DeliveryArgs,
    receiver: &Receiver,
    webhook: &Receiver,
) -> anyhow::Result<Value> {
    anyhow::ensure!(args.sessions > 0, "--sessions must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.webhook_share),
        "--webhook-share must be between 0 and 1"
    );
    anyhow::ensure!(args.seconds > 0, "--seconds must be at least 1");
    anyhow::ensure!(
        args.warmup_s >= args.ramp_s,
        "--warmup-s must not be shorter than --ramp-s"
    );

    let (redis_server, redis_url, redis_source) = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => (None, url, "REDIS_URL"),
        _ => {
            let server = test_support::RedisServer::start()
                .await
                .context("starting redis-server (set REDIS_URL to use another)")?;
            let url = server.url();
            (Some(server), url, "own redis-server")
        }
    };

    // Settings as the gateway itself parses and validates them.
    let identity = format!("bench-{}", std::process::id());
    let backend_url = receiver.url();
    let rate_rps = args.rate_limit_rps.to_string();
    let rate_burst = args.rate_limit_burst.to_string();
    let resync = args.resync_interval_s.to_string();
    let qr_format = match args.qr_format {
        QrFormatArg::Png => "png",
        QrFormatArg::Raw => "raw",
    };
    let argv = [
        "gateway",
        "standalone",
        "--backend-url",
        &backend_url,
        "--redis-url",
        &redis_url,
        "--batch-policy",
        args.policy.as_str(),
        "--rate-limit-rps",
        &rate_rps,
        "--rate-limit-burst",
        &rate_burst,
        "--resync-interval-s",
        &resync,
        "--qr-format",
        qr_format,
        "--identity",
        &identity,
        "--log-format",
        "text",
    ];
    let cli = Cli::try_parse_from(argv).context("gateway command line")?;
    let Mode::Standalone(standalone) = cli.mode else {
        unreachable!("parsed a standalone command line")
    };
    let mut settings = standalone.common.validate()?;
    if let Some(ms) = args.high_linger_ms {
        settings.batch.high_linger = Duration::from_millis(ms);
    }
    if let Some(ms) = args.qr_max_delay_ms {
        settings.batch.qr_max_delay = Duration::from_millis(ms);
    }
    if let Some(ms) = args.normal_max_delay_ms {
        settings.batch.normal_max_delay = Duration::from_millis(ms);
    }
    if let Some(n) = args.max_batch_items {
        settings.batch.max_batch_items = n;
    }
    settings.batch.validate()?;
    let batch = settings.batch.clone();

    let redis = gateway::redis::connect(&redis_url).await?;
    let mut registry = gateway::metrics::new_registry();
    let hook_items = Arc::new(AtomicU64::new(0));
    let hook: gateway::delivery::DeliveredHook = {
        let hook_items = hook_items.clone();
        Arc::new(move |batch| {
            hook_items.fetch_add(batch.items.len() as u64, Ordering::Relaxed);
        })
    };
    let pipeline = Pipeline::start(&settings, Some(redis), &mut registry, Some(hook)).await?;

    // The sessions report here; the forwarder records and passes each event on unchanged.
    let (sink, mut events_rx) = EventSink::channel(settings.batch.input_capacity);
    let to_pipeline = pipeline.event_sink();
    let forwarder = tokio::spawn(async move {
        let mut log = EventLog::default();
        while let Some(event) = events_rx.recv().await {
            log.record(&event);
            if to_pipeline.emit(event).await.is_err() {
                tracing::error!("pipeline stopped taking events");
                break;
            }
        }
        log
    });

    let mut mix = steady_mix(args.seed);
    if let Some(share) = args.unpaired_share {
        mix.unpaired_share = share;
    }
    if let Some(secs) = args.mean_connected_s {
        mix.mean_connected = Duration::from_secs(secs);
    }
    let driver = SimDriver::new(mix.clone())?;
    // Every k-th session (evenly spread) names the webhook, as `spec.webhook` would.
    let webhook_ids: std::collections::HashSet<String> = (0..args.sessions)
        .filter(|&i| {
            (i as f64 * args.webhook_share).floor() != ((i + 1) as f64 * args.webhook_share).floor()
        })
        .map(|i| format!("sim-{i:06}"))
        .collect();
    let webhook_target = gateway::delivery::WebhookTarget {
        url: webhook.url().parse()?,
        secret: None,
    };
    for id in &webhook_ids {
        pipeline.webhooks.route(id, Some(&webhook_target)).await?;
    }
    let started = Instant::now();
    let ramp = Duration::from_secs(args.ramp_s);
    let mut sessions = Vec::with_capacity(args.sessions);
    for i in 0..args.sessions {
        let at = started + ramp.mul_f64(i as f64 / args.sessions as f64);
        tokio::time::sleep_until(at).await;
        sessions.push(driver.start(&format!("sim-{i:06}"), sink.clone()).await?);
    }
    drop(sink);
    tracing::info!(sessions = sessions.len(), "sessions started; warming up");
    tokio::time::sleep_until(started + Duration::from_secs(args.warmup_s)).await;

    let window_from = unix_ms_f64();
    if args.scenario == Scenario::Burst {
        tracing::info!("burst: every connected session drops");
        driver.trigger_burst(Duration::from_millis(args.burst_window_ms));
    }
    let webhook_mode = match args.webhook_mode {
        WebhookMode::Ok => test_support::receiver::Mode::Ok,
        WebhookMode::Down => test_support::receiver::Mode::Down,
        WebhookMode::Hang => test_support::receiver::Mode::Hang,
    };
    webhook.set_mode(webhook_mode);
    let window_started = Instant::now();
    tokio::time::sleep_until(window_started + Duration::from_secs(args.seconds)).await;
    let window_to = window_from + (args.seconds * 1000) as f64;
    tracing::info!("window over; tail");
    webhook.set_mode(test_support::receiver::Mode::Ok);
    tokio::time::sleep(Duration::from_secs(args.tail_s)).await;
    // What the webhook missed waits in its spill: let it drain before counting.
    let drain_started = Instant::now();
    while pipeline.webhooks.backlog() > 0 && drain_started.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let webhook_drain_ms = drain_started.elapsed().as_millis() as u64;

    let end_states = pipeline.states.count_by_status();
    let stats = pipeline.batch_stats().clone();
    let delivery = pipeline.delivery.clone();
    tracing::info!("stopping sessions and shutting the pipeline down");
    let shutdown_started = Instant::now();
    pipeline
        .shutdown(sessions, Duration::from_secs(args.shutdown_grace_s))
        .await;
    let shutdown_ms = shutdown_started.elapsed().as_millis() as u64;
    let log = forwarder.await?;
    let metrics_text = gateway::metrics::render(&registry);
    drop(redis_server);

    let arrivals_at = |receiver: &Receiver| -> Vec<Arrival> {
        receiver
            .received()
            .into_iter()
            .map(|request| Arrival {
                at_ms: request.at_unix_ms as f64,
                qr: !request.path.contains("status"),
                keys: request.items.iter().map(wire_key).collect(),
            })
            .collect()
    };
    let arrivals = arrivals_at(receiver);
    let webhook_arrivals = arrivals_at(webhook);
    // Lost and duplicates over both receivers; latencies per receiver and its sessions.
    let analysis = analyse(&log, arrivals.iter().chain(&webhook_arrivals));
    let (webhook_log, backend_log) = log.split(&webhook_ids);

    let delivered = analysis.first_arrival.len() as u64;
    let superseded = stats.total_superseded();
    let expired_batcher = stats.expired();
    let expired_spill = metric_sum(&metrics_text, "whatsapp_gateway_expired_items_total") as u64;
    let lost = log.forwarded as i64
        - delivered as i64
        - superseded as i64
        - expired_batcher as i64
        - expired_spill as i64;

    let main = window(&backend_log, &analysis, &arrivals, window_from, window_to);
    let mut report = json!({
        "policy": args.policy.as_str(),
        "scenario": args.scenario.as_str(),
        "sessions": args.sessions,
        "seconds": args.seconds,
        "events": main["events"],
        "requests": main["requests"],
        "requests_per_second": main["requests_per_second"],
        "qr_latency_ms": {"p50": main["qr_latency_ms"]["p50"], "p99": main["qr_latency_ms"]["p99"]},
        "status_high_latency_ms": {
            "p50": main["status_high_latency_ms"]["p50"],
            "p99": main["status_high_latency_ms"]["p99"],
        },
        "lost": lost,
        "duplicates": analysis.duplicates,
        "window": main,
        "run": {
            "events_forwarded": log.forwarded,
            "delivered_distinct": delivered,
            "superseded": superseded,
            "superseded_by_lane": Lane::ALL.iter().map(|&lane| (lane.as_str(), stats.superseded(lane))).collect::<HashMap<_, _>>(),
            "expired": expired_batcher + expired_spill,
            "expired_batcher": expired_batcher,
            "expired_spill": expired_spill,
            "receiver_items": analysis.receiver_items,
            "receiver_requests": arrivals.len(),
            "receiver_unmatched_items": analysis.unmatched,
            "gateway_delivered_items": hook_items.load(Ordering::Relaxed),
            "batcher_received": stats.total_received(),
            "batcher_sent": stats.total_sent(),
            "flushes": Lane::ALL.iter().map(|&lane| {
                let reasons: HashMap<_, _> = FlushReason::ALL
                    .iter()
                    .map(|&reason| (reason.as_str(), stats.flushes(lane, reason)))
                    .filter(|(_, n)| *n > 0)
                    .collect();
                (lane.as_str(), reasons)
            }).collect::<HashMap<_, _>>(),
            "dead_letters": delivery.dead_letters(),
            "spill_backlog_after_shutdown": delivery.backlog(),
            "key_collisions": log.key_collisions,
            "shutdown_ms": shutdown_ms,
            "sessions_by_status_at_end": end_states.iter().map(|(status, n)| (status.as_str(), *n)).collect::<HashMap<_, _>>(),
        },
        "mix": mix_json(&mix),
        "ramp_s": args.ramp_s,
        "warmup_s": args.warmup_s,
        "tail_s": args.tail_s,
        "backend_delay_ms": args.backend_delay_ms,
        "rate_limit_rps": args.rate_limit_rps,
        "rate_limit_burst": args.rate_limit_burst,
        "resync_interval_s": args.resync_interval_s,
        "qr_format": qr_format,
        "redis": redis_source,
        "batch_config": {
            "batch_size": batch.batch_size,
            "batch_interval_ms": batch.batch_interval.as_millis() as u64,
            "priority_interval_ms": batch.priority_interval.as_millis() as u64,
            "naive_max_in_flight": batch.naive_max_in_flight,
            "max_batch_items": batch.max_batch_items,
            "high_linger_ms": batch.high_linger.as_millis() as u64,
            "normal_max_delay_ms": batch.normal_max_delay.as_millis() as u64,
            "qr_max_delay_ms": batch.qr_max_delay.as_millis() as u64,
            "qr_validity_fraction": batch.qr_validity_fraction,
        },
    });
    if args.scenario == Scenario::Burst {
        report["burst_window_ms"] = json!(args.burst_window_ms);
        let phase_to = window_from + (args.burst_phase_s.min(args.seconds) * 1000) as f64;
        report["burst_phase"] = window(&backend_log, &analysis, &arrivals, window_from, phase_to);
    }
    if !webhook_ids.is_empty() {
        report["webhook"] = json!({
            "share": args.webhook_share,
            "sessions": webhook_ids.len(),
            "mode_in_window": args.webhook_mode.as_str(),
            "window": window(&webhook_log, &analysis, &webhook_arrivals, window_from, window_to),
            "requests_total": webhook_arrivals.len(),
            "attempts_total": webhook.attempts(),
            "drain_after_tail_ms": webhook_drain_ms,
            "note": "top-level latencies and requests are the other sessions' (the backend's); lost and duplicates cover both",
        });
    }
    Ok(report)
}
