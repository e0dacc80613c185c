//! The cache core: "is this session active?", its latest QR, connection and session info.
//!
//! Tiers, asked in order:
//! 1. **owned**: the sessions this gateway runs, written by its event router; always fresh, never
//!    expires (a gateway is the authority on its own sessions);
//! 2. **local**: an in-process TTL cache (moka; 30 s; unknown sessions 5 s: negative caching);
//! 3. **Redis** ([`RemoteTier`]; 120 s TTL), shared by every gateway;
//! 4. the **fallback** ([`SessionLookup`]): the backend lookup in standalone mode, the
//!    `WhatsappSession` informer store in cluster mode.
//!
//! Misses are single-flight: concurrent lookups of one session share one load (moka's
//! `or_try_insert_with`), so a burst makes one Redis read and at most one fallback call.
//!
//! Writes: the owning gateway updates its owned tier at once and queues the session for a writer
//! task that writes the four keys to Redis in pipelines and publishes the session id on
//! [`INVALIDATION_CHANNEL`]. Every gateway evicts its local entry on that message. The event path
//! never waits for Redis; a Redis outage only delays the write (it is retried, newest state wins).
//!
//! Staleness: a lookup started after the invalidation message reached a gateway never returns the
//! older state. A load that raced with an invalidation is dropped from the local tier once it
//! completes (per-key generation stripes), and on every reconnect to Redis the whole local tier is
//! cleared, since messages may have been missed. The propagation delay is thus the writer's queue
//! wait + one pipeline round trip + pub/sub delivery (see `docs/api.md` for measured figures).

mod lookup;
mod metrics;
mod redis_tier;
mod view;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use moka::Expiry;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use lookup::{BackendLookup, ChainLookup, NoLookup, StatesLookup};
pub use metrics::{CacheMetrics, Outcome, Tier};
pub use redis_tier::{RedisTier, spawn_invalidation_listener};
pub use view::{
    ConnectionRecord, ConnectionState, Kind, QrRecord, SessionInfo, SessionView, StatusRecord,
    index_key, key, valid_session_id,
};

use crate::Result;

/// Redis pub/sub channel of invalidations; each message is one session id.
pub const INVALIDATION_CHANNEL: &str = "wa:invalidate";

/// Tunables (flags `--cache-*`).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    pub local_ttl: Duration,
    pub negative_ttl: Duration,
    pub redis_ttl: Duration,
    pub local_capacity: u64,
    /// How often the owned sessions are written to Redis again (keeps their keys from expiring
    /// while nothing changes, and repairs writes lost in an outage).
    pub refresh_interval: Duration,
    /// How often the key counts are read from Redis for `whatsapp_gateway_cache_keys`.
    pub count_interval: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            local_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            redis_ttl: Duration::from_secs(120),
            local_capacity: 100_000,
            refresh_interval: Duration::from_secs(40),
            count_interval: Duration::from_secs(15),
        }
    }
}

/// Where a session's state is looked up when no cache tier has it.
pub trait SessionLookup: Send + Sync + 'static {
    /// `Ok(None)`: the session does not exist (cached negatively for a short while).
    fn lookup<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<Option<SessionView>>>;
}

/// How a queued write is applied to the shared tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// A change: overwrite the keys and publish an invalidation.
    Change,
    /// Same state again (periodic refresh): overwrite, extend the TTL, no invalidation.
    Refresh,
    /// Learned from the fallback: write only where absent, so an older answer never overwrites
    /// what the owner wrote meanwhile.
    IfAbsent,
}

impl WriteMode {
    fn strength(self) -> u8 {
        match self {
            WriteMode::IfAbsent => 0,
            WriteMode::Refresh => 1,
            WriteMode::Change => 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PendingWrite {
    pub view: Arc<SessionView>,
    pub mode: WriteMode,
}

/// The shared tier (Redis in production, an in-memory fake in unit tests).
pub trait RemoteTier: Send + Sync + 'static {
    /// False while disconnected: lookups skip the tier instead of waiting for a timeout.
    fn available(&self) -> bool;
    fn read<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<Option<SessionView>>>;
    /// Applies the writes and publishes the invalidations of `Change` writes, in that order.
    fn write<'a>(&'a self, writes: &'a [PendingWrite]) -> BoxFuture<'a, Result<()>>;
    /// Keys by kind ([`Kind::ALL`] order), at bounded cost.
    fn count_keys(&self) -> BoxFuture<'_, Result<[u64; 4]>>;
}

/// Which tier answered a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// Owned or local tier, without waiting.
    Local,
    Redis,
    Fallback,
    /// Waited for a concurrent lookup of the same session (single-flight).
    Shared,
}

/// Local entries: `None` is a negative entry (the session is known not to exist).
type LocalValue = Option<Arc<SessionView>>;

struct TtlPolicy {
    positive: Duration,
    negative: Duration,
}

impl Expiry<String, LocalValue> for TtlPolicy {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &LocalValue,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(if value.is_some() {
            self.positive
        } else {
            self.negative
        })
    }

    fn expire_after_update(
        &self,
        key: &String,
        value: &LocalValue,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}

const STRIPES: usize = 1024;
/// Largest number of sessions written to Redis in one pipeline (about 9 commands each).
const WRITE_CHUNK: usize = 256;

/// The two-tier cache with its fallback. Cheap to share (`Arc`).
pub struct SessionCache {
    settings: CacheSettings,
    owned: Mutex<HashMap<String, Arc<SessionView>>>,
    local: moka::future::Cache<String, LocalValue>,
    remote: Option<Arc<dyn RemoteTier>>,
    lookup: Arc<dyn SessionLookup>,
    metrics: CacheMetrics,
    /// Bumped per key stripe on every invalidation, and all at once (`epoch`) on a full clear: a
    /// load that saw either move while it ran must not stay cached.
    stripes: Box<[AtomicU64]>,
    epoch: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
    pending: Mutex<HashMap<String, PendingWrite>>,
    wake_writer: Notify,
    last_version: AtomicU64,
}

impl std::fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCache")
            .field("settings", &self.settings)
            .field("remote", &self.remote.is_some())
            .finish_non_exhaustive()
    }
}

impl SessionCache {
    pub fn new(
        settings: CacheSettings,
        remote: Option<Arc<dyn RemoteTier>>,
        lookup: Arc<dyn SessionLookup>,
        metrics: CacheMetrics,
    ) -> Arc<Self> {
        let local = moka::future::Cache::builder()
            .max_capacity(settings.local_capacity)
            .expire_after(TtlPolicy {
                positive: settings.local_ttl,
                negative: settings.negative_ttl,
            })
            .build();
        Arc::new(SessionCache {
            settings,
            owned: Mutex::default(),
            local,
            remote,
            lookup,
            metrics,
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
            hasher: Default::default(),
            pending: Mutex::default(),
            wake_writer: Notify::new(),
            last_version: AtomicU64::new(0),
        })
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    pub fn metrics(&self) -> &CacheMetrics {
        &self.metrics
    }

    fn stripe(&self, session_id: &str) -> &AtomicU64 {
        &self.stripes[(self.hasher.hash_one(session_id) as usize) % STRIPES]
    }

    fn generation(&self, session_id: &str) -> u64 {
        self.stripe(session_id)
            .load(Ordering::Acquire)
            .wrapping_add(self.epoch.load(Ordering::Acquire))
    }

    fn bump(&self, session_id: &str) {
        self.stripe(session_id).fetch_add(1, Ordering::AcqRel);
    }

    /// The session's cached state; `Ok(None)` when it does not exist. Errors only when the
    /// fallback fails for a session no tier knows.
    pub async fn get(&self, session_id: &str) -> Result<Option<Arc<SessionView>>> {
        self.get_traced(session_id).await.map(|(view, _)| view)
    }

    /// [`SessionCache::get`], also telling which tier answered (for the benchmark).
    pub async fn get_traced(
        &self,
        session_id: &str,
    ) -> Result<(Option<Arc<SessionView>>, Answered)> {
        if let Some(view) = self.owned.lock().expect("owned lock").get(session_id) {
            self.metrics.request(Tier::Local, Outcome::Hit);
            return Ok((Some(view.clone()), Answered::Local));
        }
        if let Some(value) = self.local.get(session_id).await {
            let outcome = if value.is_some() {
                Outcome::Hit
            } else {
                Outcome::NegativeHit
            };
            self.metrics.request(Tier::Local, outcome);
            return Ok((value, Answered::Local));
        }
        self.metrics.request(Tier::Local, Outcome::Miss);
        let generation = self.generation(session_id);
        let mut answered = Answered::Shared;
        let entry = self
            .local
            .entry_by_ref(session_id)
            .or_try_insert_with(async {
                let (value, tier) = self.load(session_id).await?;
                answered = tier;
                Ok::<_, crate::Error>(value)
            })
            .await
            .map_err(|e| crate::Error::Cache(e.to_string()))?;
        // An invalidation arrived while we loaded: what we read may predate it, so do not keep it.
        if entry.is_fresh() && self.generation(session_id) != generation {
            self.local.invalidate(session_id).await;
        }
        Ok((entry.into_value(), answered))
    }

    /// "Is this session active?"
    pub async fn is_active(&self, session_id: &str) -> Result<bool> {
        Ok(self
            .get(session_id)
            .await?
            .is_some_and(|v| v.status.status == crate::events::SessionStatus::Active))
    }

    async fn load(&self, session_id: &str) -> Result<(LocalValue, Answered)> {
        match &self.remote {
            Some(remote) if remote.available() => match remote.read(session_id).await {
                Ok(Some(view)) => {
                    self.metrics.request(Tier::Redis, Outcome::Hit);
                    return Ok((Some(Arc::new(view)), Answered::Redis));
                }
                Ok(None) => self.metrics.request(Tier::Redis, Outcome::Miss),
                Err(err) => {
                    self.metrics.request(Tier::Redis, Outcome::Error);
                    tracing::debug!(session_id, %err, "Redis tier read failed; asking the fallback");
                }
            },
            Some(_) => self.metrics.request(Tier::Redis, Outcome::Skipped),
            None => {}
        }
        let started = Instant::now();
        let found = self.lookup.lookup(session_id).await;
        self.metrics.fallback_call(started.elapsed().as_secs_f64());
        match found {
            Ok(Some(view)) => {
                self.metrics.request(Tier::Fallback, Outcome::Hit);
                let view = Arc::new(view);
                self.enqueue(PendingWrite {
                    view: view.clone(),
                    mode: WriteMode::IfAbsent,
                });
                Ok((Some(view), Answered::Fallback))
            }
            Ok(None) => {
                self.metrics.request(Tier::Fallback, Outcome::Miss);
                Ok((None, Answered::Fallback))
            }
            Err(err) => {
                self.metrics.request(Tier::Fallback, Outcome::Error);
                Err(err)
            }
        }
    }

    /// A session this gateway runs changed: it is answered from here at once, and written to the
    /// shared tier with an invalidation as soon as the writer gets to it. Never waits for Redis.
    /// Returns the version given to the view.
    pub fn write(&self, mut view: SessionView) -> u64 {
        let version = self.next_version();
        view.status.version = version;
        let view = Arc::new(view);
        self.owned
            .lock()
            .expect("owned lock")
            .insert(view.session_id.clone(), view.clone());
        self.enqueue(PendingWrite {
            view,
            mode: WriteMode::Change,
        });
        version
    }

    /// A change of a session this gateway no longer runs (its last status, routed after it was
    /// removed): written to the shared tier with an invalidation, not kept as owned.
    pub fn write_detached(&self, mut view: SessionView) -> u64 {
        let version = self.next_version();
        view.status.version = version;
        self.enqueue(PendingWrite {
            view: Arc::new(view),
            mode: WriteMode::Change,
        });
        version
    }

    /// This gateway no longer runs the session (stopped, handed over): its entry is no longer
    /// authoritative here. The shared tier keeps the last state until its TTL or the next owner.
    pub fn forget(&self, session_id: &str) {
        self.owned.lock().expect("owned lock").remove(session_id);
    }

    /// Versions grow per writer and follow the wall clock (microseconds), so a session handed to
    /// another gateway keeps growing versions as long as clocks are roughly in sync.
    fn next_version(&self) -> u64 {
        let now = chrono::Utc::now().timestamp_micros().max(0) as u64;
        let mut prev = self.last_version.load(Ordering::Relaxed);
        loop {
            let next = now.max(prev + 1);
            match self.last_version.compare_exchange_weak(
                prev,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(actual) => prev = actual,
            }
        }
    }

    fn enqueue(&self, write: PendingWrite) {
        if self.remote.is_none() {
            return;
        }
        let len = {
            let mut pending = self.pending.lock().expect("pending lock");
            let id = write.view.session_id.clone();
            match pending.get_mut(&id) {
                // The newest view wins; the strongest mode wins, so a change still publishes.
                Some(queued) => {
                    let mode = if write.mode.strength() > queued.mode.strength() {
                        write.mode
                    } else {
                        queued.mode
                    };
                    // A fallback answer never replaces a queued owner write.
                    if write.mode != WriteMode::IfAbsent {
                        queued.view = write.view;
                    }
                    queued.mode = mode;
                }
                None => {
                    pending.insert(id, write);
                }
            }
            pending.len()
        };
        self.metrics.set_pending_writes(len);
        self.wake_writer.notify_one();
    }

    /// Another gateway changed the session: drop the local entry.
    pub async fn invalidate(&self, session_id: &str) {
        self.metrics.invalidation_received();
        self.bump(session_id);
        self.local.invalidate(session_id).await;
    }

    /// Invalidations may have been missed (reconnect to Redis): drop every local entry.
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.local.invalidate_all();
    }

    /// Queues every owned session for a plain rewrite (TTL refresh, outage repair).
    pub fn refresh_owned(&self) -> usize {
        let views: Vec<Arc<SessionView>> = self
            .owned
            .lock()
            .expect("owned lock")
            .values()
            .cloned()
            .collect();
        let n = views.len();
        for view in views {
            self.enqueue(PendingWrite {
                view,
                mode: WriteMode::Refresh,
            });
        }
        n
    }

    pub fn pending_writes(&self) -> usize {
        self.pending.lock().expect("pending lock").len()
    }

    /// Entries in the local tier (approximate, as moka counts).
    pub fn local_entries(&self) -> u64 {
        self.local.entry_count()
    }

    /// Keys by kind: from the shared tier, or the owned sessions when there is none.
    pub async fn count_keys(&self) -> Result<[u64; 4]> {
        if let Some(remote) = &self.remote {
            return remote.count_keys().await;
        }
        let owned = self.owned.lock().expect("owned lock");
        let n = owned.len() as u64;
        let qr = owned.values().filter(|v| v.qr.is_some()).count() as u64;
        Ok([n, qr, n, n])
    }

    /// The next batch for the writer: every queued change, first, plus at most one chunk of
    /// refreshes and fallback fills, so the periodic refresh of thousands of sessions never
    /// holds a change back for more than one chunk's round trip.
    fn take_pending(&self) -> Vec<PendingWrite> {
        let mut pending = self.pending.lock().expect("pending lock");
        let mut batch = Vec::new();
        let mut background = 0;
        pending.retain(|_, write| {
            if write.mode == WriteMode::Change {
                batch.push(write.clone());
                false
            } else if background < WRITE_CHUNK {
                background += 1;
                batch.push(write.clone());
                false
            } else {
                true
            }
        });
        let left = pending.len();
        drop(pending);
        batch.sort_by_key(|write| write.mode != WriteMode::Change);
        self.metrics.set_pending_writes(left);
        batch
    }

    /// Puts back the writes of a failed batch unless a newer write of the session is queued.
    fn requeue(&self, writes: Vec<PendingWrite>) {
        let mut pending = self.pending.lock().expect("pending lock");
        for write in writes {
            match pending.get_mut(&write.view.session_id) {
                // The newer view stays, but a failed change must still publish its invalidation.
                Some(newer) if write.mode.strength() > newer.mode.strength() => {
                    newer.mode = write.mode;
                }
                Some(_) => {}
                None => {
                    pending.insert(write.view.session_id.clone(), write);
                }
            }
        }
        let len = pending.len();
        drop(pending);
        self.metrics.set_pending_writes(len);
    }

    /// Writes queued sessions to the shared tier until `cancel`, then once more (best effort).
    pub async fn run_writer(self: Arc<Self>, cancel: CancellationToken) {
        let Some(remote) = self.remote.clone() else {
            return;
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let stopping = tokio::select! {
                _ = self.wake_writer.notified() => false,
                _ = cancel.cancelled() => true,
            };
            let batch = self.take_pending();
            let mut failed = Vec::new();
            for chunk in batch.chunks(WRITE_CHUNK) {
                if !failed.is_empty() || !remote.available() {
                    failed.extend_from_slice(chunk);
                    continue;
                }
                match remote.write(chunk).await {
                    Ok(()) => {
                        let changes = chunk.iter().filter(|w| w.mode == WriteMode::Change).count();
                        self.metrics.invalidation_sent(changes as u64);
                    }
                    Err(err) => {
                        self.metrics.write_error();
                        tracing::warn!(%err, sessions = chunk.len(), "cache write to Redis failed; retrying");
                        failed.extend_from_slice(chunk);
                    }
                }
            }
            if stopping {
                return;
            }
            if failed.is_empty() {
                backoff = Duration::from_millis(100);
                if self.pending_writes() > 0 {
                    // More than one batch was queued (a refresh): go on without waiting.
                    self.wake_writer.notify_one();
                }
            } else {
                self.requeue(failed);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = cancel.cancelled() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                // Try again even if nothing new arrives.
                self.wake_writer.notify_one();
            }
        }
    }

    /// Starts the writer, the periodic refresh of owned sessions and the key counter.
    pub fn spawn_background(
        self: &Arc<Self>,
        cancel: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = vec![tokio::spawn(self.clone().run_writer(cancel.clone()))];
        let cache = self.clone();
        let stop = cancel.clone();
        tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(cache.settings.refresh_interval);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.cancelled() => return,
                }
                cache.refresh_owned();
            }
        }));
        let cache = self.clone();
        tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(cache.settings.count_interval);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = cancel.cancelled() => return,
                }
                cache.metrics.set_local_entries(cache.local_entries());
                match cache.count_keys().await {
                    Ok(counts) => cache.metrics.set_keys(counts),
                    Err(err) => tracing::debug!(%err, "could not count cache keys"),
                }
            }
        }));
        tasks
    }
}
