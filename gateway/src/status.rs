//! Writes each session's status onto its `WhatsappSession` resource, coalesced: a phase change is
//! written about a second after it happens (later changes in that second ride along), anything
//! else at most once per `detail_interval` per session, and all writes share a global QPS limit.
//! The QR payload is never written (it rotates every 20 s and would flood etcd); only its expiry
//! and rotation count.
//!
//! The coalescing policy is pure ([`StatusCoalescer`]) and tested with paused time; the kube
//! server-side-apply shell is [`StatusWriter`].

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crds::{GATEWAY_FIELD_MANAGER, Phase, WhatsappSession};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use kube::api::{Api, Patch, PatchParams};
use tokio::time::Instant;

use crate::events::SessionStatus;
use crate::session::SessionState;

/// The phase a gateway status maps to.
pub fn phase_of(status: SessionStatus) -> Phase {
    match status {
        SessionStatus::Active => Phase::Connected,
        SessionStatus::Inactive => Phase::Disconnected,
        SessionStatus::QrPending => Phase::AwaitingScan,
        SessionStatus::LoggedOut => Phase::LoggedOut,
        SessionStatus::Connecting => Phase::Connecting,
        SessionStatus::Banned => Phase::Failed,
    }
}

/// What the gateway writes for one session.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusSnapshot {
    pub phase: Phase,
    pub reason: Option<String>,
    pub qr_expires_at: Option<String>,
    pub qr_rotations: u32,
    pub since: String,
}

impl StatusSnapshot {
    pub fn from_state(state: &SessionState) -> Self {
        StatusSnapshot {
            phase: phase_of(state.status),
            reason: state.reason.clone(),
            qr_expires_at: state.latest_qr.as_ref().map(|qr| {
                qr.expires_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            }),
            qr_rotations: state.latest_qr.as_ref().map(|qr| qr.seq).unwrap_or(0),
            since: state
                .since
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CoalescePolicy {
    /// A phase change waits this long so what follows at once (Connecting -> Connected) coalesces.
    pub phase_delay: Duration,
    /// Other changes (QR rotation) are written at most this often per session.
    pub detail_interval: Duration,
    /// `Connecting` alone is not worth a write unless it lasts this long.
    pub connecting_grace: Duration,
}

impl Default for CoalescePolicy {
    fn default() -> Self {
        CoalescePolicy {
            phase_delay: Duration::from_secs(1),
            detail_interval: Duration::from_secs(300),
            connecting_grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
struct Entry {
    written: Option<StatusSnapshot>,
    written_at: Option<Instant>,
    pending: Option<(StatusSnapshot, Instant)>,
}

/// Decides which sessions' statuses are due for a write.
#[derive(Debug, Default)]
pub struct StatusCoalescer {
    policy: CoalescePolicy,
    entries: HashMap<String, Entry>,
}

impl StatusCoalescer {
    pub fn new(policy: CoalescePolicy) -> Self {
        StatusCoalescer {
            policy,
            entries: HashMap::new(),
        }
    }

    /// Records the current snapshot of a session (call as often as you like).
    pub fn observe(&mut self, session_id: &str, snapshot: StatusSnapshot, now: Instant) {
        let entry = self.entries.entry(session_id.to_string()).or_insert(Entry {
            written: None,
            written_at: None,
            pending: None,
        });
        if entry.written.as_ref() == Some(&snapshot) {
            entry.pending = None;
            return;
        }
        match &mut entry.pending {
            Some((pending, _)) if *pending == snapshot => {}
            // Keep the time the session first became dirty: the delay counts from there.
            Some((pending, _)) => *pending = snapshot,
            None => entry.pending = Some((snapshot, now)),
        }
    }

    pub fn forget(&mut self, session_id: &str) {
        self.entries.remove(session_id);
    }

    /// Sessions whose pending snapshot is due now; they count as written.
    pub fn due(&mut self, now: Instant) -> Vec<(String, StatusSnapshot)> {
        let policy = self.policy;
        let mut out = Vec::new();
        for (id, entry) in self.entries.iter_mut() {
            let Some((snapshot, dirty_since)) = &entry.pending else {
                continue;
            };
            let phase_changed = entry.written.as_ref().map(|w| w.phase) != Some(snapshot.phase);
            let waited = now.saturating_duration_since(*dirty_since);
            let due = if phase_changed {
                if snapshot.phase == Phase::Connecting {
                    waited >= policy.connecting_grace
                } else {
                    waited >= policy.phase_delay
                }
            } else {
                entry
                    .written_at
                    .is_none_or(|at| now.saturating_duration_since(at) >= policy.detail_interval)
            };
            if due {
                out.push((id.clone(), snapshot.clone()));
                entry.written = Some(snapshot.clone());
                entry.written_at = Some(now);
                entry.pending = None;
            }
        }
        out
    }
}

const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the shard knows of a session's placement, written with its status.
#[derive(Debug, Clone, Copy)]
pub struct Assignment<'a> {
    /// The spec generation the shard runs (`status.observedGeneration`).
    pub generation: Option<i64>,
    /// When the shard took the session on (RFC 3339).
    pub since: &'a str,
}

/// Server-side apply of the gateway's status fields under its own field manager.
///
/// The gateway also writes `status.shard`, `observedGeneration` and the `Assigned` condition:
/// for a session's first placement the operator writes only the label (one write), and the
/// gateway's first status write (usually already `Connected`) records the rest, so a session
/// costs two apiserver writes to reach Connected instead of three. On moves the operator still
/// writes `status.shard` itself, as the move happens.
pub struct StatusWriter {
    client: kube::Client,
    pod: String,
    shard: String,
    limiter: DefaultDirectRateLimiter,
    writes: Arc<std::sync::atomic::AtomicU64>,
}

impl StatusWriter {
    pub fn new(client: kube::Client, pod: String, shard: String, qps: u32) -> Self {
        let qps = NonZeroU32::new(qps.max(1)).expect("non-zero");
        StatusWriter {
            client,
            pod,
            shard,
            limiter: RateLimiter::direct(Quota::per_second(qps)),
            writes: Arc::default(),
        }
    }

    pub fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn write(
        &self,
        namespace: &str,
        name: &str,
        assignment: &Assignment<'_>,
        s: &StatusSnapshot,
    ) -> Result<(), String> {
        self.limiter.until_ready().await;
        let api: Api<WhatsappSession> = Api::namespaced(self.client.clone(), namespace);
        let connected = s.phase == Phase::Connected;
        let mut status = serde_json::json!({
            "phase": s.phase,
            "shard": self.shard,
            "gatewayPod": self.pod,
            "conditions": [
                {"type": crds::condition::ASSIGNED, "status": "True", "reason": "Running",
                 "message": format!("running on shard {} ({})", self.shard, self.pod),
                 "lastTransitionTime": assignment.since},
                {"type": crds::condition::CONNECTED, "status": if connected { "True" } else { "False" },
                 "reason": format!("{:?}", s.phase), "lastTransitionTime": s.since},
                {"type": crds::condition::AWAITING_SCAN, "status": if s.phase == Phase::AwaitingScan { "True" } else { "False" },
                 "reason": format!("{:?}", s.phase), "lastTransitionTime": s.since},
            ],
        });
        if let Some(generation) = assignment.generation {
            status["observedGeneration"] = serde_json::json!(generation);
        }
        if connected {
            status["lastConnectedAt"] = serde_json::json!(s.since);
        }
        if let Some(reason) = &s.reason {
            status["lastDisconnectReason"] = serde_json::json!(reason);
        }
        if let Some(expires) = &s.qr_expires_at {
            status["qr"] = serde_json::json!({"expiresAt": expires, "rotations": s.qr_rotations});
        }
        let body = serde_json::json!({
            "apiVersion": "whatsapp.gateway.dev/v1alpha1", "kind": "WhatsappSession", "status": status,
        });
        // Bounded: a write stuck on a dead apiserver connection must not hold up the shard loop.
        tokio::time::timeout(
            WRITE_TIMEOUT,
            api.patch_status(
                name,
                &PatchParams::apply(GATEWAY_FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            ),
        )
        .await
        .map_err(|_| "status write timed out".to_string())?
        .map_err(|e| e.to_string())?;
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(phase: Phase, rotations: u32) -> StatusSnapshot {
        StatusSnapshot {
            phase,
            reason: None,
            qr_expires_at: None,
            qr_rotations: rotations,
            since: "t".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn phase_changes_coalesce_within_a_second() {
        let mut c = StatusCoalescer::new(CoalescePolicy::default());
        let t0 = Instant::now();
        c.observe("s", snap(Phase::Connecting, 0), t0);
        assert!(
            c.due(t0 + Duration::from_secs(2)).is_empty(),
            "Connecting alone waits its grace"
        );
        c.observe(
            "s",
            snap(Phase::Connected, 0),
            t0 + Duration::from_millis(2500),
        );
        // Still dirty since t0: due at once, and carries the latest phase only.
        let due = c.due(t0 + Duration::from_millis(2600));
        assert_eq!(due, vec![("s".to_string(), snap(Phase::Connected, 0))]);
        assert!(
            c.due(t0 + Duration::from_secs(60)).is_empty(),
            "nothing new"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn qr_rotations_are_written_at_most_once_per_interval() {
        let policy = CoalescePolicy::default();
        let mut c = StatusCoalescer::new(policy);
        let t0 = Instant::now();
        c.observe("s", snap(Phase::AwaitingScan, 1), t0);
        assert_eq!(c.due(t0 + Duration::from_secs(1)).len(), 1);
        c.observe(
            "s",
            snap(Phase::AwaitingScan, 2),
            t0 + Duration::from_secs(20),
        );
        assert!(c.due(t0 + Duration::from_secs(21)).is_empty());
        c.observe(
            "s",
            snap(Phase::AwaitingScan, 3),
            t0 + Duration::from_secs(40),
        );
        assert_eq!(
            c.due(t0 + Duration::from_secs(1) + policy.detail_interval)
                .len(),
            1
        );
        // A phase change is not held back by the detail interval.
        c.observe(
            "s",
            snap(Phase::Connected, 3),
            t0 + Duration::from_secs(400),
        );
        assert_eq!(c.due(t0 + Duration::from_secs(402)).len(), 1);
    }
}
