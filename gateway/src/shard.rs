//! Cluster mode: this gateway is shard `<k>` of the StatefulSet (`POD_NAME=<release>-gateway-<k>`).
//! It heartbeats its Lease, watches only the sessions labelled for its shard, runs them through
//! the supervisor, acknowledges drain requests, writes their status onto the resources, and on
//! SIGTERM marks its Lease draining and hands its sessions over before it exits.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crds::{CLEANED_ANNOTATION, WhatsappSession};
use crds::{
    DRAIN_ACK_ANNOTATION, DRAIN_ANNOTATION, DRAINING_ANNOTATION, GATEWAY_LEASE_LABEL, SHARD_LABEL,
};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::app::SessionStates;
use crate::secrets::WebhookRouting;
use crate::session::SessionDriver;
use crate::session::supervisor::Supervisor;
use crate::status::{Assignment, CoalescePolicy, StatusCoalescer, StatusSnapshot, StatusWriter};
use crate::{Error, Result};

const LEASE_FIELD_MANAGER: &str = "whatsapp-gateway-lease";

#[derive(Debug, Clone)]
pub struct ShardSettings {
    pub release: String,
    pub namespace: String,
    pub pod: String,
    pub shard: String,
    pub lease_duration: Duration,
    pub lease_renew: Duration,
    pub status_qps: u32,
    /// Longest the gateway waits on SIGTERM for the operator to move its sessions away.
    pub drain_timeout: Duration,
    /// Filled from each session's `spec.login`, read by the driver at start.
    pub logins: crate::session::LoginDirectory,
}

/// The shard ordinal of a pod named `<release>-gateway-<k>`.
pub fn shard_of_pod(pod: &str) -> Option<String> {
    let (_, ordinal) = pod.rsplit_once('-')?;
    (!ordinal.is_empty() && ordinal.chars().all(|c| c.is_ascii_digit()))
        .then(|| ordinal.to_string())
}

pub fn lease_name(release: &str, shard: &str) -> String {
    format!("{release}-gateway-{shard}")
}

async fn renew_lease(
    api: &Api<Lease>,
    s: &ShardSettings,
    draining: bool,
) -> Result<(), kube::Error> {
    let name = lease_name(&s.release, &s.shard);
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let lease = serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {
            "name": name,
            "labels": {GATEWAY_LEASE_LABEL: s.release},
            "annotations": {DRAINING_ANNOTATION: if draining { "true" } else { "false" }},
        },
        "spec": {"holderIdentity": s.pod, "leaseDurationSeconds": s.lease_duration.as_secs().max(1), "renewTime": now},
    });
    api.patch(
        &name,
        &PatchParams::apply(LEASE_FIELD_MANAGER).force(),
        &Patch::Apply(&lease),
    )
    .await?;
    Ok(())
}

/// Where each running session's resource lives.
#[derive(Debug, Clone)]
struct Placement {
    namespace: String,
    name: String,
    /// `metadata.generation` of the spec this shard runs (`status.observedGeneration`).
    generation: Option<i64>,
    /// When this shard took the session on (the Assigned condition's transition time).
    since: String,
}

/// Runs shard duties until `shutdown` is cancelled, then drains and returns.
pub async fn run<D: SessionDriver>(
    client: Client,
    redis: Option<fred::clients::Client>,
    settings: ShardSettings,
    supervisor: Arc<Supervisor<D>>,
    states: Arc<SessionStates>,
    routing: WebhookRouting,
    shutdown: CancellationToken,
) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    renew_lease(&leases, &settings, false).await?;
    tracing::info!(shard = %settings.shard, lease = %lease_name(&settings.release, &settings.shard), "joined as gateway shard");

    let draining = CancellationToken::new();
    let heartbeat = {
        let leases = leases.clone();
        let settings = settings.clone();
        let draining = draining.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(settings.lease_renew);
            loop {
                ticker.tick().await;
                // Bounded: a call hanging on a dead apiserver connection must not stall the
                // heartbeat past the lease duration once the apiserver is back.
                match tokio::time::timeout(
                    settings.lease_renew,
                    renew_lease(&leases, &settings, draining.is_cancelled()),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => tracing::warn!(%err, "lease renewal failed"),
                    Err(_) => tracing::warn!("lease renewal timed out"),
                }
            }
        })
    };

    let sessions_api: Api<WhatsappSession> = Api::all(client.clone());
    let (store, writer) = reflector::store();
    let config = watcher::Config::default().labels(&format!("{SHARD_LABEL}={}", settings.shard));
    let (changed_tx, mut changed_rx) = tokio::sync::mpsc::channel::<()>(1);
    let watch = tokio::spawn(async move {
        let mut events = reflector::reflector(writer, watcher(sessions_api, config))
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(_) => {
                    let _ = changed_tx.try_send(());
                }
                Err(err) => tracing::warn!(%err, "session watch error (retrying with backoff)"),
            }
        }
    });
    store
        .wait_until_ready()
        .await
        .map_err(|e| Error::Kube(e.to_string()))?;

    let writer = StatusWriter::new(
        client.clone(),
        settings.pod.clone(),
        settings.shard.clone(),
        settings.status_qps,
    );
    let mut coalescer = StatusCoalescer::new(CoalescePolicy::default());
    let mut placements: HashMap<String, Placement> = HashMap::new();
    let mut deleting = HashMap::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(()) = changed_rx.recv() => {}
            _ = shutdown.cancelled(), if drain_deadline.is_none() => {
                tracing::info!("SIGTERM: marking the lease draining and handing sessions over");
                draining.cancel();
                let _ = renew_lease(&leases, &settings, true).await;
                drain_deadline = Some(tokio::time::Instant::now() + settings.drain_timeout);
            }
        }
        reconcile(
            &client,
            redis.as_ref(),
            &store,
            &settings,
            &supervisor,
            &mut placements,
            &mut deleting,
            &mut coalescer,
            &states,
            &routing,
        )
        .await;
        write_statuses(&writer, &placements, &mut coalescer, &states).await;
        if let Some(deadline) = drain_deadline {
            // Done when the operator has relabelled every session away, not merely when they
            // stopped here: until then a session may still be waiting for its handoff.
            let running = store.state();
            if running.is_empty() || tokio::time::Instant::now() >= deadline {
                if !running.is_empty() {
                    tracing::warn!(
                        sessions = running.len(),
                        "drain timed out; stopping the rest (the operator reassigns them once the lease is gone)"
                    );
                }
                break;
            }
        }
    }
    supervisor.stop_all().await;
    heartbeat.abort();
    watch.abort();
    // Give up the shard at once instead of letting the lease expire.
    let _ = leases
        .delete(
            &lease_name(&settings.release, &settings.shard),
            &Default::default(),
        )
        .await;
    tracing::info!(status_writes = writer.writes(), "shard left");
    Ok(())
}

/// Brings running sessions in line with the resources labelled for this shard.
#[allow(clippy::too_many_arguments)]
async fn reconcile<D: SessionDriver>(
    client: &Client,
    redis: Option<&fred::clients::Client>,
    store: &Store<WhatsappSession>,
    settings: &ShardSettings,
    supervisor: &Arc<Supervisor<D>>,
    placements: &mut HashMap<String, Placement>,
    deleting: &mut HashMap<String, tokio::task::JoinHandle<()>>,
    coalescer: &mut StatusCoalescer,
    states: &SessionStates,
    routing: &WebhookRouting,
) {
    let mut wanted = HashSet::new();
    let mut drains = Vec::new();
    deleting.retain(|_, task| !task.is_finished());
    for session in store.state() {
        let id = session.session_id();
        let namespace = session.namespace().unwrap_or_default();
        let name = session.name_any();
        let drain_requested = session.annotations().get(DRAIN_ANNOTATION) == Some(&settings.shard);
        let acked = session.annotations().get(DRAIN_ACK_ANNOTATION) == Some(&settings.shard);
        if drain_requested {
            drains.push((id, namespace, name, acked));
            continue;
        }
        if session.metadata.deletion_timestamp.is_some() {
            // Deleted: stop; with logoutOnDelete log out (a live session unlinks its device, a
            // paired one that does not run is connected just to unlink it) and wipe the
            // credentials, then tell the operator it may remove the finalizer. On a task of its
            // own, since an unlink takes seconds and the other sessions must not wait for it.
            if deleting.get(&id).is_some_and(|task| !task.is_finished()) {
                continue;
            }
            let cleaned = session.annotations().get(CLEANED_ANNOTATION).is_some();
            let task = tokio::spawn(finish_deleted(
                supervisor.clone(),
                redis.cloned(),
                Api::namespaced(client.clone(), &namespace),
                DeletedSession {
                    id: id.clone(),
                    name,
                    logout: session.spec.logout_on_delete && !cleaned,
                },
                settings.pod.clone(),
            ));
            deleting.insert(id, task);
            continue;
        }
        if session.spec.paused {
            continue;
        }
        wanted.insert(id.clone());
        settings.logins.set(&id, &session.spec.login);
        let generation = session.metadata.generation;
        placements
            .entry(id.clone())
            .and_modify(|p| p.generation = generation)
            .or_insert_with(|| Placement {
                namespace,
                name,
                generation,
                since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            });
        let namespace = placements[&id].namespace.clone();
        if !routing
            .route(&id, &namespace, session.spec.webhook.as_ref())
            .await
        {
            // Its webhook cannot be resolved yet: not started, or stopped if it ran (a webhook
            // added to a running session), since its events must not reach our backend.
            supervisor.stop(&id).await;
            continue;
        }
        match supervisor.ensure_running(&id).await {
            Ok(true) => tracing::debug!(session_id = %id, "session started"),
            Ok(false) => {}
            Err(err) => tracing::warn!(%err, session_id = %id, "session did not start"),
        }
    }
    // Handoffs side by side: a scale-up asks a shard to drain a fifth of its sessions at once,
    // and one stop-and-acknowledge after the other took 100 ms or more each.
    futures::stream::iter(drains)
        .for_each_concurrent(32, |(id, namespace, name, acked)| async move {
            if supervisor.stop(&id).await {
                tracing::info!(session_id = %id, "drained for handoff");
            }
            if !acked {
                let api: Api<WhatsappSession> = Api::namespaced(client.clone(), &namespace);
                let patch = serde_json::json!({"metadata": {"annotations": {DRAIN_ACK_ANNOTATION: settings.shard}}});
                if let Err(err) = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    tracing::warn!(%err, session_id = %id, "could not acknowledge the drain");
                }
            }
        })
        .await;
    for id in supervisor.running().await {
        // A deleted one is its deletion task's to end (with a logout, where asked).
        if !wanted.contains(&id) && !deleting.contains_key(&id) {
            supervisor.stop(&id).await;
        }
    }
    placements.retain(|id, _| {
        let keep = wanted.contains(id);
        if !keep {
            coalescer.forget(id);
            states.remove(id);
            routing.webhooks.removed(id);
            settings.logins.remove(id);
        }
        keep
    });
}

/// A resource being deleted, as [`finish_deleted`] needs it.
struct DeletedSession {
    id: String,
    name: String,
    /// `logoutOnDelete` and not yet marked cleaned.
    logout: bool,
}

/// Stops a deleted session; with `logout`, logs it out (see [`Supervisor::logout`]), wipes its
/// keys and marks the resource cleaned so the operator removes the finalizer.
async fn finish_deleted<D: SessionDriver>(
    supervisor: Arc<Supervisor<D>>,
    redis: Option<fred::clients::Client>,
    api: Api<WhatsappSession>,
    session: DeletedSession,
    pod: String,
) {
    let DeletedSession { id, name, logout } = session;
    if !logout {
        supervisor.stop(&id).await;
        return;
    }
    supervisor.logout(&id).await;
    let wiped = match &redis {
        Some(redis) => crate::redis::wipe_session(redis, &id)
            .await
            .map_err(|e| e.to_string()),
        None => Ok(0),
    };
    match wiped {
        Ok(keys) => {
            tracing::info!(session_id = %id, keys, "deleted session logged out and wiped");
            let patch = serde_json::json!({"metadata": {"annotations": {CLEANED_ANNOTATION: pod}}});
            if let Err(err) = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::warn!(%err, session_id = %id, "could not mark the session cleaned");
            }
        }
        Err(err) => {
            tracing::warn!(%err, session_id = %id, "wiping credentials failed; retrying")
        }
    }
}

async fn write_statuses(
    writer: &StatusWriter,
    placements: &HashMap<String, Placement>,
    coalescer: &mut StatusCoalescer,
    states: &SessionStates,
) {
    let now = tokio::time::Instant::now();
    for id in placements.keys() {
        if let Some(state) = states.get(id) {
            coalescer.observe(id, StatusSnapshot::from_state(&state), now);
        }
    }
    let due = coalescer.due(now);
    let writes = futures::stream::iter(
        due.into_iter()
            .filter_map(|(id, snapshot)| placements.get(&id).map(|p| (id, p.clone(), snapshot))),
    )
    .map(|(id, placement, snapshot)| async move {
        match writer
            .write(
                &placement.namespace,
                &placement.name,
                &Assignment {
                    generation: placement.generation,
                    since: &placement.since,
                },
                &snapshot,
            )
            .await
        {
            Ok(()) => None,
            Err(err) => {
                tracing::warn!(%err, session_id = %id, "status write failed; retrying");
                Some(id)
            }
        }
    })
    .buffer_unordered(16);
    // A failed write is forgotten, so the next pass writes the session's status again.
    for failed in writes.collect::<Vec<_>>().await.into_iter().flatten() {
        coalescer.forget(&failed);
    }
}
