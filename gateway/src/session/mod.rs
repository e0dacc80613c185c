//! How the gateway runs sessions: a [`SessionDriver`] starts one task per session, which reports
//! [`GatewayEvent`]s into an [`EventSink`] until it is stopped.

pub mod any;
pub mod credentials;
pub mod ownership;
pub mod sim;
pub mod supervisor;
#[cfg(feature = "whatsapp")]
pub mod wa_store;
#[cfg(feature = "whatsapp")]
pub mod whatsapp;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::events::{GatewayEvent, Priority, QrEvent, SessionStatus, StatusEvent};

/// Starts sessions. Implementations: [`sim::SimDriver`], [`credentials::RestoringSim`] and, with
/// the `whatsapp` feature, `whatsapp::WhatsappDriver`.
pub trait SessionDriver: Send + Sync + 'static {
    /// Starts `session_id`, whose events go to `events` until the returned session is stopped.
    fn start(
        &self,
        session_id: &str,
        events: EventSink,
    ) -> impl Future<Output = Result<RunningSession, DriverError>> + Send;

    /// Starts `session_id` on behalf of the holder of its ownership lock, `fence`. A driver that
    /// persists session state (the `whatsapp` driver's Redis store) fences every write with it,
    /// so a gateway that lost the lock cannot overwrite what the new owner wrote. Drivers without
    /// such state start as [`SessionDriver::start`] does.
    fn start_owned(
        &self,
        session_id: &str,
        events: EventSink,
        fence: Option<&credentials::Fence>,
    ) -> impl Future<Output = Result<RunningSession, DriverError>> + Send {
        let _ = fence;
        self.start(session_id, events)
    }

    /// Unlinks the device of a paired session that is not running here (deleted while paused,
    /// or while this gateway was down): connects with its stored keys only to log out, so the
    /// phone stops listing it. Waits at most `wait` for the login and returns within a few
    /// seconds more (the deregistration and the disconnect). Nothing it reports reaches the
    /// backend. The caller
    /// holds the session's ownership lock (`fence`) and wipes the stored credentials after.
    ///
    /// The default starts the session with a private sink, waits for `active`, and stops it with
    /// a logout.
    fn unlink(
        &self,
        session_id: &str,
        fence: Option<&credentials::Fence>,
        wait: std::time::Duration,
    ) -> impl Future<Output = Result<Unlink, DriverError>> + Send {
        async move {
            let (sink, mut rx) = EventSink::channel(64);
            let session = self.start_owned(session_id, sink, fence).await?;
            let linked = tokio::time::timeout(wait, async {
                while let Some(event) = rx.recv().await {
                    match event {
                        GatewayEvent::Status(s) if s.status == SessionStatus::Active => {
                            return Some(true);
                        }
                        // A code to scan or a logout: the stored keys no longer log in.
                        GatewayEvent::Status(s) if s.status == SessionStatus::LoggedOut => {
                            return Some(false);
                        }
                        GatewayEvent::Qr(_) => return Some(false),
                        GatewayEvent::Status(_) => {}
                    }
                }
                None
            })
            .await;
            // Keep reading, so a driver that reports while it stops is never stuck on a full sink.
            let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
            let outcome = match linked {
                Ok(Some(true)) => {
                    session.stop_and_logout().await;
                    Ok(Unlink::Unlinked)
                }
                Ok(Some(false)) => {
                    session.stop().await;
                    Ok(Unlink::NotLinked)
                }
                Ok(None) | Err(_) => {
                    session.stop().await;
                    Err(DriverError::UnlinkFailed {
                        session_id: session_id.to_owned(),
                        reason: format!("not logged in within {wait:?}"),
                    })
                }
            };
            drain.abort();
            outcome
        }
    }
}

/// What [`SessionDriver::unlink`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unlink {
    /// Logged in with the stored keys and logged out: the phone no longer lists the device.
    Unlinked,
    /// The stored keys no longer log in (the user unlinked the device from the phone): nothing
    /// left to unlink.
    NotLinked,
}

/// How each session links to its phone (from the `WhatsappSession` spec in cluster mode), shared
/// between whoever learns it and the driver that starts the session. Unknown sessions link by QR.
#[derive(Debug, Clone, Default)]
pub struct LoginDirectory(Arc<RwLock<HashMap<String, crds::Login>>>);

impl LoginDirectory {
    pub fn set(&self, session_id: &str, login: &crds::Login) {
        let mut map = self.0.write().expect("login directory lock");
        if map.get(session_id) != Some(login) {
            map.insert(session_id.to_owned(), login.clone());
        }
    }

    pub fn get(&self, session_id: &str) -> crds::Login {
        self.0
            .read()
            .expect("login directory lock")
            .get(session_id)
            .cloned()
            .unwrap_or_default()
    }

    pub fn remove(&self, session_id: &str) {
        self.0
            .write()
            .expect("login directory lock")
            .remove(session_id);
    }
}

/// Errors of session drivers.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("the gateway no longer accepts session events")]
    EventSinkClosed,
    #[error("session {session_id} could not start: {reason}")]
    StartFailed { session_id: String, reason: String },
    #[error("session {session_id} could not be unlinked: {reason}")]
    UnlinkFailed { session_id: String, reason: String },
    #[error("invalid driver config `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
}

/// Where a driver reports a session's events. Bounded: a driver waits when the gateway is behind.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: mpsc::Sender<GatewayEvent>,
}

impl EventSink {
    pub fn new(tx: mpsc::Sender<GatewayEvent>) -> Self {
        EventSink { tx }
    }

    /// A sink and the receiver the gateway reads from.
    pub fn channel(capacity: usize) -> (EventSink, mpsc::Receiver<GatewayEvent>) {
        let (tx, rx) = mpsc::channel(capacity);
        (EventSink { tx }, rx)
    }

    pub async fn emit(&self, event: impl Into<GatewayEvent>) -> Result<(), DriverError> {
        self.tx
            .send(event.into())
            .await
            .map_err(|_| DriverError::EventSinkClosed)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Resolves when the session should end: on [`RunningSession::stop`] or when the
/// `RunningSession` is dropped, so a forgotten session cannot keep running.
#[derive(Debug)]
pub struct StopSignal {
    rx: oneshot::Receiver<bool>,
    logout: bool,
}

impl StopSignal {
    /// Whether the stop asked the session to log out (unlink the device) first: the resource
    /// was deleted with `logoutOnDelete`. Meaningful once the signal has resolved.
    pub fn wants_logout(&self) -> bool {
        self.logout
    }
}

impl Future for StopSignal {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(logout) => {
                self.logout = logout.unwrap_or(false);
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A session's task. Dropping it stops the session without waiting; [`RunningSession::stop`]
/// waits until the task has ended.
#[derive(Debug)]
pub struct RunningSession {
    session_id: String,
    /// `true` asks for a logout before the stop.
    stop: oneshot::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningSession {
    /// Runs `body` on its own task; the [`StopSignal`] it gets tells it when to end.
    pub fn spawn<F, Fut>(session_id: impl Into<String>, body: F) -> Self
    where
        F: FnOnce(StopSignal) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(body(StopSignal {
            rx: stop_rx,
            logout: false,
        }));
        RunningSession {
            session_id: session_id.into(),
            stop,
            task,
        }
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Whether the task ended (stopped, or finished by itself).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Asks the session to end and waits until its task has.
    pub async fn stop(self) {
        self.end(false).await
    }

    /// Asks the session to log out (unlink the device from the phone, where the driver can) and
    /// end, and waits until its task has.
    pub async fn stop_and_logout(self) {
        self.end(true).await
    }

    async fn end(self, logout: bool) {
        // The task may have ended by itself; then nobody listens and that is fine.
        let _ = self.stop.send(logout);
        if let Err(err) = self.task.await
            && err.is_panic()
        {
            tracing::error!(session_id = %self.session_id, error = %err, "session task panicked");
        }
    }
}

/// What the gateway last heard from a session, to re-send it (level-triggered re-sync): after a
/// restart or periodically, so a crash between an event and its flush cannot lose a final state.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState {
    pub status: SessionStatus,
    pub reason: Option<String>,
    /// When `status` was reported.
    pub since: DateTime<Utc>,
    /// The QR code on display while the session awaits a scan.
    pub latest_qr: Option<QrEvent>,
}

impl SessionState {
    pub fn new(status: SessionStatus) -> Self {
        SessionState {
            status,
            reason: None,
            since: Utc::now(),
            latest_qr: None,
        }
    }

    /// Folds an event of this session into the state.
    pub fn apply(&mut self, event: &GatewayEvent) {
        match event {
            GatewayEvent::Qr(qr) => self.latest_qr = Some(qr.clone()),
            GatewayEvent::Status(status) => {
                self.status = status.status;
                self.reason.clone_from(&status.reason);
                self.since = status.at;
                // A QR code only means something while the session waits for a scan.
                if status.status != SessionStatus::QrPending {
                    self.latest_qr = None;
                }
            }
        }
    }

    /// The events that bring the backend up to date: the current status, at normal priority since
    /// it repeats what was already sent once, and the QR on display if it is still valid.
    pub fn resync_events(&self, session_id: &str, now: Instant) -> Vec<GatewayEvent> {
        let mut events = Vec::with_capacity(2);
        events.push(GatewayEvent::Status(StatusEvent {
            session_id: session_id.to_owned(),
            status: self.status,
            priority: Priority::Normal,
            at: self.since,
            reason: self.reason.clone(),
            created: now,
        }));
        if let Some(qr) = self.latest_qr.as_ref().filter(|qr| !qr.is_expired_at(now)) {
            events.push(GatewayEvent::Qr(QrEvent {
                created: now,
                ..qr.clone()
            }));
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn state_tracks_status_and_qr_for_resync() {
        let mut state = SessionState::new(SessionStatus::Connecting);
        let pending = StatusEvent::new("s", SessionStatus::QrPending, Priority::Normal, None);
        state.apply(&pending.clone().into());
        let qr = QrEvent::new("s", "code", 1, Duration::from_secs(60));
        state.apply(&qr.clone().into());

        let events = state.resync_events("s", Instant::now());
        assert_eq!(events.len(), 2);
        match &events[0] {
            GatewayEvent::Status(status) => {
                assert_eq!(status.status, SessionStatus::QrPending);
                assert_eq!(status.priority, Priority::Normal);
                assert_eq!(status.at, pending.at);
            }
            GatewayEvent::Qr(_) => panic!("status first"),
        }
        assert!(matches!(&events[1], GatewayEvent::Qr(resent) if resent.code == qr.code));

        // An expired QR is not re-sent.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(state.resync_events("s", Instant::now()).len(), 1);

        let active = StatusEvent::new("s", SessionStatus::Active, Priority::High, None);
        state.apply(&active.into());
        assert_eq!(state.status, SessionStatus::Active);
        assert!(state.latest_qr.is_none());
    }

    #[tokio::test]
    async fn dropping_a_running_session_stops_it() {
        let (ended_tx, ended_rx) = oneshot::channel();
        let session = RunningSession::spawn("s", |stop| async move {
            stop.await;
            let _ = ended_tx.send(());
        });
        drop(session);
        ended_rx.await.expect("task saw the stop");
    }
}
