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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use fred::prelude::*;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
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
    /// None: the gateway's backend.
    destination: Option<String>,
    removed_at: Option<Instant>,
}

struct Destination {
    delivery: Delivery,
    stop: CancellationToken,
}

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
    routes: RwLock<HashMap<String, Route>>,
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
        Arc::new(Webhooks {
            template,
            settings,
            identity: identity.to_owned(),
            redis,
            lanes: backend.lane_metrics(),
            target_metrics: TargetMetrics::register_webhooks(registry),
            destinations_gauge,
            on_delivered: backend.delivered_hook(),
            shutdown: CancellationToken::new(),
            routes: RwLock::default(),
            destinations: Mutex::default(),
            any: AtomicBool::new(false),
        })
    }

    /// Sends `session_id`'s batches to `target` (None: the gateway's backend) from now on.
    pub async fn route(&self, session_id: &str, target: Option<&WebhookTarget>) -> Result<()> {
        let destination = target.map(WebhookTarget::destination_id);
        {
            let routes = self.routes.read().expect("routes lock");
            match routes.get(session_id) {
                Some(route) if route.destination == destination && route.removed_at.is_none() => {
                    return Ok(());
                }
                None if destination.is_none() => return Ok(()),
                _ => {}
            }
        }
        if let (Some(target), Some(id)) = (target, &destination) {
            self.open(id, target).await?;
            self.any.store(true, Ordering::Relaxed);
        }
        let mut routes = self.routes.write().expect("routes lock");
        match destination {
            Some(destination) => {
                tracing::info!(session_id, webhook = %crate::config::redact_url(target.expect("some").url.as_str()), "session delivers to its own webhook");
                routes.insert(
                    session_id.to_owned(),
                    Route {
                        destination: Some(destination),
                        removed_at: None,
                    },
                );
            }
            None => {
                routes.remove(session_id);
            }
        }
        Ok(())
    }

    /// The session stopped here: its late events still go to its webhook for [`ROUTE_GRACE`].
    pub fn removed(&self, session_id: &str) {
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

    fn lookup(&self, session_id: &str) -> Option<(String, Delivery)> {
        let destination = self
            .routes
            .read()
            .expect("routes lock")
            .get(session_id)?
            .destination
            .clone()?;
        let delivery = self
            .destinations
            .lock()
            .expect("destinations lock")
            .get(&destination)?
            .delivery
            .clone();
        Some((destination, delivery))
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

    /// Opens the destination unless it is open, records it in Redis and starts its drainers.
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
        delivery.recover_backlog().await;
        let stop = self.shutdown.child_token();
        let mut destinations = self.destinations.lock().expect("destinations lock");
        if destinations.contains_key(id) {
            return Ok(()); // opened meanwhile by another caller
        }
        drop(delivery.spawn_drainers(stop.clone()));
        destinations.insert(id.to_owned(), Destination { delivery, stop });
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
    /// no session uses and nothing waits for.
    pub async fn sweep(&self) {
        let now = Instant::now();
        let in_use: std::collections::HashSet<String> = {
            let mut routes = self.routes.write().expect("routes lock");
            routes.retain(|_, route| {
                route
                    .removed_at
                    .is_none_or(|at| now.duration_since(at) < ROUTE_GRACE)
            });
            routes
                .values()
                .filter_map(|route| route.destination.clone())
                .collect()
        };
        let closed: Vec<String> = {
            let mut destinations = self.destinations.lock().expect("destinations lock");
            let idle: Vec<String> = destinations
                .iter()
                .filter(|(id, d)| !in_use.contains(*id) && d.delivery.backlog() == 0)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &idle {
                if let Some(destination) = destinations.remove(id) {
                    destination.stop.cancel();
                }
            }
            self.destinations_gauge.set(destinations.len() as i64);
            idle
        };
        if let Some(redis) = &self.redis {
            for id in closed {
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

    /// At shutdown, after the batcher's last flush: waits until every destination's drainer has
    /// sent what it holds (the caller bounds the wait), then stops them and the sweeper. What is
    /// still in a Redis spill resumes on the next start.
    pub async fn drain(&self) {
        while self.backlog() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
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
        let mut to_webhooks: Vec<(String, Delivery, Vec<GatewayEvent>)> = Vec::new();
        for item in items {
            match self.webhooks.lookup(item.session_id()) {
                None => to_backend.push(item),
                Some((id, delivery)) => match to_webhooks.iter_mut().find(|(d, ..)| *d == id) {
                    Some((.., part)) => part.push(item),
                    None => to_webhooks.push((id, delivery, vec![item])),
                },
            }
        }
        for (_, delivery, items) in to_webhooks {
            delivery
                .deliver(Batch {
                    lane,
                    items,
                    reason,
                })
                .await;
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
