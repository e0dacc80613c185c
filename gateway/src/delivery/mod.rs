//! Delivery of batches to the backend: rate limit, quick retries, spill to a Redis stream when the
//! backend fails (retried in order by a drainer task), dead letters for permanent 4xx answers, and
//! the metrics of all that. `Delivery` is the batcher's [`BatchSink`].

pub mod client;
pub mod render;
pub mod retry;
pub mod spill;
pub mod webhooks;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, BatchSink};
pub use client::{BackendClient, BackendSettings};
pub use render::{Endpoint, QrFormat, WireBatch, unix_ms_now};
pub use retry::{Outcome, RetryPolicy};
use spill::{MemorySpill, RedisSpill, Refused};
pub use webhooks::{RoutingSink, WebhookTarget, Webhooks};

#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub qr_format: QrFormat,
    pub retry: RetryPolicy,
    /// Token bucket toward the backend: sustained requests per second and burst.
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    /// Batches held in memory per endpoint when Redis cannot take them; beyond it, senders wait.
    pub memory_spill_capacity: usize,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            qr_format: QrFormat::Png,
            retry: RetryPolicy::default(),
            rate_limit_per_second: 200,
            rate_limit_burst: 50,
            memory_spill_capacity: 10_000,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaneLabel {
    lane: String,
}

/// Per-lane metrics, shared by the backend's delivery and every webhook destination's.
#[derive(Debug, Clone)]
pub struct LaneMetrics {
    batch_size: Family<LaneLabel, Histogram>,
    delivery_latency: Family<LaneLabel, Histogram>,
    delivered_items: Family<LaneLabel, Counter>,
    expired_items: Counter,
    shutdown_lost: Counter,
}

impl LaneMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = LaneMetrics {
            batch_size: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 2.0, 12))
            }),
            delivery_latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 14))
            }),
            delivered_items: Family::default(),
            expired_items: Counter::default(),
            shutdown_lost: Counter::default(),
        };
        registry.register(
            "whatsapp_gateway_batch_size",
            "Items per batch sent, by lane",
            m.batch_size.clone(),
        );
        registry.register(
            "whatsapp_gateway_delivery_latency_seconds",
            "Time from an event to the 2xx (backend or per-session webhook) for it, by lane",
            m.delivery_latency.clone(),
        );
        registry.register(
            "whatsapp_gateway_delivered_items",
            "Items the backend or a per-session webhook accepted, by lane",
            m.delivered_items.clone(),
        );
        registry.register(
            "whatsapp_gateway_expired_items",
            "QR items dropped from the spill because they expired before the backend took them",
            m.expired_items.clone(),
        );
        registry.register(
            "whatsapp_gateway_shutdown_lost_batches",
            "Batches (backend or per-session webhooks) still held only in memory when the gateway stopped: lost",
            m.shutdown_lost.clone(),
        );
        m
    }

    /// Counts batches a stop loses (held only in memory).
    pub(crate) fn count_shutdown_lost(&self, batches: u64) {
        self.shutdown_lost.inc_by(batches);
    }
}

/// Per-target metrics: one set for the configured backend (`whatsapp_gateway_backend_*`,
/// `whatsapp_gateway_spill_backlog`, `whatsapp_gateway_dead_letters`) and one set summed over every
/// per-session webhook (`whatsapp_gateway_webhook_*`), so a customer's broken webhook is told
/// apart from the backend without a label per URL.
#[derive(Debug, Clone)]
pub struct TargetMetrics {
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<EndpointLabel, Histogram>,
    spill_backlog: Family<EndpointLabel, Gauge>,
    dead_letters: Family<EndpointLabel, Counter>,
}

impl TargetMetrics {
    fn new() -> Self {
        TargetMetrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.002, 2.0, 14))
            }),
            spill_backlog: Family::default(),
            dead_letters: Family::default(),
        }
    }

    /// Registers the four families under `names` (requests, request duration, spill backlog,
    /// dead letters), each with its help text.
    fn register(registry: &mut Registry, names: [(&str, &str); 4]) -> Self {
        let m = Self::new();
        let [requests, duration, backlog, dead] = names;
        registry.register(requests.0, requests.1, m.requests.clone());
        registry.register(duration.0, duration.1, m.request_duration.clone());
        registry.register(backlog.0, backlog.1, m.spill_backlog.clone());
        registry.register(dead.0, dead.1, m.dead_letters.clone());
        m
    }

    fn touch_backlog(&self, endpoint: Endpoint) {
        drop(self.spill_backlog.get_or_create(&EndpointLabel {
            endpoint: endpoint.as_str(),
        }));
    }

    fn register_backend(registry: &mut Registry) -> Self {
        Self::register(
            registry,
            [
                (
                    "whatsapp_gateway_backend_requests",
                    "Requests to the backend by endpoint and HTTP status code (`error` when no answer)",
                ),
                (
                    "whatsapp_gateway_backend_request_duration_seconds",
                    "Duration of backend requests",
                ),
                (
                    "whatsapp_gateway_spill_backlog",
                    "Batches waiting in the retry (spill) stream, by endpoint",
                ),
                (
                    "whatsapp_gateway_dead_letters",
                    "Batches moved to the dead-letter stream after a permanent 4xx",
                ),
            ],
        )
    }

    pub(crate) fn register_webhooks(registry: &mut Registry) -> Self {
        Self::register(
            registry,
            [
                (
                    "whatsapp_gateway_webhook_requests",
                    "Requests to per-session webhooks (spec.webhook), summed over destinations, by endpoint and HTTP status code",
                ),
                (
                    "whatsapp_gateway_webhook_request_duration_seconds",
                    "Duration of requests to per-session webhooks",
                ),
                (
                    "whatsapp_gateway_webhook_spill_backlog",
                    "Batches waiting for per-session webhooks, summed over destinations, by endpoint",
                ),
                (
                    "whatsapp_gateway_webhook_dead_letters",
                    "Batches for per-session webhooks moved to the dead-letter stream",
                ),
            ],
        )
    }
}

#[derive(Debug, Clone)]
struct DeliveryMetrics {
    lanes: LaneMetrics,
    target: TargetMetrics,
}

/// Batches one webhook destination may have spilled per endpoint; beyond, dead letters.
pub const WEBHOOK_SPILL_MAX: i64 = 100_000;

/// Called for every item the backend accepted, with the batch id (for tests and benches).
pub type DeliveredHook = Arc<dyn Fn(&WireBatch) + Send + Sync>;

struct Inner {
    backend: Option<BackendClient>,
    settings: DeliverySettings,
    redis: Option<RedisSpill>,
    memory: MemorySpill,
    limiter: DefaultDirectRateLimiter,
    metrics: DeliveryMetrics,
    /// Batches spilled and not yet delivered, per endpoint; while non-zero, new batches of that
    /// endpoint join the spill so the backend sees them in order.
    backlog: [AtomicI64; 2],
    /// Per endpoint; `notify_one` keeps a permit when the drainer is busy, so a batch spilled
    /// between its backlog check and its wait is not left for the 1 s poll.
    wake_drainer: [Notify; 2],
    dead_letters: AtomicU64,
    /// Items counted for reconciliation: accepted by the backend, dead-lettered, expired in the spill.
    delivered_items: AtomicU64,
    dead_letter_items: AtomicU64,
    expired_items: AtomicU64,
    last_backend_ok: AtomicI64,
    last_backend_error: AtomicI64,
    on_delivered: Option<DeliveredHook>,
    /// Webhook destinations: every batch goes through the spill and its drainer, so the batcher
    /// (shared with every other session) never waits on a customer's slow or broken webhook.
    queued: bool,
    /// For logs and dead letters: which webhook (redacted URL); None for the backend.
    destination: Option<String>,
    /// Cancelled when the gateway starts to stop: a failed batch is spilled at once (hot retries
    /// could outlast the grace) and a full memory spill no longer makes senders wait.
    shutting_down: CancellationToken,
}

/// The batcher's sink. Cheap to clone.
#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

fn slot(endpoint: Endpoint) -> usize {
    match endpoint {
        Endpoint::Qr => 0,
        Endpoint::Status => 1,
    }
}

impl Delivery {
    /// `backend` None: batches are logged instead of sent (standalone demo without a backend).
    /// `redis` None: the spill lives in memory only.
    pub fn new(
        backend: Option<BackendClient>,
        redis: Option<RedisSpill>,
        settings: DeliverySettings,
        registry: &mut Registry,
    ) -> Self {
        let metrics = DeliveryMetrics {
            lanes: LaneMetrics::register(registry),
            target: TargetMetrics::register_backend(registry),
        };
        Self::build(backend, redis, settings, metrics, None)
    }

    /// A per-session webhook's delivery: its own client, limiter and spill, the shared metrics,
    /// and every batch queued (see `Inner::queued`).
    pub(crate) fn for_webhook(
        backend: BackendClient,
        redis: Option<RedisSpill>,
        settings: DeliverySettings,
        lanes: LaneMetrics,
        target: TargetMetrics,
        on_delivered: Option<DeliveredHook>,
    ) -> Self {
        let destination = crate::config::redact_url(backend.settings().base_url.as_str());
        let mut delivery = Self::build(
            Some(backend),
            redis,
            settings,
            DeliveryMetrics { lanes, target },
            Some(destination),
        );
        Arc::get_mut(&mut delivery.inner)
            .expect("not shared yet")
            .on_delivered = on_delivered;
        delivery
    }

    /// The metrics every webhook destination shares with this delivery.
    pub(crate) fn lane_metrics(&self) -> LaneMetrics {
        self.inner.metrics.lanes.clone()
    }

    pub(crate) fn delivered_hook(&self) -> Option<DeliveredHook> {
        self.inner.on_delivered.clone()
    }

    fn build(
        backend: Option<BackendClient>,
        redis: Option<RedisSpill>,
        settings: DeliverySettings,
        metrics: DeliveryMetrics,
        destination: Option<String>,
    ) -> Self {
        let per_second = NonZeroU32::new(settings.rate_limit_per_second.max(1)).expect("non-zero");
        let burst = NonZeroU32::new(settings.rate_limit_burst.max(1)).expect("non-zero");
        let limiter = RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst));
        let delivery = Delivery {
            inner: Arc::new(Inner {
                backend,
                memory: MemorySpill::new(settings.memory_spill_capacity),
                settings,
                redis,
                limiter,
                metrics,
                backlog: [AtomicI64::new(0), AtomicI64::new(0)],
                wake_drainer: [Notify::new(), Notify::new()],
                dead_letters: AtomicU64::new(0),
                delivered_items: AtomicU64::new(0),
                dead_letter_items: AtomicU64::new(0),
                expired_items: AtomicU64::new(0),
                last_backend_ok: AtomicI64::new(0),
                last_backend_error: AtomicI64::new(0),
                on_delivered: None,
                queued: destination.is_some(),
                destination,
                shutting_down: CancellationToken::new(),
            }),
        };
        // The backlog series exist (at 0) from the start, for dashboards and `absent()` alerts.
        for endpoint in Endpoint::ALL {
            delivery.backlog_gauge(endpoint);
        }
        delivery
    }

    /// Installs a hook called with each batch the backend accepted. Must be called before the
    /// delivery is shared.
    pub fn with_delivered_hook(mut self, hook: DeliveredHook) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("hook installed before sharing")
            .on_delivered = Some(hook);
        self
    }

    /// Spilled batches held in memory (both endpoints): those a stop would lose.
    pub(crate) fn memory_backlog(&self) -> usize {
        Endpoint::ALL
            .into_iter()
            .map(|endpoint| self.inner.memory.len(endpoint))
            .sum()
    }

    /// Starts the shutdown: from now on a batch that fails once is spilled instead of retried on
    /// the hot path, and the spill takes batches past its memory bound instead of waiting for a
    /// drainer. The drainers keep running until their own token is cancelled.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.cancel();
    }

    /// Waits until the drainers have emptied the memory spill (whatever the caller's deadline
    /// allows: a backend that stays down keeps it full).
    pub async fn wait_memory_drained(&self) {
        while self.memory_backlog() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ends the shutdown: the memory spill takes nothing more, and the batches it still holds
    /// are lost with the process. Logs them at error level, counts them in
    /// `whatsapp_gateway_shutdown_lost_batches` and returns how many.
    pub fn close(&self) -> usize {
        let lost = self.inner.memory.close();
        if lost > 0 {
            tracing::error!(
                batches = lost,
                destination = self.inner.destination.as_deref().unwrap_or("backend"),
                "stopping with batches held only in memory: they are lost"
            );
            self.inner.metrics.lanes.count_shutdown_lost(lost as u64);
        }
        lost
    }

    /// Batches spilled to Redis and not delivered yet (they resume on the next start); 0
    /// without Redis.
    pub fn redis_backlog(&self) -> i64 {
        if self.inner.redis.is_none() {
            return 0;
        }
        (self.backlog() - self.memory_backlog() as i64).max(0)
    }

    /// A webhook batch its destination's queue could not take: logged and counted as a dead
    /// letter (not stored: the queue is full because the spill cannot keep up).
    pub(crate) fn refuse_unqueued(&self, batch: &Batch) {
        let endpoint = Endpoint::of(batch.lane);
        tracing::error!(
            destination = self.inner.destination.as_deref().unwrap_or("backend"),
            lane = batch.lane.as_str(),
            items = batch.items.len(),
            "webhook queue full: batch dropped and counted as a dead letter"
        );
        self.inner.dead_letters.fetch_add(1, Ordering::Relaxed);
        self.inner
            .dead_letter_items
            .fetch_add(batch.items.len() as u64, Ordering::Relaxed);
        self.inner
            .metrics
            .target
            .dead_letters
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.as_str(),
            })
            .inc();
    }

    /// Batches waiting in the spill (both endpoints).
    pub fn backlog(&self) -> i64 {
        self.inner
            .backlog
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    pub fn dead_letters(&self) -> u64 {
        self.inner.dead_letters.load(Ordering::Relaxed)
    }

    /// Items the backend accepted with a 2xx.
    pub fn delivered_items(&self) -> u64 {
        self.inner.delivered_items.load(Ordering::Relaxed)
    }

    /// Items in dead-lettered batches.
    pub fn dead_letter_items(&self) -> u64 {
        self.inner.dead_letter_items.load(Ordering::Relaxed)
    }

    /// QR items that expired while waiting in the spill.
    pub fn expired_items(&self) -> u64 {
        self.inner.expired_items.load(Ordering::Relaxed)
    }

    /// True unless the last backend answer was a failure (no backend configured counts as healthy).
    pub fn backend_healthy(&self) -> bool {
        self.inner.last_backend_ok.load(Ordering::Relaxed)
            >= self.inner.last_backend_error.load(Ordering::Relaxed)
    }

    /// Counts what a previous run of this gateway left in the Redis spill, so it drains first.
    pub async fn recover_backlog(&self) {
        if let Some(redis) = &self.inner.redis {
            for endpoint in Endpoint::ALL {
                match redis.len(endpoint).await {
                    Ok(n) if n > 0 => {
                        tracing::info!(
                            endpoint = endpoint.as_str(),
                            batches = n,
                            "resuming spilled batches from Redis"
                        );
                        self.add_backlog(endpoint, n as i64);
                    }
                    Ok(_) => {}
                    // The drainer checks the stream again while idle (see `SPILL_RECHECK`).
                    Err(err) => {
                        tracing::warn!(%err, "could not read the spill backlog from Redis; retried while draining")
                    }
                }
            }
        }
    }

    /// Spawns the drainers that retry spilled batches in order until `shutdown` resolves.
    pub fn spawn_drainers(&self, shutdown: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        Endpoint::ALL
            .into_iter()
            .map(|endpoint| {
                let this = self.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { this.drain(endpoint, shutdown).await })
            })
            .collect()
    }

    /// Changes the backlog and its gauge by the same amount: the webhook gauge is a sum over
    /// destinations, so each one adds its changes rather than setting a value.
    fn add_backlog(&self, endpoint: Endpoint, delta: i64) {
        self.inner.backlog[slot(endpoint)].fetch_add(delta, Ordering::Relaxed);
        self.backlog_gauge(endpoint).inc_by(delta);
    }

    fn reset_backlog(&self, endpoint: Endpoint, actual: i64) {
        let before = self.inner.backlog[slot(endpoint)].swap(actual, Ordering::Relaxed);
        self.backlog_gauge(endpoint).inc_by(actual - before);
    }

    fn backlog_gauge(&self, endpoint: Endpoint) -> Gauge {
        self.inner
            .metrics
            .target
            .spill_backlog
            .get_or_create(&EndpointLabel {
                endpoint: endpoint.as_str(),
            })
            .clone()
    }

    /// One attempt: rate limit, send, metrics.
    async fn attempt(&self, batch: &WireBatch) -> Outcome {
        let Some(backend) = &self.inner.backend else {
            tracing::info!(
                endpoint = batch.endpoint.as_str(),
                batch_id = %batch.batch_id,
                items = batch.items.len(),
                "no backend configured: batch logged instead of sent"
            );
            return Outcome::Delivered { code: 200 };
        };
        self.inner.limiter.until_ready().await;
        let endpoint = backend.endpoint_label(batch.endpoint);
        let started = std::time::Instant::now();
        let outcome = backend.send(batch).await;
        self.inner
            .metrics
            .target
            .request_duration
            .get_or_create(&EndpointLabel { endpoint })
            .observe(started.elapsed().as_secs_f64());
        self.inner
            .metrics
            .target
            .requests
            .get_or_create(&RequestLabels {
                endpoint,
                code: outcome.code_label(),
            })
            .inc();
        let now = unix_ms_now();
        match &outcome {
            Outcome::Delivered { .. } => self.inner.last_backend_ok.store(now, Ordering::Relaxed),
            Outcome::Transient { .. } => {
                self.inner.last_backend_error.store(now, Ordering::Relaxed)
            }
            _ => {}
        }
        outcome
    }

    fn on_delivered(&self, batch: &WireBatch) {
        let now = unix_ms_now();
        let lane = LaneLabel {
            lane: batch.lane.clone(),
        };
        let latency = self
            .inner
            .metrics
            .lanes
            .delivery_latency
            .get_or_create(&lane);
        for item in &batch.items {
            latency.observe(((now - item.created_unix_ms).max(0) as f64) / 1000.0);
        }
        self.inner
            .metrics
            .lanes
            .batch_size
            .get_or_create(&lane)
            .observe(batch.items.len() as f64);
        self.inner
            .metrics
            .lanes
            .delivered_items
            .get_or_create(&lane)
            .inc_by(batch.items.len() as u64);
        self.inner
            .delivered_items
            .fetch_add(batch.items.len() as u64, Ordering::Relaxed);
        if let Some(hook) = &self.inner.on_delivered {
            hook(batch);
        }
    }

    async fn dead_letter(&self, batch: &WireBatch, code: u16, body: &str) {
        tracing::error!(
            endpoint = batch.endpoint.as_str(),
            batch_id = %batch.batch_id,
            items = batch.items.len(),
            code,
            body,
            destination = self.inner.destination.as_deref().unwrap_or("backend"),
            "batch refused permanently: moved to the dead-letter stream"
        );
        self.inner.dead_letters.fetch_add(1, Ordering::Relaxed);
        self.inner
            .dead_letter_items
            .fetch_add(batch.items.len() as u64, Ordering::Relaxed);
        self.inner
            .metrics
            .target
            .dead_letters
            .get_or_create(&EndpointLabel {
                endpoint: batch.endpoint.as_str(),
            })
            .inc();
        if let Some(redis) = &self.inner.redis
            && let Err(err) = redis
                .dead_letter(batch, code, body, self.inner.destination.as_deref())
                .await
        {
            tracing::error!(%err, batch_id = %batch.batch_id, "could not write the dead letter to Redis; it is only logged");
        }
    }

    /// Sends with splitting on 413; returns the parts that still need a retry (transient failure).
    /// Delivered parts are recorded, permanent failures dead-lettered.
    async fn send_splitting(&self, batch: WireBatch) -> Option<Vec<WireBatch>> {
        let mut todo = vec![batch];
        let mut retry_later = Vec::new();
        while let Some(batch) = todo.pop() {
            if batch.items.is_empty() {
                continue;
            }
            match self.attempt(&batch).await {
                Outcome::Delivered { .. } => self.on_delivered(&batch),
                Outcome::TooLarge if batch.items.len() > 1 => {
                    let (a, b) = batch.split();
                    // Keep order: `a` is popped first.
                    todo.push(b);
                    todo.push(a);
                }
                Outcome::TooLarge => self.dead_letter(&batch, 413, "single item too large").await,
                Outcome::Permanent { code, body } => self.dead_letter(&batch, code, &body).await,
                Outcome::Transient { code, error } => {
                    tracing::warn!(
                        endpoint = batch.endpoint.as_str(),
                        batch_id = %batch.batch_id,
                        code = code.map(|c| c.to_string()).unwrap_or_else(|| "none".into()),
                        error = %error,
                        "backend request failed"
                    );
                    retry_later.push(batch);
                    // Whatever was not tried yet keeps its place behind the failed part.
                    while let Some(rest) = todo.pop() {
                        retry_later.push(rest);
                    }
                }
            }
        }
        if retry_later.is_empty() {
            None
        } else {
            Some(retry_later)
        }
    }

    /// Sends parts in order; on a transient failure returns what is left (the failed parts and
    /// every later one).
    async fn send_parts(&self, parts: Vec<WireBatch>) -> Option<Vec<WireBatch>> {
        let mut parts = parts.into_iter();
        while let Some(part) = parts.next() {
            if let Some(mut left) = self.send_splitting(part).await {
                left.extend(parts);
                return Some(left);
            }
        }
        None
    }

    /// Puts a batch into the spill (Redis, or memory when Redis is absent or failing; when memory
    /// is full too, waits: backpressure up to the batcher).
    async fn spill(&self, batch: WireBatch) {
        let endpoint = batch.endpoint;
        if self.inner.queued
            && self.inner.backlog[slot(endpoint)].load(Ordering::Relaxed) >= WEBHOOK_SPILL_MAX
        {
            // One customer's webhook down for days must not fill the Redis every session's
            // credentials live in.
            self.dead_letter(&batch, 0, "webhook spill full").await;
            return;
        }
        if let Some(redis) = &self.inner.redis {
            match redis.append(&batch).await {
                Ok(()) => {
                    self.add_backlog(endpoint, 1);
                    self.inner.wake_drainer[slot(endpoint)].notify_one();
                    return;
                }
                Err(err) => tracing::warn!(%err, "Redis spill failed; keeping the batch in memory"),
            }
        }
        let mut batch = batch;
        loop {
            // Once stopping, the drainers may be gone: waiting for room could last forever, and
            // the excess is bounded by the deliveries in flight.
            let appended = if self.inner.shutting_down.is_cancelled() && !self.inner.queued {
                self.inner.memory.append_unbounded(batch)
            } else {
                self.inner.memory.try_append(batch)
            };
            match appended {
                Ok(()) => break,
                Err(Refused::Closed(back)) => {
                    // After `close`: counted here, as `close` counted what it held.
                    tracing::error!(
                        endpoint = endpoint.as_str(),
                        batch_id = %back.batch_id,
                        items = back.items.len(),
                        "batch spilled after the shutdown ended: lost"
                    );
                    self.inner.metrics.lanes.count_shutdown_lost(1);
                    return;
                }
                Err(Refused::Full(back)) if self.inner.queued => {
                    // A webhook that stays down must not stall the batcher for everyone: past
                    // the memory bound its batches are dead-lettered (logged and counted).
                    self.dead_letter(&back, 0, "webhook queue full").await;
                    return;
                }
                Err(Refused::Full(back)) => {
                    batch = back;
                    tracing::warn!(
                        "in-memory spill is full: waiting for the backend (backpressure)"
                    );
                    self.inner.wake_drainer[slot(endpoint)].notify_one();
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        () = self.inner.shutting_down.cancelled() => {}
                    }
                }
            }
        }
        self.add_backlog(endpoint, 1);
        self.inner.wake_drainer[slot(endpoint)].notify_one();
    }

    /// Hot path for a rendered batch: quick retries, then the spill.
    pub async fn deliver_wire(&self, batch: WireBatch) {
        if self.inner.queued || self.inner.backlog[slot(batch.endpoint)].load(Ordering::Relaxed) > 0
        {
            // Older batches are waiting: queue behind them so the backend sees events in order.
            self.spill(batch).await;
            return;
        }
        let mut pending = vec![batch];
        let mut backoff = self.inner.settings.retry.backoff();
        for attempt in 1..=self.inner.settings.retry.hot_attempts.max(1) {
            let mut failed = Vec::new();
            for batch in pending {
                if let Some(parts) = self.send_splitting(batch).await {
                    failed.extend(parts);
                }
            }
            if failed.is_empty() {
                return;
            }
            pending = failed;
            // Stopping: the spill keeps the batch (Redis across the restart; memory while the
            // drainers have time left), where hot retries could outlast the grace.
            if attempt >= self.inner.settings.retry.hot_attempts
                || self.inner.shutting_down.is_cancelled()
            {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(1))) => {}
                () = self.inner.shutting_down.cancelled() => break,
            }
        }
        for batch in pending {
            self.spill(batch).await;
        }
    }

    /// The counter is only ever corrected downward by the drainer (when it reads nothing), so
    /// entries it never counted would stay in Redis unseen while new batches pass them: after a
    /// failed `recover_backlog`, or an XADD that timed out but was applied (the batch also went
    /// to memory). An idle drainer compares with the stream's length now and then.
    async fn recheck_stored(&self, endpoint: Endpoint) {
        let Some(redis) = &self.inner.redis else {
            return;
        };
        // Read before XLEN: a batch spilled in between is then counted twice at worst, which
        // the drainer corrects once it finds the stream shorter; never missed.
        let counted = self.inner.backlog[slot(endpoint)].load(Ordering::Relaxed);
        match redis.len(endpoint).await {
            Ok(stored) => {
                let held = stored as i64 + self.inner.memory.len(endpoint) as i64;
                let missed = missed_backlog(counted, held);
                if missed > 0 {
                    tracing::warn!(
                        endpoint = endpoint.as_str(),
                        batches = held,
                        "spill entries the backlog counter missed: draining them"
                    );
                    self.add_backlog(endpoint, missed);
                }
            }
            Err(err) => tracing::debug!(%err, "could not check the spill stream's length"),
        }
    }

    /// Retries spilled batches of one endpoint, oldest first, until shutdown.
    async fn drain(&self, endpoint: Endpoint, shutdown: CancellationToken) {
        let mut backoff = self.inner.settings.retry.backoff();
        let mut recheck = Every::new(SPILL_RECHECK);
        let mut progress: Option<Progress> = None;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            if self.inner.backlog[slot(endpoint)].load(Ordering::Relaxed) <= 0 {
                tokio::select! {
                    _ = self.inner.wake_drainer[slot(endpoint)].notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
                if self.inner.redis.is_some() && recheck.due(tokio::time::Instant::now()) {
                    self.recheck_stored(endpoint).await;
                }
                continue;
            }
            // Memory first: it only holds batches that could not reach Redis, which are older
            // than anything appended to Redis after Redis came back.
            let (from_memory, entries) = {
                let mem = self.inner.memory.oldest(endpoint, 16);
                if !mem.is_empty() {
                    (true, mem)
                } else if let Some(redis) = &self.inner.redis {
                    match redis.oldest(endpoint, 16).await {
                        Ok(entries) => (false, entries),
                        Err(err) => {
                            tracing::warn!(%err, "reading the spill stream failed");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    }
                } else {
                    (true, Vec::new())
                }
            };
            if entries.is_empty() {
                // Counter drifted (e.g. a stream emptied by hand): resynchronise.
                let actual = match &self.inner.redis {
                    Some(redis) => redis.len(endpoint).await.unwrap_or(0) as i64,
                    None => 0,
                } + self.inner.memory.len(endpoint) as i64;
                self.reset_backlog(endpoint, actual);
                continue;
            }
            for entry in entries {
                // The stored batch stays as it was until it is done with; what an earlier
                // attempt finished (parts delivered or dead-lettered after a split) is not
                // redone, unless the process restarts in between.
                let resumed =
                    progress.take_if(|done| done.from_memory == from_memory && done.id == entry.id);
                let (mut parts, mut expired) = match resumed {
                    Some(done) => (done.left, done.expired),
                    None => (vec![entry.batch], 0),
                };
                // Counted when the entry is acknowledged: until then a restart retries the stored
                // batch, which drops (and would count) them again.
                let now = unix_ms_now();
                for part in &mut parts {
                    expired += part.drop_expired(now);
                }
                let outcome = self.send_parts(parts).await;
                if let Some(left) = outcome {
                    // Still failing: keep what is left (unchanged order) and back off.
                    progress = Some(Progress {
                        from_memory,
                        id: entry.id.clone(),
                        left,
                        expired,
                    });
                    let mut delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    // Stopping: what memory holds is lost at the end of a short grace, so retry
                    // when the stop begins and then at least every second.
                    let stopping = self.inner.shutting_down.is_cancelled();
                    if stopping {
                        delay = delay.min(SHUTDOWN_RETRY);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return,
                        _ = self.inner.shutting_down.cancelled(), if !stopping => {}
                    }
                    break;
                }
                backoff = self.inner.settings.retry.backoff();
                if from_memory {
                    self.inner.memory.ack(endpoint, &entry.id);
                } else if let Some(redis) = &self.inner.redis
                    && let Err(err) = redis.ack(endpoint, &entry.id).await
                {
                    // Delivered but not acknowledged: it will be sent again; the batch id lets the
                    // backend ignore the duplicate.
                    tracing::warn!(%err, "could not acknowledge a delivered spill entry");
                    break;
                }
                if expired > 0 {
                    self.inner
                        .metrics
                        .lanes
                        .expired_items
                        .inc_by(expired as u64);
                    self.inner
                        .expired_items
                        .fetch_add(expired as u64, Ordering::Relaxed);
                }
                self.add_backlog(endpoint, -1);
            }
        }
    }
}

/// What is left of the spill entry a drainer is retrying, once an attempt finished some of it.
struct Progress {
    from_memory: bool,
    id: String,
    left: Vec<WireBatch>,
    /// QR items dropped as expired so far.
    expired: usize,
}

/// Longest wait between a drainer's retries once the gateway is stopping.
const SHUTDOWN_RETRY: Duration = Duration::from_secs(1);

/// How often an idle drainer checks the Redis stream for entries its counter missed (one XLEN).
const SPILL_RECHECK: Duration = Duration::from_secs(10);

/// What to add to the backlog counter, given what it says and what the spill holds: enough to
/// match when it counts fewer, nothing otherwise (a count too high is corrected by the drainer
/// when it reads nothing).
fn missed_backlog(counted: i64, held: i64) -> i64 {
    if held > counted.max(0) {
        held - counted
    } else {
        0
    }
}

/// True at most once per period, and on the first call.
struct Every {
    period: Duration,
    next: Option<tokio::time::Instant>,
}

impl Every {
    fn new(period: Duration) -> Self {
        Every { period, next: None }
    }

    fn due(&mut self, now: tokio::time::Instant) -> bool {
        if self.next.is_some_and(|next| now < next) {
            return false;
        }
        self.next = Some(now + self.period);
        true
    }
}

impl BatchSink for Delivery {
    async fn deliver(&self, batch: Batch) {
        let lane = batch.lane;
        let format = self.inner.settings.qr_format;
        // PNG rendering is CPU work (about a millisecond per code): keep it off the async workers
        // so a large QR batch cannot stall the status lane or the HTTP server.
        let rendered = if lane == crate::batch::Lane::Qr && format == QrFormat::Png {
            match tokio::task::spawn_blocking(move || WireBatch::render(&batch, format)).await {
                Ok(result) => result,
                Err(err) => {
                    tracing::error!(%err, "QR rendering task failed; the batch is dropped");
                    return;
                }
            }
        } else {
            WireBatch::render(&batch, format)
        };
        match rendered {
            Ok(wire) => self.deliver_wire(wire).await,
            Err(err) => {
                tracing::error!(%err, lane = lane.as_str(), "could not render a batch; it is dropped")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use prometheus_client::encoding::text::encode;

    use super::*;
    use crate::events::{Priority, SessionStatus, StatusEvent};

    #[test]
    fn missed_backlog_counts_only_what_the_counter_missed() {
        assert_eq!(missed_backlog(0, 0), 0);
        // `recover_backlog` failed at start: everything in the stream was missed.
        assert_eq!(missed_backlog(0, 3), 3);
        // An XADD that timed out but was applied: one more stored than counted.
        assert_eq!(missed_backlog(2, 3), 1);
        // A counter below zero (drift) ends at what is held.
        assert_eq!(missed_backlog(-1, 1), 2);
        // Too high is left to the drainer's read (it finds nothing and resets).
        assert_eq!(missed_backlog(4, 1), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_spill_recheck_is_due_at_most_every_period() {
        let mut every = Every::new(SPILL_RECHECK);
        assert!(every.due(tokio::time::Instant::now()), "first idle poll");
        for _ in 0..9 {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(!every.due(tokio::time::Instant::now()));
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(every.due(tokio::time::Instant::now()));
        assert!(!every.due(tokio::time::Instant::now()));
    }

    /// A loopback backend answering 500 while `failing` is set and 200 otherwise; counts requests.
    async fn backend(failing: Arc<AtomicBool>) -> (BackendClient, Arc<AtomicU64>) {
        let hits = Arc::new(AtomicU64::new(0));
        let counted = hits.clone();
        let app = axum::Router::new().fallback(move || {
            let failing = failing.clone();
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                if failing.load(Ordering::SeqCst) {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::OK
                }
            }
        });
        (serve(app).await, hits)
    }

    /// A client of a loopback server running `app`.
    async fn serve(app: axum::Router) -> BackendClient {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        BackendClient::new(BackendSettings {
            base_url: url.parse().unwrap(),
            qr_batch_path: "/qr/batch".into(),
            status_batch_path: "/status/batch".into(),
            legacy: false,
            qr_path: "/qr".into(),
            status_path: "/status".into(),
            secret: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
        })
        .unwrap()
    }

    fn status_batch(id: &str) -> WireBatch {
        let batch = Batch {
            lane: crate::batch::Lane::StatusHigh,
            items: vec![StatusEvent::new(id, SessionStatus::Active, Priority::High, None).into()],
            reason: crate::batch::FlushReason::Shutdown,
        };
        WireBatch::render(&batch, QrFormat::Raw).unwrap()
    }

    fn lost_metric(registry: &Registry) -> u64 {
        let mut text = String::new();
        encode(&mut text, registry).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix("whatsapp_gateway_shutdown_lost_batches_total "))
            .expect("metric registered")
            .parse()
            .unwrap()
    }

    /// Slow hot retries (2 s apart) and a memory spill of one batch, without Redis and without
    /// drainers: once stopping, a failed batch is spilled after one attempt, a full spill does
    /// not wait for room, and `close` counts what memory still holds.
    #[tokio::test]
    async fn stopping_spills_after_one_failure_never_waits_for_room_and_counts_the_loss() {
        let (client, hits) = backend(Arc::new(AtomicBool::new(true))).await;
        let mut registry = Registry::default();
        let settings = DeliverySettings {
            retry: RetryPolicy {
                hot_attempts: 3,
                min_delay: Duration::from_secs(2),
                max_delay: Duration::from_secs(2),
                factor: 1.0,
            },
            memory_spill_capacity: 1,
            ..DeliverySettings::default()
        };
        let delivery = Delivery::new(Some(client), None, settings, &mut registry);
        delivery.begin_shutdown();
        let started = std::time::Instant::now();
        delivery.deliver_wire(status_batch("a")).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "hot retries took {:?}",
            started.elapsed()
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1, "one attempt");
        assert_eq!(delivery.memory_backlog(), 1);
        // The spill is full and no drainer runs: it must not wait.
        tokio::time::timeout(
            Duration::from_secs(2),
            delivery.deliver_wire(status_batch("b")),
        )
        .await
        .expect("a full memory spill does not hold a stopping gateway");
        assert_eq!(delivery.memory_backlog(), 2);
        assert_eq!(delivery.close(), 2);
        assert_eq!(lost_metric(&registry), 2);
        // A batch that arrives after the end is counted too, not kept.
        delivery.deliver_wire(status_batch("c")).await;
        assert_eq!(lost_metric(&registry), 3);
        assert_eq!(delivery.memory_backlog(), 2);
    }

    /// A spilled batch split on 413 whose parts end differently: `a` is refused (422, dead
    /// letter), `b` accepted, `c` fails twice. The retries send `c` alone: `a` is not
    /// dead-lettered again, nor `b` delivered (and counted) again.
    #[tokio::test]
    async fn a_retried_spill_entry_does_not_redo_its_finished_parts() {
        let c_failures = Arc::new(AtomicU64::new(0));
        let failures = c_failures.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let failures = failures.clone();
            async move {
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let ids: Vec<String> = body["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|item| item["sessionId"].as_str().unwrap().to_owned())
                    .collect();
                match ids.as_slice() {
                    [_, _, ..] => axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    [id] if id == "a" => axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                    [id] if id == "c" && failures.fetch_add(1, Ordering::SeqCst) < 2 => {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    }
                    _ => axum::http::StatusCode::OK,
                }
            }
        });
        let client = serve(app).await;
        let mut registry = Registry::default();
        let settings = DeliverySettings {
            retry: RetryPolicy {
                hot_attempts: 1,
                min_delay: Duration::from_millis(20),
                max_delay: Duration::from_millis(50),
                factor: 2.0,
            },
            ..DeliverySettings::default()
        };
        let delivery = Delivery::new(Some(client), None, settings, &mut registry);
        let batch = Batch {
            lane: crate::batch::Lane::StatusHigh,
            items: ["a", "b", "c"]
                .into_iter()
                .map(|id| StatusEvent::new(id, SessionStatus::Active, Priority::High, None).into())
                .collect(),
            reason: crate::batch::FlushReason::Immediate,
        };
        delivery
            .spill(WireBatch::render(&batch, QrFormat::Raw).unwrap())
            .await;
        let drainers_stop = CancellationToken::new();
        let drainers = delivery.spawn_drainers(drainers_stop.clone());
        tokio::time::timeout(Duration::from_secs(5), delivery.wait_memory_drained())
            .await
            .expect("drained");
        assert_eq!(c_failures.load(Ordering::SeqCst), 3);
        assert_eq!(delivery.dead_letters(), 1, "a is dead-lettered once");
        assert_eq!(delivery.dead_letter_items(), 1);
        assert_eq!(delivery.delivered_items(), 2, "b and c, each once");
        assert_eq!(delivery.backlog(), 0);
        drainers_stop.cancel();
        for drainer in drainers {
            drainer.await.unwrap();
        }
    }

    /// A drainer backing off for long (the backend was down for a while) retries at once when
    /// the stop begins, and then at least every second: the grace is short.
    #[tokio::test]
    async fn a_backing_off_drainer_retries_at_once_when_stopping_begins() {
        let failing = Arc::new(AtomicBool::new(true));
        let (client, hits) = backend(failing.clone()).await;
        let mut registry = Registry::default();
        let settings = DeliverySettings {
            retry: RetryPolicy {
                hot_attempts: 1,
                min_delay: Duration::from_secs(20),
                max_delay: Duration::from_secs(20),
                factor: 1.0,
            },
            ..DeliverySettings::default()
        };
        let delivery = Delivery::new(Some(client), None, settings, &mut registry);
        let drainers_stop = CancellationToken::new();
        let drainers = delivery.spawn_drainers(drainers_stop.clone());
        delivery.deliver_wire(status_batch("a")).await;
        // The drainer's own attempt fails too; it backs off for 20 s.
        tokio::time::timeout(Duration::from_secs(3), async {
            while hits.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the drainer tries");
        failing.store(false, Ordering::SeqCst);
        delivery.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(3), delivery.wait_memory_drained())
            .await
            .expect("retried at once, not after the 20 s backoff");
        assert_eq!(delivery.delivered_items(), 1);
        drainers_stop.cancel();
        for drainer in drainers {
            drainer.await.unwrap();
        }
    }

    /// The drainers still run once stopping has begun, so a backend that recovers within the
    /// grace gets what the memory spill holds.
    #[tokio::test]
    async fn drainers_empty_the_memory_spill_while_stopping() {
        let failing = Arc::new(AtomicBool::new(true));
        let (client, _hits) = backend(failing.clone()).await;
        let mut registry = Registry::default();
        let settings = DeliverySettings {
            retry: RetryPolicy {
                hot_attempts: 3,
                min_delay: Duration::from_millis(20),
                max_delay: Duration::from_millis(50),
                factor: 2.0,
            },
            ..DeliverySettings::default()
        };
        let delivery = Delivery::new(Some(client), None, settings, &mut registry);
        let drainers_stop = CancellationToken::new();
        let drainers = delivery.spawn_drainers(drainers_stop.clone());
        delivery.begin_shutdown();
        delivery.deliver_wire(status_batch("a")).await;
        assert_eq!(delivery.memory_backlog(), 1);
        failing.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), delivery.wait_memory_drained())
            .await
            .expect("the drainer delivers the spilled batch");
        assert_eq!(delivery.delivered_items(), 1);
        assert_eq!(delivery.close(), 0);
        assert_eq!(lost_metric(&registry), 0);
        drainers_stop.cancel();
        for drainer in drainers {
            drainer.await.unwrap();
        }
    }
}
