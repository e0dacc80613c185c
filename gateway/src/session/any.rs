//! The driver the configuration chose (`--driver sim|whatsapp`), as one type the supervisor and
//! the shard can be built over.

use std::sync::Arc;

use super::credentials::{CredentialStore, Fence, RestoringSim};
use super::sim::SimConfig;
use super::{DriverError, EventSink, LoginDirectory, RunningSession, SessionDriver};
use crate::config::DriverChoice;

pub enum AnyDriver {
    Sim(RestoringSim),
    #[cfg(feature = "whatsapp")]
    Whatsapp(super::whatsapp::WhatsappDriver),
}

impl AnyDriver {
    /// The chosen driver. `credentials` remembers paired sim sessions; `redis`, when given, keeps
    /// the whatsapp driver's session keys (fenced by ownership); `logins` says how sessions link.
    pub fn new(
        choice: &DriverChoice,
        sim: SimConfig,
        credentials: Arc<dyn CredentialStore>,
        redis: Option<&fred::clients::Client>,
        logins: LoginDirectory,
    ) -> Result<Self, DriverError> {
        match choice {
            DriverChoice::Sim => Ok(AnyDriver::Sim(RestoringSim::new(sim, credentials)?)),
            #[cfg(feature = "whatsapp")]
            DriverChoice::Whatsapp { url, version } => {
                use super::whatsapp::{WhatsappConfig, WhatsappDriver};
                let mut driver = WhatsappDriver::new(WhatsappConfig {
                    ws_url: url.clone(),
                    version: *version,
                    ..WhatsappConfig::production()
                })?
                .with_logins(logins);
                match redis {
                    Some(client) => driver = driver.with_redis_store(client.clone()),
                    None => tracing::warn!(
                        "no Redis (--redis-url / WA_REDIS_URL): WhatsApp session keys are kept in memory and a restarted session must be linked again"
                    ),
                }
                Ok(AnyDriver::Whatsapp(driver))
            }
            #[cfg(not(feature = "whatsapp"))]
            DriverChoice::Whatsapp { .. } => {
                let _ = (redis, logins);
                Err(DriverError::InvalidConfig {
                    field: "driver",
                    reason: "this build has no whatsapp driver (cargo feature `whatsapp`)".into(),
                })
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            AnyDriver::Sim(_) => "sim",
            #[cfg(feature = "whatsapp")]
            AnyDriver::Whatsapp(_) => "whatsapp",
        }
    }
}

impl SessionDriver for AnyDriver {
    async fn start(
        &self,
        session_id: &str,
        events: EventSink,
    ) -> Result<RunningSession, DriverError> {
        match self {
            AnyDriver::Sim(d) => d.start(session_id, events).await,
            #[cfg(feature = "whatsapp")]
            AnyDriver::Whatsapp(d) => d.start(session_id, events).await,
        }
    }

    async fn start_owned(
        &self,
        session_id: &str,
        events: EventSink,
        fence: Option<&Fence>,
    ) -> Result<RunningSession, DriverError> {
        match self {
            AnyDriver::Sim(d) => d.start_owned(session_id, events, fence).await,
            #[cfg(feature = "whatsapp")]
            AnyDriver::Whatsapp(d) => d.start_owned(session_id, events, fence).await,
        }
    }

    async fn unlink(
        &self,
        session_id: &str,
        fence: Option<&Fence>,
        wait: std::time::Duration,
    ) -> Result<super::Unlink, DriverError> {
        match self {
            AnyDriver::Sim(d) => d.unlink(session_id, fence, wait).await,
            #[cfg(feature = "whatsapp")]
            AnyDriver::Whatsapp(d) => d.unlink(session_id, fence, wait).await,
        }
    }
}
