//! The placement loop: watches sessions and gateway Leases, computes the bounded-load assignment
//! (pure, in [`crate::assign`]) and applies the moves.
//!
//! Moves from a gone shard (or of new sessions) are direct: the label and `status.shard` change at
//! once; the Redis lock TTL and fencing keep a half-dead gateway from acting. Moves away from a
//! shard that is still alive (draining, over cap, rebalance) are a handoff: the operator annotates
//! the session `drain=<from>`, the gateway stops it, releases its lock and answers
//! `drain-ack=<from>`, and only then is the session relabelled.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crds::{CLEANED_ANNOTATION, CONFLICT_ANNOTATION, FINALIZER};
use crds::{
    DRAIN_ACK_ANNOTATION, DRAIN_ANNOTATION, GATEWAY_LEASE_LABEL, OPERATOR_FIELD_MANAGER,
    SHARD_LABEL,
};
use crds::{Phase, WhatsappSession};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::assign::{AssignConfig, MoveReason, SessionState, assign};
use crate::conflict::{self, Claim};
use crate::membership::membership;
use crate::metrics::OperatorMetrics;
use crate::{Error, Result};

#[derive(Clone)]
pub struct PlacementSettings {
    /// Helm release name: gateway Leases are `<release>-gateway-<k>`.
    pub release: String,
    /// Namespace of the gateway Leases.
    pub lease_namespace: String,
    pub epsilon: f64,
    /// How often placement runs even without watch events (Lease expiry is a matter of time).
    pub resync: Duration,
    /// Gathers bursts of watch events into one placement pass.
    pub debounce: Duration,
    /// How long a deleted session waits for its gateway to log out and wipe its credentials
    /// before the operator wipes them itself.
    pub cleanup_timeout: Duration,
    /// Redis, for wiping credentials when no gateway answers; without it the operator only
    /// records an Event.
    pub redis: Option<fred::clients::Client>,
    /// Publishes Kubernetes Events on sessions.
    pub recorder: Option<Arc<kube::runtime::events::Recorder>>,
    /// When the Lease watch was last broken (see [`crate::membership`]).
    pub lease_sight: LeaseSight,
}

/// The last moment the operator could not watch the gateway Leases.
#[derive(Clone, Default)]
pub struct LeaseSight(Arc<std::sync::Mutex<Option<chrono::DateTime<chrono::Utc>>>>);

impl LeaseSight {
    fn blind_now(&self) {
        *self.0.lock().expect("lease sight") = Some(chrono::Utc::now());
    }

    pub fn blind_until(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        *self.0.lock().expect("lease sight")
    }
}

fn session_key(s: &WhatsappSession) -> String {
    format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any())
}

fn annotation<'a>(s: &'a WhatsappSession, key: &str) -> Option<&'a str> {
    s.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Runs until `stop` changes to `true`.
pub async fn run(
    client: Client,
    settings: PlacementSettings,
    metrics: Arc<OperatorMetrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let sessions_api: Api<WhatsappSession> = Api::all(client.clone());
    let leases_api: Api<Lease> = Api::namespaced(client.clone(), &settings.lease_namespace);
    let (sessions, sessions_writer) = reflector::store();
    let (leases, leases_writer) = reflector::store();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);

    let session_events = reflector::reflector(
        sessions_writer,
        watcher(sessions_api.clone(), watcher::Config::default()),
    )
    .default_backoff()
    .applied_objects()
    .boxed();
    let lease_config =
        watcher::Config::default().labels(&format!("{GATEWAY_LEASE_LABEL}={}", settings.release));
    let lease_events = reflector::reflector(leases_writer, watcher(leases_api, lease_config))
        .default_backoff()
        .applied_objects()
        .boxed();
    let watch_tx = tx.clone();
    let lease_sight = settings.lease_sight.clone();
    let watchers = tokio::spawn(async move {
        let mut merged = futures::stream::select(
            session_events.map(|r| (false, r.map(|_| ()))),
            lease_events.map(|r| (true, r.map(|_| ()))),
        );
        let mut leases_broken = false;
        while let Some((is_lease, event)) = merged.next().await {
            if let Err(err) = event {
                tracing::warn!(%err, "watch error (retrying with backoff)");
                if is_lease {
                    leases_broken = true;
                    lease_sight.blind_now();
                }
                continue;
            }
            if is_lease && leases_broken {
                // Back: Leases renewed while the watch was down now come in; none is judged
                // expired before a lease duration from now.
                leases_broken = false;
                lease_sight.blind_now();
            }
            let _ = watch_tx.try_send(());
        }
    });

    sessions
        .wait_until_ready()
        .await
        .map_err(|e| Error::Store(e.to_string()))?;
    leases
        .wait_until_ready()
        .await
        .map_err(|e| Error::Store(e.to_string()))?;
    let mut ticker = tokio::time::interval(settings.resync);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(()) = rx.recv() => {
                tokio::time::sleep(settings.debounce).await;
                while rx.try_recv().is_ok() {}
            }
            // A `false` sent on (re)gaining leadership is not a stop.
            _ = stop.changed() => if *stop.borrow_and_update() { break } else { continue },
        }
        if *stop.borrow() {
            break;
        }
        let started = std::time::Instant::now();
        let result = place_once(&sessions_api, &sessions, &leases, &settings, &metrics).await;
        metrics.observe_pass(started.elapsed(), result.is_ok());
        if let Err(err) = result {
            tracing::warn!(%err, "placement pass failed; retrying on the next event or tick");
        }
    }
    watchers.abort();
    Ok(())
}

/// One placement pass over the current stores.
pub async fn place_once(
    api: &Api<WhatsappSession>,
    sessions: &Store<WhatsappSession>,
    leases: &Store<Lease>,
    settings: &PlacementSettings,
    metrics: &OperatorMetrics,
) -> Result<()> {
    let leases: Vec<Lease> = leases.state().iter().map(|l| (**l).clone()).collect();
    let members = membership(
        &settings.release,
        &leases,
        chrono::Utc::now(),
        settings.lease_sight.blind_until(),
    );
    metrics.set_shards(members.live.len(), members.draining.len());
    let (deleted, snapshot): (Vec<Arc<WhatsappSession>>, Vec<Arc<WhatsappSession>>) = sessions
        .state()
        .into_iter()
        .partition(|s| s.metadata.deletion_timestamp.is_some());
    // Session id -> a resource (not being deleted) that names it.
    let named: HashMap<String, String> = snapshot
        .iter()
        .map(|s| (s.session_id(), session_key(s)))
        .collect();
    for session in deleted {
        if session.finalizers().iter().any(|f| f == FINALIZER)
            && let Err(err) = finalize(api, &session, &members, settings, &named).await
        {
            tracing::warn!(%err, session = %session.name_any(), "cleanup of a deleted session failed; retrying");
        }
    }
    let snapshot = set_conflicts_aside(api, snapshot, settings, metrics).await;
    if snapshot.is_empty() {
        return Ok(());
    }
    if members.live.is_empty() {
        tracing::warn!(
            sessions = snapshot.len(),
            "no live gateway shard: sessions wait unassigned"
        );
        return Ok(());
    }
    let keys: Vec<String> = snapshot.iter().map(|s| session_key(s)).collect();
    let states: Vec<SessionState> = snapshot
        .iter()
        .zip(&keys)
        .map(|(s, key)| SessionState {
            session: key.as_str(),
            shard: s.labels().get(SHARD_LABEL).map(String::as_str),
        })
        .collect();
    let live: Vec<&str> = members.live.iter().map(String::as_str).collect();
    let draining: Vec<&str> = members.draining.iter().map(String::as_str).collect();
    let config = AssignConfig {
        epsilon: settings.epsilon,
        ..AssignConfig::default()
    };
    let assignment =
        assign(&live, &draining, &states, &config).map_err(|e| Error::Assign(e.to_string()))?;
    metrics.set_loads(&assignment.loads);

    let by_key: HashMap<&str, &Arc<WhatsappSession>> = keys
        .iter()
        .map(String::as_str)
        .zip(snapshot.iter())
        .collect();
    let mut writes = futures::stream::FuturesUnordered::new();
    let moving: std::collections::HashSet<&str> =
        assignment.moves.iter().map(|m| m.session).collect();
    // A former conflict that now keeps its id (the older resource is gone) and stays on its
    // shard: lift the mark so the gateway runs it.
    for (key, session) in &by_key {
        if annotation(session, CONFLICT_ANNOTATION).is_some()
            && !moving.contains(key)
            && let Some(shard) = session.labels().get(SHARD_LABEL)
        {
            let (api, session, shard) = (api.clone(), (*session).clone(), shard.clone());
            writes.push(
                async move {
                    assign_to(&api, &session, &shard, true).await?;
                    Ok(None)
                }
                .boxed(),
            );
        }
    }
    for mv in &assignment.moves {
        let session = by_key[mv.session];
        let from_alive = mv
            .from
            .is_some_and(|f| live.contains(&f) || draining.contains(&f));
        // A set-aside copy runs nowhere (gateways skip it): no handoff to wait for.
        let handoff = from_alive
            && annotation(session, CONFLICT_ANNOTATION).is_none()
            && matches!(
                mv.reason,
                MoveReason::Draining | MoveReason::OverCap | MoveReason::Rebalance
            );
        let from = mv.from.unwrap_or_default().to_string();
        let to = mv.to.to_string();
        let reason = mv.reason;
        let api = api.clone();
        let session = session.clone();
        let recorder = settings.recorder.clone();
        writes.push(
            async move {
                // Acknowledged means for this request: an acknowledgement left over from a drain
                // that was cancelled (or landed after its cancel) is not one, or the session
                // would be relabelled while its shard still runs it.
                let acked = annotation(&session, DRAIN_ACK_ANNOTATION) == Some(from.as_str())
                    && annotation(&session, DRAIN_ANNOTATION) == Some(from.as_str());
                if handoff && !acked {
                    if annotation(&session, DRAIN_ANNOTATION) != Some(from.as_str()) {
                        request_drain(&api, &session, &from).await?;
                    }
                    return Ok::<Option<MoveReason>, Error>(None);
                }
                // A former conflict's status says Failed: a first placement rewrites it too.
                let write_status = reason != MoveReason::New
                    || annotation(&session, CONFLICT_ANNOTATION).is_some();
                assign_to(&api, &session, &to, write_status).await?;
                // A first placement is visible in the label and status; a move between shards is
                // worth an Event (`kubectl describe` shows why a session reconnected elsewhere).
                if reason != MoveReason::New
                    && let Some(recorder) = recorder
                {
                    publish_move(&recorder, &session, &from, &to, reason).await;
                }
                Ok(Some(reason))
            }
            .boxed(),
        );
        // Bound the number of concurrent apiserver writes.
        if writes.len() >= 32
            && let Some(result) = writes.next().await
        {
            record(metrics, result);
        }
    }
    while let Some(result) = writes.next().await {
        record(metrics, result);
    }
    // A handoff that is no longer wanted (the session stays after all) must not leave the session
    // stopped on its shard: clear the drain request.
    for (key, session) in &by_key {
        if !moving.contains(key)
            && (annotation(session, DRAIN_ANNOTATION).is_some()
                || annotation(session, DRAIN_ACK_ANNOTATION).is_some())
        {
            let ns_api: Api<WhatsappSession> = Api::namespaced(
                api.clone().into_client(),
                &session.namespace().unwrap_or_default(),
            );
            let patch = serde_json::json!({"metadata": {"annotations": {DRAIN_ANNOTATION: null, DRAIN_ACK_ANNOTATION: null}}});
            if let Err(err) = ns_api
                .patch(
                    &session.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                tracing::warn!(%err, session = %key, "could not cancel a drain request");
            }
        }
    }
    Ok(())
}

/// Finds resources whose session id an older resource already names ([`conflict::losers`]),
/// marks them (not run, status Failed, a Warning Event) and returns the others, which are placed.
async fn set_conflicts_aside(
    api: &Api<WhatsappSession>,
    sessions: Vec<Arc<WhatsappSession>>,
    settings: &PlacementSettings,
    metrics: &OperatorMetrics,
) -> Vec<Arc<WhatsappSession>> {
    let keys: Vec<String> = sessions.iter().map(|s| session_key(s)).collect();
    let ids: Vec<String> = sessions.iter().map(|s| s.session_id()).collect();
    let claims: Vec<Claim<'_>> = sessions
        .iter()
        .zip(keys.iter().zip(&ids))
        .map(|(s, (key, id))| Claim {
            key,
            session_id: id,
            created_ms: s
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond()),
        })
        .collect();
    let losers = conflict::losers(&claims);
    metrics.set_id_conflicts(losers.len());
    if losers.is_empty() {
        return sessions;
    }
    let shard_of: HashMap<&str, Option<&str>> = sessions
        .iter()
        .zip(&keys)
        .map(|(s, key)| {
            (
                key.as_str(),
                s.labels().get(SHARD_LABEL).map(String::as_str),
            )
        })
        .collect();
    for (session, key) in sessions.iter().zip(&keys) {
        if let Some(winner) = losers.get(key)
            && let Err(err) =
                mark_conflict(api, session, winner, shard_of[winner.as_str()], settings).await
        {
            tracing::warn!(%err, session = %key, "could not mark a session id conflict; retrying");
        }
    }
    sessions
        .into_iter()
        .zip(keys)
        .filter(|(_, key)| !losers.contains_key(key))
        .map(|(s, _)| s)
        .collect()
}

fn conflict_message(session_id: &str, winner: &str) -> String {
    format!(
        "session id {session_id} is already used by {winner}: this resource is not run until that \
         one is deleted, and deleting this one leaves the account alone"
    )
}

/// A conflict follows its winner's shard (so the gateway that runs the id sees both and never
/// logs the account out for the copy) with a mark that keeps it from being run; its status
/// says why.
async fn mark_conflict(
    api: &Api<WhatsappSession>,
    session: &WhatsappSession,
    winner: &str,
    winner_shard: Option<&str>,
    settings: &PlacementSettings,
) -> Result<()> {
    let ns_api: Api<WhatsappSession> = Api::namespaced(
        api.clone().into_client(),
        &session.namespace().unwrap_or_default(),
    );
    let name = session.name_any();
    let shard = session.labels().get(SHARD_LABEL).map(String::as_str);
    let handoff = annotation(session, DRAIN_ANNOTATION).is_some()
        || annotation(session, DRAIN_ACK_ANNOTATION).is_some();
    let finalized = session.finalizers().iter().any(|f| f == FINALIZER);
    if annotation(session, CONFLICT_ANNOTATION) != Some(winner)
        || shard != winner_shard
        || handoff
        || !finalized
    {
        // One write: the mark, the winner's shard, any handoff cancelled, and the finalizer, so
        // that if this copy ends up the last resource naming the id, deleting it still logs the
        // account out (while another names it, finalizing keeps the credentials).
        let mut finalizers = session.finalizers().to_vec();
        if !finalized {
            finalizers.push(FINALIZER.to_string());
        }
        let patch = serde_json::json!({"metadata": {
            "labels": {SHARD_LABEL: winner_shard},
            "annotations": {CONFLICT_ANNOTATION: winner, DRAIN_ANNOTATION: null, DRAIN_ACK_ANNOTATION: null},
            "finalizers": finalizers,
            "resourceVersion": session.resource_version(),
        }});
        ns_api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    let session_id = session.session_id();
    let message = conflict_message(&session_id, winner);
    let reported = session.status.as_ref().is_some_and(|status| {
        status.phase == Some(Phase::Failed)
            && status.conditions.iter().any(|c| {
                c.type_ == crds::condition::ASSIGNED && c.message.as_deref() == Some(&message)
            })
    });
    if reported {
        return Ok(());
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = serde_json::json!({
        "apiVersion": "whatsapp.gateway.dev/v1alpha1",
        "kind": "WhatsappSession",
        "status": {
            "phase": Phase::Failed,
            "observedGeneration": session.metadata.generation,
            "conditions": [{
                "type": crds::condition::ASSIGNED, "status": "False",
                "reason": crds::condition::REASON_SESSION_ID_CONFLICT,
                "message": message, "lastTransitionTime": now,
            }],
        }
    });
    ns_api
        .patch_status(
            &name,
            &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
            &Patch::Apply(&status),
        )
        .await?;
    tracing::warn!(session = %name, namespace = ?session.namespace(), %session_id, %winner, "session id already used by another resource: not run");
    publish_event(
        settings,
        session,
        EventType::Warning,
        crds::condition::REASON_SESSION_ID_CONFLICT,
        message,
        "Place",
    )
    .await;
    Ok(())
}

/// Records an Event on the session, when the operator has a recorder; a failure is only logged.
async fn publish_event(
    settings: &PlacementSettings,
    session: &WhatsappSession,
    type_: EventType,
    reason: &str,
    note: String,
    action: &str,
) {
    let Some(recorder) = &settings.recorder else {
        return;
    };
    let event = kube::runtime::events::Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(err) = recorder
        .publish(&event, &kube::Resource::object_ref(session, &()))
        .await
    {
        tracing::warn!(%err, "could not record the Event");
    }
}

fn record(metrics: &OperatorMetrics, result: Result<Option<MoveReason>>) {
    match result {
        Ok(Some(reason)) => metrics.moved(reason),
        Ok(None) => {}
        Err(err) => tracing::warn!(%err, "applying a move failed"),
    }
}

async fn request_drain(
    api: &Api<WhatsappSession>,
    session: &WhatsappSession,
    from: &str,
) -> Result<()> {
    let ns_api: Api<WhatsappSession> = Api::namespaced(
        api.clone().into_client(),
        &session.namespace().unwrap_or_default(),
    );
    // Any earlier acknowledgement goes with the new request: only the shard's answer to this
    // one counts.
    let patch = serde_json::json!({"metadata": {"annotations": {DRAIN_ANNOTATION: from, DRAIN_ACK_ANNOTATION: null}}});
    ns_api
        .patch(
            &session.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    tracing::info!(session = %session.name_any(), from, "handoff: asked the shard to drain the session");
    Ok(())
}

async fn publish_move(
    recorder: &kube::runtime::events::Recorder,
    session: &WhatsappSession,
    from: &str,
    to: &str,
    reason: MoveReason,
) {
    let (event_reason, why) = match reason {
        MoveReason::ShardGone => ("MovedFromLostShard", "its shard stopped heartbeating"),
        MoveReason::Draining => ("HandedOff", "its shard is draining"),
        MoveReason::OverCap => ("HandedOff", "its shard was over capacity"),
        MoveReason::Rebalance => ("HandedOff", "rebalanced onto a new shard"),
        MoveReason::New => ("Assigned", "first placement"),
    };
    let from = if from.is_empty() { "none" } else { from };
    let event = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Normal,
        reason: event_reason.into(),
        note: Some(format!("moved from shard {from} to shard {to}: {why}")),
        action: "Place".into(),
        secondary: None,
    };
    if let Err(err) = recorder
        .publish(&event, &kube::Resource::object_ref(session, &()))
        .await
    {
        tracing::warn!(%err, session = %session.name_any(), "could not record the move Event");
    }
}

/// Relabels the session; for a move also records `status.shard` (phase Assigned, condition
/// Assigned). A first placement is the label alone: the gateway's first status write records
/// the shard, the Assigned condition and `observedGeneration` (one apiserver write per session
/// saved, which keeps a new session at two writes to Connected).
async fn assign_to(
    api: &Api<WhatsappSession>,
    session: &WhatsappSession,
    to: &str,
    write_status: bool,
) -> Result<()> {
    let ns_api: Api<WhatsappSession> = Api::namespaced(
        api.clone().into_client(),
        &session.namespace().unwrap_or_default(),
    );
    let name = session.name_any();
    // One merge patch: the new label, the handoff annotations cleared.
    // The finalizer rides on the same write (a merge patch replaces the whole list, so the
    // resourceVersion makes a concurrent change of the list fail and retry instead of losing it).
    let mut finalizers = session.finalizers().to_vec();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        finalizers.push(FINALIZER.to_string());
    }
    let patch = serde_json::json!({"metadata": {
        "labels": {SHARD_LABEL: to},
        "annotations": {DRAIN_ANNOTATION: null, DRAIN_ACK_ANNOTATION: null, CONFLICT_ANNOTATION: null},
        "finalizers": finalizers,
        "resourceVersion": session.resource_version(),
    }});
    ns_api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    if !write_status {
        return Ok(());
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = serde_json::json!({
        "apiVersion": "whatsapp.gateway.dev/v1alpha1",
        "kind": "WhatsappSession",
        "status": {
            "shard": to,
            "phase": Phase::Assigned,
            "observedGeneration": session.metadata.generation,
            "conditions": [{
                "type": crds::condition::ASSIGNED, "status": "True", "reason": "Placed",
                "message": format!("assigned to shard {to}"), "lastTransitionTime": now,
            }],
        }
    });
    ns_api
        .patch_status(
            &name,
            &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
            &Patch::Apply(&status),
        )
        .await?;
    Ok(())
}

/// Deletion: with `logoutOnDelete`, the owning gateway logs out and wipes the credentials, then
/// marks the session cleaned; the operator removes the finalizer. If no gateway answers within
/// the cleanup timeout (or the shard is gone), the operator wipes the credentials itself and
/// records an Event.
async fn finalize(
    api: &Api<WhatsappSession>,
    session: &WhatsappSession,
    members: &crate::membership::Membership,
    settings: &PlacementSettings,
    named: &HashMap<String, String>,
) -> Result<()> {
    let name = session.name_any();
    let namespace = session.namespace().unwrap_or_default();
    let ns_api: Api<WhatsappSession> = Api::namespaced(api.clone().into_client(), &namespace);
    let cleaned = annotation(session, CLEANED_ANNOTATION).is_some();
    let shard = session.labels().get(SHARD_LABEL).cloned();
    let shard_alive = shard
        .as_ref()
        .is_some_and(|s| members.live.contains(s) || members.draining.contains(s));
    let waited = session
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| {
            Duration::from_millis(
                (chrono::Utc::now().timestamp_millis() - t.0.as_millisecond()).max(0) as u64,
            )
        })
        .unwrap_or_default();
    let still_named = named.get(&session.session_id());
    let done = if !session.spec.logout_on_delete || cleaned {
        true
    } else if let Some(other) = still_named {
        // The account is still wanted under another resource: an id is logged out and wiped
        // only with the last resource that names it.
        let note = format!(
            "session id {} is still named by {other}: not logged out, credentials kept",
            session.session_id()
        );
        tracing::info!(session = %name, note = %note, "finalizing without a logout");
        publish_event(
            settings,
            session,
            EventType::Normal,
            "CredentialsKept",
            note,
            "Finalize",
        )
        .await;
        true
    } else if !shard_alive || waited >= settings.cleanup_timeout {
        let id = session.session_id();
        let wiped = match &settings.redis {
            Some(redis) => wipe_session(redis, &id).await,
            None => Err("no Redis configured for the operator".to_string()),
        };
        let (reason, note) = match &wiped {
            Ok(keys) => (
                "CredentialsWipedByOperator",
                format!(
                    "no gateway cleaned up in time; the operator deleted {keys} Redis keys of the session"
                ),
            ),
            Err(err) => (
                "CredentialsNotWiped",
                format!(
                    "no gateway cleaned up and the operator could not wipe the credentials: {err}"
                ),
            ),
        };
        tracing::warn!(session = %name, reason, note = %note, "finalizing without the gateway");
        publish_event(
            settings,
            session,
            EventType::Warning,
            reason,
            note,
            "Finalize",
        )
        .await;
        true
    } else {
        false
    };
    if done {
        let finalizers: Vec<String> = session
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        let patch = serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": session.resource_version()}});
        ns_api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(session = %name, "finalizer removed");
    }
    Ok(())
}

/// Deletes every Redis key of a session (`wa:{id}:*`); returns how many.
pub async fn wipe_session(
    redis: &fred::clients::Client,
    session_id: &str,
) -> std::result::Result<usize, String> {
    use fred::prelude::*;
    use fred::types::scan::Scanner;
    use futures::TryStreamExt;
    let mut keys: Vec<String> = Vec::new();
    let mut scan = redis.scan(crds::session_key_pattern(session_id), Some(100), None);
    while let Some(mut page) = scan.try_next().await.map_err(|e| e.to_string())? {
        if let Some(found) = page.take_results() {
            keys.extend(found.into_iter().filter_map(|k| k.into_string()));
        }
    }
    if !keys.is_empty() {
        let _: i64 = redis.del(keys.clone()).await.map_err(|e| e.to_string())?;
    }
    Ok(keys.len())
}
