//! Runs the sessions this gateway owns: start, stop and pause through a [`SessionDriver`].
//!
//! This is the minimal core used by cluster mode; ownership locks, reconnect backoff, the cap on
//! concurrent connection attempts and graceful drain build on it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Mutex;

use super::{DriverError, EventSink, RunningSession, SessionDriver};

pub struct Supervisor<D: SessionDriver> {
    driver: Arc<D>,
    events: EventSink,
    running: Mutex<HashMap<String, RunningSession>>,
}

impl<D: SessionDriver> Supervisor<D> {
    pub fn new(driver: Arc<D>, events: EventSink) -> Self {
        Supervisor {
            driver,
            events,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Starts the session unless it already runs. Returns whether it was started now.
    pub async fn ensure_running(&self, session_id: &str) -> Result<bool, DriverError> {
        let mut running = self.running.lock().await;
        if let Some(session) = running.get(session_id) {
            if !session.is_finished() {
                return Ok(false);
            }
            running.remove(session_id);
        }
        let session = self.driver.start(session_id, self.events.clone()).await?;
        running.insert(session_id.to_string(), session);
        Ok(true)
    }

    /// Stops the session if it runs and waits for its task to end. Returns whether it ran.
    pub async fn stop(&self, session_id: &str) -> bool {
        let session = self.running.lock().await.remove(session_id);
        match session {
            Some(session) => {
                session.stop().await;
                true
            }
            None => false,
        }
    }

    pub async fn is_running(&self, session_id: &str) -> bool {
        self.running
            .lock()
            .await
            .get(session_id)
            .is_some_and(|s| !s.is_finished())
    }

    /// Ids of the sessions running now.
    pub async fn running(&self) -> Vec<String> {
        self.running
            .lock()
            .await
            .iter()
            .filter(|(_, s)| !s.is_finished())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Stops every session (graceful shutdown).
    pub async fn stop_all(&self) {
        let sessions: Vec<RunningSession> =
            self.running.lock().await.drain().map(|(_, s)| s).collect();
        futures::future::join_all(sessions.into_iter().map(RunningSession::stop)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
