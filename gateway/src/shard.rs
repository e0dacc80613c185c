//! Cluster mode: this gateway is shard `<k>` of the StatefulSet (`POD_NAME=<release>-gateway-<k>`).
//! It heartbeats its Lease, watches only the sessions labelled for its shard, runs them through
//! the supervisor, acknowledges drain requests, writes their status onto the resources, and on
//! SIGTERM marks its Lease draining and hands its sessions over before it exits.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Duration;

use crds::{CLEANED_ANNOTATION, CONFLICT_ANNOTATION, WhatsappSession};
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
use crate::session::supervisor::Supervisor;
use crate::session::{LoginDirectory, SessionDriver};
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
    /// Every resource of the cluster by session id (this shard's store holds only its own): a
    /// deleted resource is not logged out while another resource still names its id, even
    /// before the operator has set that other one aside onto this shard.
    pub names: Option<crate::informer::InformerLookup>,
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
    let mut deleting: HashMap<String, Deletion> = HashMap::new();
    let routing = Arc::new(routing);
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
    // Deletions under way finish first (an unlink is bounded to seconds); their last events
    // still go out with the pipeline's flush.
    let unfinished = deleting
        .into_values()
        .map(|deletion| deletion.task)
        .filter(|task| !task.is_finished());
    if tokio::time::timeout(
        Duration::from_secs(15),
        futures::future::join_all(unfinished),
    )
    .await
    .is_err()
    {
        tracing::warn!(
            "deleted sessions still logging out at shutdown; the operator finishes them"
        );
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
    deleting: &mut HashMap<String, Deletion>,
    coalescer: &mut StatusCoalescer,
    states: &Arc<SessionStates>,
    routing: &Arc<WebhookRouting>,
) {
    let mut wanted = HashSet::new();
    let mut drains = Vec::new();
    let mut deleted = HashSet::new();
    let mut starts = Vec::new();
    let sessions = store.state();
    // Ids that a resource not being deleted still names (a conflict the operator set aside
    // included: it follows its winner's shard, so both are seen here).
    let named: HashSet<String> = sessions
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .map(|s| s.session_id())
        .collect();
    for session in sessions {
        let id = session.session_id();
        let namespace = session.namespace().unwrap_or_default();
        let name = session.name_any();
        let conflict = session.annotations().contains_key(CONFLICT_ANNOTATION);
        if session.metadata.deletion_timestamp.is_some()
            && (named.contains(&id)
                || settings
                    .names
                    .as_ref()
                    .and_then(|names| names.named_elsewhere(&id, &namespace, &name))
                    .is_some())
        {
            // Another resource still names the account: no logout and no wipe; the operator
            // removes the finalizer. If this one ran the id, the id is no longer wanted below and
            // stops until the other is placed. (The last resource naming an id, a set-aside copy
            // included, is logged out as usual.)
            continue;
        }
        if conflict {
            // An older resource names this session id: this one is not run.
            continue;
        }
        if session.metadata.deletion_timestamp.is_some() {
            // Deleted: stop; with logoutOnDelete log out (a live session unlinks its device, a
            // paired one that does not run is connected just to unlink it) and wipe the
            // credentials, then tell the operator it may remove the finalizer. On a task of its
            // own, since an unlink takes seconds and the other sessions must not wait for it.
            deleted.insert(id.clone());
            // Under way, or done (the resource lingers until the operator removes the
            // finalizer): nothing to start. Settled on another try otherwise.
            if deleting.get(&id).is_some_and(|d| {
                !d.task.is_finished()
                    || d.done.load(AtomicOrdering::Acquire)
                    || d.started.elapsed() < DELETION_RETRY
            }) {
                continue;
            }
            let cleaned = session.annotations().get(CLEANED_ANNOTATION).is_some();
            let done = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(finish_deleted(
                DeletionContext {
                    supervisor: supervisor.clone(),
                    redis: redis.cloned(),
                    api: Api::namespaced(client.clone(), &namespace),
                    routing: routing.clone(),
                    states: states.clone(),
                    logins: settings.logins.clone(),
                    pod: settings.pod.clone(),
                },
                DeletedSession {
                    id: id.clone(),
                    name,
                    namespace,
                    webhook: session.spec.webhook.clone(),
                    logout: session.spec.logout_on_delete && !cleaned,
                },
                done.clone(),
            ));
            deleting.insert(
                id,
                Deletion {
                    task,
                    done,
                    started: tokio::time::Instant::now(),
                },
            );
            continue;
        }
        // After the deletion check: a session deleted during its handoff is still logged out
        // here (the operator never moves a deleted session, so its drain would never end).
        let drain_requested = session.annotations().get(DRAIN_ANNOTATION) == Some(&settings.shard);
        let acked = session.annotations().get(DRAIN_ACK_ANNOTATION) == Some(&settings.shard);
        if drain_requested {
            drains.push((id, namespace, name, acked));
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
            .and_modify(|p| {
                p.generation = generation;
                // The id now runs under another resource (a conflict that took over from a
                // deleted one): its statuses go there.
                if p.namespace != namespace || p.name != name {
                    p.namespace.clone_from(&namespace);
                    p.name.clone_from(&name);
                    // What was written went to the other resource: write it all again here.
                    coalescer.forget(&id);
                }
            })
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
        starts.push(id);
    }
    // Side by side: each start waits for its first outcome (a login may take seconds), and a
    // shard that takes on a thousand sessions must not start them one after the other. The
    // supervisor's connection-attempt limit bounds what really runs at once.
    futures::stream::iter(starts)
        .for_each_concurrent(STARTS_IN_FLIGHT, |id| async move {
            match supervisor.ensure_running(&id).await {
                Ok(true) => tracing::debug!(session_id = %id, "session started"),
                Ok(false) => {}
                Err(err) => tracing::warn!(%err, session_id = %id, "session did not start"),
            }
        })
        .await;
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
            // A deleted one is forgotten by its deletion task, after its last status.
            if !deleting.contains_key(id) {
                forget(id, states, routing, &settings.logins);
            }
        }
        keep
    });
    // The resource is gone (finalizer removed): a deletion that never settled (the operator
    // wiped it after its timeout) is forgotten here.
    deleting.retain(|id, deletion| {
        let keep = deleted.contains(id) || !deletion.task.is_finished();
        if !keep && !deletion.done.load(AtomicOrdering::Acquire) {
            forget(id, states, routing, &settings.logins);
        }
        keep
    });
}

/// Forgets a session that no longer runs here: its state (re-sync, gauges), its webhook route
/// (after the grace that lets its last events follow it) and its login.
fn forget(id: &str, states: &SessionStates, routing: &WebhookRouting, logins: &LoginDirectory) {
    states.remove(id);
    routing.forget(id);
    logins.remove(id);
}

/// Sessions a reconcile starts at once (each waits for its first outcome).
const STARTS_IN_FLIGHT: usize = 64;

/// A deleted resource's clean-up task; `done` once it settled.
struct Deletion {
    task: tokio::task::JoinHandle<()>,
    done: Arc<AtomicBool>,
    started: tokio::time::Instant,
}

/// How often a deletion whose logout could not run (another gateway holds the lock, Redis
/// unreachable) is tried again.
const DELETION_RETRY: Duration = Duration::from_secs(2);

/// What a deletion task works with.
struct DeletionContext<D: SessionDriver> {
    supervisor: Arc<Supervisor<D>>,
    redis: Option<fred::clients::Client>,
    api: Api<WhatsappSession>,
    routing: Arc<WebhookRouting>,
    states: Arc<SessionStates>,
    logins: LoginDirectory,
    pod: String,
}

/// A resource being deleted, as [`finish_deleted`] needs it.
struct DeletedSession {
    id: String,
    name: String,
    namespace: String,
    webhook: Option<crds::Webhook>,
    /// `logoutOnDelete` and not yet marked cleaned.
    logout: bool,
}

/// Stops a deleted session; with `logout`, logs it out (see [`Supervisor::logout`]: a paired
/// session that does not run is connected just to unlink it), wipes its keys and marks the
/// resource cleaned so the operator removes the finalizer. Sets `done` once settled; a logout
/// that could not run (another gateway holds the lock, Redis unreachable) is tried again by the
/// next reconcile.
async fn finish_deleted<D: SessionDriver>(
    ctx: DeletionContext<D>,
    session: DeletedSession,
    done: Arc<AtomicBool>,
) {
    let DeletedSession {
        id,
        name,
        namespace,
        webhook,
        logout,
    } = session;
    if logout {
        // Its last status follows its webhook, as its other events did (a paused session's
        // route may have lapsed).
        ctx.routing.route(&id, &namespace, webhook.as_ref()).await;
        let outcome = ctx.supervisor.logout(&id).await;
        if !outcome.is_settled() {
            tracing::debug!(session_id = %id, ?outcome, "deleted session's logout to be tried again");
            return;
        }
        let wiped = match &ctx.redis {
            Some(redis) => crate::redis::wipe_session(redis, &id)
                .await
                .map_err(|e| e.to_string()),
            None => Ok(0),
        };
        match wiped {
            Ok(keys) => {
                tracing::info!(session_id = %id, keys, logout = outcome.as_str(), "deleted session logged out and wiped");
                let patch =
                    serde_json::json!({"metadata": {"annotations": {CLEANED_ANNOTATION: ctx.pod}}});
                if let Err(err) = ctx
                    .api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    tracing::warn!(%err, session_id = %id, "could not mark the session cleaned; retrying");
                    return;
                }
            }
            Err(err) => {
                tracing::warn!(%err, session_id = %id, "wiping credentials failed; retrying");
                return;
            }
        }
    } else {
        ctx.supervisor.stop(&id).await;
    }
    // After its last status: an event created before the removal is delivered but does not
    // bring the session back into the states.
    forget(&id, &ctx.states, &ctx.routing, &ctx.logins);
    done.store(true, AtomicOrdering::Release);
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
