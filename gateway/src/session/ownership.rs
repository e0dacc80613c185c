//! Who may run a session: a lock per session in Redis with a fencing token, so that at most one
//! gateway drives a WhatsApp account at any instant (DESIGN.md, "Assignment and handoff").
//!
//! - `wa:{<id>}:owner` holds `<gateway identity>:<token>` with a TTL; `wa:{<id>}:fence` is the
//!   session's token counter, bumped on every successful acquisition (never reset, so tokens are
//!   monotonic per session). Acquire, renew (compare-and-pexpire) and release (compare-and-del) are
//!   Lua scripts, each atomic. The two keys share a hash tag, so Redis Cluster works.
//! - A [`Lease`] is this process's view of one lock. It is *usable* only until
//!   `last successful renewal sent + ttl - renew interval - margin`: one renewal may fail and the
//!   lease still ends locally a third of the TTL before Redis could hand the lock to anyone else.
//!   The check is against the monotonic clock, which keeps running while a process is stopped
//!   (SIGSTOP), so a process that wakes up after its TTL sees its leases as lost before it renews
//!   or forwards anything.
//! - Every acquisition, release and loss is appended to the stream `wa:owners:history` (bounded)
//!   so tests can prove that owners never overlapped.
//!
//! [`LockStore`] is the I/O: [`RedisLockStore`] (fred) or [`LocalLockStore`] (in memory: the
//! standalone mode without Redis, and the fake of unit tests).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::prelude::*;
use futures::StreamExt;
use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Stream of ownership events (acquire / release / lost), for audits and tests.
pub const HISTORY_KEY: &str = "wa:owners:history";
/// Approximate cap of the history stream (`XADD MAXLEN ~`).
pub const HISTORY_MAX_LEN: u64 = 1_000_000;

pub fn owner_key(session_id: &str) -> String {
    format!("wa:{{{session_id}}}:owner")
}

pub fn fence_key(session_id: &str) -> String {
    format!("wa:{{{session_id}}}:fence")
}

/// While this key exists no gateway takes the session's lock (its value says why: a session
/// paused or deleted through the API). Other gateways learn of a pause or delete from the session
/// book about a second later; without the hold, one whose lock retry fell in that second would
/// start the session again.
pub fn hold_key(session_id: &str) -> String {
    format!("wa:{{{session_id}}}:hold")
}

/// The hold of a session deleted through the API. Only the logout of that deleted session may
/// take the lock through it ([`Ownership::acquire_for_logout`]).
pub const DELETED_HOLD_VALUE: &str = "deleted";

#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("unexpected answer from the lock script: {0}")]
    Protocol(String),
}

/// Answer of an acquisition attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The lock is ours; `value` is `<identity>:<token>`.
    Yes { token: u64, value: String },
    /// Another owner holds it (`<identity>:<token>`).
    HeldBy(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryEvent {
    Acquire,
    Release,
    Lost,
}

impl HistoryEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryEvent::Acquire => "acquire",
            HistoryEvent::Release => "release",
            HistoryEvent::Lost => "lost",
        }
    }
}

/// One entry of the ownership history. `at_ms` (unix ms) is conservative: an acquisition is
/// stamped after Redis granted it and before the session starts; a release after the session
/// stopped and before the lock is deleted; a loss at the instant the lease stopped being usable
/// (from then on nothing of the session gets out), `detected_ms` when this process noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub session_id: String,
    pub owner: String,
    pub token: u64,
    pub event: HistoryEvent,
    pub at_ms: i64,
    pub detected_ms: i64,
}

/// The lock operations; implementations are thin.
pub trait LockStore: Send + Sync + 'static {
    /// Takes the lock if it is free: bumps the fence and stores `<owner>:<token>` with `ttl`.
    fn acquire<'a>(
        &'a self,
        session_id: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Acquired, OwnershipError>>;
    /// Like [`LockStore::acquire`], but a hold whose value is `passable` does not stop it. Stores
    /// without holds acquire as usual.
    fn acquire_through_hold<'a>(
        &'a self,
        session_id: &'a str,
        owner: &'a str,
        ttl: Duration,
        passable: &'a str,
    ) -> BoxFuture<'a, Result<Acquired, OwnershipError>> {
        let _ = passable;
        self.acquire(session_id, owner, ttl)
    }
    /// Extends the lock if it still holds `value`; false when it does not (lost or expired).
    fn renew<'a>(
        &'a self,
        session_id: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, OwnershipError>>;
    /// Deletes the lock if it still holds `value`.
    fn release<'a>(
        &'a self,
        session_id: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<bool, OwnershipError>>;
    fn record(&self, entry: HistoryEntry) -> BoxFuture<'_, Result<(), OwnershipError>>;
}

/// Unix time in ms.
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `at` (tokio clock) as unix ms.
fn wall_ms_at(at: Instant) -> i64 {
    let now = Instant::now();
    if at <= now {
        wall_ms() - (now - at).as_millis() as i64
    } else {
        wall_ms() + (at - now).as_millis() as i64
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

// ARGV[3]: a hold value that does not stop this acquisition ('' for none: holds are never empty).
const ACQUIRE_LUA: &str = r"
local hold = redis.call('GET', KEYS[3])
if hold and hold ~= ARGV[3] then return {'held', 'hold:' .. hold} end
local holder = redis.call('GET', KEYS[1])
if holder then return {'held', holder} end
local token = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. ':' .. token
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {'acquired', tostring(token)}
";

const RENEW_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A Lua script run with EVALSHA; on `NOSCRIPT` (first use on a node, Redis restarted) it runs
/// with EVAL, which caches it on the node that holds its keys. Not `SCRIPT LOAD` again: on a
/// Redis Cluster that command is routed by the script's text to one fixed node, so the script
/// never reached the nodes that hold most sessions' slots.
pub(crate) struct LuaScript {
    src: &'static str,
    sha: tokio::sync::OnceCell<String>,
}

impl LuaScript {
    pub(crate) const fn new(src: &'static str) -> Self {
        LuaScript {
            src,
            sha: tokio::sync::OnceCell::const_new(),
        }
    }

    pub(crate) async fn run<R: FromValue>(
        &self,
        client: &Client,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<R, fred::error::Error> {
        let sha = self
            .sha
            .get_or_try_init(|| client.script_load::<String, _>(self.src))
            .await?;
        match client
            .evalsha::<R, _, _, _>(sha.as_str(), keys.clone(), args.clone())
            .await
        {
            Err(err) if err.details().starts_with("NOSCRIPT") => {
                client.eval(self.src, keys, args).await
            }
            other => other,
        }
    }
}

/// Locks in Redis (fred).
pub struct RedisLockStore {
    client: Client,
    acquire: LuaScript,
    renew: LuaScript,
    release: LuaScript,
}

impl RedisLockStore {
    pub fn new(client: Client) -> Self {
        RedisLockStore {
            client,
            acquire: LuaScript::new(ACQUIRE_LUA),
            renew: LuaScript::new(RENEW_LUA),
            release: LuaScript::new(RELEASE_LUA),
        }
    }
}

fn ttl_ms(ttl: Duration) -> String {
    ttl.as_millis().max(1).to_string()
}

impl LockStore for RedisLockStore {
    fn acquire<'a>(
        &'a self,
        session_id: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Acquired, OwnershipError>> {
        self.acquire_through_hold(session_id, owner, ttl, "")
    }

    fn acquire_through_hold<'a>(
        &'a self,
        session_id: &'a str,
        owner: &'a str,
        ttl: Duration,
        passable: &'a str,
    ) -> BoxFuture<'a, Result<Acquired, OwnershipError>> {
        Box::pin(async move {
            let answer: Vec<String> = self
                .acquire
                .run(
                    &self.client,
                    vec![
                        owner_key(session_id),
                        fence_key(session_id),
                        hold_key(session_id),
                    ],
                    vec![owner.to_string(), ttl_ms(ttl), passable.to_string()],
                )
                .await?;
            match answer.as_slice() {
                [kind, token] if kind == "acquired" => {
                    let token: u64 = token
                        .parse()
                        .map_err(|_| OwnershipError::Protocol(format!("token `{token}`")))?;
                    Ok(Acquired::Yes {
                        token,
                        value: format!("{owner}:{token}"),
                    })
                }
                [kind, holder] if kind == "held" => Ok(Acquired::HeldBy(holder.clone())),
                other => Err(OwnershipError::Protocol(format!("{other:?}"))),
            }
        })
    }

    fn renew<'a>(
        &'a self,
        session_id: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, OwnershipError>> {
        Box::pin(async move {
            let renewed: i64 = self
                .renew
                .run(
                    &self.client,
                    vec![owner_key(session_id)],
                    vec![value.to_string(), ttl_ms(ttl)],
                )
                .await?;
            Ok(renewed == 1)
        })
    }

    fn release<'a>(
        &'a self,
        session_id: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<bool, OwnershipError>> {
        Box::pin(async move {
            let deleted: i64 = self
                .release
                .run(
                    &self.client,
                    vec![owner_key(session_id)],
                    vec![value.to_string()],
                )
                .await?;
            Ok(deleted == 1)
        })
    }

    fn record(&self, entry: HistoryEntry) -> BoxFuture<'_, Result<(), OwnershipError>> {
        Box::pin(async move {
            let cap =
                fred::types::streams::XCap::try_from(("MAXLEN", "~", HISTORY_MAX_LEN as i64))?;
            let _: String = self
                .client
                .xadd(
                    HISTORY_KEY,
                    false,
                    cap,
                    "*",
                    vec![
                        ("session", entry.session_id),
                        ("owner", entry.owner),
                        ("token", entry.token.to_string()),
                        ("event", entry.event.as_str().to_string()),
                        ("at_ms", entry.at_ms.to_string()),
                        ("detected_ms", entry.detected_ms.to_string()),
                    ],
                )
                .await?;
            Ok(())
        })
    }
}

/// Reads the history stream back (tests, audits).
pub async fn read_history(client: &Client) -> Result<Vec<HistoryEntry>, OwnershipError> {
    let entries: Vec<(String, HashMap<String, String>)> =
        client.xrange(HISTORY_KEY, "-", "+", None).await?;
    let mut out = Vec::with_capacity(entries.len());
    for (_, fields) in entries {
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        let event = match get("event").as_str() {
            "acquire" => HistoryEvent::Acquire,
            "release" => HistoryEvent::Release,
            "lost" => HistoryEvent::Lost,
            other => return Err(OwnershipError::Protocol(format!("event `{other}`"))),
        };
        out.push(HistoryEntry {
            session_id: get("session"),
            owner: get("owner"),
            token: get("token").parse().unwrap_or(0),
            event,
            at_ms: get("at_ms").parse().unwrap_or(0),
            detected_ms: get("detected_ms").parse().unwrap_or(0),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// In memory

#[derive(Debug, Default)]
struct LocalLock {
    holder: Option<(String, Instant)>,
    fence: u64,
}

/// Locks in this process: what a gateway without Redis uses (it is alone, so it always gets them),
/// and the fake of unit tests, which can fail renewals or hand a lock to someone else.
#[derive(Debug, Default)]
pub struct LocalLockStore {
    locks: Mutex<HashMap<String, LocalLock>>,
    failing: AtomicBool,
    history: Mutex<Vec<HistoryEntry>>,
}

/// History kept by [`LocalLockStore`], newest last; older entries are dropped beyond this.
const LOCAL_HISTORY_MAX: usize = 10_000;

impl LocalLockStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// While set, every operation fails as if Redis were away.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Hands the lock to `owner` as if the current holder's lock had expired (tests).
    pub fn steal(&self, session_id: &str, owner: &str, ttl: Duration) -> u64 {
        let mut locks = self.locks.lock().expect("local locks");
        let lock = locks.entry(session_id.to_string()).or_default();
        lock.fence += 1;
        lock.holder = Some((format!("{owner}:{}", lock.fence), Instant::now() + ttl));
        lock.fence
    }

    /// The session's current fencing token (0 if never locked).
    pub fn fence(&self, session_id: &str) -> u64 {
        self.locks
            .lock()
            .expect("local locks")
            .get(session_id)
            .map_or(0, |l| l.fence)
    }

    /// The current holder (`<owner>:<token>`), if the lock has not expired.
    pub fn holder(&self, session_id: &str) -> Option<String> {
        let locks = self.locks.lock().expect("local locks");
        let (value, until) = locks.get(session_id)?.holder.as_ref()?;
        (*until > Instant::now()).then(|| value.clone())
    }

    pub fn history(&self) -> Vec<HistoryEntry> {
        self.history.lock().expect("local history").clone()
    }

    fn check(&self) -> Result<(), OwnershipError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(OwnershipError::Protocol("store failing (test)".into()))
        } else {
            Ok(())
        }
    }
}

impl LockStore for LocalLockStore {
    fn acquire<'a>(
        &'a self,
        session_id: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Acquired, OwnershipError>> {
        Box::pin(async move {
            self.check()?;
            let now = Instant::now();
            let mut locks = self.locks.lock().expect("local locks");
            let lock = locks.entry(session_id.to_string()).or_default();
            if let Some((value, until)) = &lock.holder
                && *until > now
            {
                return Ok(Acquired::HeldBy(value.clone()));
            }
            lock.fence += 1;
            let value = format!("{owner}:{}", lock.fence);
            lock.holder = Some((value.clone(), now + ttl));
            Ok(Acquired::Yes {
                token: lock.fence,
                value,
            })
        })
    }

    fn renew<'a>(
        &'a self,
        session_id: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, OwnershipError>> {
        Box::pin(async move {
            self.check()?;
            let now = Instant::now();
            let mut locks = self.locks.lock().expect("local locks");
            match locks.get_mut(session_id).and_then(|l| l.holder.as_mut()) {
                Some((held, until)) if held == value && *until > now => {
                    *until = now + ttl;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
    }

    fn release<'a>(
        &'a self,
        session_id: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<bool, OwnershipError>> {
        Box::pin(async move {
            self.check()?;
            let mut locks = self.locks.lock().expect("local locks");
            match locks.get_mut(session_id) {
                Some(lock) if lock.holder.as_ref().is_some_and(|(held, _)| held == value) => {
                    lock.holder = None;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
    }

    fn record(&self, entry: HistoryEntry) -> BoxFuture<'_, Result<(), OwnershipError>> {
        Box::pin(async move {
            let mut history = self.history.lock().expect("local history");
            if history.len() >= LOCAL_HISTORY_MAX {
                history.drain(..LOCAL_HISTORY_MAX / 2);
            }
            history.push(entry);
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Leases

/// Timing of the locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// TTL of the Redis lock.
    pub ttl: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl: Duration::from_secs(10),
        }
    }
}

impl LeaseConfig {
    pub fn new(ttl: Duration) -> Self {
        LeaseConfig { ttl }
    }

    /// Renewals run this often.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// How long after a renewal was *sent* the lease may still be used: the TTL, minus one renewal
    /// interval (one failed renewal is tolerated and the loss is noticed at the next tick, still a
    /// third of the TTL before Redis lets the lock go), minus a margin for scheduling delays.
    pub fn usable_for(&self) -> Duration {
        self.ttl
            .saturating_sub(self.renew_every())
            .saturating_sub(self.ttl / 20)
    }
}

/// Labels of the loss counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LossLabels {
    pub reason: &'static str,
}

/// Why a lease was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LossReason {
    /// Renewals could not succeed before the lease's usable time ran out (Redis away, or this
    /// process was stopped or starved).
    Expired,
    /// A renewal found the lock gone or held by someone else.
    Taken,
}

/// `LeaseInner::lost` of a lease given back on purpose.
const RELEASED: u8 = 3;

impl LossReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::Expired => "expired",
            LossReason::Taken => "taken",
        }
    }

    fn code(self) -> u8 {
        match self {
            LossReason::Expired => 1,
            LossReason::Taken => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(LossReason::Expired),
            2 => Some(LossReason::Taken),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct LeaseInner {
    session_id: Arc<str>,
    value: String,
    token: u64,
    /// Usable until this many ns after `Ownership::base` (tokio clock).
    usable_until_ns: AtomicU64,
    /// 0 while held, else a [`LossReason`] code.
    lost: AtomicU8,
    /// When the lease stopped being usable, unix ms (set with `lost`).
    lost_at_ms: AtomicU64,
    lost_notify: Notify,
    /// Whether this owner already recorded the session as paired in the credential store.
    pub(crate) creds_recorded: AtomicBool,
    base: Instant,
}

/// This process's hold on one session's lock. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Lease(Arc<LeaseInner>);

impl Lease {
    pub fn session_id(&self) -> &str {
        &self.0.session_id
    }

    /// The fencing token: credential writes carry it and are refused once a newer one exists.
    pub fn token(&self) -> u64 {
        self.0.token
    }

    /// `<identity>:<token>`, the lock's value.
    pub fn value(&self) -> &str {
        &self.0.value
    }

    fn usable_until(&self) -> Instant {
        self.0.base + Duration::from_nanos(self.0.usable_until_ns.load(Ordering::Acquire))
    }

    fn set_usable_until(&self, until: Instant) {
        let ns = until.saturating_duration_since(self.0.base).as_nanos() as u64;
        // Never shorten: renewals may complete out of order.
        self.0.usable_until_ns.fetch_max(ns, Ordering::AcqRel);
    }

    /// Whether the session may act now. Checks the clock, so a process that was stopped past
    /// its TTL sees `false` the moment it wakes, before any renewal; it then marks the lease lost.
    pub fn is_usable(&self) -> bool {
        if self.0.lost.load(Ordering::Acquire) != 0 {
            return false;
        }
        if Instant::now() >= self.usable_until() {
            self.mark_lost(LossReason::Expired);
            return false;
        }
        true
    }

    pub fn loss(&self) -> Option<LossReason> {
        LossReason::from_code(self.0.lost.load(Ordering::Acquire))
    }

    /// Marks the lease lost (first reason wins) and wakes whoever waits on [`Lease::lost`].
    pub fn mark_lost(&self, reason: LossReason) {
        if self
            .0
            .lost
            .compare_exchange(0, reason.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // Nothing got out after the lease stopped being usable. A lock found taken was
            // usually past its usable time already (Redis let it go after the TTL), so `now`
            // would stamp the loss late, when this process was merely slow to notice it.
            let at = wall_ms_at(self.usable_until().min(Instant::now()));
            self.0.lost_at_ms.store(at.max(0) as u64, Ordering::Release);
            self.0.lost_notify.notify_waiters();
        }
    }

    /// Resolves once the lease is lost.
    pub async fn lost(&self) {
        loop {
            let notified = self.0.lost_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.0.lost.load(Ordering::Acquire) != 0 {
                return;
            }
            notified.await;
        }
    }

    fn lost_at_ms(&self) -> i64 {
        self.0.lost_at_ms.load(Ordering::Acquire) as i64
    }

    pub(crate) fn creds_recorded(&self) -> &AtomicBool {
        &self.0.creds_recorded
    }
}

/// Lock counters (registered by [`OwnershipMetrics::register`]).
#[derive(Debug, Clone, Default)]
pub struct OwnershipMetrics {
    pub acquisitions: Counter,
    pub contended: Counter,
    pub losses: Family<LossLabels, Counter>,
    pub errors: Counter,
}

impl OwnershipMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = OwnershipMetrics::default();
        registry.register(
            "whatsapp_gateway_lock_acquisitions",
            "Session locks acquired by this gateway",
            metrics.acquisitions.clone(),
        );
        registry.register(
            "whatsapp_gateway_lock_contended",
            "Acquisition attempts that found the session locked by another gateway",
            metrics.contended.clone(),
        );
        registry.register(
            "whatsapp_gateway_lock_losses",
            "Session locks lost while running, by reason (expired, taken)",
            metrics.losses.clone(),
        );
        registry.register(
            "whatsapp_gateway_lock_errors",
            "Lock operations that failed (Redis unreachable, ...)",
            metrics.errors.clone(),
        );
        metrics
    }
}

struct OwnershipInner {
    store: Arc<dyn LockStore>,
    identity: String,
    config: LeaseConfig,
    leases: Mutex<HashMap<Arc<str>, Lease>>,
    renewer_started: AtomicBool,
    metrics: OwnershipMetrics,
    base: Instant,
}

/// The locks this gateway holds, kept alive by one renewal task.
#[derive(Clone)]
pub struct Ownership(Arc<OwnershipInner>);

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("identity", &self.0.identity)
            .field("config", &self.0.config)
            .finish_non_exhaustive()
    }
}

/// Renewals in flight at once.
const RENEW_CONCURRENCY: usize = 256;

impl Ownership {
    pub fn new(
        store: Arc<dyn LockStore>,
        identity: impl Into<String>,
        config: LeaseConfig,
        metrics: OwnershipMetrics,
    ) -> Self {
        Ownership(Arc::new(OwnershipInner {
            store,
            identity: identity.into(),
            config,
            leases: Mutex::new(HashMap::new()),
            renewer_started: AtomicBool::new(false),
            metrics,
            base: Instant::now(),
        }))
    }

    /// In-memory locks: a gateway without Redis.
    pub fn local(identity: impl Into<String>) -> Self {
        Self::new(
            Arc::new(LocalLockStore::new()),
            identity,
            LeaseConfig::default(),
            OwnershipMetrics::default(),
        )
    }

    pub fn identity(&self) -> &str {
        &self.0.identity
    }

    pub fn config(&self) -> LeaseConfig {
        self.0.config
    }

    pub fn metrics(&self) -> &OwnershipMetrics {
        &self.0.metrics
    }

    /// Tries to take the session's lock. On success the lease is renewed in the background until
    /// released or lost.
    pub async fn acquire(
        &self,
        session_id: &Arc<str>,
    ) -> Result<Result<Lease, String>, OwnershipError> {
        self.acquire_passing(session_id, "").await
    }

    /// Like [`Ownership::acquire`], for logging a deleted session out: its `deleted` hold, which
    /// keeps every gateway from running it, does not keep this one connection from unlinking it.
    pub async fn acquire_for_logout(
        &self,
        session_id: &Arc<str>,
    ) -> Result<Result<Lease, String>, OwnershipError> {
        self.acquire_passing(session_id, DELETED_HOLD_VALUE).await
    }

    async fn acquire_passing(
        &self,
        session_id: &Arc<str>,
        passable: &str,
    ) -> Result<Result<Lease, String>, OwnershipError> {
        self.ensure_renewer();
        let sent = Instant::now();
        let answer = self
            .0
            .store
            .acquire_through_hold(session_id, &self.0.identity, self.0.config.ttl, passable)
            .await
            .inspect_err(|_| {
                self.0.metrics.errors.inc();
            })?;
        match answer {
            Acquired::HeldBy(holder) => {
                self.0.metrics.contended.inc();
                Ok(Err(holder))
            }
            Acquired::Yes { token, value } => {
                let lease = Lease(Arc::new(LeaseInner {
                    session_id: session_id.clone(),
                    value,
                    token,
                    usable_until_ns: AtomicU64::new(0),
                    lost: AtomicU8::new(0),
                    lost_at_ms: AtomicU64::new(0),
                    lost_notify: Notify::new(),
                    creds_recorded: AtomicBool::new(false),
                    base: self.0.base,
                }));
                lease.set_usable_until(sent + self.0.config.usable_for());
                self.0.metrics.acquisitions.inc();
                let previous = self
                    .0
                    .leases
                    .lock()
                    .expect("leases")
                    .insert(session_id.clone(), lease.clone());
                if let Some(previous) = previous {
                    // A newer token supersedes whatever this process held before.
                    previous.mark_lost(LossReason::Taken);
                }
                self.record(&lease, HistoryEvent::Acquire, wall_ms()).await;
                Ok(Ok(lease))
            }
        }
    }

    /// The lease this process holds on the session, if any.
    pub fn lease(&self, session_id: &str) -> Option<Lease> {
        self.0
            .leases
            .lock()
            .expect("leases")
            .get(session_id)
            .cloned()
    }

    /// Number of leases held.
    pub fn held(&self) -> usize {
        self.0.leases.lock().expect("leases").len()
    }

    fn forget(&self, lease: &Lease) {
        let mut leases = self.0.leases.lock().expect("leases");
        if leases
            .get(lease.session_id())
            .is_some_and(|held| Arc::ptr_eq(&held.0, &lease.0))
        {
            leases.remove(lease.session_id());
        }
    }

    /// Gives the lock back (the session is stopped). Stamped before the delete, so the history
    /// never shows the next owner starting before this one ended.
    pub async fn release(&self, lease: Lease) {
        self.forget(&lease);
        if lease.loss().is_some() {
            self.record_loss(&lease).await;
            return;
        }
        // Nothing of the session may get out from now on.
        lease.0.lost.store(RELEASED, Ordering::Release);
        self.record(&lease, HistoryEvent::Release, wall_ms()).await;
        match self
            .0
            .store
            .release(lease.session_id(), lease.value())
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(session_id = %lease.session_id(), "lock was no longer ours at release")
            }
            Err(err) => {
                self.0.metrics.errors.inc();
                tracing::warn!(session_id = %lease.session_id(), %err, "could not release the lock; it expires by its TTL")
            }
        }
    }

    /// Books a lost lease (the session is stopped): metric, log and history.
    pub async fn record_loss(&self, lease: &Lease) {
        self.forget(lease);
        let reason = lease.loss().unwrap_or(LossReason::Taken);
        self.0
            .metrics
            .losses
            .get_or_create(&LossLabels {
                reason: reason.as_str(),
            })
            .inc();
        tracing::warn!(session_id = %lease.session_id(), token = lease.token(), ?reason, "session lock lost; session stopped");
        self.record(lease, HistoryEvent::Lost, lease.lost_at_ms())
            .await;
    }

    async fn record(&self, lease: &Lease, event: HistoryEvent, at_ms: i64) {
        let entry = HistoryEntry {
            session_id: lease.session_id().to_string(),
            owner: self.0.identity.clone(),
            token: lease.token(),
            event,
            at_ms,
            detected_ms: wall_ms(),
        };
        if let Err(err) = self.0.store.record(entry).await {
            tracing::debug!(%err, "ownership history not written");
        }
    }

    fn ensure_renewer(&self) {
        if self.0.renewer_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.0);
        tokio::spawn(renew_loop(weak, self.0.config.renew_every()));
    }
}

/// Renews every held lease each `every`; ends when the [`Ownership`] is dropped.
async fn renew_loop(inner: Weak<OwnershipInner>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let leases: Vec<Lease> = inner
            .leases
            .lock()
            .expect("leases")
            .values()
            .cloned()
            .collect();
        futures::stream::iter(leases)
            .for_each_concurrent(RENEW_CONCURRENCY, |lease| {
                let inner = &inner;
                async move {
                    // Check the clock before anything else: after a stop past the TTL the lease
                    // is gone, whatever Redis would answer.
                    if !lease.is_usable() {
                        return;
                    }
                    let sent = Instant::now();
                    match inner
                        .store
                        .renew(lease.session_id(), lease.value(), inner.config.ttl)
                        .await
                    {
                        Ok(true) => lease.set_usable_until(sent + inner.config.usable_for()),
                        Ok(false) => lease.mark_lost(LossReason::Taken),
                        Err(err) => {
                            inner.metrics.errors.inc();
                            tracing::warn!(session_id = %lease.session_id(), %err, "lock renewal failed; retrying at the next tick");
                        }
                    }
                }
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ownership(store: Arc<LocalLockStore>, identity: &str) -> Ownership {
        Ownership::new(
            store,
            identity,
            LeaseConfig::new(Duration::from_secs(3)),
            OwnershipMetrics::default(),
        )
    }

    #[test]
    fn keys_share_a_hash_tag() {
        assert_eq!(owner_key("s-1"), "wa:{s-1}:owner");
        assert_eq!(fence_key("s-1"), "wa:{s-1}:fence");
        assert_eq!(hold_key("s-1"), "wa:{s-1}:hold");
    }

    #[test]
    fn lease_timing_leaves_a_third_of_the_ttl() {
        let config = LeaseConfig::new(Duration::from_secs(9));
        assert_eq!(config.renew_every(), Duration::from_secs(3));
        assert_eq!(config.usable_for(), Duration::from_millis(5_550));
    }

    #[tokio::test(start_paused = true)]
    async fn one_owner_at_a_time_with_increasing_tokens() {
        let store = Arc::new(LocalLockStore::new());
        let a = ownership(store.clone(), "a");
        let b = ownership(store.clone(), "b");
        let id: Arc<str> = "s".into();
        let lease = a.acquire(&id).await.unwrap().unwrap();
        assert_eq!(lease.token(), 1);
        assert_eq!(b.acquire(&id).await.unwrap().unwrap_err(), "a:1");
        // Renewals keep it far beyond the TTL.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(lease.is_usable());
        assert!(b.acquire(&id).await.unwrap().is_err());
        a.release(lease.clone()).await;
        assert!(!lease.is_usable(), "a released lease is not usable");
        let lease_b = b.acquire(&id).await.unwrap().unwrap();
        assert_eq!(lease_b.token(), 2);
        let events: Vec<_> = store
            .history()
            .iter()
            .map(|e| (e.owner.clone(), e.event))
            .collect();
        assert_eq!(
            events,
            [
                ("a".into(), HistoryEvent::Acquire),
                ("a".into(), HistoryEvent::Release),
                ("b".into(), HistoryEvent::Acquire)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failing_renewals_lose_the_lease_before_the_ttl() {
        let store = Arc::new(LocalLockStore::new());
        let a = ownership(store.clone(), "a");
        let id: Arc<str> = "s".into();
        let lease = a.acquire(&id).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        store.set_failing(true);
        let failed_at = Instant::now();
        tokio::select! {
            () = lease.lost() => {}
            () = tokio::time::sleep(Duration::from_secs(10)) => panic!("never lost"),
        }
        assert_eq!(lease.loss(), Some(LossReason::Expired));
        // The last renewal sent before the failure was at 1 s; Redis would free the lock at 4 s.
        let lost_after = Instant::now() - failed_at;
        assert!(lost_after <= Duration::from_millis(1_600), "{lost_after:?}");
        assert!(
            store.holder("s").is_some(),
            "lost locally while Redis still holds it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_taken_lock_is_noticed_at_the_next_renewal() {
        let store = Arc::new(LocalLockStore::new());
        let a = ownership(store.clone(), "a");
        let id: Arc<str> = "s".into();
        let lease = a.acquire(&id).await.unwrap().unwrap();
        store.steal("s", "b", Duration::from_secs(3));
        tokio::select! {
            () = lease.lost() => {}
            () = tokio::time::sleep(Duration::from_millis(1_100)) => panic!("not noticed"),
        }
        assert_eq!(lease.loss(), Some(LossReason::Taken));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_process_sees_its_lease_lost_on_wake_up() {
        let store = Arc::new(LocalLockStore::new());
        let a = ownership(store.clone(), "a");
        let id: Arc<str> = "s".into();
        let lease = a.acquire(&id).await.unwrap().unwrap();
        // Time jumps as for a SIGSTOPped process: no task ran in between.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!lease.is_usable(), "checked against the clock first");
        assert_eq!(lease.loss(), Some(LossReason::Expired));
        let lost_at = lease.lost_at_ms();
        assert!(
            lost_at <= wall_ms() - 3_000,
            "loss stamped at the lease's end"
        );
    }
}
