//! The `sim` driver: a deterministic, seeded stand-in for WhatsApp, so whole fleets can run for
//! demos, load and tests.
//!
//! A session starts either paired (`connecting`, then `active`) or awaiting a scan (`qr_pending`
//! and rotating QR codes: the first valid 60 s, then 20 s each, six in all, then `inactive` with
//! reason `qr_exhausted`). A QR may be scanned (`active`). Connected sessions drop now and then
//! (`inactive`, reconnecting to `active` shortly after) and rarely log out (`logged_out`).
//! Each session draws from its own RNG seeded from the base seed and its id, so a session's event
//! sequence depends on nothing else.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use super::{DriverError, EventSink, RunningSession, SessionDriver, StopSignal};
use crate::events::{GatewayEvent, Priority, QrEvent, SessionStatus, StatusEvent};

/// Rates and timings of the simulated fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Base seed; each session mixes in a hash of its id.
    pub seed: u64,
    /// Share of sessions that start awaiting a scan rather than already paired.
    pub unpaired_share: f64,
    /// Validity of the first QR code of a pairing cycle.
    pub first_qr_validity: Duration,
    /// Validity of each later QR code.
    pub rotated_qr_validity: Duration,
    /// QR codes shown per pairing cycle before it is exhausted.
    pub qr_codes_per_cycle: u32,
    /// Chance that a shown QR code gets scanned before it expires.
    pub scan_probability: f64,
    /// Pause before a new pairing cycle after one is exhausted or the session logged out; `None`
    /// leaves the session idle instead.
    pub qr_restart_after: Option<Duration>,
    /// Longest time a paired session takes to connect at start.
    pub connect_delay_max: Duration,
    /// Mean time a connection stays up before it drops (exponentially distributed).
    pub mean_connected: Duration,
    /// Reconnect delay after a drop, drawn uniformly from this range.
    pub reconnect_delay_min: Duration,
    pub reconnect_delay_max: Duration,
    /// Chance that a drop is a logout instead.
    pub logout_probability: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 0,
            unpaired_share: 0.2,
            first_qr_validity: Duration::from_secs(60),
            rotated_qr_validity: Duration::from_secs(20),
            qr_codes_per_cycle: 6,
            scan_probability: 0.15,
            qr_restart_after: Some(Duration::from_secs(30)),
            connect_delay_max: Duration::from_secs(2),
            mean_connected: Duration::from_secs(30 * 60),
            reconnect_delay_min: Duration::from_millis(500),
            reconnect_delay_max: Duration::from_secs(5),
            logout_probability: 0.01,
        }
    }
}

impl SimConfig {
    pub fn validate(&self) -> Result<(), DriverError> {
        let shares = [
            ("unpaired_share", self.unpaired_share),
            ("scan_probability", self.scan_probability),
            ("logout_probability", self.logout_probability),
        ];
        for (field, value) in shares {
            if !(0.0..=1.0).contains(&value) {
                return Err(DriverError::InvalidConfig {
                    field,
                    reason: format!("must be between 0 and 1, got {value}"),
                });
            }
        }
        if self.qr_codes_per_cycle == 0 {
            return Err(DriverError::InvalidConfig {
                field: "qr_codes_per_cycle",
                reason: "must be at least 1".into(),
            });
        }
        if self.reconnect_delay_min > self.reconnect_delay_max {
            return Err(DriverError::InvalidConfig {
                field: "reconnect_delay_min",
                reason: "must not exceed reconnect_delay_max".into(),
            });
        }
        if self.mean_connected.is_zero() {
            return Err(DriverError::InvalidConfig {
                field: "mean_connected",
                reason: "must be longer than zero".into(),
            });
        }
        Ok(())
    }
}

/// Broadcast to all sessions: drop the connection within `window`.
#[derive(Debug, Clone, Copy, Default)]
struct Burst {
    window: Duration,
}

/// The simulator. Cheap to share; all sessions read one config.
#[derive(Debug)]
pub struct SimDriver {
    config: Arc<SimConfig>,
    bursts: watch::Sender<Burst>,
}

impl SimDriver {
    pub fn new(config: SimConfig) -> Result<Self, DriverError> {
        config.validate()?;
        Ok(SimDriver {
            config: Arc::new(config),
            bursts: watch::Sender::new(Burst::default()),
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Every connected session drops at a random moment within `window` and then reconnects
    /// after its usual delay, as in a WhatsApp or node outage.
    pub fn trigger_burst(&self, window: Duration) {
        self.bursts.send_replace(Burst { window });
    }
}

impl SessionDriver for SimDriver {
    async fn start(
        &self,
        session_id: &str,
        events: EventSink,
    ) -> Result<RunningSession, DriverError> {
        if events.is_closed() {
            return Err(DriverError::EventSinkClosed);
        }
        let session = SimSession::new(session_id, self.config.clone(), events);
        let bursts = self.bursts.subscribe();
        Ok(RunningSession::spawn(session_id, move |stop| {
            session.run(stop, bursts)
        }))
    }
}

/// What a session does next, at its scheduled time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Announce `qr_pending` and show the first QR code.
    StartPairing,
    ShowQr {
        seq: u32,
    },
    Scanned,
    QrExhausted,
    Connect,
    Disconnect,
    /// Nothing more happens until the session is stopped.
    Idle,
}

const DISCONNECT_REASONS: [&str; 3] = ["connection_lost", "stream_error", "keepalive_timeout"];

struct SimSession {
    id: String,
    rng: StdRng,
    config: Arc<SimConfig>,
    events: EventSink,
}

impl SimSession {
    fn new(id: &str, config: Arc<SimConfig>, events: EventSink) -> Self {
        let rng = StdRng::seed_from_u64(config.seed ^ fnv1a(id.as_bytes()));
        SimSession {
            id: id.to_owned(),
            rng,
            config,
            events,
        }
    }

    async fn run(mut self, mut stop: StopSignal, mut bursts: watch::Receiver<Burst>) {
        let mut bursts_open = true;
        let (mut step, mut at) = if self.rng.random_bool(self.config.unpaired_share) {
            (Step::StartPairing, Instant::now())
        } else {
            let connecting = self.status(SessionStatus::Connecting, Priority::Normal, None);
            if !self.emit(&mut stop, connecting).await {
                return;
            }
            let delay = self.uniform(Duration::ZERO, self.config.connect_delay_max);
            (Step::Connect, Instant::now() + delay)
        };
        loop {
            tokio::select! {
                biased;
                () = &mut stop => return,
                changed = bursts.changed(), if bursts_open => {
                    if changed.is_err() {
                        // The driver is gone; no more bursts can come.
                        bursts_open = false;
                    } else if step == Step::Disconnect {
                        let window = bursts.borrow_and_update().window;
                        at = Instant::now() + self.uniform(Duration::ZERO, window);
                    }
                }
                () = sleep_until(at), if step != Step::Idle => {
                    let Some((next, delay)) = self.perform(step, &mut stop).await else {
                        return;
                    };
                    step = next;
                    at = Instant::now() + delay;
                }
            }
        }
    }

    /// Emits what `step` means and returns the next step and how long until it. `None` when the
    /// session must end (stopped, or the gateway is gone).
    async fn perform(&mut self, step: Step, stop: &mut StopSignal) -> Option<(Step, Duration)> {
        let config = self.config.clone();
        let (event, next) = match step {
            Step::StartPairing => {
                let pending = self.status(SessionStatus::QrPending, Priority::Normal, None);
                (pending, (Step::ShowQr { seq: 1 }, Duration::ZERO))
            }
            Step::ShowQr { seq } => {
                let validity = if seq == 1 {
                    config.first_qr_validity
                } else {
                    config.rotated_qr_validity
                };
                let code = self.qr_code(seq);
                let qr = GatewayEvent::Qr(QrEvent::new(self.id.as_str(), code, seq, validity));
                let next = if self.rng.random_bool(config.scan_probability) {
                    (Step::Scanned, self.uniform(Duration::ZERO, validity))
                } else if seq < config.qr_codes_per_cycle {
                    (Step::ShowQr { seq: seq + 1 }, validity)
                } else {
                    (Step::QrExhausted, validity)
                };
                (qr, next)
            }
            Step::Scanned | Step::Connect => {
                let active = self.status(SessionStatus::Active, Priority::High, None);
                (active, (Step::Disconnect, self.connected_for()))
            }
            Step::QrExhausted => {
                let exhausted = self.status(
                    SessionStatus::Inactive,
                    Priority::High,
                    Some("qr_exhausted"),
                );
                (exhausted, self.after_pairing_ends())
            }
            Step::Disconnect => {
                if self.rng.random_bool(config.logout_probability) {
                    let logged_out =
                        self.status(SessionStatus::LoggedOut, Priority::High, Some("logged_out"));
                    (logged_out, self.after_pairing_ends())
                } else {
                    let reason =
                        DISCONNECT_REASONS[self.rng.random_range(0..DISCONNECT_REASONS.len())];
                    let dropped =
                        self.status(SessionStatus::Inactive, Priority::High, Some(reason));
                    let delay =
                        self.uniform(config.reconnect_delay_min, config.reconnect_delay_max);
                    (dropped, (Step::Connect, delay))
                }
            }
            Step::Idle => return Some((Step::Idle, Duration::ZERO)),
        };
        self.emit(stop, event).await.then_some(next)
    }

    fn after_pairing_ends(&self) -> (Step, Duration) {
        match self.config.qr_restart_after {
            Some(pause) => (Step::StartPairing, pause),
            None => (Step::Idle, Duration::ZERO),
        }
    }

    /// Emits unless stopped first; false when the session must end.
    async fn emit(&self, stop: &mut StopSignal, event: GatewayEvent) -> bool {
        tokio::select! {
            biased;
            () = stop => false,
            sent = self.events.emit(event) => sent.is_ok(),
        }
    }

    fn status(
        &self,
        status: SessionStatus,
        priority: Priority,
        reason: Option<&str>,
    ) -> GatewayEvent {
        StatusEvent::new(
            self.id.as_str(),
            status,
            priority,
            reason.map(str::to_owned),
        )
        .into()
    }

    /// Looks like a WhatsApp pairing string (ref, keys), and is unique per session and rotation.
    fn qr_code(&mut self, seq: u32) -> String {
        let [a, b, c, d] = self.rng.random::<[u64; 4]>();
        format!("2@{a:016x}{b:016x},{c:016x},{d:016x},{seq}")
    }

    fn connected_for(&mut self) -> Duration {
        // Exponential: drops are memoryless, like network failures.
        let survival: f64 = 1.0 - self.rng.random::<f64>();
        self.config.mean_connected.mul_f64(-survival.ln())
    }

    fn uniform(&mut self, min: Duration, max: Duration) -> Duration {
        if max <= min {
            min
        } else {
            self.rng.random_range(min..=max)
        }
    }
}

/// A hash that is stable across Rust releases and platforms, unlike `DefaultHasher`, so a seed
/// replays the same fleet everywhere.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a test compares: when (since start) and what, without wall-clock fields.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Seen {
        Status(SessionStatus, Option<String>),
        Qr {
            seq: u32,
            valid_for: Duration,
            code: String,
        },
    }

    fn seen(event: GatewayEvent) -> Seen {
        match event {
            GatewayEvent::Status(status) => Seen::Status(status.status, status.reason),
            GatewayEvent::Qr(qr) => Seen::Qr {
                seq: qr.seq,
                valid_for: qr.valid_until - qr.created,
                code: qr.code,
            },
        }
    }

    /// Runs one session for `run_for` of virtual time and returns its events with their times.
    async fn record(
        config: SimConfig,
        session_id: &str,
        run_for: Duration,
    ) -> Vec<(Duration, Seen)> {
        let driver = SimDriver::new(config).unwrap();
        let (sink, mut rx) = EventSink::channel(1024);
        let started = Instant::now();
        let session = driver.start(session_id, sink).await.unwrap();
        tokio::time::sleep(run_for).await;
        session.stop().await;
        let mut events = Vec::new();
        while let Some(event) = rx.recv().await {
            events.push((event.created() - started, seen(event)));
        }
        events
    }

    fn awaiting_scan() -> SimConfig {
        SimConfig {
            unpaired_share: 1.0,
            scan_probability: 0.0,
            qr_restart_after: None,
            ..SimConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn qr_rotates_six_times_then_is_exhausted() {
        let events = record(awaiting_scan(), "s-1", Duration::from_secs(600)).await;
        let timeline: Vec<_> = events
            .iter()
            .map(|(at, seen)| match seen {
                Seen::Status(status, reason) => (at.as_secs(), status.as_str(), reason.clone(), 0),
                Seen::Qr { seq, valid_for, .. } => (
                    at.as_secs(),
                    "qr",
                    None,
                    valid_for.as_secs() * 10 + u64::from(*seq),
                ),
            })
            .collect();
        let exhausted = Some("qr_exhausted".to_owned());
        assert_eq!(
            timeline,
            [
                (0, "qr_pending", None, 0),
                (0, "qr", None, 601),
                (60, "qr", None, 202),
                (80, "qr", None, 203),
                (100, "qr", None, 204),
                (120, "qr", None, 205),
                (140, "qr", None, 206),
                (160, "inactive", exhausted, 0),
            ]
        );
        let codes: std::collections::HashSet<_> = events
            .iter()
            .filter_map(|(_, seen)| match seen {
                Seen::Qr { code, .. } => Some(code),
                Seen::Status(..) => None,
            })
            .collect();
        assert_eq!(codes.len(), 6, "each rotation shows a new code");
    }

    #[tokio::test(start_paused = true)]
    async fn qr_cycle_restarts_after_pause() {
        let config = SimConfig {
            qr_restart_after: Some(Duration::from_secs(30)),
            ..awaiting_scan()
        };
        let events = record(config, "s-1", Duration::from_secs(200)).await;
        assert_eq!(events[8].0, Duration::from_secs(190));
        assert_eq!(events[8].1, Seen::Status(SessionStatus::QrPending, None));
        assert!(matches!(events[9].1, Seen::Qr { seq: 1, .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn same_seed_gives_same_events() {
        let config = SimConfig {
            unpaired_share: 0.5,
            scan_probability: 0.3,
            mean_connected: Duration::from_secs(120),
            logout_probability: 0.1,
            ..SimConfig::default()
        };
        let hour = Duration::from_secs(3600);
        for id in ["a", "b", "c", "d"] {
            let first = record(config.clone(), id, hour).await;
            let again = record(config.clone(), id, hour).await;
            assert!(
                first.len() > 10,
                "{id}: too few events to compare: {first:?}"
            );
            assert_eq!(first, again, "{id}");
            let other_seed = SimConfig {
                seed: 1,
                ..config.clone()
            };
            assert_ne!(first, record(other_seed, id, hour).await, "{id}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn paired_session_connects_drops_and_reconnects() {
        let config = SimConfig {
            unpaired_share: 0.0,
            mean_connected: Duration::from_secs(60),
            logout_probability: 0.0,
            ..SimConfig::default()
        };
        let events = record(config, "s-1", Duration::from_secs(3600)).await;
        assert_eq!(events[0].1, Seen::Status(SessionStatus::Connecting, None));
        assert!(events[1].0 <= Duration::from_secs(2));
        let statuses: Vec<_> = events[1..]
            .iter()
            .map(|(_, seen)| match seen {
                Seen::Status(status, _) => *status,
                Seen::Qr { .. } => panic!("paired session showed a QR"),
            })
            .collect();
        assert!(statuses.len() > 20);
        for (i, status) in statuses.iter().enumerate() {
            let expected = if i % 2 == 0 {
                SessionStatus::Active
            } else {
                SessionStatus::Inactive
            };
            assert_eq!(*status, expected, "event {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_the_session_task() {
        let driver = SimDriver::new(awaiting_scan()).unwrap();
        let (sink, mut rx) = EventSink::channel(16);
        let session = driver.start("s-1", sink).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!session.is_finished());
        session.stop().await;
        let mut count = 0;
        // The channel closes once the task, the only sender, is gone.
        while rx.recv().await.is_some() {
            count += 1;
        }
        assert_eq!(count, 2, "qr_pending and the first QR");
    }

    #[tokio::test(start_paused = true)]
    async fn burst_drops_every_connected_session_within_window() {
        let config = SimConfig {
            unpaired_share: 0.0,
            mean_connected: Duration::from_secs(24 * 3600),
            logout_probability: 0.0,
            ..SimConfig::default()
        };
        let driver = SimDriver::new(config).unwrap();
        let (sink, mut rx) = EventSink::channel(4096);
        let mut sessions = Vec::new();
        for i in 0..200 {
            sessions.push(driver.start(&format!("s-{i}"), sink.clone()).await.unwrap());
        }
        drop(sink);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let mut before = 0;
        while rx.try_recv().is_ok() {
            before += 1;
        }
        assert_eq!(before, 400, "connecting and active for each session");

        let burst_at = Instant::now();
        driver.trigger_burst(Duration::from_secs(1));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let mut dropped = 0;
        let mut reconnected = 0;
        while let Ok(event) = rx.try_recv() {
            let GatewayEvent::Status(status) = event else {
                panic!("QR from a paired session");
            };
            let since_burst = status.created - burst_at;
            match status.status {
                SessionStatus::Inactive => {
                    assert!(since_burst <= Duration::from_secs(1));
                    dropped += 1;
                }
                SessionStatus::Active => {
                    assert!(since_burst <= Duration::from_secs(6));
                    reconnected += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((dropped, reconnected), (200, 200));
        for session in sessions {
            session.stop().await;
        }
    }

    #[test]
    fn session_task_state_is_small() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let (sink, _rx) = EventSink::channel(1);
        let driver = SimDriver::new(SimConfig::default()).unwrap();
        let session = SimSession::new("a-session-id", driver.config.clone(), sink);
        let (_stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let stop = StopSignal {
            rx: stop_rx,
            logout: false,
        };
        let task = session.run(stop, driver.bursts.subscribe());
        let size = std::mem::size_of_val(&task);
        assert!(size <= 2048, "session task is {size} bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn ten_thousand_sessions_run_in_one_process() {
        let driver = SimDriver::new(SimConfig::default()).unwrap();
        let (sink, mut rx) = EventSink::channel(1024);
        let counter = tokio::spawn(async move {
            let mut counts = (0u64, 0u64);
            while let Some(event) = rx.recv().await {
                match event {
                    GatewayEvent::Qr(_) => counts.0 += 1,
                    GatewayEvent::Status(_) => counts.1 += 1,
                }
            }
            counts
        });
        let mut sessions = Vec::with_capacity(10_000);
        for i in 0..10_000 {
            sessions.push(driver.start(&format!("s-{i}"), sink.clone()).await.unwrap());
        }
        drop(sink);
        tokio::time::sleep(Duration::from_secs(120)).await;
        for session in sessions {
            session.stop().await;
        }
        let (qr_codes, statuses) = counter.await.unwrap();
        // About 2,000 start unpaired and show a QR at 0, 60, 80, 100 and 120 s, fewer as some
        // get scanned (15% per code).
        assert!((5_000..10_000).contains(&qr_codes), "{qr_codes} QR codes");
        assert!(statuses >= 18_000, "{statuses} statuses");
    }

    #[test]
    fn invalid_config_names_the_field() {
        let config = SimConfig {
            scan_probability: 1.5,
            ..SimConfig::default()
        };
        let err = SimDriver::new(config).unwrap_err();
        assert!(err.to_string().contains("scan_probability"), "{err}");
    }
}
