//! `bench cache`: the cache core under a realistic lookup mix while session states change.
//!
//! Two cache instances share one real Redis, as two gateway pods would: the **owner** runs every
//! session and writes each change through its cache (local tier at once, Redis + invalidation in
//! the background); the **reader** is another gateway that answers API lookups. All lookups go to
//! the reader, the harder case (in a cluster most lookups land on a pod that does not own the
//! session). Both have the real fallback path, answering from the ground truth and counting calls.
//!
//! Workload (defaults; see `docs/api.md`, Cache, for why these rates):
//! - lookups from `--readers` concurrent clients, `--lookups-per-second` in all (default 50 000,
//!   far above what 10 000 sessions' backend asks, leaving the CPU room for the gateway's own
//!   tasks; 0 runs them flat out for a throughput figure):
//!   - 94 %: "is this session active?" over all sessions, Zipf-skewed (s = 1): a few sessions
//!     are asked about far more often than the rest;
//!   - 5 %: QR reads of the sessions awaiting a scan (uniform);
//!   - 1 %: sessions that do not exist (100 ids, e.g. deleted sessions a client keeps polling);
//! - `--changes-per-second` state changes (default 50), uniform over sessions: connects, drops,
//!   logouts, QR rotations (10 000 sessions connected ~30 min each and 2 % rotating a QR every
//!   20 s make ~20/s; the default is 2.5x that);
//! - every 10th change is a probe: the time until the reader returns the new version is the
//!   measured propagation delay.
//!
//! A read is stale when it returns a version older than one written more than
//! `--propagation-budget-ms` before the read started (or "not found" for a live session).
//! Measurement starts after `--warmup-seconds` of the same lookups: it reports the steady state
//! of a running gateway, not the cold start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;
use gateway::cache::{
    Answered, CacheMetrics, CacheSettings, QrRecord, RedisTier, RemoteTier, SessionCache,
    SessionLookup, SessionView,
};
use gateway::events::SessionStatus;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args)]
pub struct CacheArgs {
    /// Sessions that exist.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Measured duration.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Session state changes per second (written through the owner).
    #[arg(long, default_value_t = 50.0)]
    changes_per_second: f64,
    /// Concurrent lookup clients on the reader.
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Total lookup rate of the clients; 0 = as fast as they go (saturates the CPU, which then
    /// delays invalidations: a throughput figure, not a realistic load).
    #[arg(long, default_value_t = 50_000)]
    lookups_per_second: u64,
    /// Zipf exponent of the "is it active?" lookups.
    #[arg(long, default_value_t = 1.0)]
    zipf_s: f64,
    /// Reads older than this after a change count as stale.
    #[arg(long, default_value_t = 250)]
    propagation_budget_ms: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Lookups before the measurement, so it sees the steady state (warm local tier) rather
    /// than the cold start of a gateway that just came up.
    #[arg(long, default_value_t = 5)]
    warmup_seconds: u64,
}

/// xorshift64*: reproducible, no RNG crate needed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A session's current view and its recent `(when written, version)` history.
type TruthEntry = (SessionView, Vec<(Instant, u64)>);

/// What is true, per session.
struct Truth {
    views: Vec<Mutex<TruthEntry>>,
    index: HashMap<String, usize>,
}

impl Truth {
    /// The newest version written at or before `at`.
    fn required_version(&self, i: usize, at: Instant) -> u64 {
        let entry = self.views[i].lock().unwrap();
        entry
            .1
            .iter()
            .rev()
            .find(|(t, _)| *t <= at)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }

    fn record(&self, i: usize, view: SessionView, at: Instant, version: u64) {
        let mut entry = self.views[i].lock().unwrap();
        entry.0 = view;
        entry.1.push((at, version));
        // Enough history for any read in flight.
        if entry.1.len() > 8 {
            entry.1.remove(0);
        }
    }
}

/// The fallback: the ground truth, counting calls.
struct TruthLookup {
    truth: Arc<Truth>,
    calls: AtomicU64,
}

impl SessionLookup for TruthLookup {
    fn lookup<'a>(
        &'a self,
        session_id: &'a str,
    ) -> BoxFuture<'a, gateway::Result<Option<SessionView>>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let found = self.truth.index.get(session_id).map(|&i| {
            let entry = self.truth.views[i].lock().unwrap();
            let mut view = entry.0.clone();
            view.status.version = entry.1.last().map(|(_, v)| *v).unwrap_or(0);
            view
        });
        Box::pin(async move { Ok(found) })
    }
}

fn session_id(i: usize) -> String {
    format!("bench-{i:06}")
}

fn qr(seq: u32) -> Option<QrRecord> {
    Some(QrRecord {
        code: format!("2@bench-qr-{seq}"),
        expires_at: chrono::Utc::now() + chrono::Duration::seconds(20),
        seq,
    })
}

/// The next state of a session: connected sessions drop (and rarely log out), dropped ones
/// reconnect, sessions awaiting a scan rotate their QR or get scanned.
fn next_view(current: &SessionView, rng: &mut Rng) -> SessionView {
    let id = current.session_id.as_str();
    let roll = rng.unit();
    match current.status.status {
        SessionStatus::Active if roll < 0.05 => {
            SessionView::with_status(id, SessionStatus::LoggedOut, Some("logged_out".into()))
        }
        SessionStatus::Active => {
            SessionView::with_status(id, SessionStatus::Inactive, Some("connection_lost".into()))
        }
        SessionStatus::QrPending if roll < 0.2 => {
            SessionView::with_status(id, SessionStatus::Active, None)
        }
        SessionStatus::QrPending => {
            let mut view = SessionView::with_status(id, SessionStatus::QrPending, None);
            view.qr = qr(current.qr.as_ref().map_or(1, |q| q.seq % 6 + 1));
            view
        }
        SessionStatus::LoggedOut => {
            let mut view = SessionView::with_status(id, SessionStatus::QrPending, None);
            view.qr = qr(1);
            view
        }
        _ => SessionView::with_status(id, SessionStatus::Active, None),
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

pub fn run(args: CacheArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.sessions >= 100, "--sessions must be at least 100");
    anyhow::ensure!(args.readers >= 1, "--readers must be at least 1");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(run_async(args))
}

struct ReaderStats {
    lookups: u64,
    answered: [u64; 4],
    stale: u64,
    stale_within_budget: u64,
    latency_ns: Vec<u32>,
    local_latency_ns: Vec<u32>,
}

async fn run_async(args: CacheArgs) -> anyhow::Result<()> {
    // A real Redis: REDIS_URL, or a private redis-server for the run.
    let (url, _server) = match std::env::var("REDIS_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let server = test_support::RedisServer::start()
                .await
                .context("start redis-server (or set REDIS_URL)")?;
            (server.url(), Some(server))
        }
    };
    let budget = Duration::from_millis(args.propagation_budget_ms);
    let mut rng = Rng(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);

    // Initial states: 80 % connected, 15 % dropped, 3 % awaiting a scan, 2 % logged out.
    let now = Instant::now();
    let mut views = Vec::with_capacity(args.sessions);
    let mut index = HashMap::with_capacity(args.sessions);
    let mut awaiting_scan = Vec::new();
    for i in 0..args.sessions {
        let id = session_id(i);
        let roll = rng.unit();
        let mut view = if roll < 0.80 {
            SessionView::with_status(&id, SessionStatus::Active, None)
        } else if roll < 0.95 {
            SessionView::with_status(&id, SessionStatus::Inactive, None)
        } else if roll < 0.98 {
            awaiting_scan.push(i);
            SessionView::with_status(&id, SessionStatus::QrPending, None)
        } else {
            SessionView::with_status(&id, SessionStatus::LoggedOut, None)
        };
        if view.status.status == SessionStatus::QrPending {
            view.qr = qr(1);
        }
        index.insert(id, i);
        views.push(Mutex::new((view, Vec::new())));
    }
    let truth = Arc::new(Truth { views, index });

    let stop = CancellationToken::new();
    let settings = CacheSettings::default();
    let mut caches = Vec::new();
    let mut lookups = Vec::new();
    for _ in 0..2 {
        let client = gateway::redis::connect(&url).await?;
        let lookup = Arc::new(TruthLookup {
            truth: truth.clone(),
            calls: AtomicU64::new(0),
        });
        let remote: Arc<dyn RemoteTier> =
            Arc::new(RedisTier::new(client.clone(), settings.redis_ttl));
        let cache = SessionCache::new(
            settings.clone(),
            Some(remote),
            lookup.clone(),
            CacheMetrics::default(),
        );
        cache.spawn_background(stop.clone());
        gateway::cache::spawn_invalidation_listener(&client, cache.clone(), stop.clone()).await?;
        caches.push(cache);
        lookups.push(lookup);
    }
    let (owner, reader) = (caches[0].clone(), caches[1].clone());

    // The owner runs every session: its writes fill Redis, as a running gateway's would.
    for (i, entry) in truth.views.iter().enumerate() {
        let view = entry.lock().unwrap().0.clone();
        let version = owner.write(view.clone());
        truth.record(i, view, now, version);
    }
    let filled = Instant::now();
    while owner.pending_writes() > 0 {
        anyhow::ensure!(
            filled.elapsed() < Duration::from_secs(60),
            "Redis did not take the initial writes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Zipf CDF over the sessions (rank r has weight 1 / r^s).
    let mut cdf = Vec::with_capacity(args.sessions);
    let mut acc = 0.0;
    for r in 1..=args.sessions {
        acc += 1.0 / (r as f64).powf(args.zipf_s);
        cdf.push(acc);
    }
    for c in &mut cdf {
        *c /= acc;
    }
    let cdf = Arc::new(cdf);
    let awaiting_scan = Arc::new(awaiting_scan);

    // Warm-up: the same mix, not counted.
    let warm_until = Instant::now() + Duration::from_secs(args.warmup_seconds);
    {
        let mut rng = Rng(args.seed.wrapping_add(7) | 1);
        let mut n = 0u64;
        while Instant::now() < warm_until {
            let u = rng.unit();
            let i = cdf.partition_point(|&c| c < u).min(cdf.len() - 1);
            let _ = reader.get(&session_id(i)).await;
            n += 1;
            if n.is_multiple_of(64) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    let fallback_before = lookups[1].calls.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let args_rate = args.lookups_per_second as f64;
    let readers = args.readers;
    let mut tasks = Vec::new();
    for r in 0..args.readers {
        let reader = reader.clone();
        let truth = truth.clone();
        let cdf = cdf.clone();
        let awaiting_scan = awaiting_scan.clone();
        let mut rng = Rng((args.seed + 1 + r as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1);
        tasks.push(tokio::spawn(async move {
            let mut stats = ReaderStats {
                lookups: 0,
                answered: [0; 4],
                stale: 0,
                stale_within_budget: 0,
                latency_ns: Vec::with_capacity(1 << 20),
                local_latency_ns: Vec::with_capacity(1 << 20),
            };
            let began = Instant::now();
            let per_reader = args_rate / readers as f64;
            while Instant::now() < deadline {
                if per_reader > 0.0 {
                    let due = began + Duration::from_secs_f64(stats.lookups as f64 / per_reader);
                    tokio::time::sleep_until(due.into()).await;
                }
                for _ in 0..64 {
                    let roll = rng.unit();
                    let (id, known) = if roll < 0.01 {
                        (format!("gone-{:03}", rng.below(100)), None)
                    } else if roll < 0.06 && !awaiting_scan.is_empty() {
                        let i = awaiting_scan[rng.below(awaiting_scan.len())];
                        (session_id(i), Some(i))
                    } else {
                        let u = rng.unit();
                        let i = cdf.partition_point(|&c| c < u).min(cdf.len() - 1);
                        (session_id(i), Some(i))
                    };
                    let started = Instant::now();
                    let (view, answered) = reader.get_traced(&id).await.expect("lookup");
                    let took = started.elapsed().as_nanos().min(u32::MAX as u128) as u32;
                    stats.lookups += 1;
                    stats.latency_ns.push(took);
                    let slot = match answered {
                        Answered::Local => {
                            stats.local_latency_ns.push(took);
                            0
                        }
                        Answered::Redis => 1,
                        Answered::Fallback => 2,
                        Answered::Shared => 3,
                    };
                    stats.answered[slot] += 1;
                    if let Some(i) = known {
                        let got = view.map(|v| v.version()).unwrap_or(0);
                        let required = started
                            .checked_sub(budget)
                            .map_or(0, |t| truth.required_version(i, t));
                        if got < required {
                            stats.stale += 1;
                        } else if got < truth.required_version(i, started) {
                            stats.stale_within_budget += 1;
                        }
                    }
                }
                // Let the writer and listener tasks in between batches.
                tokio::task::yield_now().await;
            }
            stats
        }));
    }

    // State changes at the configured rate; every 10th is a propagation probe.
    let changer = {
        let owner = owner.clone();
        let reader = reader.clone();
        let truth = truth.clone();
        let mut rng = Rng(args.seed.wrapping_mul(0x94d0_49bb_1331_11eb) | 1);
        let interval = Duration::from_secs_f64(1.0 / args.changes_per_second.max(0.1));
        tokio::spawn(async move {
            let mut changes = 0u64;
            let mut probes = Vec::new();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while Instant::now() < deadline {
                ticker.tick().await;
                let i = rng.below(truth.views.len());
                let next = next_view(&truth.views[i].lock().unwrap().0, &mut rng);
                let at = Instant::now();
                let version = owner.write(next.clone());
                truth.record(i, next, at, version);
                changes += 1;
                if changes.is_multiple_of(10) {
                    let id = session_id(i);
                    loop {
                        let seen = reader.get(&id).await.ok().flatten().map(|v| v.version());
                        if seen >= Some(version) || at.elapsed() > Duration::from_secs(5) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                    // On stderr, so a run that misses the budget says when it happened.
                    if at.elapsed() > budget {
                        eprintln!(
                            "probe over the propagation budget: {:?}, {:?} before the end; owner pending writes {}",
                            at.elapsed(),
                            deadline.saturating_duration_since(Instant::now()),
                            owner.pending_writes()
                        );
                    }
                    probes.push(at.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                }
            }
            (changes, probes)
        })
    };

    let mut total = ReaderStats {
        lookups: 0,
        answered: [0; 4],
        stale: 0,
        stale_within_budget: 0,
        latency_ns: Vec::new(),
        local_latency_ns: Vec::new(),
    };
    for task in tasks {
        let stats = task.await?;
        total.lookups += stats.lookups;
        for k in 0..4 {
            total.answered[k] += stats.answered[k];
        }
        total.stale += stats.stale;
        total.stale_within_budget += stats.stale_within_budget;
        total.latency_ns.extend(stats.latency_ns);
        total.local_latency_ns.extend(stats.local_latency_ns);
    }
    let (changes, mut probes) = changer.await?;
    stop.cancel();
    let fallback_calls = lookups[1].calls.load(Ordering::Relaxed) - fallback_before;
    total.latency_ns.sort_unstable();
    total.local_latency_ns.sort_unstable();
    probes.sort_unstable();
    let lookups_n = total.lookups.max(1) as f64;
    let ratio = |n: u64| (n as f64 / lookups_n * 10_000.0).round() / 10_000.0;
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    let out = json!({
        "sessions": args.sessions,
        "seconds": args.seconds,
        "readers": args.readers,
        "target_lookups_per_second": args.lookups_per_second,
        "lookups": total.lookups,
        "lookups_per_second": (total.lookups as f64 / args.seconds as f64).round(),
        "hit_ratio_local": ratio(total.answered[0]),
        "hit_ratio_redis": ratio(total.answered[1]),
        "shared_loads_ratio": ratio(total.answered[3]),
        "fallback_calls": fallback_calls,
        "fallback_per_1000_lookups": round2(fallback_calls as f64 / lookups_n * 1000.0),
        "lookup_latency_us": {
            "p50": round2(percentile(&total.latency_ns, 0.50)),
            "p99": round2(percentile(&total.latency_ns, 0.99)),
            "p999": round2(percentile(&total.latency_ns, 0.999)),
        },
        "local_hit_latency_us": {
            "p50": round2(percentile(&total.local_latency_ns, 0.50)),
            "p99": round2(percentile(&total.local_latency_ns, 0.99)),
        },
        "stale_reads": total.stale,
        "stale_reads_within_budget": total.stale_within_budget,
        "propagation_budget_ms": args.propagation_budget_ms,
        "propagation_delay_ms": {
            "probes": probes.len(),
            "p50": round2(percentile(&probes, 0.50) / 1000.0),
            "p99": round2(percentile(&probes, 0.99) / 1000.0),
            "max": round2(percentile(&probes, 1.0) / 1000.0),
        },
        "changes": changes,
        "mix": {
            "is_active_zipf": 0.94,
            "qr_awaiting_scan": 0.05,
            "unknown_ids": 0.01,
            "zipf_s": args.zipf_s,
            "changes_per_second": args.changes_per_second,
        },
    });
    println!("{out}");
    Ok(())
}
