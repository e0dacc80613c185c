//! Wiring: drivers -> event router (session state) -> batcher -> delivery -> backend, plus the
//! periodic re-sync, the HTTP server and graceful shutdown. Used by standalone mode and by the
//! delivery benchmark, so what is measured is what runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::batch::{BatcherHandle, BatcherTask, spawn_batcher};
use crate::cache::{
    BackendLookup, CacheMetrics, ChainLookup, RedisTier, RemoteTier, SessionCache, SessionLookup,
    SessionView, StatesLookup,
};
use crate::config::{DriverChoice, Settings, StandaloneArgs};
use crate::delivery::spill::{RedisSpill, SpillKeys};
use crate::delivery::{BackendClient, DeliveredHook, Delivery, RoutingSink, Webhooks};
use crate::events::{GatewayEvent, SessionStatus};
use crate::manage::metered::Metered;
use crate::manage::redis_book::RedisBook;
use crate::manage::{LocalSessions, MemoryBook, SessionBook, SessionManager, SessionSpec};
use crate::metrics::BatchStatsCollector;
use crate::session::LoginDirectory;
use crate::session::any::AnyDriver;
use crate::session::ownership::LeaseConfig;
use crate::session::sim::SimConfig;
use crate::session::supervisor::{Supervisor, SupervisorConfig, SupervisorOptions};
use crate::session::{EventSink, RunningSession, SessionState};
use crate::{Error, Result};

/// How often a standalone gateway with Redis checks for sessions created or deleted through
/// another gateway sharing it (one `GET` of a version counter).
pub const BOOK_FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

/// Longest a graceful shutdown may take before the process gives up waiting.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// How long a removed session's late events are recognised as such.
const FORGOTTEN_FOR: Duration = Duration::from_secs(120);

/// What [`SessionStates::apply`] made of an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The session's state after the event.
    Tracked(SessionState),
    /// Late news of a removed session (produced before its removal): the state this status
    /// change alone describes, not kept.
    Late(SessionState),
    /// A removed session's late QR code: nothing to keep or cache.
    Ignored,
}

type RemoveHook = Box<dyn Fn(&str) + Send + Sync>;

/// Removed sessions and when, pruned of entries older than [`FORGOTTEN_FOR`] whenever the map
/// has doubled since the last pruning (amortised: a bulk removal stays linear).
#[derive(Default)]
struct Forgotten {
    at: HashMap<String, tokio::time::Instant>,
    prune_at_len: usize,
}

/// The latest known state of every session this process runs.
#[derive(Default)]
pub struct SessionStates {
    inner: Mutex<HashMap<String, SessionState>>,
    /// Told of every removal (the cache drops the session from its owned tier).
    on_remove: std::sync::OnceLock<RemoveHook>,
    /// Sessions removed, and when: an event created before that (a deleted session's last
    /// `logged_out`, still queued when it was removed) is delivered but does not bring the
    /// session back into re-sync and the gauges.
    forgotten: Mutex<Forgotten>,
}

impl std::fmt::Debug for SessionStates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStates")
            .field("sessions", &self.len())
            .finish_non_exhaustive()
    }
}

impl SessionStates {
    /// Applies the event (see [`Applied`]).
    fn apply(&self, event: &GatewayEvent) -> Applied {
        let id = event.session_id();
        {
            let mut forgotten = self.forgotten.lock().expect("forgotten lock");
            if let Some(removed_at) = forgotten.at.get(id).copied() {
                if event.created() <= removed_at {
                    return match event {
                        GatewayEvent::Status(_) => {
                            let mut detached = SessionState::new(SessionStatus::Connecting);
                            detached.apply(event);
                            Applied::Late(detached)
                        }
                        GatewayEvent::Qr(_) => Applied::Ignored,
                    };
                }
                forgotten.at.remove(id);
            }
        }
        let mut map = self.inner.lock().expect("session states lock");
        let state = map
            .entry(id.to_string())
            .or_insert_with(|| SessionState::new(SessionStatus::Connecting));
        state.apply(event);
        Applied::Tracked(state.clone())
    }

    /// Calls `hook` with every session removed from now on (set once).
    pub fn on_remove(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.on_remove.set(Box::new(hook));
    }

    pub fn get(&self, session_id: &str) -> Option<SessionState> {
        self.inner
            .lock()
            .expect("session states lock")
            .get(session_id)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("session states lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets a session (deleted, moved away): it leaves re-sync and the gauges, and events it
    /// produced before now no longer bring it back.
    pub fn remove(&self, session_id: &str) {
        self.inner
            .lock()
            .expect("session states lock")
            .remove(session_id);
        let now = tokio::time::Instant::now();
        let mut forgotten = self.forgotten.lock().expect("forgotten lock");
        if forgotten.at.len() >= forgotten.prune_at_len.max(1024) {
            forgotten
                .at
                .retain(|_, at| now.duration_since(*at) < FORGOTTEN_FOR);
            forgotten.prune_at_len = 2 * forgotten.at.len();
        }
        forgotten.at.insert(session_id.to_string(), now);
        drop(forgotten);
        if let Some(hook) = self.on_remove.get() {
            hook(session_id);
        }
    }

    /// Sessions per status (for the `whatsapp_gateway_sessions{state}` gauge).
    pub fn count_by_status(&self) -> HashMap<SessionStatus, usize> {
        let map = self.inner.lock().expect("session states lock");
        let mut counts = HashMap::new();
        for state in map.values() {
            *counts.entry(state.status).or_insert(0) += 1;
        }
        counts
    }

    /// What re-sync sends: every session's current status (and QR on display).
    fn resync_events(&self) -> Vec<GatewayEvent> {
        let now = tokio::time::Instant::now();
        let map = self.inner.lock().expect("session states lock");
        map.iter()
            .flat_map(|(id, state)| state.resync_events(id, now))
            .collect()
    }
}

#[derive(Debug)]
struct SessionsCollector(Arc<SessionStates>);

impl Collector for SessionsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::result::Result<(), std::fmt::Error> {
        let counts = self.0.count_by_status();
        let mut family = encoder.encode_descriptor(
            "whatsapp_gateway_sessions",
            "Sessions run by this gateway, by state",
            None,
            MetricType::Gauge,
        )?;
        for status in SessionStatus::ALL {
            let labels = vec![("state", status.as_str())];
            ConstGauge::new(counts.get(&status).copied().unwrap_or(0) as i64)
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The running delivery pipeline.
pub struct Pipeline {
    pub delivery: Delivery,
    /// Per-session webhooks (`spec.webhook`); the session layers set each session's route.
    pub webhooks: Arc<Webhooks>,
    pub states: Arc<SessionStates>,
    events: EventSink,
    batcher: BatcherTask,
    router: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    /// Stops the drainers (and the re-sync loop).
    cancel: CancellationToken,
    /// Stops the re-sync loop alone: it holds a batcher handle, so it must end before the
    /// batcher's last flush, while the drainers keep going.
    stop_resync: CancellationToken,
}

impl Pipeline {
    pub async fn start(
        settings: &Settings,
        redis: Option<fred::clients::Client>,
        registry: &mut Registry,
        on_delivered: Option<DeliveredHook>,
    ) -> Result<Self> {
        let states = Arc::new(SessionStates::default());
        Self::start_with_cache(settings, redis, registry, on_delivered, states, None).await
    }

    /// Like [`Pipeline::start`], with the session states given (the cache's fallback reads them)
    /// and every session change written through `cache`.
    pub async fn start_with_cache(
        settings: &Settings,
        redis: Option<fred::clients::Client>,
        registry: &mut Registry,
        on_delivered: Option<DeliveredHook>,
        states: Arc<SessionStates>,
        cache: Option<Arc<SessionCache>>,
    ) -> Result<Self> {
        let backend = settings
            .backend
            .clone()
            .map(BackendClient::new)
            .transpose()?;
        let spill = redis
            .clone()
            .map(|client| RedisSpill::new(client, SpillKeys::new(&settings.identity)));
        let mut delivery = Delivery::new(backend, spill, settings.delivery.clone(), registry);
        if let Some(hook) = on_delivered {
            delivery = delivery.with_delivered_hook(hook);
        }
        delivery.recover_backlog().await;
        let cancel = CancellationToken::new();
        let mut background = delivery.spawn_drainers(cancel.clone());
        let webhooks = Webhooks::new(
            settings.webhook_endpoints.clone(),
            settings.delivery.clone(),
            &settings.identity,
            redis,
            &delivery,
            registry,
        );
        webhooks.recover().await;
        let sweeper = webhooks.spawn_sweeper();

        let (handle, batcher) = spawn_batcher(
            settings.batch.clone(),
            Arc::new(RoutingSink::new(delivery.clone(), webhooks.clone())),
        )?;
        registry.register_collector(Box::new(BatchStatsCollector(batcher.stats().clone())));
        registry.register_collector(Box::new(SessionsCollector(states.clone())));

        let (events, rx) = EventSink::channel(settings.batch.input_capacity);
        let cache = cache.map(|cache| (cache, settings.identity.clone()));
        let router = tokio::spawn(route_events(rx, handle.clone(), states.clone(), cache));
        let stop_resync = cancel.child_token();
        if let Some(interval) = settings.resync_interval {
            background.push(tokio::spawn(resync_loop(
                interval,
                handle.clone(),
                states.clone(),
                stop_resync.clone(),
            )));
        }
        drop(handle);
        drop(sweeper); // ends with `webhooks.drain()`
        Ok(Pipeline {
            delivery,
            webhooks,
            states,
            events,
            batcher,
            router,
            background,
            cancel,
            stop_resync,
        })
    }

    /// Where drivers report events.
    pub fn event_sink(&self) -> EventSink {
        self.events.clone()
    }

    pub fn batch_stats(&self) -> &Arc<crate::batch::BatchStats> {
        self.batcher.stats()
    }

    /// Stops the given sessions, flushes every pending event and waits (up to `grace`) for the
    /// backend or the spill to take them. Batches still held only in memory at the end are lost
    /// with the process: logged at error level and counted
    /// (`whatsapp_gateway_shutdown_lost_batches`).
    pub async fn shutdown(self, sessions: Vec<RunningSession>, grace: Duration) {
        self.shutdown_by(sessions, tokio::time::Instant::now() + grace)
            .await
    }

    /// [`Pipeline::shutdown`] with the grace ending at `deadline`, for a caller that set its own
    /// before (the standalone drain): the loss accounting at the end must run before the caller
    /// gives up on this future.
    pub async fn shutdown_by(self, sessions: Vec<RunningSession>, deadline: tokio::time::Instant) {
        let Pipeline {
            delivery,
            webhooks,
            events,
            batcher,
            router,
            background,
            cancel,
            stop_resync,
            ..
        } = self;
        // A batch failing from now on is spilled after one attempt: hot retries (up to three
        // request timeouts) could outlast the grace.
        delivery.begin_shutdown();
        let work = {
            let delivery = delivery.clone();
            async move {
                futures::future::join_all(sessions.into_iter().map(RunningSession::stop)).await;
                drop(events);
                // The router ends once every sink clone is gone, and the re-sync loop on its
                // token; then the batcher's last handle drops and it flushes with reason
                // `shutdown`, while the drainers still run.
                let _ = router.await;
                stop_resync.cancel();
                batcher.join().await;
                webhooks.drain().await;
                // Without Redis (or with Redis failing) the memory spill is all there is: the
                // drainers get the rest of the grace to empty it.
                delivery.wait_memory_drained().await;
            }
        };
        let finished = tokio::time::timeout_at(deadline, work).await.is_ok();
        cancel.cancel();
        for task in background {
            // A drainer in the middle of a request would hold the stop up to a request
            // timeout; what it holds stays in the spill (Redis) or is counted below (memory).
            task.abort();
            let _ = task.await;
        }
        let lost = delivery.close();
        let in_redis = delivery.redis_backlog();
        match (finished, in_redis > 0) {
            (true, false) => {}
            (true, true) => tracing::info!(
                backlog = in_redis,
                "batches spilled to Redis resume on next start"
            ),
            (false, false) => tracing::warn!(lost, "graceful shutdown timed out"),
            (false, true) => tracing::warn!(
                lost,
                backlog = in_redis,
                "graceful shutdown timed out; batches spilled to Redis resume on next start"
            ),
        }
    }
}

async fn route_events(
    mut rx: mpsc::Receiver<GatewayEvent>,
    batcher: BatcherHandle,
    states: Arc<SessionStates>,
    cache: Option<(Arc<SessionCache>, String)>,
) {
    while let Some(event) = rx.recv().await {
        let applied = states.apply(&event);
        // Write-through: the local tier at once, Redis and the invalidation in the background.
        if let Some((cache, gateway)) = &cache {
            match applied {
                Applied::Tracked(state) => {
                    cache.write(SessionView::from_state(event.session_id(), &state, gateway));
                }
                Applied::Late(state) => {
                    cache.write_detached(SessionView::from_state(
                        event.session_id(),
                        &state,
                        gateway,
                    ));
                }
                Applied::Ignored => {}
            }
        }
        if batcher.submit(event).await.is_err() {
            tracing::error!("batcher stopped while sessions still report events");
            return;
        }
    }
}

async fn resync_loop(
    interval: Duration,
    batcher: BatcherHandle,
    states: Arc<SessionStates>,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = cancel.cancelled() => return,
        }
        let events = states.resync_events();
        tracing::debug!(
            events = events.len(),
            "level-triggered re-sync of every session's status"
        );
        for event in events {
            if batcher.submit(event).await.is_err() {
                return;
            }
        }
    }
}

/// Logging: JSON lines (default) or human-readable text, filtered by `RUST_LOG` (default info).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Says where batches go; without a backend they are only logged, which must not pass unnoticed.
pub(crate) fn announce_backend(settings: &Settings) {
    match &settings.backend {
        Some(backend) => tracing::info!(
            backend = %crate::config::redact_url(backend.base_url.as_str()),
            "sending batches to the backend"
        ),
        None => tracing::warn!(
            "no backend configured (--backend-url / WA_BACKEND_URL): batches are logged instead of sent"
        ),
    }
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Standalone mode: one gateway, no Kubernetes.
pub async fn run_standalone(args: StandaloneArgs) -> Result<()> {
    let settings = args.common.validate()?;
    // A flag meant for the other driver would be silently ignored: refuse it before starting.
    match &settings.driver {
        DriverChoice::Sim if !args.sessions.is_empty() => {
            return Err(Error::config(
                "--session / WA_SESSIONS",
                "lists real sessions, which need --driver whatsapp (the sim driver runs --simulate N)",
            ));
        }
        DriverChoice::Whatsapp { .. } if args.simulate > 0 => {
            return Err(Error::config(
                "--simulate / WA_SIMULATE",
                "runs simulated sessions, which need --driver sim (the whatsapp driver runs --session ids)",
            ));
        }
        _ => {}
    }
    init_logging(settings.log_json);
    let sim_config = SimConfig {
        seed: args.sim_seed,
        mean_connected: Duration::from_secs(args.sim_mean_connected_s.max(1)),
        unpaired_share: args.sim_unpaired_share,
        ..SimConfig::default()
    };
    sim_config
        .validate()
        .map_err(|e| Error::config("--sim-* / WA_SIM_*", e.to_string()))?;

    let redis = match &settings.redis_url {
        Some(url) => {
            tracing::info!(redis = %crate::config::redact_url(url), "using Redis for the retry spill and dead letters");
            Some(crate::redis::connect(url).await?)
        }
        None => {
            tracing::warn!(
                "no Redis configured (--redis-url / WA_REDIS_URL): spill and state are kept in memory and lost on restart"
            );
            None
        }
    };
    announce_backend(&settings);
    let mut registry = crate::metrics::new_registry();
    let stop = CancellationToken::new();
    let (pipeline, cache, mut cache_tasks) =
        start_pipeline_with_cache(&settings, redis.as_ref(), None, &mut registry, &stop).await?;

    // Every wanted session runs only while this gateway holds its lock, so gateways sharing a
    // Redis split the sessions and never run one twice.
    let options = supervisor_options(&settings, redis.as_ref(), &mut registry);
    let logins = LoginDirectory::default();
    let driver = AnyDriver::new(
        &settings.driver,
        sim_config,
        options.credentials.clone(),
        redis.as_ref(),
        logins.clone(),
    )
    .map_err(|e| Error::config("--driver / WA_DRIVER, --sim-* / WA_SIM_*", e.to_string()))?;
    let wanted: Vec<String> = match &driver {
        AnyDriver::Sim(_) => (0..args.simulate).map(|i| format!("sim-{i:05}")).collect(),
        #[cfg(feature = "whatsapp")]
        AnyDriver::Whatsapp(_) => args.sessions.clone(),
    };
    if let Some(bad) = wanted.iter().find(|id| !crate::cache::valid_session_id(id)) {
        return Err(Error::config(
            "--session / WA_SESSIONS",
            format!(
                "`{bad}` is not a valid session id (1-128 of A-Z a-z 0-9 - _ . @ :, not starting with `gw:`)"
            ),
        ));
    }
    let mut configured: Vec<(SessionSpec, &'static str)> = wanted
        .iter()
        .map(|id| {
            (
                SessionSpec::qr(id),
                if args.simulate > 0 {
                    "--simulate"
                } else {
                    "--session"
                },
            )
        })
        .collect();
    if let Some(path) = &args.sessions_file {
        let specs = crate::manage::file::load(path)
            .map_err(|e| Error::config("--sessions-file / WA_SESSIONS_FILE", e))?;
        for spec in specs {
            if configured
                .iter()
                .any(|(c, _)| c.session_id == spec.session_id)
            {
                return Err(Error::config(
                    "--sessions-file / WA_SESSIONS_FILE",
                    format!(
                        "session `{}` is also named by --session / --simulate",
                        spec.session_id
                    ),
                ));
            }
            configured.push((spec, "--sessions-file"));
        }
    }
    let supervisor = Arc::new(Supervisor::with_options(
        Arc::new(driver),
        pipeline.event_sink(),
        options,
    ));
    // Sessions created through the API: in Redis (shared by every gateway using it, kept across
    // restarts) or, without Redis, in memory.
    let book: Arc<dyn SessionBook> = match &redis {
        Some(client) => Arc::new(RedisBook::new(client.clone())),
        None => Arc::new(MemoryBook::default()),
    };
    let routing = crate::secrets::WebhookRouting::new(
        pipeline.webhooks.clone(),
        crate::secrets::WebhookResolver::dir(args.secrets_dir.clone()),
    );
    // A configured session whose webhook cannot be resolved would never start: refuse it now.
    for (spec, source) in &configured {
        if let Some(webhook) = &spec.webhook
            && let Err(reason) = routing.resolver.resolve("", webhook).await
        {
            return Err(Error::config(
                if *source == "--sessions-file" {
                    "--sessions-file / WA_SESSIONS_FILE"
                } else {
                    "--secrets-dir / WA_SECRETS_DIR"
                },
                format!("session `{}`: {reason}", spec.session_id),
            ));
        }
    }
    let sessions = Arc::new(
        LocalSessions::new(
            supervisor.clone(),
            logins,
            pipeline.states.clone(),
            configured,
            book,
        )
        .with_webhooks(routing),
    );
    // The configured sessions start even if the book cannot be read yet (Redis down).
    sessions.start_configured().await;
    if let Err(err) = sessions.reconcile(true).await {
        tracing::warn!(%err, "cannot read the sessions created through the API yet; retrying");
    }
    let follow = sessions.spawn_follow(BOOK_FOLLOW_INTERVAL, stop.clone());
    let count = supervisor.running().await.len();
    if count > 0 {
        tracing::info!(
            sessions = count,
            driver = supervisor.driver().name(),
            "sessions wanted; each starts once its lock is taken"
        );
    }

    let api_sessions: Arc<dyn SessionManager> =
        Arc::new(Metered::new(sessions.clone(), &mut registry));
    let state = crate::http::HttpState {
        registry: Arc::new(registry),
        redis,
        delivery: pipeline.delivery.clone(),
    };
    let api = crate::api::ApiState {
        cache,
        events: Some(pipeline.event_sink()),
        token: settings.api_token.as_deref().map(Arc::from),
        sessions: Some(api_sessions),
        webhooks: Some(pipeline.webhooks.clone()),
    };
    if api.token.is_none() {
        tracing::warn!("no API token (--api-token / WA_API_TOKEN): the /v1 API is open");
    }
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, policy = settings.batch.policy.as_str(), "gateway listening (/metrics, /healthz, /readyz, /v1)");
    // The HTTP server stops first: the API holds a pipeline sink, and the pipeline flushes only
    // once every sink is gone.
    let stop_http = CancellationToken::new();
    let server = {
        let stop = stop_http.clone();
        let app = crate::http::router(state).merge(crate::api::router(api));
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        })
    };
    shutdown_signal().await;
    tracing::info!("shutting down: stopping sessions and flushing events");
    stop_http.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    follow.abort();
    // A deleted session still logging out (a paused one unlinks in seconds) ends first, so its
    // `logged_out` is flushed with the rest.
    if !sessions.finish_ends(Duration::from_secs(15)).await {
        tracing::warn!(
            "deleted sessions still logging out at shutdown were cut short; their devices may stay linked"
        );
    }
    drop(sessions);
    // Sessions stop, their events flush, and only then are the locks released.
    // The pipeline's own grace ends a little before the drain's, so its last step (counting
    // and logging what only memory held) runs before the drain stops waiting for it.
    let flush_by = tokio::time::Instant::now() + SHUTDOWN_GRACE - Duration::from_millis(500);
    supervisor
        .drain(SHUTDOWN_GRACE, pipeline.shutdown_by(Vec::new(), flush_by))
        .await;
    stop.cancel();
    // The writer makes one last attempt at pending cache writes; do not wait long for it.
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        futures::future::join_all(cache_tasks.drain(..)),
    )
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// The session states, the cache over them (see [`start_cache`]) and the pipeline writing
/// through it: what both modes run sessions into.
pub async fn start_pipeline_with_cache(
    settings: &Settings,
    redis: Option<&fred::clients::Client>,
    informer: Option<Arc<dyn SessionLookup>>,
    registry: &mut Registry,
    stop: &CancellationToken,
) -> Result<(Pipeline, Arc<SessionCache>, Vec<JoinHandle<()>>)> {
    let states = Arc::new(SessionStates::default());
    let (cache, tasks) =
        start_cache(settings, redis, states.clone(), informer, registry, stop).await?;
    // A session that stops running here leaves the cache's owned tier too (weak: the cache
    // reads the states, so a strong reference back would be a cycle).
    let weak_cache = Arc::downgrade(&cache);
    states.on_remove(move |id| {
        if let Some(cache) = weak_cache.upgrade() {
            cache.forget(id);
        }
    });
    let pipeline = Pipeline::start_with_cache(
        settings,
        redis.cloned(),
        registry,
        None,
        states,
        Some(cache.clone()),
    )
    .await?;
    Ok((pipeline, cache, tasks))
}

/// Supervisor options from the settings: Redis ownership locks (in-memory without Redis) with
/// the configured lock TTL and cap on concurrent connection attempts.
pub fn supervisor_options(
    settings: &Settings,
    redis: Option<&fred::clients::Client>,
    registry: &mut Registry,
) -> SupervisorOptions {
    SupervisorOptions::new(
        redis,
        &settings.identity,
        LeaseConfig::new(settings.lock_ttl),
        SupervisorConfig {
            max_connect_attempts: settings.max_connect_attempts,
            ..SupervisorConfig::default()
        },
        registry,
    )
}

/// The cache with its fallback (backend lookup if configured, then this gateway's own sessions),
/// its Redis tier and invalidation listener when Redis is configured, and its background tasks.
///
/// `informer`, in cluster mode, answers between the two: what the `WhatsappSession` resources say.
pub async fn start_cache(
    settings: &Settings,
    redis: Option<&fred::clients::Client>,
    states: Arc<SessionStates>,
    informer: Option<Arc<dyn SessionLookup>>,
    registry: &mut Registry,
    stop: &CancellationToken,
) -> Result<(Arc<SessionCache>, Vec<JoinHandle<()>>)> {
    let mut lookups: Vec<Arc<dyn SessionLookup>> = vec![Arc::new(StatesLookup::new(
        states,
        settings.identity.clone(),
    ))];
    if let Some(informer) = informer {
        tracing::info!("cache fallback: the WhatsappSession informer store");
        lookups.push(informer);
    }
    if let (Some(backend), Some(path)) = (&settings.backend, &settings.session_lookup_path) {
        tracing::info!(path = %path, "cache fallback: backend session lookup");
        lookups.push(Arc::new(BackendLookup::new(backend, path)?));
    }
    let remote = redis.map(|client| {
        Arc::new(RedisTier::new(client.clone(), settings.cache.redis_ttl)) as Arc<dyn RemoteTier>
    });
    let cache = SessionCache::new(
        settings.cache.clone(),
        remote,
        Arc::new(ChainLookup(lookups)),
        CacheMetrics::register(registry),
    );
    let mut tasks = cache.spawn_background(stop.clone());
    if let Some(client) = redis {
        tasks.push(
            crate::cache::spawn_invalidation_listener(client, cache.clone(), stop.clone()).await?,
        );
    }
    Ok((cache, tasks))
}

/// Entry point of the binary.
pub async fn run(cli: crate::config::Cli) -> Result<()> {
    match cli.mode {
        crate::config::Mode::Standalone(args) => run_standalone(args).await,
        crate::config::Mode::Cluster(args) => crate::cluster::run_cluster(args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Priority, QrEvent, StatusEvent};

    /// A loopback backend that answers 500 to its first `failures` requests, then 200.
    async fn flaky_backend(failures: u64) -> crate::delivery::BackendSettings {
        use std::sync::atomic::{AtomicU64, Ordering};
        let seen = Arc::new(AtomicU64::new(0));
        let app = axum::Router::new().fallback(move || {
            let seen = seen.clone();
            async move {
                if seen.fetch_add(1, Ordering::SeqCst) < failures {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::OK
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        crate::delivery::BackendSettings {
            base_url: url.parse().unwrap(),
            qr_batch_path: "/qr/batch".into(),
            status_batch_path: "/status/batch".into(),
            legacy: false,
            qr_path: "/qr".into(),
            status_path: "/status".into(),
            secret: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
        }
    }

    fn settings(backend: crate::delivery::BackendSettings) -> Settings {
        Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            redis_url: None,
            backend: Some(backend.clone()),
            webhook_endpoints: backend,
            delivery: crate::delivery::DeliverySettings::default(),
            batch: crate::batch::BatchConfig::default(),
            resync_interval: Some(Duration::from_secs(300)),
            identity: "test".into(),
            log_json: false,
            api_token: None,
            cache: crate::cache::CacheSettings::default(),
            session_lookup_path: None,
            lock_ttl: Duration::from_secs(30),
            max_connect_attempts: 1,
            driver: DriverChoice::Sim,
        }
    }

    /// Without Redis, the last flush meets a backend that fails three times (as many as the hot
    /// attempts) and then recovers: the batch waits in memory and the drainers, still running
    /// after the flush, deliver it within the grace instead of it being dropped silently.
    #[tokio::test]
    async fn shutdown_drains_the_memory_spill_after_the_last_flush() {
        let settings = settings(flaky_backend(3).await);
        let mut registry = Registry::default();
        let pipeline = Pipeline::start(&settings, None, &mut registry, None)
            .await
            .unwrap();
        let delivery = pipeline.delivery.clone();
        pipeline
            .event_sink()
            .emit(StatusEvent::new(
                "s",
                SessionStatus::Active,
                Priority::High,
                None,
            ))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        pipeline.shutdown(Vec::new(), Duration::from_secs(10)).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "within the grace"
        );
        assert_eq!(delivery.delivered_items(), 1, "delivered, not lost");
        assert_eq!(delivery.memory_backlog(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_removed_sessions_late_events_do_not_bring_it_back() {
        let states = SessionStates::default();
        let removed = Arc::new(Mutex::new(Vec::new()));
        let seen_removed = removed.clone();
        states.on_remove(move |id| seen_removed.lock().unwrap().push(id.to_owned()));
        let active = StatusEvent::new("s", SessionStatus::Active, Priority::High, None);
        states.apply(&active.into());
        // Produced before the removal, routed after it (a deleted session's last status).
        let late = StatusEvent::new("s", SessionStatus::LoggedOut, Priority::High, None);
        let late_qr = QrEvent::new("s", "code", 1, Duration::from_secs(20));
        tokio::time::advance(Duration::from_millis(5)).await;
        states.remove("s");
        let Applied::Late(seen) = states.apply(&late.into()) else {
            panic!("a late status is still cached, detached");
        };
        assert_eq!(seen.status, SessionStatus::LoggedOut);
        assert_eq!(states.apply(&late_qr.into()), Applied::Ignored);
        assert!(states.get("s").is_none(), "not tracked again");
        assert_eq!(*removed.lock().unwrap(), ["s"], "the cache is told");
        assert!(states.resync_events().is_empty());
        // The same id, started again later, is tracked.
        tokio::time::advance(Duration::from_millis(5)).await;
        let again = StatusEvent::new("s", SessionStatus::Connecting, Priority::Normal, None);
        states.apply(&again.into());
        assert_eq!(states.get("s").unwrap().status, SessionStatus::Connecting);
    }
}
