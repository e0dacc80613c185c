//! The `whatsapp` driver: real WhatsApp sessions on `whatsapp-rust` 0.7.
//!
//! One [`Bot`] per running session, built anew on every start: 0.7.0 leaves a dead connection
//! when a running client is disconnected and connected again (see the crate notes), so a restart
//! never reuses a client. The client's events are mapped onto the gateway's by [`EventMapper`]:
//!
//! | client event | gateway event |
//! |---|---|
//! | `PairingQrCode { code, timeout }` | `qr_pending` (on the first code of a cycle), then a QR (`seq` = rotation number, valid for `timeout`) |
//! | `PairSuccess`, `Connected` | high-priority `active` |
//! | `Disconnected` | high-priority `inactive`, reason `disconnected: ...` |
//! | `StreamReplaced` | high-priority `inactive`, reason `stream_replaced` |
//! | `LoggedOut` | high-priority `logged_out`, reason `logged_out: ...` |
//! | `PairingQrCodesExhausted` | high-priority `inactive`, reason `qr_exhausted` |
//! | `TemporaryBan` | high-priority `banned`, reason `temporary_ban: ...` |
//! | `ConnectFailure`, `PairError`, `ClientOutdated` | high-priority `inactive` with a reason |
//!
//! There is no "connecting" event in the client: the driver reports `connecting` itself when it
//! starts a bot.
//!
//! Storage: with [`WhatsappDriver::with_redis_store`], each session's keys live in Redis
//! ([`RedisStore`]), every write fenced by the owner's lock token, so a restart or a move to
//! another gateway reconnects without a new scan. Without Redis, a fresh [`InMemoryBackend`] per
//! start (a restarted session pairs again).
//!
//! Sessions whose resource asks for `login.method: pairingCode` get the client's pairing-code
//! flow: the 8-character code goes to the QR endpoint as `"type": "pairing_code"`, refreshed when
//! the server voids it; the client's QR codes are not forwarded for them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use whatsapp_rust::bot::{Bot, BotHandle};
use whatsapp_rust::pair_code::PairCodeOptions;
use whatsapp_rust::transport::TokioWebSocketTransportFactory;
use whatsapp_rust::wacore::store::InMemoryBackend;
use whatsapp_rust::wacore::store::traits::Backend;
use whatsapp_rust::wacore::types::events::{Event, EventHandler, EventInterest, EventKind};

use super::credentials::Fence;
use super::wa_store::RedisStore;
use super::{DriverError, EventSink, LoginDirectory, RunningSession, SessionDriver, StopSignal};
use crate::events::{GatewayEvent, Priority, QrEvent, SessionStatus, StatusEvent};

/// How the driver reaches WhatsApp.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WhatsappConfig {
    /// WebSocket URL of the chat server; `None` is WhatsApp's own. Tests point it at the fake
    /// server in `tests/` (which needs the `fake-server-tests` feature).
    pub ws_url: Option<String>,
    /// Client version to announce; `None` fetches the current one over HTTP at each start.
    pub version: Option<(u32, u32, u32)>,
    /// How long a stop waits for the client to flush and disconnect before aborting it.
    pub shutdown_timeout: Duration,
}

impl WhatsappConfig {
    /// WhatsApp's own server, with the current client version fetched at start.
    pub fn production() -> Self {
        WhatsappConfig {
            ws_url: None,
            version: None,
            shutdown_timeout: Duration::from_secs(5),
        }
    }

    pub fn validate(&self) -> Result<(), DriverError> {
        if let Some(url) = &self.ws_url
            && !(url.starts_with("ws://") || url.starts_with("wss://"))
        {
            return Err(DriverError::InvalidConfig {
                field: "ws_url",
                reason: format!("must be a ws:// or wss:// URL, got {url:?}"),
            });
        }
        if self.shutdown_timeout.is_zero() {
            return Err(DriverError::InvalidConfig {
                field: "shutdown_timeout",
                reason: "must be longer than zero".into(),
            });
        }
        Ok(())
    }
}

/// Runs sessions on `whatsapp-rust`. Cheap to share.
#[derive(Debug)]
pub struct WhatsappDriver {
    config: Arc<WhatsappConfig>,
    /// Where session keys live: Redis (fenced per owner) when set, else memory per start.
    store: Option<fred::clients::Client>,
    logins: LoginDirectory,
}

impl WhatsappDriver {
    pub fn new(config: WhatsappConfig) -> Result<Self, DriverError> {
        config.validate()?;
        Ok(WhatsappDriver {
            config: Arc::new(config),
            store: None,
            logins: LoginDirectory::default(),
        })
    }

    /// Keeps every session's keys in Redis, so a restart or a move to another gateway
    /// reconnects without a new scan. Writes are fenced by the owner's lock token.
    pub fn with_redis_store(mut self, client: fred::clients::Client) -> Self {
        self.store = Some(client);
        self
    }

    /// Where the driver learns how each session links (QR or pairing code).
    pub fn with_logins(mut self, logins: LoginDirectory) -> Self {
        self.logins = logins;
        self
    }

    pub fn config(&self) -> &WhatsappConfig {
        &self.config
    }

    async fn start_with(
        &self,
        session_id: &str,
        events: EventSink,
        fence: Option<&Fence>,
    ) -> Result<RunningSession, DriverError> {
        let session_id = session_id.to_owned();
        let config = Arc::clone(&self.config);
        events
            .emit(StatusEvent::new(
                &session_id,
                SessionStatus::Connecting,
                Priority::Normal,
                None,
            ))
            .await?;
        let Storage {
            backend,
            redis: redis_store,
        } = self.backend_for(&session_id, fence)?;
        let pair_code = pair_code_options(&self.logins.get(&session_id));
        let (tx, rx) = mpsc::unbounded_channel();
        let bot = build_bot(&config, backend, pair_code.clone(), tx)
            .await
            .map_err(|reason| DriverError::StartFailed {
                session_id: session_id.clone(),
                reason,
            })?;
        let handle = bot.spawn();
        let task_id = session_id.clone();
        Ok(RunningSession::spawn(session_id, move |stop| {
            let session = SessionTask {
                session_id: task_id,
                config,
                pair_code,
                redis_store,
            };
            run_session(session, handle, rx, events, stop)
        }))
    }

    fn backend_for(&self, session_id: &str, fence: Option<&Fence>) -> Result<Storage, DriverError> {
        match (&self.store, fence) {
            (Some(client), Some(fence)) => {
                let store = Arc::new(RedisStore::new(client.clone(), session_id, fence.clone()));
                Ok(Storage {
                    backend: store.clone(),
                    redis: Some(store),
                })
            }
            // Never run a Redis-backed session without ownership: its writes could not be fenced.
            (Some(_), None) => Err(DriverError::StartFailed {
                session_id: session_id.to_owned(),
                reason: "the Redis store needs the session's ownership lock (fencing token)".into(),
            }),
            (None, _) => Ok(Storage {
                backend: Arc::new(InMemoryBackend::new()),
                redis: None,
            }),
        }
    }
}

/// The client's pairing-code request for a session that links by phone number.
fn pair_code_options(login: &crds::Login) -> Option<PairCodeOptions> {
    match (login.method, &login.phone_number) {
        (crds::LoginMethod::PairingCode, Some(phone)) => Some(PairCodeOptions {
            // The client wants digits only; the resource allows a leading `+` (E.164).
            phone_number: phone.trim_start_matches('+').to_owned(),
            ..PairCodeOptions::default()
        }),
        _ => None,
    }
}

impl SessionDriver for WhatsappDriver {
    async fn start(
        &self,
        session_id: &str,
        events: EventSink,
    ) -> Result<RunningSession, DriverError> {
        self.start_with(session_id, events, None).await
    }

    async fn start_owned(
        &self,
        session_id: &str,
        events: EventSink,
        fence: Option<&Fence>,
    ) -> Result<RunningSession, DriverError> {
        self.start_with(session_id, events, fence).await
    }

    /// Deregisters the device as soon as the stored keys have logged in (`<success>`), without
    /// waiting for `Connected`, which comes only after the app-state sync: the deregistration IQ
    /// needs an authenticated socket and nothing more. Sent directly rather than through
    /// `Client::logout`, which does not say whether the server accepted it. Whatever the
    /// outcome, the keys are wiped: the session is going away. Returns within `wait` + 4 s.
    async fn unlink(
        &self,
        session_id: &str,
        fence: Option<&Fence>,
        wait: Duration,
    ) -> Result<super::Unlink, DriverError> {
        use whatsapp_rust::wacore::iq::devices::RemoveCompanionDeviceSpec;
        let failed = |reason: String| DriverError::UnlinkFailed {
            session_id: session_id.to_owned(),
            reason,
        };
        if self.store.is_none() {
            // Keys in memory live only as long as one run: a session that does not run has none.
            return Ok(super::Unlink::NotLinked);
        }
        let Storage { backend, redis } = self.backend_for(session_id, fence)?;
        // No pairing-code request: this connection only logs in with the stored keys.
        let (tx, mut signals) = mpsc::unbounded_channel();
        let bot = build_bot(&self.config, backend, None, tx)
            .await
            .map_err(failed)?;
        // Dropped (the caller gave up, or lost the lock) means the connection ends at once.
        let mut handle = EndOnDrop {
            handle: bot.spawn(),
            ended: false,
        };
        let client = handle.handle.client();
        let deadline = tokio::time::Instant::now() + wait;
        // The client's task ended (it must not be polled again).
        let mut client_ended = false;
        let linked = loop {
            if client.is_logged_in() {
                break Some(true);
            }
            tokio::select! {
                // Signals first: a 401 at connect sends `LoggedOut` and then ends the client.
                biased;
                signal = signals.recv() => match signal {
                    // A code to scan, or a 401: the phone unlinked the device already.
                    Some(Signal::Qr { .. } | Signal::LoggedOut(_)) => break Some(false),
                    Some(Signal::Connected) => break Some(true),
                    Some(_) => {}
                    None => break None,
                },
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                () = tokio::time::sleep_until(deadline) => break None,
                () = &mut handle.handle => {
                    client_ended = true;
                    break None;
                }
            }
        };
        let outcome = match linked {
            Some(true) => match client.pn() {
                Some(jid) => match tokio::time::timeout(
                    UNLINK_IQ_TIMEOUT,
                    client.execute(RemoveCompanionDeviceSpec::new(&jid)),
                )
                .await
                {
                    Ok(Ok(())) => Ok(super::Unlink::Unlinked),
                    Ok(Err(err)) => Err(failed(format!("deregistration refused: {err}"))),
                    Err(_) => Err(failed("deregistration timed out".into())),
                },
                None => Err(failed("logged in without a phone number JID".into())),
            },
            Some(false) => Ok(super::Unlink::NotLinked),
            None => Err(failed(format!("not logged in within {wait:?}"))),
        };
        // The outcome is settled; what follows only tidies up, within a second.
        if tokio::time::timeout(UNLINK_DISCONNECT_TIMEOUT, client.disconnect())
            .await
            .is_err()
        {
            tracing::warn!(%session_id, "whatsapp client did not disconnect in time; aborting it");
        } else {
            handle.ended = true;
        }
        if !client_ended {
            let _ = tokio::time::timeout(UNLINK_DISCONNECT_TIMEOUT, &mut handle.handle).await;
        }
        drop(handle);
        // After the client is gone, so none of its late writes brings a key back.
        if let Some(store) = &redis
            && let Err(err) = store.wipe().await
        {
            tracing::warn!(%session_id, %err, "unlinking: wiping the session keys failed");
        }
        outcome
    }
}

/// How long an unlink waits for the server to accept the deregistration, once logged in.
const UNLINK_IQ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an unlink waits for the client to disconnect before aborting it.
const UNLINK_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Ends the client when dropped: `BotHandle::abort` alone stops only its run loop, while the
/// keepalive and the post-login tasks hold the client and its socket open.
struct EndOnDrop {
    handle: BotHandle,
    /// Disconnected already.
    ended: bool,
}

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        if !self.ended {
            let client = self.handle.client();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(UNLINK_DISCONNECT_TIMEOUT, client.disconnect()).await;
            });
        }
        self.handle.abort();
    }
}

async fn build_bot(
    config: &WhatsappConfig,
    backend: Arc<dyn Backend>,
    pair_code: Option<PairCodeOptions>,
    signals: mpsc::UnboundedSender<Signal>,
) -> Result<Bot, String> {
    let mut transport = TokioWebSocketTransportFactory::new();
    if let Some(url) = &config.ws_url {
        transport = transport.with_url(url.clone());
    }
    let mut builder = Bot::builder()
        .with_backend_arc(backend)
        .with_transport_factory(transport)
        .with_event_handler(Forward {
            signals,
            pairing_code: pair_code.is_some(),
        });
    if let Some(version) = config.version {
        builder = builder.with_version(version);
    }
    if let Some(options) = pair_code {
        builder = builder.with_pair_code(options);
    }
    builder.build().await.map_err(|err| err.to_string())
}

/// Runs inline on the client's dispatch path, so signals keep the client's event order.
struct Forward {
    signals: mpsc::UnboundedSender<Signal>,
    /// The session links by pairing code: the client's QR codes (it shows both) are not
    /// forwarded, or a rotating QR would replace the unsent pairing code in the QR lane.
    pairing_code: bool,
}

impl EventHandler for Forward {
    fn handle_event(&self, event: Arc<Event>) {
        if let Some(signal) = Signal::from_event(&event) {
            // A pairing-code session shows no QR code, and the hidden QR codes running out
            // while the client keeps the connection for the code is no news either.
            if self.pairing_code
                && matches!(
                    signal,
                    Signal::Qr { .. }
                        | Signal::QrExhausted {
                            still_connected: true
                        }
                )
            {
                return;
            }
            // The session task may be gone already; then nobody cares.
            let _ = self.signals.send(signal);
        }
    }

    fn interest(&self) -> EventInterest {
        EventInterest::of(&[
            EventKind::PairingQrCode,
            EventKind::PairingQrCodesExhausted,
            EventKind::PairingCode,
            EventKind::PairingCodeRefresh,
            EventKind::PairingCodeError,
            EventKind::PairSuccess,
            EventKind::PairError,
            EventKind::Connected,
            EventKind::Disconnected,
            EventKind::LoggedOut,
            EventKind::StreamReplaced,
            EventKind::TemporaryBan,
            EventKind::ConnectFailure,
            EventKind::ClientOutdated,
        ])
    }
}

async fn sleep_until_or_never(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One running session's own settings.
struct SessionTask {
    session_id: String,
    config: Arc<WhatsappConfig>,
    /// Set for sessions that link by pairing code (refreshes ask for a new one).
    pair_code: Option<PairCodeOptions>,
    /// The Redis store, to wipe on logout.
    redis_store: Option<Arc<RedisStore>>,
}

/// A session's key store: what the client uses, and the Redis store behind it when there is one.
struct Storage {
    backend: Arc<dyn Backend>,
    redis: Option<Arc<RedisStore>>,
}

async fn run_session(
    task: SessionTask,
    mut handle: BotHandle,
    mut signals: mpsc::UnboundedReceiver<Signal>,
    events: EventSink,
    mut stop: StopSignal,
) {
    let SessionTask {
        session_id,
        config,
        pair_code,
        redis_store,
    } = task;
    let mut mapper = EventMapper::new(session_id.clone());
    // When the pairing code on display stops working. The client keeps the connection past it
    // and asks for nothing, so the driver ends the session then, as an exhausted QR cycle does:
    // the supervisor restarts it after its backoff and the user gets a fresh code.
    let mut code_expires: Option<tokio::time::Instant> = None;
    let stopped = 'run: loop {
        tokio::select! {
            biased;
            () = &mut stop => break true,
            () = sleep_until_or_never(code_expires) => {
                for event in mapper.map(Signal::PairingCodeExpired) {
                    let _ = events.emit(event).await;
                }
                break true;
            }
            signal = signals.recv() => {
                let Some(signal) = signal else { break false };
                match &signal {
                    Signal::PairingCode { timeout, .. } => {
                        code_expires = Some(tokio::time::Instant::now() + *timeout);
                    }
                    Signal::Paired | Signal::Connected => code_expires = None,
                    _ => {}
                }
                if signal == Signal::PairingCodeRefresh
                    && let Some(options) = pair_code.clone()
                {
                    // The old code is void; ask for a new one (it arrives as a signal).
                    let client = handle.client();
                    tokio::spawn(async move {
                        if let Err(err) = client.pair_with_code(options).await {
                            tracing::warn!(%err, "pairing code refresh failed");
                        }
                    });
                }
                let logged_out = matches!(signal, Signal::LoggedOut(_));
                for event in mapper.map(signal) {
                    if events.emit(event).await.is_err() {
                        // The gateway is gone: nobody to report to, so stop the client.
                        break 'run true;
                    }
                }
                if logged_out && let Some(store) = &redis_store {
                    // The device is unlinked: its keys are worthless and must not linger.
                    match store.wipe().await {
                        Ok(keys) => tracing::info!(%session_id, keys, "logged out: session keys wiped"),
                        Err(err) => tracing::warn!(%session_id, %err, "logged out: wiping the session keys failed"),
                    }
                }
            }
            () = &mut handle => break false,
        }
    };
    if stopped {
        let client = handle.client();
        if stop.wants_logout() {
            // Unlink the device from the user's phone, then forget its keys.
            match tokio::time::timeout(config.shutdown_timeout, client.logout()).await {
                Ok(()) => tracing::info!(%session_id, "logged out"),
                Err(_) => tracing::warn!(%session_id, "logout timed out"),
            }
            if let Some(store) = &redis_store
                && let Err(err) = store.wipe().await
            {
                tracing::warn!(%session_id, %err, "wiping the session keys failed");
            }
        }
        if tokio::time::timeout(config.shutdown_timeout, client.disconnect())
            .await
            .is_err()
        {
            tracing::warn!(%session_id, "whatsapp client did not disconnect in time; aborting it");
        }
        handle.abort();
        return;
    }
    // The client ended by itself (logout, exhausted QR codes, ...): report what it said last.
    while let Ok(signal) = signals.try_recv() {
        for event in mapper.map(signal) {
            let _ = events.emit(event).await;
        }
    }
    if let Some(event) = mapper.client_stopped() {
        let _ = events.emit(event).await;
    }
}

/// What the driver takes from one client event: the parts the gateway reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    Qr {
        code: String,
        timeout: Duration,
    },
    PairingCode {
        code: String,
        timeout: Duration,
    },
    PairingCodeRefresh,
    PairingCodeError(String),
    /// `still_connected`: the client kept the connection up because a pairing code is
    /// outstanding (only the hidden QR codes ran out).
    QrExhausted {
        still_connected: bool,
    },
    /// The pairing code on display expired without being typed (the driver's own deadline).
    PairingCodeExpired,
    Paired,
    PairError(String),
    Connected,
    Disconnected(String),
    LoggedOut(String),
    StreamReplaced,
    TemporaryBan(String),
    ConnectFailure(String),
    ClientOutdated,
}

impl Signal {
    pub fn from_event(event: &Event) -> Option<Signal> {
        Some(match event {
            Event::PairingQrCode(qr) => Signal::Qr {
                code: qr.code.clone(),
                timeout: qr.timeout,
            },
            Event::PairingQrCodesExhausted(exhausted) => Signal::QrExhausted {
                still_connected: !exhausted.disconnected,
            },
            Event::PairingCode(pc) => Signal::PairingCode {
                code: pc.code.clone(),
                timeout: pc.timeout,
            },
            Event::PairingCodeRefresh(_) => Signal::PairingCodeRefresh,
            Event::PairingCodeError(err) => Signal::PairingCodeError(err.error.clone()),
            Event::PairSuccess(_) => Signal::Paired,
            Event::PairError(err) => Signal::PairError(err.error.clone()),
            Event::Connected(_) => Signal::Connected,
            Event::Disconnected(disconnected) => {
                Signal::Disconnected(disconnected.reason.to_string())
            }
            Event::LoggedOut(logged_out) => Signal::LoggedOut(format!("{:?}", logged_out.reason)),
            Event::StreamReplaced(_) => Signal::StreamReplaced,
            Event::TemporaryBan(ban) => {
                Signal::TemporaryBan(format!("{} for {}s", ban.code, ban.expire.num_seconds()))
            }
            Event::ConnectFailure(failure) => {
                Signal::ConnectFailure(format!("{:?}", failure.reason))
            }
            Event::ClientOutdated(_) => Signal::ClientOutdated,
            _ => return None,
        })
    }
}

/// Turns a session's [`Signal`]s into gateway events: numbers QR rotations within a pairing
/// cycle and reports `qr_pending` once per cycle.
#[derive(Debug)]
pub struct EventMapper {
    session_id: String,
    /// QR codes shown in the current pairing cycle.
    qr_seq: u32,
    /// The last status reported.
    status: SessionStatus,
}

impl EventMapper {
    pub fn new(session_id: impl Into<String>) -> Self {
        EventMapper {
            session_id: session_id.into(),
            qr_seq: 0,
            status: SessionStatus::Connecting,
        }
    }

    pub fn status(&self) -> SessionStatus {
        self.status
    }

    pub fn map(&mut self, signal: Signal) -> Vec<GatewayEvent> {
        let (status, reason) = match signal {
            Signal::Qr { code, timeout } => {
                return self.link_code(QrEvent::new(&self.session_id, code, 0, timeout));
            }
            Signal::PairingCode { code, timeout } => {
                return self.link_code(QrEvent::pairing_code(&self.session_id, code, 0, timeout));
            }
            // The driver asks for a new code; the code itself reports the change.
            Signal::PairingCodeRefresh => return Vec::new(),
            Signal::PairingCodeError(err) => (
                SessionStatus::Inactive,
                Some(format!("pairing_code_error: {err}")),
            ),
            Signal::Paired | Signal::Connected => {
                if self.status == SessionStatus::Active {
                    return Vec::new();
                }
                (SessionStatus::Active, None)
            }
            Signal::QrExhausted { .. } => {
                (SessionStatus::Inactive, Some("qr_exhausted".to_owned()))
            }
            Signal::PairingCodeExpired => (
                SessionStatus::Inactive,
                Some("pairing_code_expired".to_owned()),
            ),
            Signal::PairError(err) => (SessionStatus::Inactive, Some(format!("pair_error: {err}"))),
            Signal::Disconnected(reason) => (
                SessionStatus::Inactive,
                Some(format!("disconnected: {reason}")),
            ),
            Signal::StreamReplaced => (SessionStatus::Inactive, Some("stream_replaced".to_owned())),
            Signal::LoggedOut(reason) => (
                SessionStatus::LoggedOut,
                Some(format!("logged_out: {reason}")),
            ),
            Signal::TemporaryBan(reason) => (
                SessionStatus::Banned,
                Some(format!("temporary_ban: {reason}")),
            ),
            Signal::ConnectFailure(reason) => (
                SessionStatus::Inactive,
                Some(format!("connect_failure: {reason}")),
            ),
            Signal::ClientOutdated => (SessionStatus::Inactive, Some("client_outdated".to_owned())),
        };
        vec![self.status_event(status, Priority::High, reason)]
    }

    /// A QR or pairing code: `qr_pending` on the first code of a cycle, then the code numbered
    /// within the cycle.
    fn link_code(&mut self, mut code: QrEvent) -> Vec<GatewayEvent> {
        let mut events = Vec::with_capacity(2);
        if self.status != SessionStatus::QrPending {
            self.qr_seq = 0;
            events.push(self.status_event(SessionStatus::QrPending, Priority::Normal, None));
        }
        self.qr_seq += 1;
        code.seq = self.qr_seq;
        events.push(code.into());
        events
    }

    /// The final status when the client ended by itself without one.
    pub fn client_stopped(&mut self) -> Option<GatewayEvent> {
        match self.status {
            SessionStatus::Active | SessionStatus::Connecting | SessionStatus::QrPending => {
                Some(self.status_event(
                    SessionStatus::Inactive,
                    Priority::High,
                    Some("client_stopped".to_owned()),
                ))
            }
            SessionStatus::Inactive | SessionStatus::LoggedOut | SessionStatus::Banned => None,
        }
    }

    fn status_event(
        &mut self,
        status: SessionStatus,
        priority: Priority,
        reason: Option<String>,
    ) -> GatewayEvent {
        self.status = status;
        StatusEvent::new(&self.session_id, status, priority, reason).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses(events: &[GatewayEvent]) -> Vec<(SessionStatus, Priority, Option<String>)> {
        events
            .iter()
            .filter_map(|event| match event {
                GatewayEvent::Status(s) => Some((s.status, s.priority, s.reason.clone())),
                GatewayEvent::Qr(_) => None,
            })
            .collect()
    }

    fn qr(n: u32, secs: u64) -> Signal {
        Signal::Qr {
            code: format!("2@ref-{n},a,b,c,9"),
            timeout: Duration::from_secs(secs),
        }
    }

    #[tokio::test]
    async fn qr_rotation_numbers_codes_and_reports_pending_once() {
        let mut mapper = EventMapper::new("s");
        let first = mapper.map(qr(1, 60));
        assert_eq!(
            statuses(&first),
            vec![(SessionStatus::QrPending, Priority::Normal, None)]
        );
        match &first[1] {
            GatewayEvent::Qr(qr) => {
                assert_eq!(qr.seq, 1);
                assert_eq!(qr.code, "2@ref-1,a,b,c,9");
                assert_eq!(qr.valid_until - qr.created, Duration::from_secs(60));
            }
            other => panic!("expected a QR, got {other:?}"),
        }
        let second = mapper.map(qr(2, 20));
        assert_eq!(second.len(), 1);
        assert!(matches!(&second[0], GatewayEvent::Qr(qr) if qr.seq == 2));

        let exhausted = mapper.map(Signal::QrExhausted {
            still_connected: false,
        });
        assert_eq!(
            statuses(&exhausted),
            vec![(
                SessionStatus::Inactive,
                Priority::High,
                Some("qr_exhausted".into())
            )]
        );
        // A new cycle starts numbering again and reports qr_pending again.
        let again = mapper.map(qr(1, 60));
        assert_eq!(statuses(&again).len(), 1);
        assert!(matches!(&again[1], GatewayEvent::Qr(qr) if qr.seq == 1));
    }

    #[tokio::test]
    async fn pairing_codes_go_to_the_qr_lane_typed_and_errors_are_reported() {
        use crate::events::LinkCode;
        let mut mapper = EventMapper::new("s");
        let first = mapper.map(Signal::PairingCode {
            code: "K7XQ2M9B".into(),
            timeout: Duration::from_secs(180),
        });
        assert_eq!(
            statuses(&first),
            vec![(SessionStatus::QrPending, Priority::Normal, None)]
        );
        match &first[1] {
            GatewayEvent::Qr(qr) => {
                assert_eq!(qr.kind, LinkCode::PairingCode);
                assert_eq!(qr.code, "K7XQ2M9B");
                assert_eq!(qr.seq, 1);
            }
            other => panic!("expected a pairing code, got {other:?}"),
        }
        assert!(mapper.map(Signal::PairingCodeRefresh).is_empty());
        let refreshed = mapper.map(Signal::PairingCode {
            code: "M2B7K9XQ".into(),
            timeout: Duration::from_secs(180),
        });
        assert!(matches!(&refreshed[..], [GatewayEvent::Qr(qr)] if qr.seq == 2));
        assert_eq!(
            statuses(&mapper.map(Signal::PairingCodeExpired)),
            vec![(
                SessionStatus::Inactive,
                Priority::High,
                Some("pairing_code_expired".into())
            )]
        );
        assert_eq!(
            statuses(&mapper.map(Signal::PairingCodeError("rate limited".into()))),
            vec![(
                SessionStatus::Inactive,
                Priority::High,
                Some("pairing_code_error: rate limited".into())
            )]
        );
    }

    #[test]
    fn pairing_code_options_only_for_pairing_code_logins() {
        let by_phone = crds::Login {
            method: crds::LoginMethod::PairingCode,
            phone_number: Some("+15551234567".into()),
        };
        let options = pair_code_options(&by_phone).expect("options");
        assert_eq!(options.phone_number, "15551234567");
        assert!(pair_code_options(&crds::Login::default()).is_none());
    }

    #[tokio::test]
    async fn pairing_and_connection_report_active_once() {
        let mut mapper = EventMapper::new("s");
        mapper.map(qr(1, 60));
        let paired = mapper.map(Signal::Paired);
        assert_eq!(
            statuses(&paired),
            vec![(SessionStatus::Active, Priority::High, None)]
        );
        assert!(mapper.map(Signal::Connected).is_empty());
        let dropped = mapper.map(Signal::Disconnected("stream ended (EOF)".into()));
        assert_eq!(
            statuses(&dropped),
            vec![(
                SessionStatus::Inactive,
                Priority::High,
                Some("disconnected: stream ended (EOF)".into())
            )]
        );
        assert_eq!(statuses(&mapper.map(Signal::Connected)).len(), 1);
    }

    #[tokio::test]
    async fn account_losses_are_high_priority_with_reasons() {
        let mut mapper = EventMapper::new("s");
        let cases = [
            (
                Signal::StreamReplaced,
                SessionStatus::Inactive,
                "stream_replaced",
            ),
            (
                Signal::LoggedOut("LoggedOut".into()),
                SessionStatus::LoggedOut,
                "logged_out: LoggedOut",
            ),
            (
                Signal::TemporaryBan("sent to too many people for 3600s".into()),
                SessionStatus::Banned,
                "temporary_ban: sent to too many people for 3600s",
            ),
        ];
        for (signal, status, reason) in cases {
            assert_eq!(
                statuses(&mapper.map(signal)),
                vec![(status, Priority::High, Some(reason.to_owned()))]
            );
        }
        // After a final status, a client that ends adds nothing.
        assert!(mapper.client_stopped().is_none());
    }

    #[tokio::test]
    async fn a_client_that_ends_while_live_reports_inactive() {
        let mut mapper = EventMapper::new("s");
        mapper.map(Signal::Connected);
        let event = mapper.client_stopped().expect("a final status");
        assert_eq!(
            statuses(&[event]),
            vec![(
                SessionStatus::Inactive,
                Priority::High,
                Some("client_stopped".into())
            )]
        );
    }

    #[test]
    fn config_rejects_non_websocket_urls() {
        let config = WhatsappConfig {
            ws_url: Some("http://127.0.0.1:1/ws".into()),
            ..WhatsappConfig::production()
        };
        assert!(matches!(
            WhatsappDriver::new(config),
            Err(DriverError::InvalidConfig {
                field: "ws_url",
                ..
            })
        ));
        assert!(WhatsappDriver::new(WhatsappConfig::production()).is_ok());
    }
}
