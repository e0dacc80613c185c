//! Per-session webhooks (`spec.webhook`): a session that names its own backend has its batches
//! sent there, signed with its own key, instead of to the gateway's backend.
//!
//! The batcher stays shared (one queue, one set of lanes for every session); [`RoutingSink`]
//! splits each flushed batch by destination. Each destination is a [`Delivery`] of its own: its
//! own HTTP client, token bucket and spill stream, and it is *queued* (every batch goes through
//! its spill and drainer), so a customer's slow or broken webhook delays only that customer and
//! never the batcher everyone shares. Metrics are summed over destinations
//! (`whatsapp_gateway_webhook_*`): a label per URL would be unbounded.
//!
//! A session's route outlives the session for [`ROUTE_GRACE`]: the last events of a stopped or
//! moved session must reach the webhook it named, never the gateway's backend.
//!
//! Destinations are recorded in Redis (`wa:{gw:<identity>}:webhooks`, URL and key) so a restarted
//! gateway drains what it had spilled for them before any session names them again. The key sits
//! next to the session credentials Redis already holds, so this stores nothing more sensitive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fred::prelude::*;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::spill::{RedisSpill, SpillKeys};
use super::{
    BackendClient, BackendSettings, Delivery, DeliverySettings, LaneMetrics, TargetMetrics,
};
use crate::Result;
use crate::batch::{Batch, BatchSink};
use crate::events::GatewayEvent;

/// How long a removed session's events still go to its webhook.
pub const ROUTE_GRACE: Duration = Duration::from_secs(600);
/// How often unused destinations (no session, nothing spilled) are closed.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// A resolved `spec.webhook`: the base URL and the HMAC key read from its Secret.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    pub url: reqwest::Url,
    pub secret: Option<String>,
}

/// A destination's record in Redis.
#[derive(Serialize, Deserialize)]
struct StoredTarget {
    url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("url", &crate::config::redact_url(self.url.as_str()))
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl WebhookTarget {
    /// Parses and checks a webhook URL; the error says what is wrong with it.
    pub fn parse_url(url: &str) -> std::result::Result<reqwest::Url, String> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| format!("`{}`: {e}", crate::config::redact_url(url)))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "`{}` must be http or https",
                crate::config::redact_url(url)
            ));
        }
        Ok(parsed)
    }

    /// Names the destination in Redis keys: a digest of URL and key, so a rotated key is a new
    /// destination (what was spilled under the old one drains with it) and the key never
    /// appears in a key name.
    pub fn destination_id(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(self.url.as_str().as_bytes());
        hash.update(b"\n");
        hash.update(self.secret.as_deref().unwrap_or("").as_bytes());
        hex::encode(&hash.finalize()[..8])
    }
}

#[derive(Debug, Clone)]
struct Route {
    destination: String,
    removed_at: Option<Instant>,
}

struct Destination {
    delivery: Delivery,
    /// Batches handed to the task and not yet spilled (the queue's count drops as soon as the
    /// task takes one; rendering and the Redis write come after).
    in_flight: Arc<AtomicI64>,
    /// To the destination's own task, which renders and spills: the batcher never awaits a
    /// webhook's work, not even a Redis write.
    queue: mpsc::Sender<Batch>,
    stop: CancellationToken,
    /// Consecutive sweeps that found it unused and empty; closed at two, so a batch handed to
    /// it just before the first sweep has shown up in its backlog by the second.
    idle_sweeps: u8,
}

/// Where a session's batches go.
enum Lookup {
    Backend,
    Webhook(String, Delivery, mpsc::Sender<Batch>, Arc<AtomicI64>),
    /// Its webhook cannot be resolved (or its destination is not open): the items are dropped
    /// and counted, never sent to the gateway's backend.
    Held,
}

/// Batches waiting for a destination's task; past it they are dropped and counted as dead
/// letters (a Redis that stays unwritable for minutes).
pub const QUEUE_BATCHES: usize = 1024;
/// How long shutdown waits for webhook batches that would otherwise be lost.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// The per-session webhook destinations of one gateway and which session goes where.
pub struct Webhooks {
    template: BackendSettings,
    settings: DeliverySettings,
    identity: String,
    redis: Option<fred::clients::Client>,
    lanes: LaneMetrics,
    target_metrics: TargetMetrics,
    destinations_gauge: Gauge,
    on_delivered: Option<super::DeliveredHook>,
    /// Stops drainers and the sweeper; its own, because they must outlive the batcher's last
    /// flush, which happens after the pipeline's background tasks were told to stop.
    shutdown: CancellationToken,
    /// Lock order: `routes`, then `destinations`.
    routes: RwLock<HashMap<String, Route>>,
    /// Sessions whose webhook cannot be resolved yet, with when they were removed (pruned after
    /// the grace). Checked before `routes`.
    held: RwLock<HashMap<String, Option<Instant>>>,
    held_items: Counter,
    /// Held sessions not removed: those waiting for their webhook (its Secret) to start.
    waiting: Gauge,
    destinations: Mutex<HashMap<String, Destination>>,
    /// False until a session names a webhook: until then batches skip the split.
    any: AtomicBool,
}

impl Webhooks {
    /// `template`: paths, timeouts and legacy mode as configured for the backend (a webhook only
    /// overrides the base URL and the key). `backend`: the gateway's delivery, whose lane metrics
    /// and delivered hook the destinations share.
    pub fn new(
        template: BackendSettings,
        settings: DeliverySettings,
        identity: &str,
        redis: Option<fred::clients::Client>,
        backend: &Delivery,
        registry: &mut Registry,
    ) -> Arc<Self> {
        let destinations_gauge = Gauge::default();
        registry.register(
            "whatsapp_gateway_webhook_destinations",
            "Per-session webhook destinations this gateway delivers to",
            destinations_gauge.clone(),
        );
        let held_items = Counter::default();
        registry.register(
            "whatsapp_gateway_webhook_held_items",
            "Items of sessions whose webhook cannot be resolved (its Secret is missing), dropped rather than sent to the gateway's backend",
            held_items.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            "whatsapp_gateway_webhook_sessions_waiting",
            "Sessions that do not start because their webhook cannot be resolved (its Secret or key is missing)",
            waiting.clone(),
        );
        let target_metrics = TargetMetrics::register_webhooks(registry);
        for endpoint in super::Endpoint::ALL {
            // The series exist (at 0) before any webhook is used, for dashboards and alerts.
            target_metrics.touch_backlog(endpoint);
        }
        Arc::new(Webhooks {
            template,
            settings,
            identity: identity.to_owned(),
            redis,
            lanes: backend.lane_metrics(),
            target_metrics,
            destinations_gauge,
            on_delivered: backend.delivered_hook(),
            shutdown: CancellationToken::new(),
            routes: RwLock::default(),
            held: RwLock::default(),
            held_items,
            waiting,
            destinations: Mutex::default(),
            any: AtomicBool::new(false),
        })
    }

    /// Sends `session_id`'s batches to `target` (None: the gateway's backend) from now on.
    pub async fn route(&self, session_id: &str, target: Option<&WebhookTarget>) -> Result<()> {
        self.release(session_id);
        let Some(target) = target else {
            // Called for every session on every reconcile pass: no write lock unless needed.
            let routed = self
                .routes
                .read()
                .expect("routes lock")
                .contains_key(session_id);
            if routed {
                self.routes.write().expect("routes lock").remove(session_id);
            }
            return Ok(());
        };
        let id = target.destination_id();
        loop {
            {
                // The route is written under both locks, after checking its destination is open:
                // a sweep (which holds `routes` while it closes) cannot close it in between.
                let mut routes = self.routes.write().expect("routes lock");
                let mut destinations = self.destinations.lock().expect("destinations lock");
                if let Some(destination) = destinations.get_mut(&id) {
                    destination.idle_sweeps = 0;
                    let changed = routes
                        .get(session_id)
                        .is_none_or(|route| route.destination != id);
                    routes.insert(
                        session_id.to_owned(),
                        Route {
                            destination: id,
                            removed_at: None,
                        },
                    );
                    self.any.store(true, Ordering::Relaxed);
                    if changed {
                        tracing::info!(session_id, webhook = %crate::config::redact_url(target.url.as_str()), "session delivers to its own webhook");
                    }
                    return Ok(());
                }
            }
            self.open(&id, target).await?;
        }
    }

    /// The session stopped here for good: its late events still go to its webhook for
    /// [`ROUTE_GRACE`]. (A paused session keeps its route: it still exists, and re-sync still
    /// sends its status.)
    pub fn removed(&self, session_id: &str) {
        {
            let mut held = self.held.write().expect("held lock");
            if let Some(at) = held.get_mut(session_id) {
                at.get_or_insert_with(Instant::now);
                self.count_waiting(&held);
            }
        }
        if let Some(route) = self
            .routes
            .write()
            .expect("routes lock")
            .get_mut(session_id)
        {
            route.removed_at.get_or_insert_with(Instant::now);
        }
    }

    /// Keeps `session_id`'s current webhook route (also one left from a removal within the
    /// grace, which stops counting down); false when it has none.
    pub fn keep_route(&self, session_id: &str) -> bool {
        match self
            .routes
            .write()
            .expect("routes lock")
            .get_mut(session_id)
        {
            Some(route) => {
                route.removed_at = None;
                true
            }
            None => false,
        }
    }

    /// Whether this gateway runs `session_id` with a webhook route (not one kept after a
    /// removal: a change accepted for it would be re-sent by re-sync after the route is gone).
    pub fn routes_to_webhook(&self, session_id: &str) -> bool {
        self.routes
            .read()
            .expect("routes lock")
            .get(session_id)
            .is_some_and(|route| route.removed_at.is_none())
    }

    /// `session_id`'s webhook cannot be resolved and it has no route: until it does, its items
    /// (the stop event, re-sync) are dropped and counted, never sent to the gateway's backend.
    pub fn hold(&self, session_id: &str) {
        let mut held = self.held.write().expect("held lock");
        held.insert(session_id.to_owned(), None);
        self.count_waiting(&held);
    }

    fn count_waiting(&self, held: &HashMap<String, Option<Instant>>) {
        self.waiting
            .set(held.values().filter(|removed| removed.is_none()).count() as i64);
    }

    fn release(&self, session_id: &str) {
        let known = self
            .held
            .read()
            .expect("held lock")
            .contains_key(session_id);
        if known {
            let mut held = self.held.write().expect("held lock");
            held.remove(session_id);
            self.count_waiting(&held);
        }
    }

    fn lookup(&self, session_id: &str) -> Lookup {
        if self
            .held
            .read()
            .expect("held lock")
            .contains_key(session_id)
        {
            return Lookup::Held;
        }
        let Some(route) = self
            .routes
            .read()
            .expect("routes lock")
            .get(session_id)
            .cloned()
        else {
            return Lookup::Backend;
        };
        match self
            .destinations
            .lock()
            .expect("destinations lock")
            .get_mut(&route.destination)
        {
            Some(d) => {
                d.idle_sweeps = 0;
                Lookup::Webhook(
                    route.destination,
                    d.delivery.clone(),
                    d.queue.clone(),
                    d.in_flight.clone(),
                )
            }
            // Cannot happen while routes are only written under both locks; if it did, the
            // items must still not reach the gateway's backend.
            None => {
                tracing::error!(session_id, destination = %route.destination, "webhook route without an open destination");
                Lookup::Held
            }
        }
    }

    /// Batches waiting for webhooks (every destination, both endpoints).
    pub fn backlog(&self) -> i64 {
        self.destinations
            .lock()
            .expect("destinations lock")
            .values()
            .map(|d| d.delivery.backlog())
            .sum()
    }

    /// Items webhooks accepted with a 2xx.
    pub fn delivered_items(&self) -> u64 {
        self.destinations
            .lock()
            .expect("destinations lock")
            .values()
            .map(|d| d.delivery.delivered_items())
            .sum()
    }

    /// Opens the destination unless it is open: records it in Redis, starts its task and
    /// drainers.
    async fn open(&self, id: &str, target: &WebhookTarget) -> Result<()> {
        if self
            .destinations
            .lock()
            .expect("destinations lock")
            .contains_key(id)
        {
            return Ok(());
        }
        let client = BackendClient::new(BackendSettings {
            base_url: target.url.clone(),
            secret: target.secret.clone(),
            ..self.template.clone()
        })?;
        let spill = self
            .redis
            .clone()
            .map(|redis| RedisSpill::new(redis, SpillKeys::for_webhook(&self.identity, id)));
        if let Some(redis) = &self.redis {
            let stored = serde_json::to_string(&StoredTarget {
                url: target.url.to_string(),
                secret: target.secret.clone(),
            })?;
            let recorded: std::result::Result<(), fred::error::Error> = redis
                .hset(SpillKeys::new(&self.identity).webhooks(), (id, stored))
                .await;
            if let Err(err) = recorded {
                // Only a restart's recovery needs the record; delivery works without it.
                tracing::warn!(%err, "could not record the webhook destination in Redis");
            }
        }
        let delivery = Delivery::for_webhook(
            client,
            spill,
            self.settings.clone(),
            self.lanes.clone(),
            self.target_metrics.clone(),
            self.on_delivered.clone(),
        );
        let mut destinations = self.destinations.lock().expect("destinations lock");
        if destinations.contains_key(id) {
            return Ok(()); // opened meanwhile by another caller
        }
        let stop = self.shutdown.child_token();
        let (queue, mut batches) = mpsc::channel::<Batch>(QUEUE_BATCHES);
        let in_flight = Arc::new(AtomicI64::new(0));
        {
            let delivery = delivery.clone();
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                // What a previous run left in Redis goes first.
                delivery.recover_backlog().await;
                // Ends once the destination is closed and its queue is empty.
                while let Some(batch) = batches.recv().await {
                    delivery.deliver(batch).await;
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                }
            });
        }
        drop(delivery.spawn_drainers(stop.clone()));
        destinations.insert(
            id.to_owned(),
            Destination {
                delivery,
                in_flight,
                queue,
                stop,
                idle_sweeps: 0,
            },
        );
        self.destinations_gauge.set(destinations.len() as i64);
        Ok(())
    }

    /// Reopens the destinations a previous run of this gateway recorded, so what it spilled for
    /// them is delivered; the sweep closes those that end up unused and empty.
    pub async fn recover(&self) {
        let Some(redis) = &self.redis else { return };
        let recorded: HashMap<String, String> = match redis
            .hgetall(SpillKeys::new(&self.identity).webhooks())
            .await
        {
            Ok(recorded) => recorded,
            Err(err) => {
                tracing::warn!(%err, "could not read the webhook destinations from Redis");
                return;
            }
        };
        for (id, stored) in recorded {
            let target = serde_json::from_str::<StoredTarget>(&stored)
                .ok()
                .and_then(|stored| {
                    Some(WebhookTarget {
                        url: reqwest::Url::parse(&stored.url).ok()?,
                        secret: stored.secret,
                    })
                });
            match target {
                Some(target) if target.destination_id() == id => {
                    if let Err(err) = self.open(&id, &target).await {
                        tracing::warn!(%err, destination = %id, "could not reopen a webhook destination");
                    }
                }
                _ => {
                    tracing::warn!(destination = %id, "unreadable webhook destination record ignored")
                }
            }
        }
    }

    /// Forgets routes of sessions removed longer than [`ROUTE_GRACE`] ago and closes destinations
    /// that no session used and that held nothing on two sweeps in a row.
    pub async fn sweep(&self) {
        let now = Instant::now();
        let closed: Vec<String> = {
            self.held
                .write()
                .expect("held lock")
                .retain(|_, removed_at| {
                    removed_at.is_none_or(|at| now.duration_since(at) < ROUTE_GRACE)
                });
            let mut routes = self.routes.write().expect("routes lock");
            routes.retain(|_, route| {
                route
                    .removed_at
                    .is_none_or(|at| now.duration_since(at) < ROUTE_GRACE)
            });
            let in_use: std::collections::HashSet<&str> =
                routes.values().map(|r| r.destination.as_str()).collect();
            let mut destinations = self.destinations.lock().expect("destinations lock");
            for (id, d) in destinations.iter_mut() {
                let idle = !in_use.contains(id.as_str())
                    && d.delivery.backlog() == 0
                    && d.in_flight.load(Ordering::Relaxed) == 0;
                d.idle_sweeps = if idle { d.idle_sweeps + 1 } else { 0 };
            }
            let closing: Vec<String> = destinations
                .iter()
                .filter(|(_, d)| d.idle_sweeps >= 2)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &closing {
                if let Some(destination) = destinations.remove(id) {
                    destination.stop.cancel();
                }
            }
            self.destinations_gauge.set(destinations.len() as i64);
            closing
        };
        if let Some(redis) = &self.redis {
            for id in closed {
                let reopened = self
                    .destinations
                    .lock()
                    .expect("destinations lock")
                    .contains_key(&id);
                if reopened {
                    continue;
                }
                let removed: std::result::Result<u64, fred::error::Error> = redis
                    .hdel(SpillKeys::new(&self.identity).webhooks(), id)
                    .await;
                if let Err(err) = removed {
                    tracing::warn!(%err, "could not remove a closed webhook destination's record");
                }
            }
        }
    }

    /// Runs [`Webhooks::sweep`] every [`SWEEP_INTERVAL`] until shutdown.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = ticker.tick() => this.sweep().await,
                    () = this.shutdown.cancelled() => return,
                }
            }
        })
    }

    /// Batches that a stop now would lose: queued to a destination's task, or spilled where
    /// they do not survive the process (memory; all of the spill without Redis).
    fn at_risk(&self) -> i64 {
        let with_redis = self.redis.is_some();
        self.destinations
            .lock()
            .expect("destinations lock")
            .values()
            .map(|d| {
                let queued = d.in_flight.load(Ordering::Relaxed);
                let spilled = if with_redis {
                    d.delivery.memory_backlog() as i64
                } else {
                    d.delivery.backlog()
                };
                queued + spilled
            })
            .sum()
    }

    /// At shutdown, after the batcher's last flush: waits (up to [`SHUTDOWN_WAIT`]) for what
    /// would be lost otherwise, then stops the drainers and the sweeper. A Redis spill resumes
    /// on the next start, so a webhook that is down does not hold the shutdown up.
    pub async fn drain(&self) {
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while self.at_risk() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.at_risk();
        if left > 0 {
            tracing::error!(
                batches = left,
                "webhook batches not delivered before shutdown (held in memory: lost)"
            );
            self.lanes.count_shutdown_lost(left as u64);
        }
        // Every destination's token is a child of this one; the sweeper stops too.
        self.shutdown.cancel();
    }
}

/// The batcher's sink: each batch split by destination, webhooks first (they only queue), then
/// the rest to the gateway's backend.
#[derive(Clone)]
pub struct RoutingSink {
    backend: Delivery,
    webhooks: Arc<Webhooks>,
}

impl RoutingSink {
    pub fn new(backend: Delivery, webhooks: Arc<Webhooks>) -> Self {
        RoutingSink { backend, webhooks }
    }
}

impl BatchSink for RoutingSink {
    async fn deliver(&self, batch: Batch) {
        if !self.webhooks.any.load(Ordering::Relaxed) {
            return self.backend.deliver(batch).await;
        }
        let Batch {
            lane,
            items,
            reason,
        } = batch;
        let mut to_backend: Vec<GatewayEvent> = Vec::with_capacity(items.len());
        // Few destinations per batch: a vector keeps their first-seen order without hashing.
        type Part = (
            String,
            Delivery,
            mpsc::Sender<Batch>,
            Arc<AtomicI64>,
            Vec<GatewayEvent>,
        );
        let mut to_webhooks: Vec<Part> = Vec::new();
        let mut held = 0u64;
        for item in items {
            match self.webhooks.lookup(item.session_id()) {
                Lookup::Backend => to_backend.push(item),
                Lookup::Webhook(id, delivery, queue, in_flight) => {
                    match to_webhooks.iter_mut().find(|(d, ..)| *d == id) {
                        Some((.., part)) => part.push(item),
                        None => to_webhooks.push((id, delivery, queue, in_flight, vec![item])),
                    }
                }
                Lookup::Held => held += 1,
            }
        }
        if held > 0 {
            self.webhooks.held_items.inc_by(held);
            tracing::warn!(
                items = held,
                lane = lane.as_str(),
                "items of sessions whose webhook cannot be resolved dropped (not sent to the gateway's backend)"
            );
        }
        for (_, delivery, queue, in_flight, items) in to_webhooks {
            let part = Batch {
                lane,
                items,
                reason,
            };
            in_flight.fetch_add(1, Ordering::Relaxed);
            if let Err(refused) = queue.try_send(part) {
                in_flight.fetch_sub(1, Ordering::Relaxed);
                let part = match refused {
                    mpsc::error::TrySendError::Full(part)
                    | mpsc::error::TrySendError::Closed(part) => part,
                };
                delivery.refuse_unqueued(&part);
            }
        }
        if !to_backend.is_empty() {
            self.backend
                .deliver(Batch {
                    lane,
                    items: to_backend,
                    reason,
                })
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{FlushReason, Lane};
    use crate::events::{Priority, SessionStatus, StatusEvent};

    type Seen = Arc<Mutex<Vec<String>>>;

    /// A loopback HTTP server that records the session ids of every status batch it gets.
    async fn receiver() -> (reqwest::Url, Seen) {
        let seen: Seen = Arc::default();
        let record = seen.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let record = record.clone();
            async move {
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                for item in body["items"].as_array().unwrap() {
                    record
                        .lock()
                        .unwrap()
                        .push(item["sessionId"].as_str().unwrap().to_owned());
                }
                "ok"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url.parse().unwrap(), seen)
    }

    fn endpoints(url: reqwest::Url) -> BackendSettings {
        BackendSettings {
            base_url: url,
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

    fn setup(backend_url: reqwest::Url) -> (RoutingSink, Arc<Webhooks>) {
        let mut registry = Registry::default();
        let backend = Delivery::new(
            Some(BackendClient::new(endpoints(backend_url.clone())).unwrap()),
            None,
            DeliverySettings::default(),
            &mut registry,
        );
        let webhooks = Webhooks::new(
            endpoints(backend_url),
            DeliverySettings::default(),
            "test",
            None,
            &backend,
            &mut registry,
        );
        (RoutingSink::new(backend, webhooks.clone()), webhooks)
    }

    fn statuses(ids: &[&str]) -> Batch {
        Batch {
            lane: Lane::StatusHigh,
            items: ids
                .iter()
                .map(|id| {
                    GatewayEvent::Status(StatusEvent::new(
                        *id,
                        SessionStatus::Active,
                        Priority::High,
                        None,
                    ))
                })
                .collect(),
            reason: FlushReason::Immediate,
        }
    }

    async fn wait_for(seen: &Seen, count: usize) -> Vec<String> {
        for _ in 0..200 {
            let now = seen.lock().unwrap().clone();
            if now.len() >= count {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen.lock().unwrap().clone()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_split_by_destination_and_late_events_follow_the_webhook() {
        let (backend_url, at_backend) = receiver().await;
        let (hook_url, at_hook) = receiver().await;
        let (sink, webhooks) = setup(backend_url);
        let target = WebhookTarget {
            url: hook_url,
            secret: Some("k".into()),
        };
        webhooks.route("hooked", Some(&target)).await.unwrap();
        sink.deliver(statuses(&["plain-1", "hooked", "plain-2"]))
            .await;
        assert_eq!(wait_for(&at_backend, 2).await, ["plain-1", "plain-2"]);
        assert_eq!(wait_for(&at_hook, 1).await, ["hooked"]);

        // Stopped here: its last events still go to its webhook.
        webhooks.removed("hooked");
        sink.deliver(statuses(&["hooked"])).await;
        assert_eq!(wait_for(&at_hook, 2).await, ["hooked", "hooked"]);
        // Its webhook taken off the spec: back to the gateway's backend.
        webhooks.route("hooked", None).await.unwrap();
        sink.deliver(statuses(&["hooked"])).await;
        assert_eq!(
            wait_for(&at_backend, 3).await,
            ["plain-1", "plain-2", "hooked"]
        );
        assert_eq!(at_hook.lock().unwrap().len(), 2);

        // A session whose webhook cannot be resolved is held: its items are counted and
        // dropped, not sent to the backend; once routed (here: its webhook taken off) they flow.
        webhooks.hold("waiting");
        assert!(!webhooks.routes_to_webhook("waiting"));
        sink.deliver(statuses(&["waiting", "plain-3"])).await;
        assert_eq!(
            wait_for(&at_backend, 4).await,
            ["plain-1", "plain-2", "hooked", "plain-3"]
        );
        assert_eq!(webhooks.held_items.get(), 1);
        assert_eq!(webhooks.waiting.get(), 1);
        webhooks.route("waiting", None).await.unwrap();
        assert_eq!(webhooks.waiting.get(), 0);
        sink.deliver(statuses(&["waiting"])).await;
        assert_eq!(wait_for(&at_backend, 5).await.last().unwrap(), "waiting");
        assert_eq!(at_hook.lock().unwrap().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn routes_outlive_a_removal_by_the_grace_and_idle_destinations_close_on_the_second_sweep()
    {
        let (sink, webhooks) = setup("http://127.0.0.1:9/".parse().unwrap());
        drop(sink);
        let target = WebhookTarget {
            url: "http://127.0.0.1:9/hook".parse().unwrap(),
            secret: None,
        };
        webhooks.route("a", Some(&target)).await.unwrap();
        webhooks.route("b", Some(&target)).await.unwrap();
        assert_eq!(
            webhooks.destinations_gauge.get(),
            1,
            "one destination shared"
        );
        webhooks.removed("a");
        webhooks.removed("b");
        tokio::time::advance(ROUTE_GRACE / 2).await;
        webhooks.sweep().await;
        let routed = |id: &str| webhooks.routes.read().unwrap().contains_key(id);
        assert!(routed("a"), "within the grace");
        assert!(
            !webhooks.routes_to_webhook("a"),
            "kept for late events, not as running here"
        );
        // Restarted within the grace: the route stops counting down.
        assert!(webhooks.keep_route("b"));
        tokio::time::advance(ROUTE_GRACE).await;
        webhooks.sweep().await;
        assert!(!routed("a"), "past the grace");
        assert!(webhooks.routes_to_webhook("b"));
        webhooks.route("b", None).await.unwrap();
        webhooks.sweep().await;
        assert_eq!(webhooks.destinations_gauge.get(), 1, "idle once: kept");
        webhooks.sweep().await;
        assert_eq!(webhooks.destinations_gauge.get(), 0, "idle twice: closed");
        // A route to it opens it again.
        webhooks.route("a", Some(&target)).await.unwrap();
        assert_eq!(webhooks.destinations_gauge.get(), 1);
    }

    #[test]
    fn a_rotated_key_is_a_new_destination_and_ids_do_not_show_the_key() {
        let url: reqwest::Url = "https://shop.example/api".parse().unwrap();
        let a = WebhookTarget {
            url: url.clone(),
            secret: Some("one".into()),
        };
        let b = WebhookTarget {
            url,
            secret: Some("two".into()),
        };
        assert_ne!(a.destination_id(), b.destination_id());
        assert_eq!(a.destination_id().len(), 16);
        assert!(!format!("{a:?}").contains("one"), "{a:?}");
    }
}
