//! The gateway's event model: what session drivers emit and what the batcher sends to the backend.
//!
//! Items serialize to the backend wire format (see DESIGN.md, "Backend contract"). Each event also
//! carries tokio instants that are never serialized: `created` measures delivery latency, and
//! `valid_until` lets the batcher reason about QR expiry on tokio's clock, which tests can pause.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use tokio::time::Instant;

/// A session's status as the backend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Active,
    Inactive,
    QrPending,
    LoggedOut,
    Connecting,
    Banned,
}

impl SessionStatus {
    pub const ALL: [SessionStatus; 6] = [
        SessionStatus::Active,
        SessionStatus::Inactive,
        SessionStatus::QrPending,
        SessionStatus::LoggedOut,
        SessionStatus::Connecting,
        SessionStatus::Banned,
    ];

    /// The wire name, also usable as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "active",
            SessionStatus::Inactive => "inactive",
            SessionStatus::QrPending => "qr_pending",
            SessionStatus::LoggedOut => "logged_out",
            SessionStatus::Connecting => "connecting",
            SessionStatus::Banned => "banned",
        }
    }

    /// Statuses that need a human to act; an update carrying one must never be dropped in favour of
    /// a later one, or the backend could miss that the account was lost.
    pub fn must_not_be_superseded(self) -> bool {
        matches!(self, SessionStatus::LoggedOut | SessionStatus::Banned)
    }
}

/// How urgently a status update should reach the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
}

/// A QR code to show the user so they can link the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QrEvent {
    pub session_id: String,
    /// The raw QR string; rendering to a PNG data URL happens at the backend client.
    #[serde(rename = "qr")]
    pub code: String,
    #[serde(serialize_with = "rfc3339_millis")]
    pub expires_at: DateTime<Utc>,
    /// Rotation number within one pairing cycle, 1..=6.
    pub seq: u32,
    /// A QR code to scan, or a pairing code to type on the phone (sent as `"type":
    /// "pairing_code"`, never rendered to a PNG). Absent on the wire for QR codes, so the seed's
    /// QR payload is unchanged.
    #[serde(rename = "type", skip_serializing_if = "LinkCode::is_qr")]
    pub kind: LinkCode,
    #[serde(skip)]
    pub created: Instant,
    /// `expires_at` on tokio's clock.
    #[serde(skip)]
    pub valid_until: Instant,
}

/// How a session is linked to a phone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkCode {
    #[default]
    Qr,
    PairingCode,
}

impl LinkCode {
    pub fn is_qr(&self) -> bool {
        *self == LinkCode::Qr
    }
}

impl QrEvent {
    /// A pairing code (typed on the phone under Linked devices) valid for `validity`.
    pub fn pairing_code(
        session_id: impl Into<String>,
        code: impl Into<String>,
        seq: u32,
        validity: Duration,
    ) -> Self {
        QrEvent {
            kind: LinkCode::PairingCode,
            ..QrEvent::new(session_id, code, seq, validity)
        }
    }

    /// A QR code created now that stays valid for `validity`.
    pub fn new(
        session_id: impl Into<String>,
        code: impl Into<String>,
        seq: u32,
        validity: Duration,
    ) -> Self {
        let created = Instant::now();
        let wall_validity = chrono::Duration::from_std(validity).unwrap_or(chrono::Duration::MAX);
        QrEvent {
            session_id: session_id.into(),
            code: code.into(),
            expires_at: Utc::now() + wall_validity,
            seq,
            kind: LinkCode::Qr,
            created,
            valid_until: created + validity,
        }
    }

    pub fn is_expired_at(&self, now: Instant) -> bool {
        self.valid_until <= now
    }
}

/// A change of a session's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusEvent {
    pub session_id: String,
    pub status: SessionStatus,
    pub priority: Priority,
    #[serde(serialize_with = "rfc3339_millis")]
    pub at: DateTime<Utc>,
    pub reason: Option<String>,
    #[serde(skip)]
    pub created: Instant,
}

impl StatusEvent {
    /// A status change that happens now.
    pub fn new(
        session_id: impl Into<String>,
        status: SessionStatus,
        priority: Priority,
        reason: Option<String>,
    ) -> Self {
        StatusEvent {
            session_id: session_id.into(),
            status,
            priority,
            at: Utc::now(),
            reason,
            created: Instant::now(),
        }
    }
}

/// Anything a session driver reports. Serializes as the bare backend item (no tag), since each
/// kind goes to its own endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum GatewayEvent {
    Qr(QrEvent),
    Status(StatusEvent),
}

impl GatewayEvent {
    pub fn session_id(&self) -> &str {
        match self {
            GatewayEvent::Qr(qr) => &qr.session_id,
            GatewayEvent::Status(status) => &status.session_id,
        }
    }

    /// When the event was produced, to measure event-to-backend latency.
    pub fn created(&self) -> Instant {
        match self {
            GatewayEvent::Qr(qr) => qr.created,
            GatewayEvent::Status(status) => status.created,
        }
    }
}

impl From<QrEvent> for GatewayEvent {
    fn from(qr: QrEvent) -> Self {
        GatewayEvent::Qr(qr)
    }
}

impl From<StatusEvent> for GatewayEvent {
    fn from(status: StatusEvent) -> Self {
        GatewayEvent::Status(status)
    }
}

// Millisecond precision: PHP's DateTime (the Laravel side) parses at most microseconds.
fn rfc3339_millis<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[tokio::test]
    async fn qr_item_matches_wire_format() {
        let mut qr = QrEvent::new("s-1", "2@abc,def", 3, Duration::from_secs(20));
        qr.expires_at = Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap();
        let json = serde_json::to_value(GatewayEvent::Qr(qr)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "sessionId": "s-1",
                "qr": "2@abc,def",
                "expiresAt": "2025-01-02T03:04:05.000Z",
                "seq": 3,
            })
        );
    }

    #[tokio::test]
    async fn status_item_matches_wire_format() {
        let mut status = StatusEvent::new(
            "s-2",
            SessionStatus::QrPending,
            Priority::High,
            Some("qr_exhausted".into()),
        );
        status.at = Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap();
        let json = serde_json::to_value(GatewayEvent::Status(status.clone())).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "sessionId": "s-2",
                "status": "qr_pending",
                "priority": "high",
                "at": "2025-01-02T03:04:05.000Z",
                "reason": "qr_exhausted",
            })
        );
        status.reason = None;
        let json = serde_json::to_value(GatewayEvent::Status(status)).unwrap();
        assert_eq!(json["reason"], serde_json::Value::Null);
    }

    #[test]
    fn status_names_match_serde() {
        for status in SessionStatus::ALL {
            let json = serde_json::to_value(status).unwrap();
            assert_eq!(json, status.as_str());
        }
        assert_eq!(serde_json::to_value(Priority::Normal).unwrap(), "normal");
    }

    #[tokio::test(start_paused = true)]
    async fn qr_expiry_follows_tokio_clock() {
        let qr = QrEvent::new("s", "code", 1, Duration::from_secs(60));
        assert!(!qr.is_expired_at(Instant::now()));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(qr.is_expired_at(Instant::now()));
    }
}
