//! What the cache holds for one session, and how it is laid out in Redis.
//!
//! One session is four Redis keys sharing the hash tag `{sessionId}`, so all four live in one
//! Redis Cluster slot and are read with a single `MGET`: `wa:{id}:status`, `wa:{id}:qr`,
//! `wa:{id}:conn`, `wa:{id}:session`. In process the four are one [`SessionView`], so a session
//! costs one local entry and one fallback call, not four.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::events::SessionStatus;
use crate::session::SessionState;

/// The kinds of cached data (the `kind` label of `whatsapp_gateway_cache_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Status,
    Qr,
    Connection,
    Session,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Status, Kind::Qr, Kind::Connection, Kind::Session];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Status => "status",
            Kind::Qr => "qr",
            Kind::Connection => "connection",
            Kind::Session => "session",
        }
    }

    /// Suffix of the Redis key.
    fn suffix(self) -> &'static str {
        match self {
            Kind::Status => "status",
            Kind::Qr => "qr",
            Kind::Connection => "conn",
            Kind::Session => "session",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// `wa:{sessionId}:<kind>`; the braces make the session id the Redis Cluster hash tag.
pub fn key(session_id: &str, kind: Kind) -> String {
    format!("wa:{{{session_id}}}:{}", kind.suffix())
}

/// Session ids may not start with this (see [`valid_session_id`]).
pub const RESERVED_ID_PREFIX: &str = "gw:";

/// Sorted set of the session ids that have a key of `kind`, scored by expiry (ms since the
/// epoch): counting keys is `ZREMRANGEBYSCORE` + `ZCARD`, never a `KEYS`/`SCAN` sweep. No braces,
/// so it can never collide with a session key.
pub fn index_key(kind: Kind) -> String {
    format!("wa:cache-index:{}", kind.suffix())
}

/// Session ids end up inside Redis keys and URLs: keep them to a safe, bounded alphabet. The
/// `gw:` prefix is reserved: a gateway's own streams live under `wa:{gw:<gateway>}:*`, which a
/// session of that id would share (and a delete of it would wipe).
pub fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with(RESERVED_ID_PREFIX)
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b':'))
}

/// State of the WhatsApp connection, derived from the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    Open,
    Connecting,
    Closed,
}

impl ConnectionState {
    pub fn of(status: SessionStatus) -> Self {
        match status {
            SessionStatus::Active => ConnectionState::Open,
            SessionStatus::Connecting | SessionStatus::QrPending => ConnectionState::Connecting,
            SessionStatus::Inactive | SessionStatus::LoggedOut | SessionStatus::Banned => {
                ConnectionState::Closed
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusRecord {
    pub status: SessionStatus,
    pub reason: Option<String>,
    pub since: DateTime<Utc>,
    /// Grows with every change of the session (set by the writing gateway): readers and the
    /// benchmark compare versions to tell a stale read from a fresh one.
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionRecord {
    pub state: ConnectionState,
    pub since: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    /// The gateway that runs the session, when known.
    pub gateway: Option<String>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QrRecord {
    /// The raw QR string.
    pub code: String,
    pub expires_at: DateTime<Utc>,
    pub seq: u32,
}

impl QrRecord {
    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }
}

/// Everything cached about one session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub session_id: String,
    pub status: StatusRecord,
    pub connection: ConnectionRecord,
    pub session: SessionInfo,
    /// The QR on display while the session awaits a scan (it may have expired since).
    pub qr: Option<QrRecord>,
}

impl SessionView {
    /// A view of a session with just a status (fallbacks that know no more, tests).
    pub fn with_status(session_id: &str, status: SessionStatus, reason: Option<String>) -> Self {
        let now = Utc::now();
        SessionView {
            session_id: session_id.to_string(),
            status: StatusRecord {
                status,
                reason,
                since: now,
                version: 0,
            },
            connection: ConnectionRecord {
                state: ConnectionState::of(status),
                since: now,
            },
            session: SessionInfo {
                gateway: None,
                updated_at: now,
            },
            qr: None,
        }
    }

    /// The view of a session this gateway runs.
    pub fn from_state(session_id: &str, state: &SessionState, gateway: &str) -> Self {
        SessionView {
            session_id: session_id.to_string(),
            status: StatusRecord {
                status: state.status,
                reason: state.reason.clone(),
                since: state.since,
                version: state.since.timestamp_micros().max(0) as u64,
            },
            connection: ConnectionRecord {
                state: ConnectionState::of(state.status),
                since: state.since,
            },
            session: SessionInfo {
                gateway: Some(gateway.to_string()),
                updated_at: Utc::now(),
            },
            qr: state.latest_qr.as_ref().map(|qr| QrRecord {
                code: qr.code.clone(),
                expires_at: qr.expires_at,
                seq: qr.seq,
            }),
        }
    }

    pub fn version(&self) -> u64 {
        self.status.version
    }

    /// The QR if it is still valid at `now`.
    pub fn live_qr(&self, now: DateTime<Utc>) -> Option<&QrRecord> {
        self.qr.as_ref().filter(|qr| !qr.is_expired_at(now))
    }

    /// The JSON value of each Redis key, in [`Kind::ALL`] order (`None`: no key, e.g. no QR).
    pub fn to_redis_values(&self) -> crate::Result<[Option<String>; 4]> {
        Ok([
            Some(serde_json::to_string(&self.status)?),
            self.qr.as_ref().map(serde_json::to_string).transpose()?,
            Some(serde_json::to_string(&self.connection)?),
            Some(serde_json::to_string(&self.session)?),
        ])
    }

    /// Rebuilds a view from the values of its keys (in [`Kind::ALL`] order). No status key means
    /// Redis does not know the session; a missing connection or session key (a write that was
    /// cut half-way, or keys expiring a moment apart) is rebuilt from the status.
    pub fn from_redis_values(
        session_id: &str,
        values: &[Option<String>],
    ) -> crate::Result<Option<Self>> {
        let get = |kind: Kind| values.get(kind.index()).and_then(|v| v.as_deref());
        let Some(status) = get(Kind::Status) else {
            return Ok(None);
        };
        let status: StatusRecord = serde_json::from_str(status)?;
        let connection = match get(Kind::Connection) {
            Some(raw) => serde_json::from_str(raw)?,
            None => ConnectionRecord {
                state: ConnectionState::of(status.status),
                since: status.since,
            },
        };
        let session = match get(Kind::Session) {
            Some(raw) => serde_json::from_str(raw)?,
            None => SessionInfo {
                gateway: None,
                updated_at: status.since,
            },
        };
        let qr = get(Kind::Qr).map(serde_json::from_str).transpose()?;
        Ok(Some(SessionView {
            session_id: session_id.to_string(),
            status,
            connection,
            session,
            qr,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_session_hash_tag() {
        assert_eq!(key("abc", Kind::Status), "wa:{abc}:status");
        assert_eq!(key("abc", Kind::Qr), "wa:{abc}:qr");
        assert_eq!(key("abc", Kind::Connection), "wa:{abc}:conn");
        assert_eq!(key("abc", Kind::Session), "wa:{abc}:session");
        assert!(!index_key(Kind::Qr).contains('{'));
    }

    #[test]
    fn session_ids_are_restricted() {
        assert!(valid_session_id("sim-00001"));
        assert!(valid_session_id("5511999999999@s.whatsapp.net"));
        assert!(valid_session_id("gw-1:x"));
        for bad in ["", "a{b}", "a b", "a/b", &"x".repeat(129), "gw:standalone"] {
            assert!(!valid_session_id(bad), "{bad}");
        }
    }

    #[test]
    fn redis_values_round_trip() {
        let mut view =
            SessionView::with_status("s-1", SessionStatus::QrPending, Some("new".into()));
        view.qr = Some(QrRecord {
            code: "2@abc".into(),
            expires_at: Utc::now(),
            seq: 2,
        });
        view.status.version = 42;
        let values = view.to_redis_values().unwrap();
        let back = SessionView::from_redis_values("s-1", &values)
            .unwrap()
            .unwrap();
        assert_eq!(back, view);
        assert_eq!(
            SessionView::from_redis_values("s-1", &[None, None, None, None]).unwrap(),
            None
        );
    }
}
