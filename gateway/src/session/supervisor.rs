//! Runs the sessions this gateway is asked to run, each only while it holds the session's
//! ownership lock (see [`super::ownership`]).
//!
//! One small worker task per wanted session: take the lock (skipping, and retrying later, while
//! another gateway holds it), start the driver, then watch. Losing the lock stops the session at
//! once; a session that ends by itself is restarted with exponential backoff and jitter; stop and
//! pause release the lock. Connection attempts (lock + credentials + driver start) share a
//! semaphore so thousands of sessions restoring after a restart do not stampede.
//!
//! Sessions report through a *gate*, one task between the drivers and the pipeline: it passes an
//! event only while the session's lease is usable (a process that wakes up after a SIGSTOP past its
//! TTL forwards nothing), and it records credentials on pairing (`active`) and wipes them on
//! logout, with the lease's fencing token.
//!
//! Graceful drain ([`Supervisor::drain`]): stop sessions, let the pipeline flush their events,
//! then release the locks, so the next owner's events come after ours.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rand::Rng;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::credentials::{CredentialStore, Fence, MemoryCredentials, RedisCredentials, Write};
use super::ownership::{
    Lease, LeaseConfig, LocalLockStore, Ownership, OwnershipMetrics, RedisLockStore,
};
use super::{DriverError, EventSink, RunningSession, SessionDriver};
use crate::events::{GatewayEvent, Priority, SessionStatus, StatusEvent};

/// Exponential backoff with "equal jitter": half the delay fixed, half random, so a fleet that
/// failed together does not retry together, yet nothing retries at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    /// Delay before retry `attempt` (0 = first retry); `unit` is a random draw in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let full = self
            .base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        full / 2 + (full / 2).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// Reason of the `logged_out` status a session reports when it ends by a logout command (a
/// deleted session with `logoutOnDelete`).
pub const LOGOUT_REQUESTED: &str = "logout_requested";

/// What [`Supervisor::logout`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logout {
    /// It ran here and stopped with a logout.
    WasRunning,
    /// It did not run here; a connection made for the purpose unlinked its device.
    Unlinked,
    /// Never paired, or the phone had unlinked it already: nothing to unlink.
    NothingToUnlink,
    /// Another gateway holds its lock: it runs there, and logs out there.
    HeldElsewhere,
    /// The stored keys did not log in in time (or the deregistration failed): the phone still
    /// lists the device. The keys are wiped all the same.
    Failed(String),
    /// Nothing done (Redis unreachable, or the lock lost midway): try again.
    Error(String),
}

impl Logout {
    /// One of each outcome (the label values of the logout counter).
    const ALL: [Logout; 6] = [
        Logout::WasRunning,
        Logout::Unlinked,
        Logout::NothingToUnlink,
        Logout::HeldElsewhere,
        Logout::Failed(String::new()),
        Logout::Error(String::new()),
    ];

    /// Whether the logout is settled (the caller may wipe what is left and forget the session),
    /// rather than to be tried again.
    pub fn is_settled(&self) -> bool {
        !matches!(self, Logout::HeldElsewhere | Logout::Error(_))
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Logout::WasRunning => "was_running",
            Logout::Unlinked => "unlinked",
            Logout::NothingToUnlink => "nothing_to_unlink",
            Logout::HeldElsewhere => "held_elsewhere",
            Logout::Failed(_) => "failed",
            Logout::Error(_) => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SupervisorConfig {
    /// Connection attempts (lock, credentials, driver start) running at once.
    pub max_connect_attempts: usize,
    /// Restarts of sessions that ended by themselves or failed to start.
    pub restart_backoff: Backoff,
    /// A session that ran this long resets its restart backoff.
    pub stable_after: Duration,
    /// Capacity of the gate's input channel.
    pub gate_capacity: usize,
    /// How long [`Supervisor::ensure_running`] waits for the first attempt's outcome.
    pub first_outcome_wait: Duration,
    /// How long [`Supervisor::logout`] of a session that does not run here waits for its stored
    /// keys to log in, so it can unlink the device. Kept well under the 15 s a deleted
    /// standalone session stays held, after which its keys are no longer wiped for it.
    pub unlink_wait: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            max_connect_attempts: 64,
            restart_backoff: Backoff::default(),
            stable_after: Duration::from_secs(60),
            gate_capacity: 1024,
            first_outcome_wait: Duration::from_secs(5),
            unlink_wait: Duration::from_secs(8),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WriteLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteResult {
    Written,
    /// Refused by Redis: a newer owner exists.
    Fenced,
    /// Not even tried: the lease was no longer usable.
    Stale,
    Error,
}

impl WriteResult {
    pub fn as_str(self) -> &'static str {
        match self {
            WriteResult::Written => "written",
            WriteResult::Fenced => "fenced",
            WriteResult::Stale => "stale",
            WriteResult::Error => "error",
        }
    }
}

/// The supervisor's metrics, lock metrics included.
#[derive(Debug, Clone, Default)]
pub struct SupervisorMetrics {
    pub running: Gauge,
    pub attempts_in_flight: Gauge,
    pub restarts: Counter,
    pub credential_writes: Family<WriteLabels, Counter>,
    pub dropped_events: Counter,
    /// Logouts of deleted sessions by [`Logout`] outcome.
    pub unlinks: Family<UnlinkLabels, Counter>,
    pub ownership: OwnershipMetrics,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UnlinkLabels {
    pub result: &'static str,
}

impl SupervisorMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = SupervisorMetrics {
            ownership: OwnershipMetrics::register(registry),
            ..SupervisorMetrics::default()
        };
        registry.register(
            "whatsapp_gateway_sessions_running",
            "Sessions with a live connection on this gateway (each holds its ownership lock)",
            metrics.running.clone(),
        );
        registry.register(
            "whatsapp_gateway_connection_attempts_in_flight",
            "Connection attempts (lock, credentials, driver start) in progress",
            metrics.attempts_in_flight.clone(),
        );
        registry.register(
            "whatsapp_gateway_session_restarts",
            "Sessions restarted after they ended by themselves or failed to start",
            metrics.restarts.clone(),
        );
        registry.register(
            "whatsapp_gateway_credential_writes",
            "Credential writes by result (written, fenced = refused for a stale token, stale, error)",
            metrics.credential_writes.clone(),
        );
        registry.register(
            "whatsapp_gateway_unowned_events_dropped",
            "Session events dropped because the session's lock was no longer held",
            metrics.dropped_events.clone(),
        );
        // Every outcome from the start, so a rate or an alert on `failed` has a series at 0.
        for outcome in Logout::ALL {
            let _ = metrics.unlinks.get_or_create(&UnlinkLabels {
                result: outcome.as_str(),
            });
        }
        registry.register(
            "whatsapp_gateway_session_logouts",
            "Logouts of deleted sessions by result (was_running; unlinked = connected only to unlink a session that did not run; nothing_to_unlink; held_elsewhere; failed = could not unlink, keys wiped anyway; error = not tried, Redis unreachable or lock lost)",
            metrics.unlinks.clone(),
        );
        metrics
    }

    fn count_logout(&self, outcome: &Logout) {
        self.unlinks
            .get_or_create(&UnlinkLabels {
                result: outcome.as_str(),
            })
            .inc();
    }

    fn write(&self, result: WriteResult) {
        self.credential_writes
            .get_or_create(&WriteLabels {
                result: result.as_str(),
            })
            .inc();
    }
}

/// Where the supervisor keeps locks and credentials, and how it behaves.
pub struct SupervisorOptions {
    pub ownership: Ownership,
    pub credentials: Arc<dyn CredentialStore>,
    pub config: SupervisorConfig,
    pub metrics: SupervisorMetrics,
}

impl SupervisorOptions {
    /// In-memory locks and credentials, default behaviour, metrics not registered.
    pub fn local(identity: &str) -> Self {
        SupervisorOptions {
            ownership: Ownership::local(identity),
            credentials: Arc::new(MemoryCredentials::new()),
            config: SupervisorConfig::default(),
            metrics: SupervisorMetrics::default(),
        }
    }

    /// Locks and credentials in Redis when `redis` is given, in memory otherwise (a gateway alone);
    /// metrics registered into `registry`.
    pub fn new(
        redis: Option<&fred::clients::Client>,
        identity: &str,
        lease: LeaseConfig,
        config: SupervisorConfig,
        registry: &mut Registry,
    ) -> Self {
        let metrics = SupervisorMetrics::register(registry);
        let (locks, credentials): (
            Arc<dyn super::ownership::LockStore>,
            Arc<dyn CredentialStore>,
        ) = match redis {
            Some(client) => (
                Arc::new(RedisLockStore::new(client.clone())),
                Arc::new(RedisCredentials::new(client.clone())),
            ),
            None => (
                Arc::new(LocalLockStore::new()),
                Arc::new(MemoryCredentials::new()),
            ),
        };
        SupervisorOptions {
            ownership: Ownership::new(locks, identity, lease, metrics.ownership.clone()),
            credentials,
            config,
            metrics,
        }
    }
}

const RUN: u8 = 0;
const PAUSE: u8 = 1;
const STOP: u8 = 2;
const DRAIN: u8 = 3;
/// As STOP, logging the session out first (its resource was deleted).
const LOGOUT: u8 = 4;

/// Outcome of a session's first attempt, for [`Supervisor::ensure_running`].
#[derive(Debug)]
enum First {
    Started,
    Held,
    Failed(DriverError),
    Ended,
}

/// What a slot's owner wants and what its worker reports.
#[derive(Debug)]
struct SlotCtl {
    desired: AtomicU8,
    changed: Notify,
    live: AtomicBool,
    first: Mutex<Option<oneshot::Sender<First>>>,
}

impl SlotCtl {
    fn new(first: Option<oneshot::Sender<First>>) -> Self {
        SlotCtl {
            desired: AtomicU8::new(RUN),
            changed: Notify::new(),
            live: AtomicBool::new(false),
            first: Mutex::new(first),
        }
    }

    fn desired(&self) -> u8 {
        self.desired.load(Ordering::Acquire)
    }

    fn set(&self, desired: u8) {
        self.desired.store(desired, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Resolves once `desired` is no longer `seen`.
    async fn until_changed(&self, seen: u8) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.desired() != seen {
                return;
            }
            notified.await;
        }
    }

    /// Sleeps for `delay` unless `desired` changes first.
    async fn sleep(&self, delay: Duration) {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.until_changed(RUN) => {}
        }
    }

    fn settle(&self, outcome: First) {
        if let Some(tx) = self.first.lock().expect("slot first").take() {
            let _ = tx.send(outcome);
        }
    }
}

struct Slot {
    ctl: Arc<SlotCtl>,
    worker: JoinHandle<Option<Lease>>,
}

struct Gate {
    sink: EventSink,
    barriers: mpsc::UnboundedSender<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

struct Shared<D> {
    driver: Arc<D>,
    /// The pipeline's sink; taken by [`Supervisor::drain`] so the pipeline can finish.
    downstream: Mutex<Option<EventSink>>,
    gate: Mutex<Option<Gate>>,
    ownership: Ownership,
    credentials: Arc<dyn CredentialStore>,
    config: SupervisorConfig,
    metrics: SupervisorMetrics,
    attempts: Semaphore,
}

pub struct Supervisor<D: SessionDriver> {
    shared: Arc<Shared<D>>,
    slots: Mutex<HashMap<Arc<str>, Slot>>,
}

impl<D: SessionDriver> Supervisor<D> {
    /// In-memory ownership (a gateway alone) and default behaviour.
    pub fn new(driver: Arc<D>, events: EventSink) -> Self {
        Self::with_options(driver, events, SupervisorOptions::local("local"))
    }

    pub fn with_options(driver: Arc<D>, events: EventSink, options: SupervisorOptions) -> Self {
        let SupervisorOptions {
            ownership,
            credentials,
            config,
            metrics,
        } = options;
        Supervisor {
            shared: Arc::new(Shared {
                driver,
                downstream: Mutex::new(Some(events)),
                gate: Mutex::new(None),
                ownership,
                credentials,
                attempts: Semaphore::new(config.max_connect_attempts.max(1)),
                config,
                metrics,
            }),
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub fn ownership(&self) -> &Ownership {
        &self.shared.ownership
    }

    pub fn metrics(&self) -> &SupervisorMetrics {
        &self.shared.metrics
    }

    pub fn driver(&self) -> &Arc<D> {
        &self.shared.driver
    }

    /// Asks for the session to run, without waiting: it starts as soon as its lock and a
    /// connection slot are free. Resumes a paused session. Returns whether it was new.
    pub fn want(&self, session_id: &str) -> bool {
        self.want_inner(session_id, None)
    }

    fn want_inner(&self, session_id: &str, first: Option<oneshot::Sender<First>>) -> bool {
        let mut slots = self.slots.lock().expect("slots");
        if let Some(slot) = slots.get(session_id) {
            if slot.ctl.desired() == PAUSE {
                slot.ctl.set(RUN);
            }
            return false;
        }
        let id: Arc<str> = session_id.into();
        let ctl = Arc::new(SlotCtl::new(first));
        let worker = tokio::spawn(worker(self.shared.clone(), id.clone(), ctl.clone()));
        slots.insert(id, Slot { ctl, worker });
        true
    }

    /// Starts the session unless it already runs (or is being started). Returns whether it was
    /// started now; `false` also when another gateway holds its lock, in which case it keeps being
    /// retried in the background.
    pub async fn ensure_running(&self, session_id: &str) -> Result<bool, DriverError> {
        if self.shared.downstream.lock().expect("downstream").is_none() {
            return Err(DriverError::EventSinkClosed);
        }
        let (tx, rx) = oneshot::channel();
        if !self.want_inner(session_id, Some(tx)) {
            return Ok(false);
        }
        match tokio::time::timeout(self.shared.config.first_outcome_wait, rx).await {
            Ok(Ok(First::Started)) => Ok(true),
            Ok(Ok(First::Failed(err))) => Err(err),
            Ok(Ok(First::Held | First::Ended)) | Ok(Err(_)) | Err(_) => Ok(false),
        }
    }

    /// Stops the session if it runs (releasing its lock) and forgets it. Returns whether it had a
    /// live connection.
    pub async fn stop(&self, session_id: &str) -> bool {
        self.end(session_id, STOP).await
    }

    /// Like [`Supervisor::stop`], but the session logs out (the driver unlinks the device where
    /// it can): for a deleted resource with `logoutOnDelete`. A paired session that does not run
    /// here (paused, waiting for a restart, or known only from its stored credentials) is
    /// connected just long enough to unlink it, under its lock (taken through a delete's hold),
    /// so deleting a paused session does not leave the device listed on the phone.
    pub async fn logout(&self, session_id: &str) -> Logout {
        if self.end(session_id, LOGOUT).await {
            self.shared.metrics.count_logout(&Logout::WasRunning);
            return Logout::WasRunning;
        }
        // On a task of its own: a caller that goes away (an HTTP client hanging up on a
        // DELETE) must not leave the lock held or the connection open halfway.
        let task = tokio::spawn(unlink_idle(self.shared.clone(), Arc::from(session_id)));
        task.await
            .unwrap_or_else(|err| Logout::Error(format!("unlink task: {err}")))
    }
    async fn end(&self, session_id: &str, how: u8) -> bool {
        let slot = self.slots.lock().expect("slots").remove(session_id);
        let Some(slot) = slot else {
            return false;
        };
        let was_live = slot.ctl.live.load(Ordering::Acquire);
        slot.ctl.set(how);
        let _ = slot.worker.await;
        was_live
    }

    /// Stops the session and releases its lock but keeps it known, credentials untouched, until
    /// [`Supervisor::resume`]. Returns whether it had a live connection.
    pub async fn pause(&self, session_id: &str) -> bool {
        let ctl = self
            .slots
            .lock()
            .expect("slots")
            .get(session_id)
            .map(|s| s.ctl.clone());
        let Some(ctl) = ctl else {
            return false;
        };
        let was_live = ctl.live.load(Ordering::Acquire);
        ctl.set(PAUSE);
        // Wait until the session is down and its lock released.
        while ctl.live.load(Ordering::Acquire) || self.shared.ownership.lease(session_id).is_some()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        was_live
    }

    /// Resumes a paused session. Returns whether it was paused.
    pub fn resume(&self, session_id: &str) -> bool {
        let slots = self.slots.lock().expect("slots");
        match slots.get(session_id) {
            Some(slot) if slot.ctl.desired() == PAUSE => {
                slot.ctl.set(RUN);
                true
            }
            _ => false,
        }
    }

    /// Whether the session has a live connection now.
    pub async fn is_running(&self, session_id: &str) -> bool {
        self.slots
            .lock()
            .expect("slots")
            .get(session_id)
            .is_some_and(|s| s.ctl.live.load(Ordering::Acquire))
    }

    /// Ids of the sessions this supervisor runs, including those waiting for their lock or a
    /// restart (they start on their own); paused ones excluded. Callers that reconcile against a
    /// wanted set stop what is listed here and not wanted.
    pub async fn running(&self) -> Vec<String> {
        self.slots
            .lock()
            .expect("slots")
            .iter()
            .filter(|(_, s)| s.ctl.desired() == RUN)
            .map(|(id, _)| id.to_string())
            .collect()
    }

    /// Number of sessions with a live connection.
    pub fn live(&self) -> usize {
        self.slots
            .lock()
            .expect("slots")
            .values()
            .filter(|s| s.ctl.live.load(Ordering::Acquire))
            .count()
    }

    fn take_slots(&self, desired: u8) -> Vec<JoinHandle<Option<Lease>>> {
        let slots: Vec<Slot> = self
            .slots
            .lock()
            .expect("slots")
            .drain()
            .map(|(_, s)| s)
            .collect();
        slots
            .into_iter()
            .map(|slot| {
                slot.ctl.set(desired);
                slot.worker
            })
            .collect()
    }

    /// Stops every session and releases their locks. Sessions may be started again afterwards.
    pub async fn stop_all(&self) {
        let workers = self.take_slots(STOP);
        futures::future::join_all(workers).await;
        self.shared
            .close_gate(Instant::now() + Duration::from_secs(5))
            .await;
    }

    /// Graceful drain (SIGTERM): stops every session keeping its lock, closes the gate once their
    /// last events passed it, runs `flush` (the pipeline's shutdown), then releases the locks; all
    /// within `grace` (lock releases get at least 2 s more). The supervisor starts nothing after.
    pub async fn drain<F: Future<Output = ()>>(&self, grace: Duration, flush: F) {
        let deadline = Instant::now() + grace;
        let workers = self.take_slots(DRAIN);
        let ended = futures::future::join_all(
            workers
                .into_iter()
                .map(|worker| tokio::time::timeout_at(deadline, worker)),
        )
        .await;
        let mut leases = Vec::with_capacity(ended.len());
        let mut late = 0;
        for result in ended {
            match result {
                Ok(Ok(Some(lease))) => leases.push(lease),
                Ok(_) => {}
                Err(_) => late += 1,
            }
        }
        if late > 0 {
            tracing::warn!(sessions = late, "drain: some sessions did not stop in time");
        }
        let downstream = self.shared.downstream.lock().expect("downstream").take();
        drop(downstream);
        self.shared.close_gate(deadline).await;
        if tokio::time::timeout_at(deadline, flush).await.is_err() {
            tracing::warn!("drain: event flush did not finish in time");
        }
        let releases = futures::future::join_all(
            leases
                .into_iter()
                .map(|lease| self.shared.ownership.release(lease)),
        );
        let release_deadline = deadline.max(Instant::now() + Duration::from_secs(2));
        if tokio::time::timeout_at(release_deadline, releases)
            .await
            .is_err()
        {
            tracing::warn!("drain: some locks were not released; they expire by their TTL");
        }
    }
}

impl<D: SessionDriver> Drop for Supervisor<D> {
    fn drop(&mut self) {
        // Workers hold the shared state; tell them to stop and give their locks back.
        if let Ok(mut slots) = self.slots.lock() {
            for (_, slot) in slots.drain() {
                slot.ctl.set(STOP);
            }
        }
    }
}

impl<D: SessionDriver> Shared<D> {
    /// The sink drivers report into; starts the gate if needed.
    fn gate_sink(&self) -> Result<EventSink, DriverError> {
        let mut gate = self.gate.lock().expect("gate");
        if let Some(gate) = gate.as_ref() {
            return Ok(gate.sink.clone());
        }
        let downstream = self
            .downstream
            .lock()
            .expect("downstream")
            .clone()
            .ok_or(DriverError::EventSinkClosed)?;
        let (sink, rx) = EventSink::channel(self.config.gate_capacity);
        let (barriers, barrier_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_gate(
            rx,
            barrier_rx,
            downstream,
            self.ownership.clone(),
            self.credentials.clone(),
            self.metrics.clone(),
        ));
        *gate = Some(Gate {
            sink: sink.clone(),
            barriers,
            task,
        });
        Ok(sink)
    }

    /// Waits until the gate has handled every event already sent to it.
    async fn gate_barrier(&self) {
        let barriers = self
            .gate
            .lock()
            .expect("gate")
            .as_ref()
            .map(|g| g.barriers.clone());
        let Some(barriers) = barriers else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        if barriers.send(tx).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }

    /// Lets the gate end once every session's sink is gone (all sessions are stopped).
    async fn close_gate(&self, deadline: Instant) {
        let gate = self.gate.lock().expect("gate").take();
        if let Some(Gate { sink, task, .. }) = gate {
            drop(sink);
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!("gate did not finish in time");
            }
        }
    }

    /// How long to wait before trying again a lock another gateway holds.
    fn held_retry_delay(&self) -> Duration {
        let ttl = self.ownership.config().ttl;
        ttl + (ttl / 2).mul_f64(rand::rng().random::<f64>())
    }

    fn backoff(&self, failures: u32) -> Duration {
        self.config
            .restart_backoff
            .delay(failures, rand::rng().random::<f64>())
    }
}

/// Longest an unlink may take beyond its login wait (the deregistration and the disconnect:
/// the whatsapp driver needs at most 4 s), so a standalone delete ends within its 15 s hold.
const UNLINK_GRACE: Duration = Duration::from_secs(5);

/// [`Supervisor::logout`] of a session that does not run here; logs and counts the outcome.
async fn unlink_idle<D: SessionDriver>(shared: Arc<Shared<D>>, id: Arc<str>) -> Logout {
    let outcome = unlink_idle_inner(&shared, &id).await;
    match &outcome {
        Logout::Unlinked => {
            tracing::info!(session_id = %id, "idle session unlinked from the phone")
        }
        Logout::Failed(reason) => {
            tracing::warn!(session_id = %id, %reason, "idle session could not be unlinked; its keys are wiped all the same")
        }
        Logout::Error(reason) => {
            tracing::warn!(session_id = %id, %reason, "idle session logout could not run; retrying")
        }
        _ => tracing::debug!(session_id = %id, ?outcome, "idle session logout"),
    }
    shared.metrics.count_logout(&outcome);
    outcome
}

async fn unlink_idle_inner<D: SessionDriver>(shared: &Shared<D>, id: &Arc<str>) -> Logout {
    // A cheap look first, so deleting a session that never paired takes no lock.
    match shared.credentials.load(id).await {
        Ok(Some(creds)) if creds.paired => {}
        Ok(_) => return Logout::NothingToUnlink,
        Err(err) => return Logout::Error(err.to_string()),
    }
    // The unlink is a connection like any other: it counts against the attempts at once.
    let _attempt = Attempt::new(
        shared
            .attempts
            .acquire()
            .await
            .expect("the semaphore is never closed"),
        &shared.metrics.attempts_in_flight,
    );
    let lease = match shared.ownership.acquire_for_logout(id).await {
        Ok(Ok(lease)) => ReleaseOnDrop {
            ownership: shared.ownership.clone(),
            lease: Some(lease),
        },
        Ok(Err(_holder)) => return Logout::HeldElsewhere,
        Err(err) => return Logout::Error(err.to_string()),
    };
    let outcome = unlink_under(shared, id, lease.lease.as_ref().expect("held")).await;
    lease.release().await;
    outcome
}

/// A lease that is released even if the unlink panics, instead of being renewed forever.
struct ReleaseOnDrop {
    ownership: Ownership,
    lease: Option<Lease>,
}

impl ReleaseOnDrop {
    async fn release(mut self) {
        if let Some(lease) = self.lease.take() {
            self.ownership.release(lease).await;
        }
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            let ownership = self.ownership.clone();
            tokio::spawn(async move { ownership.release(lease).await });
        }
    }
}

/// The unlink proper, while `lease` is ours.
async fn unlink_under<D: SessionDriver>(
    shared: &Shared<D>,
    id: &Arc<str>,
    lease: &Lease,
) -> Logout {
    let fence = Fence::of(lease);
    // Again under the lock: another gateway may have unlinked it meanwhile.
    match shared.credentials.load(id).await {
        Ok(Some(creds)) if creds.paired => {}
        Ok(_) => return Logout::NothingToUnlink,
        Err(err) => return Logout::Error(err.to_string()),
    }
    let budget = shared.config.unlink_wait + UNLINK_GRACE;
    let unlinked = tokio::select! {
        result = tokio::time::timeout(
            budget,
            shared.driver.unlink(id, Some(&fence), shared.config.unlink_wait),
        ) => match result {
            Ok(result) => result.map_err(|err| err.to_string()),
            Err(_) => Err(format!("took longer than {budget:?}")),
        },
        // Another owner may exist from now on: the unlink's connection ends at once (dropped).
        () = lease.lost() => return Logout::Error("lost the session lock while unlinking".into()),
    };
    // A deleted session's keys go, whatever became of the unlink. Until they have, the logout
    // is not settled: whoever tries again finds them and reports the end once.
    match shared.credentials.wipe(id, &fence).await {
        Ok(Write::Written) => {}
        Ok(Write::Fenced) => {
            return Logout::Error("credentials taken over by a newer owner while unlinking".into());
        }
        Err(err) => return Logout::Error(format!("wiping the credentials: {err}")),
    }
    // The backend last heard `inactive` (paused); now it is final, as for a running session
    // that logs out: the session is gone and a new pairing is needed, whatever the phone says.
    if let Ok(sink) = shared.gate_sink() {
        let logged_out = StatusEvent::new(
            &**id,
            SessionStatus::LoggedOut,
            Priority::High,
            Some(LOGOUT_REQUESTED.to_owned()),
        );
        if sink.emit(logged_out).await.is_ok() {
            // Through the gate while the lease still vouches for it.
            shared.gate_barrier().await;
        }
    }
    match unlinked {
        Ok(super::Unlink::Unlinked) => Logout::Unlinked,
        Ok(super::Unlink::NotLinked) => Logout::NothingToUnlink,
        Err(reason) => Logout::Failed(reason),
    }
}

/// Counts a connection attempt in flight (gauge) while it holds a semaphore permit.
struct Attempt<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
    gauge: &'a Gauge,
}

impl<'a> Attempt<'a> {
    fn new(permit: tokio::sync::SemaphorePermit<'a>, gauge: &'a Gauge) -> Self {
        gauge.inc();
        Attempt {
            _permit: permit,
            gauge,
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Why a running session stopped.
enum End {
    Lost,
    Command,
    Ended,
}

/// One wanted session: lock, start, watch, restart; returns the lease it still holds when told to
/// drain.
async fn worker<D: SessionDriver>(
    shared: Arc<Shared<D>>,
    id: Arc<str>,
    ctl: Arc<SlotCtl>,
) -> Option<Lease> {
    let mut lease: Option<Lease> = None;
    let mut failures: u32 = 0;
    loop {
        match ctl.desired() {
            STOP | LOGOUT => {
                if let Some(lease) = lease.take() {
                    shared.ownership.release(lease).await;
                }
                ctl.settle(First::Ended);
                return None;
            }
            DRAIN => {
                ctl.settle(First::Ended);
                return lease;
            }
            PAUSE => {
                if let Some(lease) = lease.take() {
                    shared.ownership.release(lease).await;
                }
                ctl.until_changed(PAUSE).await;
                continue;
            }
            _ => {}
        }
        if let Some(stale) = lease.take_if(|l| !l.is_usable()) {
            shared.ownership.record_loss(&stale).await;
        }
        let permit = tokio::select! {
            permit = shared.attempts.acquire() => permit.expect("the semaphore is never closed"),
            () = ctl.until_changed(RUN) => continue,
        };
        let attempt = Attempt::new(permit, &shared.metrics.attempts_in_flight);
        if lease.is_none() {
            match shared.ownership.acquire(&id).await {
                Ok(Ok(acquired)) => lease = Some(acquired),
                Ok(Err(holder)) => {
                    drop(attempt);
                    tracing::debug!(session_id = %id, %holder, "session locked by another gateway; retrying later");
                    ctl.settle(First::Held);
                    ctl.sleep(shared.held_retry_delay()).await;
                    continue;
                }
                Err(err) => {
                    drop(attempt);
                    tracing::warn!(session_id = %id, %err, "could not take the session lock");
                    // Retried in the background, like a lock held elsewhere: whoever waits for
                    // the first outcome (a shard's reconcile) must not wait out its timeout for
                    // each session while Redis is unreachable.
                    ctl.settle(First::Held);
                    ctl.sleep(shared.backoff(failures)).await;
                    failures = failures.saturating_add(1);
                    continue;
                }
            }
        }
        // A slow answer may leave nothing of the lease; the loop top books the loss.
        let Some(current) = lease.clone().filter(Lease::is_usable) else {
            continue;
        };
        let started = match shared.gate_sink() {
            Ok(sink) => {
                let fence = Fence::of(&current);
                shared.driver.start_owned(&id, sink, Some(&fence)).await
            }
            Err(err) => Err(err),
        };
        drop(attempt);
        let session = match started {
            Ok(session) => session,
            Err(DriverError::EventSinkClosed) => {
                // The gateway is shutting down.
                ctl.settle(First::Failed(DriverError::EventSinkClosed));
                ctl.until_changed(RUN).await;
                continue;
            }
            Err(err) => {
                tracing::warn!(session_id = %id, %err, "session did not start; retrying with backoff");
                ctl.settle(First::Failed(err));
                shared.metrics.restarts.inc();
                ctl.sleep(shared.backoff(failures)).await;
                failures = failures.saturating_add(1);
                continue;
            }
        };
        ctl.live.store(true, Ordering::Release);
        shared.metrics.running.inc();
        ctl.settle(First::Started);
        let started_at = Instant::now();
        let end = supervise(&ctl, &current, &session, shared.ownership.config()).await;
        if ctl.desired() == LOGOUT && matches!(end, End::Command) {
            session.stop_and_logout().await;
            // Whatever the driver reported, the account is unlinked now: its credentials go
            // (fenced, while the lease is still ours: the gate's own wipe on the event below runs
            // in the background and may come after the release), and the backend hears it.
            if let Err(err) = shared.credentials.wipe(&id, &Fence::of(&current)).await {
                tracing::warn!(session_id = %id, %err, "wiping credentials after logout failed");
            }
            if let Ok(sink) = shared.gate_sink() {
                let logged_out = StatusEvent::new(
                    &*id,
                    SessionStatus::LoggedOut,
                    Priority::High,
                    Some(LOGOUT_REQUESTED.to_owned()),
                );
                let _ = sink.emit(logged_out).await;
            }
        } else {
            session.stop().await;
        }
        ctl.live.store(false, Ordering::Release);
        shared.metrics.running.dec();
        match end {
            End::Lost => {
                lease = None;
                shared.ownership.record_loss(&current).await;
                // Someone else most likely holds it now.
                ctl.sleep(shared.held_retry_delay()).await;
            }
            End::Command => {
                if ctl.desired() != DRAIN {
                    // Let the session's last events through while the lock is still ours.
                    shared.gate_barrier().await;
                }
            }
            End::Ended => {
                if started_at.elapsed() >= shared.config.stable_after {
                    failures = 0;
                }
                let delay = shared.backoff(failures);
                failures = failures.saturating_add(1);
                shared.metrics.restarts.inc();
                tracing::warn!(session_id = %id, delay_ms = delay.as_millis() as u64, "session ended by itself; restarting after backoff");
                ctl.sleep(delay).await;
            }
        }
    }
}

/// Watches a running session until its lease is lost, a command arrives, or it ends by itself.
async fn supervise(
    ctl: &SlotCtl,
    lease: &Lease,
    session: &RunningSession,
    lease_config: LeaseConfig,
) -> End {
    // A session ending by itself is noticed at this pace; lock loss and commands at once.
    let check_every = lease_config.renew_every().min(Duration::from_secs(5));
    loop {
        if ctl.desired() != RUN {
            return End::Command;
        }
        tokio::select! {
            biased;
            () = lease.lost() => return End::Lost,
            () = ctl.until_changed(RUN) => return End::Command,
            () = tokio::time::sleep(check_every) => {
                if !lease.is_usable() {
                    return End::Lost;
                }
                if session.is_finished() {
                    return End::Ended;
                }
            }
        }
    }
}

/// Between drivers and the pipeline: passes events of sessions whose lease is usable, records
/// credentials on pairing and logout. Barrier requests are answered once every event already
/// queued was handled.
async fn run_gate(
    mut events: mpsc::Receiver<GatewayEvent>,
    mut barriers: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    downstream: EventSink,
    ownership: Ownership,
    credentials: Arc<dyn CredentialStore>,
    metrics: SupervisorMetrics,
) {
    let pass = |event: GatewayEvent| {
        let downstream = &downstream;
        let ownership = &ownership;
        let credentials = &credentials;
        let metrics = &metrics;
        async move {
            let Some(lease) = ownership.lease(event.session_id()).filter(Lease::is_usable) else {
                metrics.dropped_events.inc();
                return true;
            };
            if let GatewayEvent::Status(status) = &event {
                match status.status {
                    SessionStatus::Active
                        if !lease.creds_recorded().swap(true, Ordering::AcqRel) =>
                    {
                        spawn_credential_write(lease, credentials.clone(), metrics.clone(), true);
                    }
                    SessionStatus::LoggedOut => {
                        lease.creds_recorded().store(false, Ordering::Release);
                        spawn_credential_write(lease, credentials.clone(), metrics.clone(), false);
                    }
                    _ => {}
                }
            }
            downstream.emit(event).await.is_ok()
        }
    };
    loop {
        tokio::select! {
            biased;
            event = events.recv() => match event {
                Some(event) => {
                    if !pass(event).await {
                        tracing::error!("pipeline closed while sessions still report events");
                        return;
                    }
                }
                None => return,
            },
            Some(ack) = barriers.recv() => {
                while let Ok(event) = events.try_recv() {
                    if !pass(event).await {
                        return;
                    }
                }
                let _ = ack.send(());
            }
        }
    }
}

/// Records the session as paired (`paired`) or wipes its credentials, with the lease's token.
fn spawn_credential_write(
    lease: Lease,
    credentials: Arc<dyn CredentialStore>,
    metrics: SupervisorMetrics,
    paired: bool,
) {
    tokio::spawn(async move {
        // Checked again at write time: the clock may have run past the lease meanwhile.
        if !lease.is_usable() {
            metrics.write(WriteResult::Stale);
            tracing::warn!(session_id = %lease.session_id(), token = lease.token(), "credential write skipped: lock no longer held");
            return;
        }
        let fence = Fence::of(&lease);
        let result = if paired {
            credentials.save_paired(lease.session_id(), &fence).await
        } else {
            credentials.wipe(lease.session_id(), &fence).await
        };
        match result {
            Ok(Write::Written) => metrics.write(WriteResult::Written),
            Ok(Write::Fenced) => {
                metrics.write(WriteResult::Fenced);
                tracing::warn!(session_id = %lease.session_id(), token = lease.token(), "credential write refused: stale fencing token");
            }
            Err(err) => {
                metrics.write(WriteResult::Error);
                tracing::warn!(session_id = %lease.session_id(), %err, "credential write failed");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::session::credentials::RestoringSim;
    use crate::session::ownership::LocalLockStore;
    use crate::session::sim::{SimConfig, SimDriver};

    #[tokio::test(start_paused = true)]
    async fn sessions_start_once_and_stop() {
        let driver = Arc::new(SimDriver::new(SimConfig::default()).unwrap());
        let (events, mut rx) = EventSink::channel(1024);
        let supervisor = Supervisor::new(driver, events);
        assert!(supervisor.ensure_running("a").await.unwrap());
        assert!(!supervisor.ensure_running("a").await.unwrap(), "idempotent");
        assert!(supervisor.ensure_running("b").await.unwrap());
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert!(rx.try_recv().is_ok(), "sessions report events");
        assert!(supervisor.stop("a").await);
        assert!(!supervisor.stop("a").await);
        assert_eq!(supervisor.running().await, vec!["b".to_string()]);
        supervisor.stop_all().await;
        assert!(supervisor.running().await.is_empty());
    }

    /// A driver whose sessions may take time to start and may end by themselves.
    #[derive(Default)]
    struct TestDriver {
        start_delay: Duration,
        live_for: Option<Duration>,
        starts: Mutex<Vec<(String, Instant)>>,
        connecting: AtomicUsize,
        max_connecting: AtomicUsize,
        /// Sessions that were stopped with a logout request.
        logged_out: Arc<Mutex<Vec<String>>>,
    }

    impl SessionDriver for TestDriver {
        async fn start(
            &self,
            session_id: &str,
            events: EventSink,
        ) -> Result<RunningSession, DriverError> {
            let now = self.connecting.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_connecting.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.start_delay).await;
            self.connecting.fetch_sub(1, Ordering::SeqCst);
            self.starts
                .lock()
                .unwrap()
                .push((session_id.to_string(), Instant::now()));
            let live_for = self.live_for;
            let logged_out = self.logged_out.clone();
            let id = session_id.to_string();
            Ok(RunningSession::spawn(
                session_id,
                move |mut stop| async move {
                    // Reports nothing, but could until it ends.
                    let _events = events;
                    let stopped = match live_for {
                        Some(d) => {
                            tokio::select! {
                                () = &mut stop => true,
                                () = tokio::time::sleep(d) => false,
                            }
                        }
                        None => {
                            (&mut stop).await;
                            true
                        }
                    };
                    if stopped && stop.wants_logout() {
                        logged_out.lock().unwrap().push(id);
                    }
                },
            ))
        }
    }

    fn options(
        store: Arc<LocalLockStore>,
        identity: &str,
        config: SupervisorConfig,
    ) -> SupervisorOptions {
        SupervisorOptions {
            ownership: Ownership::new(
                store,
                identity,
                LeaseConfig::new(Duration::from_secs(3)),
                OwnershipMetrics::default(),
            ),
            credentials: Arc::new(MemoryCredentials::new()),
            config,
            metrics: SupervisorMetrics::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn logout_reaches_the_running_session_and_stop_does_not() {
        let driver = Arc::new(TestDriver::default());
        let (events, _rx) = EventSink::channel(16);
        let store = Arc::new(LocalLockStore::new());
        let supervisor = Supervisor::with_options(
            driver.clone(),
            events,
            options(store, "g", SupervisorConfig::default()),
        );
        for id in ["deleted", "moved"] {
            assert!(supervisor.ensure_running(id).await.unwrap());
        }
        assert_eq!(supervisor.logout("deleted").await, Logout::WasRunning);
        assert!(supervisor.stop("moved").await);
        assert_eq!(
            *driver.logged_out.lock().unwrap(),
            vec!["deleted".to_string()]
        );
        assert!(supervisor.running().await.is_empty());
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let backoff = Backoff::default();
        assert_eq!(backoff.delay(0, 0.0), Duration::from_millis(500));
        assert_eq!(backoff.delay(0, 1.0), Duration::from_secs(1));
        assert_eq!(backoff.delay(3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff.delay(3, 0.5), Duration::from_secs(6));
        assert_eq!(backoff.delay(10, 1.0), Duration::from_secs(60));
        assert_eq!(backoff.delay(u32::MAX, 0.0), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn connection_attempts_are_capped() {
        let driver = Arc::new(TestDriver {
            start_delay: Duration::from_millis(100),
            ..TestDriver::default()
        });
        let (events, _rx) = EventSink::channel(16);
        let config = SupervisorConfig {
            max_connect_attempts: 8,
            ..SupervisorConfig::default()
        };
        let store = Arc::new(LocalLockStore::new());
        let supervisor =
            Supervisor::with_options(driver.clone(), events, options(store, "g", config));
        let begun = Instant::now();
        for i in 0..200 {
            supervisor.want(&format!("s-{i}"));
        }
        while supervisor.live() < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(driver.max_connecting.load(Ordering::SeqCst), 8);
        // 200 sessions, 8 at a time, 100 ms each.
        let took = begun.elapsed();
        assert!(took >= Duration::from_millis(2_500), "{took:?}");
        assert!(took <= Duration::from_millis(2_700), "{took:?}");
        assert_eq!(supervisor.metrics().attempts_in_flight.get(), 0);
        assert_eq!(supervisor.metrics().running.get(), 200);
        supervisor.stop_all().await;
        assert_eq!(supervisor.metrics().running.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_ends_by_itself_restarts_with_growing_backoff() {
        let driver = Arc::new(TestDriver {
            live_for: Some(Duration::from_millis(100)),
            ..TestDriver::default()
        });
        let (events, _rx) = EventSink::channel(16);
        let store = Arc::new(LocalLockStore::new());
        let supervisor = Supervisor::with_options(
            driver.clone(),
            events,
            options(store.clone(), "g", SupervisorConfig::default()),
        );
        supervisor.want("s");
        tokio::time::sleep(Duration::from_secs(120)).await;
        let starts: Vec<Instant> = driver.starts.lock().unwrap().iter().map(|s| s.1).collect();
        assert!((5..=9).contains(&starts.len()), "{} starts", starts.len());
        // Gap = time alive (100 ms) + detection (up to one check, 1 s) + backoff (>= half of
        // 1, 2, 4, ... s).
        for (i, pair) in starts.windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            // The backoff is capped: at least 30 s, at most 60 s with jitter.
            let min_backoff = (Duration::from_millis(500) * (1 << i)).min(Duration::from_secs(30));
            assert!(gap >= min_backoff, "restart {i}: {gap:?} < {min_backoff:?}");
        }
        // The last restart may still be in its backoff.
        let restarts = supervisor.metrics().restarts.get();
        assert!(
            (starts.len() as u64 - 1..=starts.len() as u64).contains(&restarts),
            "{restarts} restarts for {} starts",
            starts.len()
        );
        // The lock is kept across restarts: one acquisition.
        assert_eq!(store.fence("s"), 1);
        supervisor.stop_all().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_lock_error_does_not_hold_up_ensure_running() {
        let driver = Arc::new(TestDriver::default());
        let (events, _rx) = EventSink::channel(16);
        let store = Arc::new(LocalLockStore::new());
        store.set_failing(true);
        let supervisor = Supervisor::with_options(
            driver.clone(),
            events,
            options(store.clone(), "a", SupervisorConfig::default()),
        );
        let asked = Instant::now();
        for i in 0..10 {
            assert!(!supervisor.ensure_running(&format!("s{i}")).await.unwrap());
        }
        // It took 10 × the first-outcome wait (5 s each) before.
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
        // Retried in the background once Redis answers again.
        store.set_failing(false);
        tokio::time::sleep(Duration::from_secs(120)).await;
        for i in 0..10 {
            assert!(supervisor.is_running(&format!("s{i}")).await, "s{i}");
        }
        supervisor.stop_all().await;
    }

    #[tokio::test(start_paused = true)]
    async fn losing_the_lock_stops_the_session_within_a_second() {
        let driver = Arc::new(TestDriver::default());
        let (events, _rx) = EventSink::channel(16);
        let store = Arc::new(LocalLockStore::new());
        let supervisor = Supervisor::with_options(
            driver.clone(),
            events,
            options(store.clone(), "a", SupervisorConfig::default()),
        );
        assert!(supervisor.ensure_running("s").await.unwrap());

        // Redis stops answering: the lease ends locally before the lock could expire in Redis.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        store.set_failing(true);
        let failing_since = Instant::now();
        while supervisor.is_running("s").await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stopped_after = failing_since.elapsed();
        // Last renewal sent at 1 s: Redis keeps the lock until 4 s, 2.8 s after the failure
        // began; the session is down by 3 s (the tick after its lease's usable time ran out).
        assert!(
            stopped_after <= Duration::from_millis(1_850),
            "{stopped_after:?}"
        );
        assert_eq!(
            supervisor
                .ownership()
                .metrics()
                .losses
                .get_or_create(&super::super::ownership::LossLabels { reason: "expired" })
                .get(),
            1
        );
        store.set_failing(false);

        // Back once the lock is free again (it was never released in Redis: wait for its TTL).
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(supervisor.is_running("s").await);

        // Another gateway takes the lock (as after an expiry): noticed at the next renewal.
        store.steal("s", "b", Duration::from_secs(30));
        let stolen_at = Instant::now();
        while supervisor.is_running("s").await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stolen_at.elapsed() <= Duration::from_millis(1_050));
        let history = store.history();
        let events: Vec<_> = history.iter().map(|e| (e.token, e.event)).collect();
        use crate::session::ownership::HistoryEvent::*;
        assert_eq!(events, [(1, Acquire), (1, Lost), (2, Acquire), (2, Lost)]);
        supervisor.stop_all().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_locked_elsewhere_starts_once_the_lock_is_free() {
        let driver = Arc::new(TestDriver::default());
        let (events, _rx) = EventSink::channel(16);
        let store = Arc::new(LocalLockStore::new());
        store.steal("s", "other", Duration::from_secs(10));
        let supervisor = Supervisor::with_options(
            driver.clone(),
            events,
            options(store.clone(), "a", SupervisorConfig::default()),
        );
        assert!(!supervisor.ensure_running("s").await.unwrap());
        assert!(!supervisor.is_running("s").await);
        assert_eq!(
            supervisor.running().await,
            vec!["s".to_string()],
            "still wanted"
        );
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!supervisor.is_running("s").await);
        // Retries come every TTL (3 s) plus jitter.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(supervisor.is_running("s").await);
        assert!(store.holder("s").unwrap().starts_with("a:"));
        supervisor.stop_all().await;
        assert!(store.holder("s").is_none(), "released");
    }

    #[tokio::test(start_paused = true)]
    async fn pause_keeps_credentials_and_resume_shows_no_qr() {
        let credentials = Arc::new(MemoryCredentials::new());
        let sim = RestoringSim::new(
            SimConfig {
                unpaired_share: 1.0,
                scan_probability: 1.0,
                ..SimConfig::default()
            },
            credentials.clone(),
        )
        .unwrap();
        let (events, mut rx) = EventSink::channel(1024);
        let store = Arc::new(LocalLockStore::new());
        let mut opts = options(store.clone(), "a", SupervisorConfig::default());
        opts.credentials = credentials.clone();
        let supervisor = Supervisor::with_options(Arc::new(sim), events, opts);
        assert!(supervisor.ensure_running("s").await.unwrap());
        // Scanned within the first QR's 60 s.
        tokio::time::sleep(Duration::from_secs(61)).await;
        let mut saw_qr = false;
        while let Ok(event) = rx.try_recv() {
            saw_qr |= matches!(event, GatewayEvent::Qr(_));
        }
        assert!(saw_qr);
        let creds = credentials
            .load("s")
            .await
            .unwrap()
            .expect("recorded on pairing");
        assert!(creds.paired);
        assert_eq!(creds.token, 1);

        assert!(supervisor.pause("s").await);
        assert!(!supervisor.is_running("s").await);
        assert!(store.holder("s").is_none(), "lock released on pause");
        assert!(supervisor.running().await.is_empty());
        assert!(credentials.load("s").await.unwrap().unwrap().paired);

        assert!(supervisor.resume("s"));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(supervisor.is_running("s").await);
        let mut statuses = Vec::new();
        while let Ok(event) = rx.try_recv() {
            match event {
                GatewayEvent::Qr(_) => panic!("a paired session showed a QR code after resume"),
                GatewayEvent::Status(s) => statuses.push(s.status),
            }
        }
        assert_eq!(statuses, [SessionStatus::Connecting, SessionStatus::Active]);
        // The new owner recorded the pairing with its own token.
        tokio::task::yield_now().await;
        assert_eq!(credentials.load("s").await.unwrap().unwrap().token, 2);
        supervisor.stop_all().await;
    }

    /// Deleting a paused (or otherwise idle) paired session unlinks its device: a connection
    /// made only for that, whose events stay private, logs out; the credentials go; the backend
    /// hears `logged_out`; the lock is given back. Also on a gateway that never ran it.
    #[tokio::test(start_paused = true)]
    async fn logout_of_an_idle_paired_session_connects_only_to_unlink_it() {
        let credentials = Arc::new(MemoryCredentials::new());
        let sim = |credentials: Arc<MemoryCredentials>| {
            Arc::new(
                RestoringSim::new(
                    SimConfig {
                        unpaired_share: 1.0,
                        scan_probability: 1.0,
                        ..SimConfig::default()
                    },
                    credentials,
                )
                .unwrap(),
            )
        };
        let store = Arc::new(LocalLockStore::new());
        let (events, mut rx) = EventSink::channel(1024);
        let mut opts = options(store.clone(), "a", SupervisorConfig::default());
        opts.credentials = credentials.clone();
        let supervisor = Supervisor::with_options(sim(credentials.clone()), events, opts);
        for id in ["paused", "elsewhere"] {
            assert!(supervisor.ensure_running(id).await.unwrap());
        }
        tokio::time::sleep(Duration::from_secs(61)).await;
        for id in ["paused", "elsewhere"] {
            assert!(credentials.load(id).await.unwrap().unwrap().paired);
            assert!(supervisor.pause(id).await);
        }
        while rx.try_recv().is_ok() {}

        assert_eq!(supervisor.logout("paused").await, Logout::Unlinked);
        assert_eq!(credentials.load("paused").await.unwrap(), None, "wiped");
        assert!(store.holder("paused").is_none(), "lock released");
        assert_eq!(
            store.fence("paused"),
            2,
            "one more owner: the unlinking connection"
        );
        let mut seen = Vec::new();
        while let Ok(event) = rx.try_recv() {
            seen.push(event);
        }
        let [GatewayEvent::Status(last)] = seen.as_slice() else {
            panic!("only the final status reaches the backend: {seen:?}");
        };
        assert_eq!(last.status, SessionStatus::LoggedOut);
        assert_eq!(last.reason.as_deref(), Some(LOGOUT_REQUESTED));
        assert_eq!(supervisor.logout("paused").await, Logout::NothingToUnlink);

        // Another gateway runs it: that one logs out.
        store.steal("elsewhere", "b", Duration::from_secs(30));
        assert_eq!(supervisor.logout("elsewhere").await, Logout::HeldElsewhere);
        assert!(credentials.load("elsewhere").await.unwrap().unwrap().paired);

        // A gateway that never ran the session (restarted, or it ran elsewhere before) unlinks
        // it from the stored credentials alone.
        tokio::time::sleep(Duration::from_secs(31)).await;
        let (events, _rx) = EventSink::channel(1024);
        let mut opts = options(store.clone(), "c", SupervisorConfig::default());
        opts.credentials = credentials.clone();
        let fresh = Supervisor::with_options(sim(credentials.clone()), events, opts);
        assert_eq!(fresh.logout("elsewhere").await, Logout::Unlinked);
        assert_eq!(credentials.load("elsewhere").await.unwrap(), None);
        assert_eq!(fresh.logout("never-seen").await, Logout::NothingToUnlink);
        assert_eq!(store.fence("never-seen"), 0, "no lock taken for nothing");
        assert_eq!(
            fresh
                .metrics()
                .unlinks
                .get_or_create(&UnlinkLabels { result: "unlinked" })
                .get(),
            1
        );
    }

    /// Stored keys that do not log in within the wait: the unlink fails, the lock is given back
    /// and the credentials are wiped all the same (the session is deleted).
    #[tokio::test(start_paused = true)]
    async fn an_unlink_that_never_logs_in_gives_up_after_the_wait() {
        let stuck = stuck_unlink().await;
        let (supervisor, store, credentials) =
            (&stuck.supervisor, &stuck.store, &stuck.credentials);
        let mut rx = stuck.events;
        let begun = Instant::now();
        let outcome = supervisor.logout("s").await;
        assert!(
            matches!(outcome, Logout::Failed(ref r) if r.contains("not logged in")),
            "{outcome:?}"
        );
        assert_eq!(begun.elapsed(), SupervisorConfig::default().unlink_wait);
        assert!(store.holder("s").is_none());
        assert!(
            stuck.driver.logged_out.lock().unwrap().is_empty(),
            "no logout without a login"
        );
        assert_eq!(credentials.load("s").await.unwrap(), None);
        // The backend hears the session is gone all the same.
        let Ok(GatewayEvent::Status(last)) = rx.try_recv() else {
            panic!("a final status");
        };
        assert_eq!(last.status, SessionStatus::LoggedOut);
    }

    /// Paired credentials, and a supervisor whose driver never logs in.
    struct Stuck {
        supervisor: Arc<Supervisor<TestDriver>>,
        driver: Arc<TestDriver>,
        store: Arc<LocalLockStore>,
        credentials: Arc<MemoryCredentials>,
        events: mpsc::Receiver<GatewayEvent>,
    }

    async fn stuck_unlink() -> Stuck {
        let credentials = Arc::new(MemoryCredentials::new());
        let fence = Fence {
            owner: "old:1".into(),
            token: 1,
        };
        credentials.save_paired("s", &fence).await.unwrap();
        let store = Arc::new(LocalLockStore::new());
        let (sink, events) = EventSink::channel(16);
        let mut opts = options(store.clone(), "a", SupervisorConfig::default());
        opts.credentials = credentials.clone();
        let driver = Arc::new(TestDriver::default());
        let supervisor = Arc::new(Supervisor::with_options(driver.clone(), sink, opts));
        Stuck {
            supervisor,
            driver,
            store,
            credentials,
            events,
        }
    }

    /// The caller of a logout goes away (an HTTP client hanging up on a DELETE): the unlink
    /// still ends within its bounds and gives the lock back, instead of renewing it forever.
    #[tokio::test(start_paused = true)]
    async fn an_abandoned_logout_still_releases_the_lock() {
        let Stuck {
            supervisor,
            store,
            credentials,
            ..
        } = stuck_unlink().await;
        let abandoned = tokio::time::timeout(Duration::from_secs(1), supervisor.logout("s")).await;
        assert!(abandoned.is_err(), "still unlinking after 1 s");
        assert!(
            store.holder("s").is_some(),
            "the unlink holds the lock meanwhile"
        );
        tokio::time::sleep(SupervisorConfig::default().unlink_wait + UNLINK_GRACE).await;
        assert!(store.holder("s").is_none(), "released");
        assert_eq!(credentials.load("s").await.unwrap(), None, "wiped");
        assert_eq!(
            supervisor
                .metrics()
                .unlinks
                .get_or_create(&UnlinkLabels { result: "failed" })
                .get(),
            1
        );
    }

    /// Losing the lock mid-unlink (another owner may exist) ends the unlink's connection at once
    /// and leaves the credentials to whoever holds the lock now.
    #[tokio::test(start_paused = true)]
    async fn an_unlink_stops_when_its_lock_is_lost() {
        let Stuck {
            supervisor,
            store,
            credentials,
            ..
        } = stuck_unlink().await;
        let begun = Instant::now();
        let logout = tokio::spawn({
            let supervisor = supervisor.clone();
            async move { supervisor.logout("s").await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        store.steal("s", "b", Duration::from_secs(30));
        let outcome = logout.await.unwrap();
        assert!(
            matches!(outcome, Logout::Error(ref r) if r.contains("lost")),
            "{outcome:?}"
        );
        assert!(!outcome.is_settled());
        assert!(
            begun.elapsed() < Duration::from_secs(3),
            "{:?}",
            begun.elapsed()
        );
        assert!(credentials.load("s").await.unwrap().unwrap().paired);
        assert!(
            store.holder("s").unwrap().starts_with("b:"),
            "the new owner's lock untouched"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drain_stops_sessions_then_flushes_then_releases_locks() {
        let driver = Arc::new(SimDriver::new(SimConfig::default()).unwrap());
        let (events, mut rx) = EventSink::channel(1024);
        let store = Arc::new(LocalLockStore::new());
        let supervisor = Supervisor::with_options(
            driver,
            events,
            options(store.clone(), "a", SupervisorConfig::default()),
        );
        for id in ["a", "b", "c"] {
            assert!(supervisor.ensure_running(id).await.unwrap());
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let flushed = Arc::new(AtomicBool::new(false));
        let flush = {
            let store = store.clone();
            let flushed = flushed.clone();
            async move {
                // Sessions are stopped and the gate closed, the locks still held.
                let mut events = 0;
                while rx.recv().await.is_some() {
                    events += 1;
                }
                assert!(events >= 3);
                for id in ["a", "b", "c"] {
                    assert!(
                        store.holder(id).is_some(),
                        "{id} still locked while flushing"
                    );
                }
                flushed.store(true, Ordering::SeqCst);
            }
        };
        supervisor.drain(Duration::from_secs(10), flush).await;
        assert!(flushed.load(Ordering::SeqCst));
        for id in ["a", "b", "c"] {
            assert!(store.holder(id).is_none(), "{id} released after the flush");
        }
        assert_eq!(supervisor.live(), 0);
        assert!(matches!(
            supervisor.ensure_running("d").await,
            Err(DriverError::EventSinkClosed)
        ));
    }
}
