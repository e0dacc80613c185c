//! `bench operator`: the operator and the gateway shards as processes (sim driver) against a real
//! kube-apiserver + etcd and a real redis-server, with `--sessions` `WhatsappSession` resources.
//!
//! Phases, all timed from just before the first create:
//! 1. The sessions are created, `--concurrency` requests in flight (`seconds_to_create`).
//! 2. The operator labels every session for a shard (`seconds_to_all_assigned`: the bench's own
//!    watch saw the last label) and the gateways run them until each shows phase `Connected`
//!    written by the gateway of its labelled shard (`seconds_to_all_connected`).
//! 3. Steady state: `--steady-seconds` with nothing changing but the simulator (drops and
//!    reconnects, 30 min mean connected time); writes to `whatsappsessions` in that window.
//! 4. Scale-up: shard `S` joins; when every session is Connected on its labelled shard, no drain is
//!    pending and no label changed for `--stable-seconds`, the fraction of relabelled sessions.
//!
//! Writes are counted by the kube-apiserver itself: `apiserver_request_total` from its `/metrics`,
//! verbs POST/PUT/PATCH/APPLY/DELETE/DELETECOLLECTION, diffed between scrapes; the bench's own
//! creates (it counts its attempts) and the kube-apiserver's own identity Lease updates (PUT
//! leases, every 10 s) are subtracted. Which component wrote what is derived from the
//! verb (gateways renew their Leases by server-side apply, the operator's leader election by a
//! strategic merge patch), the operator's `whatsapp_operator_moves_total` (each move is one label
//! patch, plus one status apply unless it is a first placement: the gateway records the shard of
//! a new session in its own first status write) and its log (drain requests).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use crds::{DRAIN_ANNOTATION, Phase, SHARD_LABEL, WhatsappSession};
use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Map, Value, json};
use test_support::cluster::{NS, RELEASE, setup, start_gateway_with, start_operator_with};
use test_support::gateway::{GatewayProcess, build_binaries_into, own_profile_dir};
use test_support::{ControlPlane, RedisServer};
use tokio::time::Instant;

const WRITE_VERBS: &[&str] = &[
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];
const DRAIN_LOG_LINE: &str = "asked the shard to drain the session";

// Targets of issue 6.
const TARGET_CONNECTED_S: f64 = 180.0;
const TARGET_WRITES_PER_SESSION: f64 = 3.0;
const TARGET_STEADY_PER_SESSION_MIN: f64 = 0.1;
const TARGET_MOVED_FRACTION: f64 = 0.26;
const TARGET_MAX_OVER_MEAN: f64 = 1.25;

#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Gateway shards at the start; the scale-up adds one more.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Session creates in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Length of the steady-state window after everything is Connected.
    #[arg(long, default_value_t = 60)]
    steady_seconds: u64,
    /// Give up when not every session is Connected this long after the first create.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Give up when the placement has not settled this long after the new shard started.
    #[arg(long, default_value_t = 300)]
    scale_timeout_s: u64,
    /// After the scale-up, the placement counts as settled when every session is Connected on its
    /// shard, no drain is pending and no label changed for this long.
    #[arg(long, default_value_t = 10)]
    stable_seconds: u64,
    /// Gateway `--lease-duration-s` (the gateway's default).
    #[arg(long, default_value_t = 15)]
    lease_duration_s: u64,
    /// Gateway `--lease-renew-ms` (the gateway's default).
    #[arg(long, default_value_t = 5_000)]
    lease_renew_ms: u64,
    /// Operator `--resync-ms` (the operator's default).
    #[arg(long, default_value_t = 2_000)]
    resync_ms: u64,
    /// Skip the scale-up phase.
    #[arg(long)]
    no_scale_up: bool,
    /// Use the gateway and operator binaries next to this one as they are (no cargo build).
    #[arg(long)]
    no_build: bool,
    /// Copy the operator's and gateways' logs here at the end (kept automatically on failure).
    #[arg(long)]
    logs_dir: Option<PathBuf>,
}

pub fn run(args: OperatorArgs) -> anyhow::Result<()> {
    if args.sessions == 0 || args.shards == 0 || args.concurrency == 0 {
        bail!("--sessions, --shards and --concurrency must be at least 1");
    }
    if args.lease_renew_ms == 0 || args.lease_duration_s * 1000 <= args.lease_renew_ms {
        bail!("--lease-renew-ms must be > 0 and shorter than --lease-duration-s");
    }
    let profile_dir = own_profile_dir()?;
    let bins = if args.no_build {
        vec![profile_dir.join("gateway"), profile_dir.join("operator")]
    } else {
        eprintln!(
            "building gateway and operator into {} ...",
            profile_dir.display()
        );
        build_binaries_into(&profile_dir, &["gateway", "operator"])?
    };
    for bin in &bins {
        if !bin.is_file() {
            bail!("{} missing (build it, or drop --no-build)", bin.display());
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut report = Map::new();
    let result = runtime.block_on(measure(&args, &bins[0], &bins[1], &mut report));
    drop(runtime);
    if let Err(err) = &result {
        report.insert("error".into(), json!(format!("{err:#}")));
    }
    report.insert("targets".into(), targets(&report));
    println!("{}", serde_json::to_string(&Value::Object(report))?);
    result
}

/// The operator and gateway processes; checked for unexpected exits while waiting.
struct Fleet {
    operator: GatewayProcess,
    gateways: Vec<GatewayProcess>,
}

impl Fleet {
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Err(err) = self.operator.child.check_running() {
            bail!("operator: {err}\n{}", tail(&self.operator.log(), 20));
        }
        for (k, gw) in self.gateways.iter_mut().enumerate() {
            if let Err(err) = gw.child.check_running() {
                bail!("gateway {k}: {err}\n{}", tail(&gw.log(), 20));
            }
        }
        Ok(())
    }

    fn copy_logs(&self, dir: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::copy(&self.operator.log, dir.join("operator.log"))?;
        for (k, gw) in self.gateways.iter().enumerate() {
            std::fs::copy(&gw.log, dir.join(format!("gateway-{k}.log")))?;
        }
        Ok(())
    }

    async fn operator_metrics(&self) -> anyhow::Result<String> {
        let (code, body) = self
            .operator
            .get("/metrics")
            .await
            .map_err(|e| anyhow::anyhow!("operator /metrics: {e}"))?;
        if code != 200 {
            bail!("operator /metrics answered {code}");
        }
        Ok(body)
    }

    fn drain_requests(&self) -> u64 {
        self.operator
            .log()
            .lines()
            .filter(|l| l.contains(DRAIN_LOG_LINE))
            .count() as u64
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn measure(
    args: &OperatorArgs,
    gateway_bin: &std::path::Path,
    operator_bin: &std::path::Path,
    report: &mut Map<String, Value>,
) -> anyhow::Result<()> {
    let n = args.sessions;
    let shards = args.shards;
    report.insert("sessions".into(), json!(n));
    report.insert("shards".into(), json!(shards));

    let plane = ControlPlane::start()
        .await
        .context("start etcd + kube-apiserver")?;
    let redis = RedisServer::start().await.context("start redis-server")?;
    let client = plane.client().await?;
    setup(&client).await;

    let lease_duration = args.lease_duration_s.to_string();
    let lease_renew = args.lease_renew_ms.to_string();
    let gateway_args = [
        "--lease-duration-s",
        lease_duration.as_str(),
        "--lease-renew-ms",
        lease_renew.as_str(),
    ];
    let resync = args.resync_ms.to_string();
    let operator_args = ["--resync-ms", resync.as_str()];
    // What the gateways run with by default (flags not passed keep the gateway's defaults).
    let status_qps = match gateway::config::Cli::try_parse_from(["gateway", "cluster"]) {
        Ok(cli) => match cli.mode {
            gateway::config::Mode::Cluster(c) => Some(c.status_qps),
            _ => None,
        },
        Err(_) => None,
    };
    report.insert(
        "config".into(),
        json!({
            "gateway_args": gateway_args,
            "operator_args": operator_args,
            "gateway_status_qps": status_qps,
            "concurrency": args.concurrency,
            "steady_seconds": args.steady_seconds,
            "stable_seconds": args.stable_seconds,
            "note": "lease and resync flags are the binaries' own defaults, passed explicitly; \
                     everything else (status QPS, lock TTL, coalescing) is the gateway's default; \
                     sim driver, every session paired",
        }),
    );

    let operator = start_operator_with(&plane, operator_bin, &operator_args)
        .await
        .context("start the operator")?;
    let mut fleet = Fleet {
        operator,
        gateways: Vec::new(),
    };
    for k in 0..shards {
        let gw = start_gateway_with(&plane, &redis, k, gateway_bin, &gateway_args)
            .await
            .with_context(|| format!("start gateway {k}"))?;
        fleet.gateways.push(gw);
    }
    let result = phases(
        args,
        &plane,
        &redis,
        &client,
        gateway_bin,
        &gateway_args,
        &mut fleet,
        report,
    )
    .await;
    let keep = match (&args.logs_dir, &result) {
        (Some(dir), _) => Some(dir.clone()),
        (None, Err(_)) => {
            Some(std::env::temp_dir().join(format!("bench-operator-logs-{}", std::process::id())))
        }
        (None, Ok(_)) => None,
    };
    if let Some(dir) = keep {
        match fleet.copy_logs(&dir) {
            Ok(()) => eprintln!("process logs in {}", dir.display()),
            Err(err) => eprintln!(
                "could not copy the process logs to {}: {err}",
                dir.display()
            ),
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn phases(
    args: &OperatorArgs,
    plane: &ControlPlane,
    redis: &RedisServer,
    client: &kube::Client,
    gateway_bin: &std::path::Path,
    gateway_args: &[&str],
    fleet: &mut Fleet,
    report: &mut Map<String, Value>,
) -> anyhow::Result<()> {
    let n = args.sessions;
    let shards = args.shards;
    // The operator leads and sees every shard's Lease before anything is created.
    wait_for(
        "operator ready",
        fleet,
        Duration::from_secs(60),
        None,
        |_, metrics| {
            let leader = metric_value(metrics, "whatsapp_operator_is_leader", "") == Some(1.0);
            let live = metric_value(metrics, "whatsapp_operator_live_shards", "").unwrap_or(0.0);
            if leader && live as u32 == shards {
                Ok(())
            } else {
                Err(format!(
                    "operator leader={leader}, live shards {live}/{shards}"
                ))
            }
        },
        &Tracker::shared(),
    )
    .await?;

    let api: Api<WhatsappSession> = Api::namespaced(client.clone(), NS);
    let tracker = Tracker::shared();
    // Aborted on every way out (before the control plane goes away under it).
    let _watch = AbortOnDrop(spawn_watch(api.clone(), tracker.clone()));
    // Let the watch list (nothing yet) and start before the clock does.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Phase 1 and 2: create, assign, connect.
    let m0 = scrape(plane).await?;
    let o0 = fleet.operator_metrics().await?;
    let d0 = fleet.drain_requests();
    let t0 = Instant::now();
    tracker.lock().unwrap().t0 = Some(t0);
    let attempts = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let creating = {
        let api = api.clone();
        let attempts = attempts.clone();
        let failures = failures.clone();
        let concurrency = args.concurrency;
        tokio::spawn(async move {
            futures::stream::iter(0..n)
                .map(|i| create(&api, format!("s-{i:05}"), &attempts, &failures))
                .buffer_unordered(concurrency)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<anyhow::Result<Vec<()>>>()
                .map(|_| t0.elapsed())
        })
    };
    let created = creating.await??;
    report.insert("seconds_to_create".into(), json!(secs(created)));
    report.insert(
        "create_requests".into(),
        json!({"attempts": attempts.load(Ordering::Relaxed), "failed": failures.load(Ordering::Relaxed)}),
    );
    eprintln!("created {n} sessions in {:.1} s", created.as_secs_f64());

    let deadline = Duration::from_secs(args.timeout_s);
    let assigned = wait_for(
        "all assigned",
        fleet,
        deadline.saturating_sub(t0.elapsed()),
        Some(t0),
        |t, _| {
            let c = t.counts();
            if c.assigned >= n {
                Ok(t.last_of(&t.first_assigned))
            } else {
                Err(format!(
                    "only {}/{} assigned ({} connected)",
                    thousands(c.assigned),
                    thousands(n),
                    thousands(c.ever_connected)
                ))
            }
        },
        &tracker,
    )
    .await;
    let assigned = match assigned {
        Ok(d) => d,
        Err(err) => bail!("after {} s: {err:#}", args.timeout_s),
    };
    report.insert("seconds_to_all_assigned".into(), json!(secs(assigned)));
    let connected = wait_for(
        "all connected",
        fleet,
        deadline.saturating_sub(t0.elapsed()),
        Some(t0),
        |t, _| {
            let c = t.counts();
            if c.ever_connected >= n {
                Ok(t.last_of(&t.first_connected))
            } else {
                Err(format!(
                    "only {}/{} connected on their labelled shard ({} assigned)",
                    thousands(c.ever_connected),
                    thousands(n),
                    thousands(c.assigned)
                ))
            }
        },
        &tracker,
    )
    .await;
    let m1 = scrape(plane).await?;
    let o1 = fleet.operator_metrics().await?;
    let d1 = fleet.drain_requests();
    let creates = attempts.load(Ordering::Relaxed) as f64;
    let window = Window::new(&m0, &m1, &o0, &o1, d1 - d0, creates);
    report.insert(
        "writes_per_session_to_connected".into(),
        json!(round(window.total_ours() / n as f64, 3)),
    );
    let mut breakdown = Map::new();
    breakdown.insert("to_connected".into(), window.json(n));
    report.insert("writes_breakdown".into(), Value::Object(breakdown.clone()));
    let connected = match connected {
        Ok(d) => d,
        Err(err) => bail!("after {} s: {err:#}", args.timeout_s),
    };
    report.insert("seconds_to_all_connected".into(), json!(secs(connected)));
    {
        let t = tracker.lock().unwrap();
        report.insert(
            "seconds_to_connected_p50".into(),
            json!(secs(t.quantile(&t.first_connected, 0.5))),
        );
        report.insert(
            "seconds_to_assigned_p50".into(),
            json!(secs(t.quantile(&t.first_assigned, 0.5))),
        );
    }
    eprintln!(
        "all {n} assigned after {:.1} s, Connected after {:.1} s; {:.3} writes/session",
        assigned.as_secs_f64(),
        connected.as_secs_f64(),
        window.total_ours() / n as f64
    );

    // Phase 3: steady state.
    let m2 = scrape(plane).await?;
    let o2 = fleet.operator_metrics().await?;
    let d2 = fleet.drain_requests();
    let steady_start = Instant::now();
    eprintln!("steady state: {} s ...", args.steady_seconds);
    while steady_start.elapsed() < Duration::from_secs(args.steady_seconds) {
        fleet.check_alive()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let steady_elapsed = steady_start.elapsed();
    let m3 = scrape(plane).await?;
    let o3 = fleet.operator_metrics().await?;
    let d3 = fleet.drain_requests();
    let steady = Window::new(&m2, &m3, &o2, &o3, d3 - d2, 0.0);
    let minutes = steady_elapsed.as_secs_f64() / 60.0;
    let session_writes = steady.resource_writes("whatsappsessions");
    report.insert(
        "status_writes_per_session_per_minute".into(),
        json!(round(session_writes / n as f64 / minutes, 4)),
    );
    let mut steady_json = steady.json(n);
    steady_json["seconds"] = json!(secs(steady_elapsed));
    steady_json["whatsappsessions_writes"] = json!(session_writes);
    steady_json["connected_at_end"] = json!(tracker.lock().unwrap().counts().connected);
    breakdown.insert("steady".into(), steady_json);
    report.insert("writes_breakdown".into(), Value::Object(breakdown.clone()));

    let before = tracker.lock().unwrap().labels();
    let loads_before = loads(&before);
    report.insert(
        "max_over_mean_load_before_scale_up".into(),
        json!(round(max_over_mean(&loads_before, shards as usize), 4)),
    );
    report.insert("loads_before_scale_up".into(), json!(loads_before));
    if args.no_scale_up {
        return Ok(());
    }

    // Phase 4: scale-up S -> S + 1.
    let m4 = scrape(plane).await?;
    let o4 = fleet.operator_metrics().await?;
    let d4 = fleet.drain_requests();
    let scale_start = Instant::now();
    eprintln!("scale-up: starting gateway {shards}");
    let gw = start_gateway_with(plane, redis, shards, gateway_bin, gateway_args)
        .await
        .with_context(|| format!("start gateway {shards}"))?;
    fleet.gateways.push(gw);
    let new_shard = shards.to_string();
    let stable = Duration::from_secs(args.stable_seconds);
    let mut settled_since: Option<Instant> = None;
    let settled = wait_for(
        "placement settled after the scale-up",
        fleet,
        Duration::from_secs(args.scale_timeout_s),
        None,
        |t, _| {
            let now = Instant::now();
            let c = t.counts();
            let on_new = t
                .views
                .values()
                .filter(|v| v.shard.as_deref() == Some(new_shard.as_str()))
                .count();
            let in_range = t.views.values().all(|v| {
                v.shard
                    .as_deref()
                    .and_then(|s| s.parse::<u32>().ok())
                    .is_some_and(|k| k <= shards)
            });
            let good = c.connected_on_label >= n && c.draining == 0 && in_range && on_new > 0;
            if !good {
                settled_since = None;
                return Err(format!(
                    "{}/{} connected on their shard since their last move, {} draining, {} on the new shard",
                    thousands(c.connected_on_label),
                    thousands(n),
                    c.draining,
                    thousands(on_new)
                ));
            }
            let since = *settled_since.get_or_insert(now);
            let since = since.max(t.last_change);
            settled_since = Some(since);
            if now.saturating_duration_since(since) >= stable {
                Ok(since)
            } else {
                Err(format!(
                    "all connected, {} on the new shard, waiting for {} s without a move",
                    thousands(on_new),
                    args.stable_seconds
                ))
            }
        },
        &tracker,
    )
    .await
    .map_err(|e| anyhow::anyhow!("after {} s: {e:#}", args.scale_timeout_s))?;
    let m5 = scrape(plane).await?;
    let o5 = fleet.operator_metrics().await?;
    let d5 = fleet.drain_requests();
    let after = tracker.lock().unwrap().labels();
    let moved = before
        .iter()
        .filter(|(name, shard)| after.get(*name) != Some(*shard))
        .count();
    let loads_after = loads(&after);
    report.insert(
        "moved_fraction_on_scale_up".into(),
        json!(round(moved as f64 / n as f64, 4)),
    );
    report.insert(
        "optimal_moved_fraction".into(),
        json!(round(1.0 / (shards as f64 + 1.0), 4)),
    );
    report.insert(
        "seconds_to_settled_after_scale_up".into(),
        json!(secs(settled.saturating_duration_since(scale_start))),
    );
    report.insert(
        "max_over_mean_load".into(),
        json!(round(max_over_mean(&loads_after, shards as usize + 1), 4)),
    );
    report.insert("loads_after_scale_up".into(), json!(loads_after));
    let scale = Window::new(&m4, &m5, &o4, &o5, d5 - d4, 0.0);
    let mut scale_json = scale.json(n);
    scale_json["moved"] = json!(moved);
    scale_json["writes_per_moved_session"] = json!(if moved > 0 {
        round(scale.total_ours() / moved as f64, 3)
    } else {
        0.0
    });
    scale_json["note"] = json!(format!(
        "from starting gateway {shards} until settled plus {} s without a move",
        args.stable_seconds
    ));
    breakdown.insert("scale_up".into(), scale_json);
    report.insert("writes_breakdown".into(), Value::Object(breakdown));
    eprintln!(
        "scale-up settled after {:.1} s, moved {moved}",
        settled.saturating_duration_since(scale_start).as_secs_f64()
    );
    Ok(())
}

async fn create(
    api: &Api<WhatsappSession>,
    name: String,
    attempts: &AtomicU64,
    failures: &AtomicU64,
) -> anyhow::Result<()> {
    let session = WhatsappSession::new(&name, Default::default());
    let mut last = None;
    for attempt in 0..5 {
        attempts.fetch_add(1, Ordering::Relaxed);
        match api.create(&PostParams::default(), &session).await {
            Ok(_) => return Ok(()),
            // A retry of a create that went through after all.
            Err(kube::Error::Api(e)) if e.code == 409 && attempt > 0 => return Ok(()),
            Err(err) => {
                failures.fetch_add(1, Ordering::Relaxed);
                last = Some(err);
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    }
    Err(anyhow::anyhow!(
        "create {name}: {}",
        last.expect("an error")
    ))
}

// ---------------------------------------------------------------------------------------------
// The bench's own view of the sessions, from a watch.

#[derive(Debug, Default, Clone)]
struct View {
    shard: Option<String>,
    phase: Option<Phase>,
    pod: Option<String>,
    drain: bool,
}

impl View {
    fn of(s: &WhatsappSession) -> Self {
        let status = s.status.as_ref();
        View {
            shard: s.labels().get(SHARD_LABEL).cloned(),
            phase: status.and_then(|st| st.phase),
            pod: status.and_then(|st| st.gateway_pod.clone()),
            drain: s.annotations().contains_key(DRAIN_ANNOTATION),
        }
    }

    /// Connected, as written by the gateway of the shard it is labelled for.
    fn connected(&self) -> bool {
        self.phase == Some(Phase::Connected)
            && !self.drain
            && self
                .shard
                .as_ref()
                .is_some_and(|s| self.pod.as_deref() == Some(&format!("{RELEASE}-gateway-{s}")))
    }
}

#[derive(Debug, Default)]
struct Counts {
    assigned: usize,
    /// Seen Connected at least once (on any shard).
    ever_connected: usize,
    /// With a shard label and seen Connected on that shard since the label last changed (this
    /// tolerates the simulator's own drops and reconnects, which never stop).
    connected_on_label: usize,
    connected: usize,
    draining: usize,
}

struct Tracker {
    t0: Option<Instant>,
    views: HashMap<String, View>,
    first_assigned: HashMap<String, Instant>,
    first_connected: HashMap<String, Instant>,
    /// Sessions seen Connected (by the gateway of their shard) since their label last changed.
    on_label: HashSet<String>,
    /// Last time a label or drain annotation changed (or a session appeared).
    last_change: Instant,
    relist: Option<HashSet<String>>,
}

impl Tracker {
    fn shared() -> Arc<Mutex<Tracker>> {
        Arc::new(Mutex::new(Tracker {
            t0: None,
            views: HashMap::new(),
            first_assigned: HashMap::new(),
            first_connected: HashMap::new(),
            on_label: HashSet::new(),
            last_change: Instant::now(),
            relist: None,
        }))
    }

    fn apply(&mut self, s: &WhatsappSession) {
        let now = Instant::now();
        let name = s.name_any();
        let view = View::of(s);
        let old = self.views.get(&name);
        if old.is_none_or(|old| old.shard != view.shard) {
            self.on_label.remove(&name);
        }
        if old.is_none_or(|old| old.shard != view.shard || old.drain != view.drain) {
            self.last_change = now;
        }
        if view.shard.is_some() {
            self.first_assigned.entry(name.clone()).or_insert(now);
        }
        if view.connected() {
            self.first_connected.entry(name.clone()).or_insert(now);
            self.on_label.insert(name.clone());
        }
        if let Some(seen) = self.relist.as_mut() {
            seen.insert(name.clone());
        }
        self.views.insert(name, view);
    }

    fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for (name, v) in &self.views {
            c.assigned += v.shard.is_some() as usize;
            c.connected += v.connected() as usize;
            c.ever_connected += self.first_connected.contains_key(name) as usize;
            c.connected_on_label += (v.shard.is_some() && self.on_label.contains(name)) as usize;
            c.draining += v.drain as usize;
        }
        c
    }

    fn labels(&self) -> HashMap<String, String> {
        self.views
            .iter()
            .filter_map(|(n, v)| v.shard.clone().map(|s| (n.clone(), s)))
            .collect()
    }

    fn since_t0(&self, at: Instant) -> Duration {
        self.t0
            .map(|t0| at.saturating_duration_since(t0))
            .unwrap_or_default()
    }

    fn last_of(&self, times: &HashMap<String, Instant>) -> Duration {
        times
            .values()
            .max()
            .map(|&at| self.since_t0(at))
            .unwrap_or_default()
    }

    fn quantile(&self, times: &HashMap<String, Instant>, q: f64) -> Duration {
        let mut all: Vec<Instant> = times.values().copied().collect();
        if all.is_empty() {
            return Duration::ZERO;
        }
        all.sort();
        let i = ((all.len() as f64 * q).ceil() as usize).clamp(1, all.len()) - 1;
        self.since_t0(all[i])
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn spawn_watch(
    api: Api<WhatsappSession>,
    tracker: Arc<Mutex<Tracker>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = events.next().await {
            let mut t = tracker.lock().unwrap();
            match event {
                Ok(watcher::Event::Apply(s)) | Ok(watcher::Event::InitApply(s)) => t.apply(&s),
                Ok(watcher::Event::Delete(s)) => {
                    t.views.remove(&s.name_any());
                    t.on_label.remove(&s.name_any());
                }
                Ok(watcher::Event::Init) => t.relist = Some(HashSet::new()),
                Ok(watcher::Event::InitDone) => {
                    if let Some(seen) = t.relist.take() {
                        t.views.retain(|n, _| seen.contains(n));
                    }
                }
                Err(err) => eprintln!("bench watch error (retrying): {err}"),
            }
        }
    })
}

/// Polls `check` (with the tracker and, every second, the operator's metrics) until it answers,
/// printing progress to stderr every 5 s; fails when a process exits or `timeout` passes.
async fn wait_for<T>(
    what: &str,
    fleet: &mut Fleet,
    timeout: Duration,
    t0: Option<Instant>,
    mut check: impl FnMut(&Tracker, &str) -> Result<T, String>,
    tracker: &Arc<Mutex<Tracker>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut metrics = String::new();
    let mut metrics_at: Option<Instant> = None;
    loop {
        fleet.check_alive()?;
        if metrics_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            metrics = fleet.operator_metrics().await.unwrap_or_default();
            metrics_at = Some(Instant::now());
        }
        let answer = check(&tracker.lock().unwrap(), &metrics);
        match answer {
            Ok(v) => return Ok(v),
            Err(msg) => {
                let clock = t0.unwrap_or(start).elapsed().as_secs_f64();
                if start.elapsed() >= timeout {
                    bail!("{what}: {msg} (at {clock:.1} s)");
                }
                if last_progress.elapsed() >= Duration::from_secs(5) {
                    eprintln!("[{clock:6.1} s] {what}: {msg}");
                    last_progress = Instant::now();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// kube-apiserver and operator metrics.

/// `apiserver_request_total` by (verb, resource, subresource, code), summed over the other labels;
/// with the code [`DURATION_SUM`] / [`DURATION_COUNT`], `apiserver_request_duration_seconds`.
type Requests = BTreeMap<(String, String, String, String), f64>;
const DURATION_SUM: &str = "duration_sum";
const DURATION_COUNT: &str = "duration_count";

async fn scrape(plane: &ControlPlane) -> anyhow::Result<Requests> {
    let text = plane
        .apiserver_metrics()
        .await
        .context("scrape the kube-apiserver's /metrics")?;
    let mut out = Requests::new();
    for line in text.lines() {
        let (rest, code) = if let Some(rest) = line.strip_prefix("apiserver_request_total{") {
            (rest, None)
        } else if let Some(rest) = line.strip_prefix("apiserver_request_duration_seconds_sum{") {
            (rest, Some(DURATION_SUM))
        } else if let Some(rest) = line.strip_prefix("apiserver_request_duration_seconds_count{") {
            (rest, Some(DURATION_COUNT))
        } else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let labels = parse_labels(labels);
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        *out.entry((
            get("verb"),
            get("resource"),
            get("subresource"),
            code.map(str::to_string).unwrap_or_else(|| get("code")),
        ))
        .or_insert(0.0) += value;
    }
    if out.is_empty() {
        bail!("no apiserver_request_total in the kube-apiserver's /metrics");
    }
    Ok(out)
}

fn parse_labels(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, next)) = chars.next() {
                        value.push(next);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}

/// The value of `name{labels}` (labels as they appear, e.g. `reason="new"`; "" for none).
fn metric_value(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Operator moves by reason.
fn moves(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("whatsapp_operator_moves_total{")
            && let Some((labels, value)) = rest.rsplit_once("} ")
            && let Ok(value) = value.trim().parse::<f64>()
        {
            let reason = parse_labels(labels).remove("reason").unwrap_or_default();
            *out.entry(reason).or_insert(0.0) += value;
        }
    }
    out
}

/// Writes between two scrapes, with who wrote what.
struct Window {
    /// Mean kube-apiserver latency of the write requests in the window, ms.
    latency_ms: BTreeMap<String, f64>,
    /// Operator placement passes in the window and their summed duration, s.
    operator_passes: (f64, f64),
    /// Write requests by (verb, resource, subresource), all codes.
    writes: BTreeMap<(String, String, String), f64>,
    /// Failed write requests by (verb, resource/subresource, code).
    failed: BTreeMap<String, f64>,
    moves: BTreeMap<String, f64>,
    drain_requests: f64,
    bench_creates: f64,
}

impl Window {
    fn new(
        before: &Requests,
        after: &Requests,
        operator_before: &str,
        operator_after: &str,
        drain_requests: u64,
        bench_creates: f64,
    ) -> Self {
        let mut writes = BTreeMap::new();
        let mut failed = BTreeMap::new();
        let mut latency: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for ((verb, resource, sub, code), v) in after {
            if !WRITE_VERBS.contains(&verb.as_str()) {
                continue;
            }
            if code == DURATION_SUM || code == DURATION_COUNT {
                let old = before
                    .get(&(verb.clone(), resource.clone(), sub.clone(), code.clone()))
                    .copied()
                    .unwrap_or(0.0);
                let entry = latency
                    .entry(format!("{verb} {}", path(resource, sub)))
                    .or_insert((0.0, 0.0));
                if code == DURATION_SUM {
                    entry.0 += v - old;
                } else {
                    entry.1 += v - old;
                }
                continue;
            }
            let old = before
                .get(&(verb.clone(), resource.clone(), sub.clone(), code.clone()))
                .copied()
                .unwrap_or(0.0);
            let d = v - old;
            if d <= 0.0 {
                continue;
            }
            *writes
                .entry((verb.clone(), resource.clone(), sub.clone()))
                .or_insert(0.0) += d;
            if !code.starts_with('2') {
                *failed
                    .entry(format!("{verb} {} {code}", path(resource, sub)))
                    .or_insert(0.0) += d;
            }
        }
        let m0 = moves(operator_before);
        let moves = moves(operator_after)
            .into_iter()
            .map(|(r, v)| {
                let d = v - m0.get(&r).copied().unwrap_or(0.0);
                (r, d)
            })
            .filter(|(_, d)| *d > 0.0)
            .collect();
        let latency_ms = latency
            .into_iter()
            .filter(|(_, (_, count))| *count > 0.0)
            .map(|(k, (sum, count))| (k, round(sum / count * 1000.0, 1)))
            .collect();
        let passes = |text: &str| {
            (
                metric_value(
                    text,
                    "whatsapp_operator_reconcile_duration_seconds_count",
                    "",
                )
                .unwrap_or(0.0),
                metric_value(text, "whatsapp_operator_reconcile_duration_seconds_sum", "")
                    .unwrap_or(0.0),
            )
        };
        let (c0, s0) = passes(operator_before);
        let (c1, s1) = passes(operator_after);
        Window {
            latency_ms,
            operator_passes: (c1 - c0, s1 - s0),
            writes,
            failed,
            moves,
            drain_requests: drain_requests as f64,
            bench_creates,
        }
    }

    fn get(&self, verb: &str, resource: &str, sub: &str) -> f64 {
        self.writes
            .get(&(verb.to_string(), resource.to_string(), sub.to_string()))
            .copied()
            .unwrap_or(0.0)
    }

    /// Writes by the operator and the gateways: all writes but the bench's creates and the
    /// kube-apiserver's own identity Lease updates (PUT leases every 10 s; the operator's leader
    /// election patches, the gateways apply).
    fn total_ours(&self) -> f64 {
        self.writes.values().sum::<f64>() - self.bench_creates - self.get("PUT", "leases", "")
    }

    fn resource_writes(&self, resource: &str) -> f64 {
        self.writes
            .iter()
            .filter(|((_, r, _), _)| r == resource)
            .map(|(_, v)| v)
            .sum::<f64>()
            - if resource == "whatsappsessions" {
                self.bench_creates
            } else {
                0.0
            }
    }

    fn json(&self, sessions: usize) -> Value {
        let n = sessions as f64;
        let by_request: Map<String, Value> = self
            .writes
            .iter()
            .map(|((verb, r, s), v)| (format!("{verb} {}", path(r, s)), json!(v)))
            .collect();
        let moves_total: f64 = self.moves.values().sum::<f64>() + 0.0;
        let session_patches = self.get("PATCH", "whatsappsessions", "");
        let conflicts: f64 = self
            .failed
            .iter()
            .filter(|(k, _)| k.starts_with("PATCH whatsappsessions 409"))
            .map(|(_, v)| v)
            .sum::<f64>()
            + 0.0;
        // A first placement is the label alone; a move from another shard adds a status apply.
        let first_placements = self.moves.get("new").copied().unwrap_or(0.0);
        let operator_status = moves_total - first_placements;
        let status_applies = self.get("APPLY", "whatsappsessions", "status");
        let events = self.get("POST", "events", "");
        let leader = self.get("PATCH", "leases", "");
        let operator = json!({
            "label_patches": moves_total,
            "status_applies": operator_status,
            "rejected_label_patches_409": conflicts,
            "drain_requests": self.drain_requests,
            "events": events,
            "leader_lease": leader,
        });
        let gateway_status = status_applies - operator_status;
        let gateway_leases = self.get("APPLY", "leases", "") + self.get("POST", "leases", "");
        let gateway_other_patches =
            (session_patches - moves_total - conflicts - self.drain_requests).max(0.0);
        let gateways = json!({
            "status_applies": gateway_status,
            "lease_renewals": gateway_leases,
            "drain_acks_and_other_session_patches": gateway_other_patches,
        });
        let operator_sum =
            moves_total + operator_status + conflicts + self.drain_requests + events + leader;
        let gateways_sum = gateway_status + gateway_leases + gateway_other_patches;
        let total = self.total_ours();
        json!({
            "total": total,
            "excluded": {
                "bench_creates": self.bench_creates,
                "apiserver_identity_lease_puts": self.get("PUT", "leases", ""),
            },
            "by_request": by_request,
            "failed_requests": self.failed,
            "mean_latency_ms": self.latency_ms,
            "operator_passes": {
                "count": self.operator_passes.0,
                "mean_seconds": if self.operator_passes.0 > 0.0 {
                    round(self.operator_passes.1 / self.operator_passes.0, 3)
                } else {
                    0.0
                },
            },
            "operator_moves": self.moves,
            "by_component": {
                "operator": operator,
                "gateways": gateways,
                "unattributed": round(total - operator_sum - gateways_sum, 3),
            },
            "per_session": {
                "operator": round(operator_sum / n, 4),
                "operator_session_writes": round((moves_total + operator_status + conflicts + self.drain_requests) / n, 4),
                "gateway_status": round(gateway_status / n, 4),
                "gateway_leases": round(gateway_leases / n, 4),
                "total": round(total / n, 4),
            },
            "note": "total: writes by the operator and the gateways; by_request is exact \
                     (kube-apiserver apiserver_request_total) and still includes the excluded \
                     requests (the bench's creates under POST whatsappsessions, the \
                     kube-apiserver's own identity Lease under PUT leases); by_component derives the split: each \
                     operator move is 1 label PATCH, plus 1 status APPLY unless it is a first placement \
                     (whatsapp_operator_moves_total by reason), \
                     drain requests from the operator's log, the rest of the status APPLYs and \
                     session PATCHes are the gateways'; gateways renew Leases by APPLY, the \
                     operator's leader election by PATCH",
        })
    }
}

fn path(resource: &str, sub: &str) -> String {
    if sub.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}/{sub}")
    }
}

// ---------------------------------------------------------------------------------------------
// Results.

fn loads(labels: &HashMap<String, String>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for shard in labels.values() {
        *out.entry(shard.clone()).or_insert(0) += 1;
    }
    out
}

fn max_over_mean(loads: &BTreeMap<String, usize>, shards: usize) -> f64 {
    let total: usize = loads.values().sum();
    let max = loads.values().copied().max().unwrap_or(0);
    if total == 0 {
        0.0
    } else {
        max as f64 * shards as f64 / total as f64
    }
}

fn targets(report: &Map<String, Value>) -> Value {
    let one = |key: &str, target: f64| {
        let measured = report.get(key).and_then(Value::as_f64);
        json!({
            "target": format!("<= {target}"),
            "measured": measured,
            "met": measured.is_some_and(|m| m <= target),
        })
    };
    let targets = json!({
        "seconds_to_all_connected": one("seconds_to_all_connected", TARGET_CONNECTED_S),
        "writes_per_session_to_connected": one("writes_per_session_to_connected", TARGET_WRITES_PER_SESSION),
        "status_writes_per_session_per_minute": one("status_writes_per_session_per_minute", TARGET_STEADY_PER_SESSION_MIN),
        "moved_fraction_on_scale_up": one("moved_fraction_on_scale_up", TARGET_MOVED_FRACTION),
        "max_over_mean_load": one("max_over_mean_load", TARGET_MAX_OVER_MEAN),
    });
    let missed: Vec<String> = targets
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(_, v)| v["met"] != json!(true))
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut out = targets;
    out["missed"] = json!(missed);
    out
}

fn secs(d: Duration) -> f64 {
    round(d.as_secs_f64(), 3)
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    // `+ 0.0` turns -0.0 into 0.0.
    (x * f).round() / f + 0.0
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_with_escapes_parse() {
        let l = parse_labels(
            r#"code="201",component="apiserver",resource="whatsappsessions",subresource="status",verb="APPLY",x="a\"b""#,
        );
        assert_eq!(l["verb"], "APPLY");
        assert_eq!(l["subresource"], "status");
        assert_eq!(l["x"], "a\"b");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(9812), "9,812");
        assert_eq!(thousands(100), "100");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }
}
