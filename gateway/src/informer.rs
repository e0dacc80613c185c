//! Cluster mode's cache fallback: every `WhatsappSession`, indexed by session id
//! and kept current by a watch. A lookup for a session that no cache tier knows (another shard's
//! session that Redis has forgotten, a session not started yet) is answered from memory instead of
//! the apiserver or the backend.
//!
//! The index holds a small [`SessionView`] per session (and the few spec fields the session API
//! lists), not the objects: at tens of thousands of
//! sessions the managed fields and annotations would cost far more than the answers need. The QR
//! payload is never on the resource, so this tier never answers with one.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use crds::{Phase, WhatsappSession};
use futures::StreamExt;
use futures::future::BoxFuture;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::cache::{SessionLookup, SessionView};
use crate::events::SessionStatus;
use crate::manage::{LoginSpec, SessionSpec};

/// The status a session's phase stands for.
pub fn status_of(phase: Option<Phase>) -> SessionStatus {
    match phase.unwrap_or_default() {
        Phase::Pending | Phase::Assigned | Phase::Connecting => SessionStatus::Connecting,
        Phase::AwaitingScan => SessionStatus::QrPending,
        Phase::Connected => SessionStatus::Active,
        Phase::Disconnected | Phase::Failed => SessionStatus::Inactive,
        Phase::LoggedOut => SessionStatus::LoggedOut,
    }
}

/// What the resource says about a session. Version 0: an informer answer is never newer than
/// anything an owning gateway wrote to the cache.
pub fn view_of(session: &WhatsappSession) -> SessionView {
    let id = session.session_id();
    let status = session.status.clone().unwrap_or_default();
    let mut view = SessionView::with_status(
        &id,
        status_of(status.phase),
        status
            .last_disconnect_reason
            .clone()
            .filter(|_| status.phase != Some(Phase::Connected)),
    );
    // The newest condition transition is when the phase last changed, as far as the resource
    // knows; without one, the resource's creation.
    let since = status
        .conditions
        .iter()
        .filter_map(|c| c.last_transition_time.as_deref())
        .filter_map(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .max()
        .or_else(|| {
            let created = session.metadata.creation_timestamp.as_ref()?;
            DateTime::<Utc>::from_timestamp_millis(created.0.as_millisecond())
        });
    if let Some(since) = since {
        view.status.since = since;
        view.connection.since = since;
    }
    view.status.version = 0;
    view.session.gateway = status.gateway_pod;
    view
}

/// One session in the index: the view the cache answers with, where the resource is, and the spec
/// fields the session API lists and compares.
#[derive(Debug, Clone)]
pub struct Indexed {
    pub view: SessionView,
    pub namespace: String,
    pub name: String,
    pub spec: SessionSpec,
    /// Deleted, waiting for its finalizer (logout and clean-up).
    pub deleting: bool,
}

fn indexed(session: &WhatsappSession) -> Arc<Indexed> {
    Arc::new(Indexed {
        view: view_of(session),
        namespace: session.metadata.namespace.clone().unwrap_or_default(),
        name: session.metadata.name.clone().unwrap_or_default(),
        spec: SessionSpec {
            session_id: session.session_id(),
            login: LoginSpec::from(&session.spec.login),
            paused: session.spec.paused,
            logout_on_delete: session.spec.logout_on_delete,
            webhook: session.spec.webhook.clone(),
        },
        deleting: session.metadata.deletion_timestamp.is_some(),
    })
}

/// The index, shared between the watch task and lookups.
#[derive(Clone, Default, Debug)]
pub struct InformerLookup {
    index: Arc<RwLock<HashMap<String, Arc<Indexed>>>>,
    /// Session id -> the resources (`namespace/name`) not being deleted that name it. Ids are
    /// global and resources namespaced, so one id may have several (see the operator's conflict
    /// handling); a gateway must not log an account out while another resource still names it.
    names: Arc<RwLock<Names>>,
    ready: Option<watch::Receiver<bool>>,
}

type Names = HashMap<String, std::collections::BTreeSet<String>>;

fn resource_key(session: &WhatsappSession) -> String {
    format!(
        "{}/{}",
        session.metadata.namespace.as_deref().unwrap_or_default(),
        session.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Records `session` in `names` (or takes it out once it is being deleted).
fn name(names: &mut Names, session: &WhatsappSession) {
    let id = session.session_id();
    let key = resource_key(session);
    if session.metadata.deletion_timestamp.is_none() {
        names.entry(id).or_default().insert(key);
    } else {
        unname(names, &id, &key);
    }
}

fn unname(names: &mut Names, id: &str, key: &str) {
    if let Some(keys) = names.get_mut(id) {
        keys.remove(key);
        if keys.is_empty() {
            names.remove(id);
        }
    }
}

impl InformerLookup {
    /// Watches the sessions of `namespace` (`None`: of every namespace, as the shards and the
    /// operator do; session ids are global, they key Redis) until `stop`.
    pub fn spawn(
        client: kube::Client,
        namespace: Option<&str>,
        stop: CancellationToken,
    ) -> (Self, JoinHandle<()>) {
        let api: Api<WhatsappSession> = match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        };
        let (ready_tx, ready_rx) = watch::channel(false);
        let lookup = InformerLookup {
            index: Arc::default(),
            names: Arc::default(),
            ready: Some(ready_rx),
        };
        let index = lookup.index.clone();
        let names = lookup.names.clone();
        let task = tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            // A relist builds a fresh index and swaps it in whole, so sessions deleted while the
            // watch was down do not linger.
            let mut relist: Option<(HashMap<String, Arc<Indexed>>, Names)> = None;
            loop {
                let event = tokio::select! {
                    () = stop.cancelled() => break,
                    event = events.next() => event,
                };
                let Some(event) = event else { break };
                match event {
                    Ok(watcher::Event::Init) => relist = Some(Default::default()),
                    Ok(watcher::Event::InitApply(s)) => {
                        let entry = indexed(&s);
                        let (fresh, fresh_names) = relist.get_or_insert_with(Default::default);
                        name(fresh_names, &s);
                        fresh.insert(entry.view.session_id.clone(), entry);
                    }
                    Ok(watcher::Event::InitDone) => {
                        let (fresh, fresh_names) = relist.take().unwrap_or_default();
                        tracing::debug!(sessions = fresh.len(), "informer index (re)listed");
                        *index.write().expect("index lock") = fresh;
                        *names.write().expect("names lock") = fresh_names;
                        let _ = ready_tx.send(true);
                    }
                    Ok(watcher::Event::Apply(s)) => {
                        let entry = indexed(&s);
                        name(&mut names.write().expect("names lock"), &s);
                        index
                            .write()
                            .expect("index lock")
                            .insert(entry.view.session_id.clone(), entry);
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        unname(
                            &mut names.write().expect("names lock"),
                            &s.session_id(),
                            &resource_key(&s),
                        );
                        index.write().expect("index lock").remove(&s.session_id());
                    }
                    Err(err) => tracing::warn!(%err, "session informer: watch error (retrying)"),
                }
            }
        });
        (lookup, task)
    }

    /// Waits until the first list is in (a lookup before that answers "unknown").
    pub async fn ready(&self) {
        if let Some(mut ready) = self.ready.clone() {
            let _ = ready.wait_for(|r| *r).await;
        }
    }

    pub fn len(&self) -> usize {
        self.index.read().expect("index lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The session as the resource describes it.
    pub fn get(&self, session_id: &str) -> Option<SessionView> {
        self.index
            .read()
            .expect("index lock")
            .get(session_id)
            .map(|v| v.view.clone())
    }

    /// The session's index entry (resource name, namespace, spec).
    pub fn entry(&self, session_id: &str) -> Option<Arc<Indexed>> {
        self.index
            .read()
            .expect("index lock")
            .get(session_id)
            .cloned()
    }

    /// A resource other than `namespace/name` that names `session_id` and is not being deleted.
    pub fn named_elsewhere(&self, session_id: &str, namespace: &str, name: &str) -> Option<String> {
        let key = format!("{namespace}/{name}");
        self.names
            .read()
            .expect("names lock")
            .get(session_id)?
            .iter()
            .find(|k| **k != key)
            .cloned()
    }

    /// Every indexed session.
    pub fn entries(&self) -> Vec<Arc<Indexed>> {
        self.index
            .read()
            .expect("index lock")
            .values()
            .cloned()
            .collect()
    }
}

impl SessionLookup for InformerLookup {
    fn lookup<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<Option<SessionView>>> {
        let found = self.get(session_id);
        Box::pin(async move { Ok(found) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{Condition, WhatsappSessionStatus};

    fn session(phase: Option<Phase>) -> WhatsappSession {
        let mut s = WhatsappSession::new("res-name", Default::default());
        s.spec.session_id = Some("acct-7".into());
        s.status = Some(WhatsappSessionStatus {
            phase,
            gateway_pod: Some("wa-gateway-2".into()),
            last_disconnect_reason: Some("disconnected: network".into()),
            conditions: vec![
                Condition {
                    type_: "Assigned".into(),
                    status: "True".into(),
                    last_transition_time: Some("2026-11-01T10:00:00Z".into()),
                    ..Default::default()
                },
                Condition {
                    type_: "Connected".into(),
                    status: "False".into(),
                    last_transition_time: Some("2026-11-01T10:05:00Z".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        s
    }

    #[test]
    fn an_id_named_by_two_resources_is_named_elsewhere_until_the_other_is_deleted() {
        let lookup = InformerLookup::default();
        let mut a = WhatsappSession::new("support", Default::default());
        a.metadata.namespace = Some("team-a".into());
        let mut b = a.clone();
        b.metadata.namespace = Some("team-b".into());
        {
            let mut names = lookup.names.write().unwrap();
            name(&mut names, &a);
            name(&mut names, &b);
        }
        assert_eq!(
            lookup
                .named_elsewhere("support", "team-a", "support")
                .as_deref(),
            Some("team-b/support")
        );
        b.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        name(&mut lookup.names.write().unwrap(), &b);
        assert_eq!(lookup.named_elsewhere("support", "team-a", "support"), None);
        assert_eq!(
            lookup
                .named_elsewhere("support", "team-b", "support")
                .as_deref(),
            Some("team-a/support")
        );
        unname(
            &mut lookup.names.write().unwrap(),
            "support",
            "team-a/support",
        );
        assert!(lookup.names.read().unwrap().is_empty());
    }

    #[test]
    fn phases_map_onto_gateway_statuses() {
        assert_eq!(status_of(None), SessionStatus::Connecting);
        assert_eq!(status_of(Some(Phase::Assigned)), SessionStatus::Connecting);
        assert_eq!(
            status_of(Some(Phase::AwaitingScan)),
            SessionStatus::QrPending
        );
        assert_eq!(status_of(Some(Phase::Connected)), SessionStatus::Active);
        assert_eq!(
            status_of(Some(Phase::Disconnected)),
            SessionStatus::Inactive
        );
        assert_eq!(status_of(Some(Phase::LoggedOut)), SessionStatus::LoggedOut);
    }

    #[test]
    fn a_view_carries_id_gateway_reason_and_last_transition() {
        let view = view_of(&session(Some(Phase::Disconnected)));
        assert_eq!(view.session_id, "acct-7");
        assert_eq!(view.status.status, SessionStatus::Inactive);
        assert_eq!(view.status.reason.as_deref(), Some("disconnected: network"));
        assert_eq!(view.session.gateway.as_deref(), Some("wa-gateway-2"));
        assert_eq!(view.status.since.to_rfc3339(), "2026-11-01T10:05:00+00:00");
        assert_eq!(view.version(), 0);
        assert!(view.qr.is_none());
        // A connected session shows no stale disconnect reason.
        let view = view_of(&session(Some(Phase::Connected)));
        assert_eq!(view.status.reason, None);
    }
}
