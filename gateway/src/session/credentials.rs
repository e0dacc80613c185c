//! What survives a session's move between gateways: its credentials. For the `sim` driver that is
//! just "paired", kept in the hash `wa:{<id>}:creds`; the `whatsapp` driver stores its keys
//! elsewhere, under the same fencing rule.
//!
//! Every write carries the writer's fencing token and is refused unless the session's fence still
//! equals it (a Lua script, atomic with the write), so a gateway that lost its lock, even one that
//! does not know it yet, cannot overwrite what the new owner wrote.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fred::prelude::*;
use futures::future::BoxFuture;

use super::ownership::{Lease, LuaScript, fence_key, wall_ms};
use super::sim::{SimConfig, SimDriver};
use super::{DriverError, EventSink, RunningSession, SessionDriver};

pub fn creds_key(session_id: &str) -> String {
    format!("wa:{{{session_id}}}:creds")
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
}

/// What the store knows of a session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub paired: bool,
    /// Identity and token of the gateway that wrote them last.
    pub owner: String,
    pub token: u64,
    pub at_ms: i64,
}

/// The outcome of a fenced write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Written,
    /// Refused: a newer owner exists (stale fencing token).
    Fenced,
}

/// The writer's proof of ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub owner: String,
    pub token: u64,
}

impl Fence {
    pub fn of(lease: &Lease) -> Self {
        Fence {
            owner: lease.value().to_string(),
            token: lease.token(),
        }
    }
}

pub trait CredentialStore: Send + Sync + 'static {
    fn load<'a>(
        &'a self,
        session_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Credentials>, CredentialError>>;
    /// Records the session as paired, if `fence` is still the session's newest.
    fn save_paired<'a>(
        &'a self,
        session_id: &'a str,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Write, CredentialError>>;
    /// Forgets the credentials (logout), if `fence` is still the session's newest.
    fn wipe<'a>(
        &'a self,
        session_id: &'a str,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Write, CredentialError>>;
}

/// `check_fence`: writes only while the session's fence equals the writer's token.
/// KEYS: fence, creds. ARGV: token, op (`save` | `wipe`), field, value, ...
const FENCED_WRITE_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == 'wipe' then
  redis.call('DEL', KEYS[2])
else
  redis.call('HSET', KEYS[2], unpack(ARGV, 3))
end
return 1
";

/// Credentials in Redis.
pub struct RedisCredentials {
    client: Client,
    write: LuaScript,
}

impl RedisCredentials {
    pub fn new(client: Client) -> Self {
        RedisCredentials {
            client,
            write: LuaScript::new(FENCED_WRITE_LUA),
        }
    }

    async fn fenced(
        &self,
        session_id: &str,
        fence: &Fence,
        op: &str,
        fields: Vec<String>,
    ) -> Result<Write, CredentialError> {
        let mut args = vec![fence.token.to_string(), op.to_string()];
        args.extend(fields);
        let written: i64 = self
            .write
            .run(
                &self.client,
                vec![fence_key(session_id), creds_key(session_id)],
                args,
            )
            .await?;
        Ok(if written == 1 {
            Write::Written
        } else {
            Write::Fenced
        })
    }
}

impl CredentialStore for RedisCredentials {
    fn load<'a>(
        &'a self,
        session_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Credentials>, CredentialError>> {
        Box::pin(async move {
            let fields: HashMap<String, String> =
                self.client.hgetall(creds_key(session_id)).await?;
            if fields.is_empty() {
                return Ok(None);
            }
            let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
            Ok(Some(Credentials {
                paired: get("paired") == "1",
                owner: get("owner"),
                token: get("token").parse().unwrap_or(0),
                at_ms: get("at_ms").parse().unwrap_or(0),
            }))
        })
    }

    fn save_paired<'a>(
        &'a self,
        session_id: &'a str,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Write, CredentialError>> {
        Box::pin(async move {
            let fields = vec![
                "paired".into(),
                "1".into(),
                "owner".into(),
                fence.owner.clone(),
                "token".into(),
                fence.token.to_string(),
                "at_ms".into(),
                wall_ms().to_string(),
            ];
            self.fenced(session_id, fence, "save", fields).await
        })
    }

    fn wipe<'a>(
        &'a self,
        session_id: &'a str,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Write, CredentialError>> {
        Box::pin(self.fenced(session_id, fence, "wipe", Vec::new()))
    }
}

/// Credentials in memory (a gateway without Redis). Fencing as a storage service does it: a write
/// whose token is older than the newest token seen for the session is refused.
#[derive(Debug, Default)]
pub struct MemoryCredentials {
    inner: Mutex<HashMap<String, (u64, Option<Credentials>)>>,
}

impl MemoryCredentials {
    pub fn new() -> Self {
        Self::default()
    }

    fn write(&self, session_id: &str, fence: &Fence, creds: Option<Credentials>) -> Write {
        let mut map = self.inner.lock().expect("memory credentials");
        let entry = map.entry(session_id.to_string()).or_insert((0, None));
        if fence.token < entry.0 {
            return Write::Fenced;
        }
        *entry = (fence.token, creds);
        Write::Written
    }
}

impl CredentialStore for MemoryCredentials {
    fn load<'a>(
        &'a self,
        session_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Credentials>, CredentialError>> {
        let creds = self
            .inner
            .lock()
            .expect("memory credentials")
            .get(session_id)
            .and_then(|(_, c)| c.clone());
        Box::pin(async move { Ok(creds) })
    }

    fn save_paired<'a>(
        &'a self,
        session_id: &'a str,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Write, CredentialError>> {
        let creds = Credentials {
            paired: true,
            owner: fence.owner.clone(),
            token: fence.token,
            at_ms: wall_ms(),
        };
        let written = self.write(session_id, fence, Some(creds));
        Box::pin(async move { Ok(written) })
    }

    fn wipe<'a>(
        &'a self,
        session_id: &'a str,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Write, CredentialError>> {
        let written = self.write(session_id, fence, None);
        Box::pin(async move { Ok(written) })
    }
}

/// The `sim` driver with memory: a session the store knows as paired starts paired (connecting,
/// then active) instead of drawing whether to show a QR code, so a restart or a takeover never
/// asks the user to scan again.
pub struct RestoringSim {
    fresh: SimDriver,
    paired: SimDriver,
    creds: Arc<dyn CredentialStore>,
}

impl RestoringSim {
    pub fn new(config: SimConfig, creds: Arc<dyn CredentialStore>) -> Result<Self, DriverError> {
        let paired = SimConfig {
            unpaired_share: 0.0,
            ..config.clone()
        };
        Ok(RestoringSim {
            fresh: SimDriver::new(config)?,
            paired: SimDriver::new(paired)?,
            creds,
        })
    }

    pub fn config(&self) -> &SimConfig {
        self.fresh.config()
    }

    /// See [`SimDriver::trigger_burst`].
    pub fn trigger_burst(&self, window: std::time::Duration) {
        self.fresh.trigger_burst(window);
        self.paired.trigger_burst(window);
    }
}

impl SessionDriver for RestoringSim {
    async fn start(
        &self,
        session_id: &str,
        events: EventSink,
    ) -> Result<RunningSession, DriverError> {
        let known = self
            .creds
            .load(session_id)
            .await
            .map_err(|err| DriverError::StartFailed {
                session_id: session_id.to_string(),
                // Better to retry later than to show a QR code to a paired user.
                reason: format!("credentials unreadable: {err}"),
            })?;
        if known.is_some_and(|c| c.paired) {
            self.paired.start(session_id, events).await
        } else {
            self.fresh.start(session_id, events).await
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::events::{GatewayEvent, SessionStatus};

    fn fence(token: u64) -> Fence {
        Fence {
            owner: format!("g:{token}"),
            token,
        }
    }

    #[tokio::test]
    async fn memory_store_refuses_stale_tokens() {
        let store = MemoryCredentials::new();
        assert_eq!(
            store.save_paired("s", &fence(2)).await.unwrap(),
            Write::Written
        );
        assert_eq!(
            store.save_paired("s", &fence(1)).await.unwrap(),
            Write::Fenced
        );
        assert_eq!(store.wipe("s", &fence(1)).await.unwrap(), Write::Fenced);
        let creds = store.load("s").await.unwrap().unwrap();
        assert!(creds.paired);
        assert_eq!(creds.token, 2);
        assert_eq!(store.wipe("s", &fence(3)).await.unwrap(), Write::Written);
        assert!(store.load("s").await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_paired_session_restarts_without_a_qr_code() {
        let store = Arc::new(MemoryCredentials::new());
        let config = SimConfig {
            unpaired_share: 1.0,
            scan_probability: 0.0,
            ..SimConfig::default()
        };
        let driver = RestoringSim::new(config, store.clone()).unwrap();
        let first_events = |mut rx: tokio::sync::mpsc::Receiver<GatewayEvent>| async move {
            let mut out = Vec::new();
            while let Ok(event) = rx.try_recv() {
                out.push(event);
            }
            out
        };

        let (sink, rx) = EventSink::channel(64);
        let session = driver.start("s", sink).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        session.stop().await;
        let events = first_events(rx).await;
        assert!(events.iter().any(|e| matches!(e, GatewayEvent::Qr(_))));

        store.save_paired("s", &fence(1)).await.unwrap();
        let (sink, rx) = EventSink::channel(64);
        let session = driver.start("s", sink).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        session.stop().await;
        let events = first_events(rx).await;
        assert!(!events.iter().any(|e| matches!(e, GatewayEvent::Qr(_))));
        assert!(
            events
                .iter()
                .any(|e| matches!(e, GatewayEvent::Status(s) if s.status == SessionStatus::Active))
        );
    }
}
