//! Session management (`POST/PATCH/DELETE /v1/sessions`): which sessions exist, asked for over
//! HTTP by the backend instead of with `kubectl` or a restart.
//!
//! - Standalone ([`LocalSessions`]): the sessions named at start-up (`--session`, `--simulate`,
//!   `--sessions-file`) are fixed; those created through the API live in a [`SessionBook`]: in
//!   Redis when configured (they survive restarts, and every gateway sharing the Redis runs them,
//!   split by the ownership locks), in memory otherwise.
//! - Cluster ([`kube::KubeSessions`]): the API is a bridge to `WhatsappSession` resources; the
//!   operator and the shards do the rest, as for `kubectl apply`.
//!
//! The decision of what to start, pause, resume or end from a wanted set is the pure [`plan`].

pub mod file;
pub mod kube;
pub mod metered;
pub mod redis_book;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::app::SessionStates;
use crate::events::SessionStatus;
use crate::session::supervisor::Supervisor;
use crate::session::{LoginDirectory, SessionDriver};

/// A session as the API creates it: the `WhatsappSession` spec fields that apply in both modes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionSpec {
    pub session_id: String,
    #[serde(default)]
    pub login: LoginSpec,
    #[serde(default)]
    pub paused: bool,
    #[serde(default = "default_true")]
    pub logout_on_delete: bool,
    /// The resource's `spec.webhook`: this session's own backend and signing key.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict_webhook"
    )]
    pub webhook: Option<crds::Webhook>,
}

fn default_true() -> bool {
    true
}

/// `webhook` as the API reads it: unknown fields are refused here too (the resource's types
/// accept them, since the apiserver prunes them), so a misspelt `secret_ref` is a 400 rather
/// than a webhook silently sent unsigned.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StrictWebhook {
    url: String,
    #[serde(default)]
    secret_ref: Option<StrictSecretRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictSecretRef {
    name: String,
    key: String,
}

fn strict_webhook<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<crds::Webhook>, D::Error> {
    Ok(
        Option::<StrictWebhook>::deserialize(deserializer)?.map(|w| crds::Webhook {
            url: w.url,
            secret_ref: w.secret_ref.map(|r| crds::SecretKeyRef {
                name: r.name,
                key: r.key,
            }),
        }),
    )
}

/// `login` of a [`SessionSpec`]; the same JSON as the resource's `spec.login`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoginSpec {
    #[serde(default)]
    pub method: crds::LoginMethod,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_number: Option<String>,
}

impl From<&LoginSpec> for crds::Login {
    fn from(login: &LoginSpec) -> Self {
        crds::Login {
            method: login.method,
            phone_number: login.phone_number.clone(),
        }
    }
}

impl From<&crds::Login> for LoginSpec {
    fn from(login: &crds::Login) -> Self {
        LoginSpec {
            method: login.method,
            phone_number: login.phone_number.clone(),
        }
    }
}

impl SessionSpec {
    /// A QR-linked, running session.
    pub fn qr(session_id: impl Into<String>) -> Self {
        SessionSpec {
            session_id: session_id.into(),
            login: LoginSpec::default(),
            paused: false,
            logout_on_delete: true,
            webhook: None,
        }
    }

    /// The same rules as the resource's schema, checked before anything is stored, so both modes
    /// refuse the same input with the field named.
    pub fn validate(&self) -> Result<(), ManageError> {
        if !crate::cache::valid_session_id(&self.session_id) {
            return Err(ManageError::invalid(
                "sessionId",
                "1-128 characters of A-Z a-z 0-9 - _ . @ :, not starting with `gw:` (reserved)",
            ));
        }
        match (&self.login.method, &self.login.phone_number) {
            (crds::LoginMethod::PairingCode, None) => Err(ManageError::invalid(
                "login.phoneNumber",
                "required when login.method is pairingCode",
            )),
            (_, Some(phone)) if !valid_phone_number(phone) => Err(ManageError::invalid(
                "login.phoneNumber",
                "international format without spaces, 8-15 digits, e.g. +5491122334455",
            )),
            _ => Ok(()),
        }?;
        if let Some(webhook) = &self.webhook {
            crate::delivery::WebhookTarget::parse_url(&webhook.url)
                .map_err(|reason| ManageError::invalid("webhook.url", reason))?;
            if let Some(reference) = &webhook.secret_ref {
                reference
                    .validate()
                    .map_err(|reason| ManageError::invalid("webhook.secretRef", reason))?;
            }
        }
        Ok(())
    }
}

/// `^\+?[1-9][0-9]{7,14}$`, the resource schema's pattern.
fn valid_phone_number(phone: &str) -> bool {
    let digits = phone.strip_prefix('+').unwrap_or(phone);
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// Why a management request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManageError {
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    #[error("session not found")]
    NotFound,
    /// The session exists with a different spec.
    #[error("session exists with a different spec")]
    Conflict,
    /// Being deleted (its logout and clean-up are running); create it again once it is gone.
    #[error("session is being deleted; try again once it is gone")]
    Deleting,
    /// Named in this gateway's configuration, so not the API's to change.
    #[error("session is configured at start-up ({0}); change the configuration instead")]
    Configured(&'static str),
    /// Writes need a credential the gateway does not have, or the API is read-only here.
    #[error("{0}")]
    Forbidden(String),
    #[error("session store unavailable: {0}")]
    Unavailable(String),
}

impl ManageError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ManageError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

pub type ManageResult<T> = std::result::Result<T, ManageError>;

/// Outcome of a create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    /// It already existed with this spec (a retried request).
    Unchanged,
}

/// A session as listed by `GET /v1/sessions`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listed {
    #[serde(flatten)]
    pub spec: SessionSpec,
    /// Where it came from: `api`, `config` (standalone start-up) or `resource` (cluster).
    pub source: &'static str,
    /// Its status as far as this gateway knows; absent before the first report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<SessionStatus>,
}

/// Creates, pauses and deletes sessions; the `/v1/sessions` write API calls this.
pub trait SessionManager: Send + Sync {
    fn create(&self, spec: SessionSpec) -> BoxFuture<'_, ManageResult<Created>>;
    fn set_paused<'a>(
        &'a self,
        session_id: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, ManageResult<()>>;
    /// Deletes the session; a live one logs out first when its `logoutOnDelete` says so.
    fn delete<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<()>>;
    fn list(&self) -> BoxFuture<'_, ManageResult<Vec<Listed>>>;
    /// Whether the session names its own webhook (`spec.webhook`), as far as this gateway knows.
    fn has_webhook<'a>(&'a self, _session_id: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async { false })
    }
}

impl<T: SessionManager + ?Sized> SessionManager for Arc<T> {
    fn create(&self, spec: SessionSpec) -> BoxFuture<'_, ManageResult<Created>> {
        (**self).create(spec)
    }
    fn set_paused<'a>(
        &'a self,
        session_id: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, ManageResult<()>> {
        (**self).set_paused(session_id, paused)
    }
    fn delete<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<()>> {
        (**self).delete(session_id)
    }
    fn list(&self) -> BoxFuture<'_, ManageResult<Vec<Listed>>> {
        (**self).list()
    }
    fn has_webhook<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, bool> {
        (**self).has_webhook(session_id)
    }
}

/// Where standalone keeps the sessions created through the API.
pub trait SessionBook: Send + Sync {
    /// Stores `spec` unless its id is taken; returns what was there.
    fn insert_new(&self, spec: &SessionSpec) -> BoxFuture<'_, ManageResult<Option<SessionSpec>>>;
    /// Replaces `old` by `new` if the stored spec is still `old`; `false` otherwise.
    fn replace<'a>(
        &'a self,
        old: &'a SessionSpec,
        new: &'a SessionSpec,
    ) -> BoxFuture<'a, ManageResult<bool>>;
    fn remove<'a>(
        &'a self,
        session_id: &'a str,
    ) -> BoxFuture<'a, ManageResult<Option<SessionSpec>>>;
    fn all(&self) -> BoxFuture<'_, ManageResult<BookSnapshot>>;
    /// One entry, without reading the whole book.
    fn get<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<Option<BookEntry>>>;
    /// Changes with every write (by any gateway sharing the book): a cheap "anything new?".
    fn version(&self) -> BoxFuture<'_, ManageResult<u64>>;
    /// Sets or clears the session's hold, which keeps every gateway from taking its lock (see
    /// [`crate::session::ownership::hold_key`]).
    fn set_hold<'a>(&'a self, session_id: &'a str, hold: Hold) -> BoxFuture<'a, ManageResult<()>>;
    /// The session's hold, if any.
    fn hold<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<Option<Hold>>>;
    /// Deletes a deleted session's stored state (credentials, key store, cache entries) if it is
    /// still held as deleted and nobody holds its lock. A no-op for a book without a store.
    fn wipe_deleted<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<Wipe>>;
}

/// Outcome of [`SessionBook::wipe_deleted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wipe {
    Wiped(usize),
    /// Not (or no longer) held as deleted: created again, or the hold expired.
    NotDeleted,
    /// A gateway still holds its lock (it logs out and wipes its credentials itself).
    Locked,
}

/// One entry of the book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BookEntry {
    Spec(SessionSpec),
    /// Written by a newer version (see [`BookSnapshot::unreadable`]).
    Unreadable,
}

/// The book's content at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BookSnapshot {
    pub specs: Vec<SessionSpec>,
    /// Ids whose entry does not parse (written by a newer version): kept as they are, never
    /// taken for deleted.
    pub unreadable: Vec<String>,
}

/// Whether a session may be started by any gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Runnable.
    Clear,
    /// Paused: held until resumed.
    Paused,
    /// Deleted: held until every gateway has followed the book ([`DELETED_HOLD`]), or the id is
    /// created again. Only a session gone from the book *and* held as deleted is logged out by the
    /// gateways that follow the book; one that merely vanished (Redis lost its data) is stopped.
    Deleted,
}

impl Hold {
    pub fn as_str(self) -> &'static str {
        match self {
            Hold::Clear => "clear",
            Hold::Paused => "paused",
            Hold::Deleted => crate::session::ownership::DELETED_HOLD_VALUE,
        }
    }

    pub fn parse(value: &str) -> Option<Hold> {
        match value {
            "paused" => Some(Hold::Paused),
            crate::session::ownership::DELETED_HOLD_VALUE => Some(Hold::Deleted),
            _ => None,
        }
    }
}

/// How long a deleted session stays held: many times the book's follow interval. Creating the id
/// again is refused meanwhile (`409 session_deleting`), so every gateway sees it gone first.
pub const DELETED_HOLD: Duration = Duration::from_secs(15);

/// A [`SessionBook`] for a gateway alone, without Redis: lost on restart (the log says so).
#[derive(Debug, Default)]
pub struct MemoryBook {
    inner: Mutex<MemoryBookInner>,
}

#[derive(Debug, Default)]
struct MemoryBookInner {
    version: u64,
    specs: BTreeMap<String, SessionSpec>,
    holds: HashMap<String, Hold>,
}

impl SessionBook for MemoryBook {
    fn insert_new(&self, spec: &SessionSpec) -> BoxFuture<'_, ManageResult<Option<SessionSpec>>> {
        let mut inner = self.inner.lock().expect("book lock");
        let found = inner.specs.get(&spec.session_id).cloned();
        if found.is_none() {
            inner.specs.insert(spec.session_id.clone(), spec.clone());
            inner.version += 1;
        }
        Box::pin(async move { Ok(found) })
    }

    fn replace<'a>(
        &'a self,
        old: &'a SessionSpec,
        new: &'a SessionSpec,
    ) -> BoxFuture<'a, ManageResult<bool>> {
        let mut inner = self.inner.lock().expect("book lock");
        let current = inner.specs.get(&old.session_id) == Some(old);
        if current {
            inner.specs.insert(new.session_id.clone(), new.clone());
            inner.version += 1;
        }
        Box::pin(async move { Ok(current) })
    }

    fn remove<'a>(
        &'a self,
        session_id: &'a str,
    ) -> BoxFuture<'a, ManageResult<Option<SessionSpec>>> {
        let mut inner = self.inner.lock().expect("book lock");
        let found = inner.specs.remove(session_id);
        if found.is_some() {
            inner.version += 1;
        }
        Box::pin(async move { Ok(found) })
    }

    fn all(&self) -> BoxFuture<'_, ManageResult<BookSnapshot>> {
        let specs = self
            .inner
            .lock()
            .expect("book lock")
            .specs
            .values()
            .cloned()
            .collect();
        Box::pin(async move {
            Ok(BookSnapshot {
                specs,
                unreadable: Vec::new(),
            })
        })
    }

    fn get<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<Option<BookEntry>>> {
        let found = self
            .inner
            .lock()
            .expect("book lock")
            .specs
            .get(session_id)
            .cloned()
            .map(BookEntry::Spec);
        Box::pin(async move { Ok(found) })
    }

    fn version(&self) -> BoxFuture<'_, ManageResult<u64>> {
        let version = self.inner.lock().expect("book lock").version;
        Box::pin(async move { Ok(version) })
    }

    fn set_hold<'a>(&'a self, session_id: &'a str, hold: Hold) -> BoxFuture<'a, ManageResult<()>> {
        let mut inner = self.inner.lock().expect("book lock");
        // As in Redis: only a delete sets or replaces a `deleted` hold (which, here, stays until
        // the delete's clean-up: there is only this process to tell).
        let deleted = inner.holds.get(session_id) == Some(&Hold::Deleted);
        match hold {
            Hold::Deleted => {
                inner.holds.insert(session_id.to_owned(), hold);
            }
            _ if deleted => {}
            Hold::Clear => {
                inner.holds.remove(session_id);
            }
            Hold::Paused => {
                inner.holds.insert(session_id.to_owned(), hold);
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn hold<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<Option<Hold>>> {
        let hold = self
            .inner
            .lock()
            .expect("book lock")
            .holds
            .get(session_id)
            .copied();
        Box::pin(async move { Ok(hold) })
    }

    fn wipe_deleted<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<Wipe>> {
        // Nothing stored beyond the spec; the hold has done its job once the delete is applied.
        let mut inner = self.inner.lock().expect("book lock");
        if inner.holds.get(session_id) == Some(&Hold::Deleted) {
            inner.holds.remove(session_id);
        }
        Box::pin(async { Ok(Wipe::Wiped(0)) })
    }
}

/// One step that brings the supervisor to a wanted set of sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// New or resumed: run it (with this login).
    Run(SessionSpec),
    /// Stop it, keep its credentials and its place.
    Pause(SessionSpec),
    /// Gone from the wanted set: end it, logging out first when `logout`.
    End { session_id: String, logout: bool },
}

/// What changes from `applied` (what the supervisor was last told) to `wanted`. A login change
/// of a running session takes effect at its next start.
pub fn plan(
    applied: &HashMap<String, SessionSpec>,
    wanted: &HashMap<String, SessionSpec>,
) -> Vec<Step> {
    let mut steps = Vec::new();
    for (id, spec) in wanted {
        match applied.get(id) {
            None if spec.paused => steps.push(Step::Pause(spec.clone())),
            None => steps.push(Step::Run(spec.clone())),
            Some(old) if old.paused && !spec.paused => steps.push(Step::Run(spec.clone())),
            Some(old) if !old.paused && spec.paused => steps.push(Step::Pause(spec.clone())),
            Some(old) if old != spec => {
                // Same run state; record the new login / logout choice.
                if spec.paused {
                    steps.push(Step::Pause(spec.clone()));
                } else {
                    steps.push(Step::Run(spec.clone()));
                }
            }
            Some(_) => {}
        }
    }
    for (id, old) in applied {
        if !wanted.contains_key(id) {
            steps.push(Step::End {
                session_id: id.clone(),
                logout: old.logout_on_delete,
            });
        }
    }
    // Deterministic order (tests, logs): ends first, so a re-created id starts clean.
    steps.sort_by_key(rank);
    steps
}

fn rank(step: &Step) -> (u8, String) {
    match step {
        Step::End { session_id, .. } => (0, session_id.clone()),
        Step::Pause(spec) => (1, spec.session_id.clone()),
        Step::Run(spec) => (2, spec.session_id.clone()),
    }
}

/// Standalone session management: the sessions named at start-up plus those in the book,
/// applied to the supervisor.
pub struct LocalSessions<D: SessionDriver> {
    supervisor: Arc<Supervisor<D>>,
    logins: LoginDirectory,
    states: Arc<SessionStates>,
    /// Named at start-up, with where (for the error when the API tries to change one).
    configured: HashMap<String, (SessionSpec, &'static str)>,
    book: Arc<dyn SessionBook>,
    /// Configured ids whose hold was cleared (once per process).
    holds_cleared: Mutex<std::collections::HashSet<String>>,
    /// What the supervisor was last told to run; one reconciliation at a time.
    applied: tokio::sync::Mutex<HashMap<String, SessionSpec>>,
    /// Book version last applied in full.
    seen_version: Mutex<Option<u64>>,
    /// Per-session webhooks; without it (unit tests) a session naming one does not start.
    routing: Option<crate::secrets::WebhookRouting>,
    /// A step waits for a webhook: the next follow tick reconciles again though the book's
    /// version has not moved.
    deferred: std::sync::atomic::AtomicBool,
    /// Sessions applied here whose spec names a webhook: answers [`SessionManager::has_webhook`]
    /// without Redis (a status change must not be refused, nor misrouted, in a Redis outage).
    with_webhook: Mutex<std::collections::HashSet<String>>,
    /// Ends under way (see [`LocalSessions::end_session`]), by session id: the next incarnation
    /// of an id waits for the previous one's end, and a delete's wipe follows its logout.
    ending: Mutex<HashMap<String, Ending>>,
}

/// A session's end, awaitable by several.
type Ending = futures::future::Shared<BoxFuture<'static, ()>>;

impl<D: SessionDriver> LocalSessions<D> {
    pub fn new(
        supervisor: Arc<Supervisor<D>>,
        logins: LoginDirectory,
        states: Arc<SessionStates>,
        configured: Vec<(SessionSpec, &'static str)>,
        book: Arc<dyn SessionBook>,
    ) -> Self {
        LocalSessions {
            supervisor,
            logins,
            states,
            configured: configured
                .into_iter()
                .map(|(spec, source)| (spec.session_id.clone(), (spec, source)))
                .collect(),
            book,
            holds_cleared: Mutex::default(),
            applied: tokio::sync::Mutex::new(HashMap::new()),
            seen_version: Mutex::new(None),
            routing: None,
            deferred: Default::default(),
            with_webhook: Mutex::default(),
            ending: Mutex::default(),
        }
    }

    /// Routes each session's batches to its `webhook` when it names one.
    pub fn with_webhooks(mut self, routing: crate::secrets::WebhookRouting) -> Self {
        self.routing = Some(routing);
        self
    }

    /// The webhook of `spec` resolved now, so a create naming a Secret that cannot be read is
    /// refused with the field named instead of stored and never started.
    async fn check_webhook(&self, spec: &SessionSpec) -> ManageResult<()> {
        let Some(webhook) = &spec.webhook else {
            return Ok(());
        };
        let Some(routing) = &self.routing else {
            return Err(ManageError::invalid(
                "webhook",
                "per-session webhooks are not available here",
            ));
        };
        routing
            .resolver
            .resolve("", webhook)
            .await
            .map(drop)
            .map_err(|reason| {
                let field = if reason.starts_with("webhook.url") {
                    "webhook.url"
                } else {
                    "webhook.secretRef"
                };
                ManageError::invalid(field, reason)
            })
    }

    /// Points the session's batches at its webhook; false when it must not start yet.
    async fn route(&self, spec: &SessionSpec) -> bool {
        match &self.routing {
            Some(routing) => {
                routing
                    .route(&spec.session_id, "", spec.webhook.as_ref())
                    .await
            }
            None => spec.webhook.is_none(),
        }
    }

    pub fn supervisor(&self) -> &Arc<Supervisor<D>> {
        &self.supervisor
    }

    /// Starts the sessions named at start-up, whatever the book's state (Redis may be down).
    pub async fn start_configured(&self) {
        let mut applied = self.applied.lock().await;
        for (id, (spec, _)) in &self.configured {
            if !applied.contains_key(id) {
                let step = if spec.paused {
                    Step::Pause(spec.clone())
                } else {
                    Step::Run(spec.clone())
                };
                // Run or pause only: nothing ends.
                self.apply(&mut applied, &step, &mut Vec::new()).await;
            }
        }
    }

    /// Brings the supervisor to the configured sessions plus the book's; `force` re-reads the
    /// book even when its version has not moved. Returns how many steps were taken.
    pub async fn reconcile(&self, force: bool) -> ManageResult<usize> {
        let mut applied = self.applied.lock().await;
        let version = self.book.version().await?;
        let deferred = self.deferred.load(std::sync::atomic::Ordering::Relaxed);
        if !force && !deferred && *self.seen_version.lock().expect("version lock") == Some(version)
        {
            return Ok(0);
        }
        let snapshot = self.book.all().await?;
        let mut wanted: HashMap<String, SessionSpec> = snapshot
            .specs
            .into_iter()
            .map(|spec| (spec.session_id.clone(), spec))
            .collect();
        // An entry this version cannot read stays as it was applied (or unstarted).
        for id in snapshot.unreadable {
            if let Some(spec) = applied.get(&id) {
                wanted.insert(id, spec.clone());
            }
        }
        // Start-up configuration wins over a book entry with the same id, and over its hold.
        for (id, (spec, _)) in &self.configured {
            if wanted.insert(id.clone(), spec.clone()).is_some()
                && !self.holds_cleared.lock().expect("holds lock").contains(id)
            {
                self.book.set_hold(id, Hold::Clear).await?;
                self.holds_cleared
                    .lock()
                    .expect("holds lock")
                    .insert(id.clone());
            }
        }
        let steps = plan(&applied, &wanted);
        let count = steps.len();
        // Set again below by any step that still waits for its webhook.
        self.deferred
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // `applied` follows step by step, so a reconciliation cut short (a request whose client
        // went away) leaves it true and the next one finishes the work.
        let mut endings = Vec::new();
        for step in steps {
            let step = match step {
                Step::End { session_id, logout } if logout => {
                    // Log out only what was deleted on purpose: a session that vanished from
                    // the book without a delete (Redis lost its data) is stopped, not unlinked.
                    let deleted = self.book.hold(&session_id).await? == Some(Hold::Deleted);
                    if !deleted {
                        tracing::warn!(session_id = %session_id, "session vanished from the session book without a delete; stopping it without logging out");
                    }
                    Step::End {
                        session_id,
                        logout: deleted,
                    }
                }
                other => other,
            };
            self.apply(&mut applied, &step, &mut endings).await;
        }
        *self.seen_version.lock().expect("version lock") = Some(version);
        drop(applied);
        futures::future::join_all(endings).await;
        Ok(count)
    }

    /// Carries a step out and records it in `applied`. An end runs on a task of its own, added to
    /// `endings`: callers await them after letting go of `applied`, so a logout (which may
    /// connect a paused session to unlink it: seconds) does not hold up every other call.
    async fn apply(
        &self,
        applied: &mut HashMap<String, SessionSpec>,
        step: &Step,
        endings: &mut Vec<Ending>,
    ) {
        if let Step::Run(spec) | Step::Pause(spec) = step
            && self.ending_of(&spec.session_id).is_some()
        {
            // The previous incarnation of this id is still ending (logging out, say): starting
            // now would have that end stop this one or forget its login and route. Not recorded
            // as applied; the follow loop applies it once the end is done.
            self.deferred
                .store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(session_id = %spec.session_id, "session waits for its previous end");
            return;
        }
        {
            let mut with_webhook = self.with_webhook.lock().expect("webhook set lock");
            match step {
                Step::Run(spec) | Step::Pause(spec) if spec.webhook.is_some() => {
                    with_webhook.insert(spec.session_id.clone());
                }
                Step::Run(spec) | Step::Pause(spec) => {
                    with_webhook.remove(&spec.session_id);
                }
                // Its late events still follow its route (kept for the grace) to the webhook.
                Step::End { session_id, .. } => {
                    with_webhook.remove(session_id);
                }
            }
        }
        match step {
            Step::Run(spec) => {
                if !self.route(spec).await {
                    // Stopped if it ran (a webhook added that cannot be resolved: its events
                    // must not reach the gateway's backend) and not recorded as applied, so
                    // the follow loop tries again.
                    self.supervisor.stop(&spec.session_id).await;
                    applied.remove(&spec.session_id);
                    self.deferred
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(session_id = %spec.session_id, "session waits for its webhook");
                    return;
                }
                self.logins.set(&spec.session_id, &(&spec.login).into());
                self.supervisor.want(&spec.session_id);
            }
            Step::Pause(spec) => {
                // Its pause event and re-sync go to its webhook (held when it cannot be
                // resolved), and a webhook added while paused is followed too.
                self.route(spec).await;
                self.logins.set(&spec.session_id, &(&spec.login).into());
                self.supervisor.pause(&spec.session_id).await;
            }
            Step::End { session_id, logout } => {
                let ending = self.end_session(session_id, *logout);
                self.ending
                    .lock()
                    .expect("endings lock")
                    .insert(session_id.clone(), ending.clone());
                endings.push(ending);
            }
        }
        match step {
            Step::Run(spec) | Step::Pause(spec) => {
                applied.insert(spec.session_id.clone(), spec.clone());
            }
            Step::End { session_id, .. } => {
                applied.remove(session_id);
            }
        }
    }

    /// Waits, at most `within`, for the ends under way (deleted sessions logging out), so their
    /// last statuses reach the pipeline before it drains at shutdown. False if some did not end.
    pub async fn finish_ends(&self, within: Duration) -> bool {
        let ends: Vec<Ending> = self
            .ending
            .lock()
            .expect("endings lock")
            .values()
            .filter(|end| end.peek().is_none())
            .cloned()
            .collect();
        tokio::time::timeout(within, futures::future::join_all(ends))
            .await
            .is_ok()
    }

    /// The end of `session_id` under way, if any (forgetting those that are done).
    fn ending_of(&self, session_id: &str) -> Option<Ending> {
        let mut ending = self.ending.lock().expect("endings lock");
        ending.retain(|_, end| end.peek().is_none());
        ending.get(session_id).cloned()
    }

    /// Stops the session (with `logout`, logs it out: see [`Supervisor::logout`]) and forgets
    /// it, on a task that finishes even if the caller goes away.
    fn end_session(&self, session_id: &str, logout: bool) -> Ending {
        let supervisor = self.supervisor.clone();
        let logins = self.logins.clone();
        let states = self.states.clone();
        let webhooks = self.routing.as_ref().map(|r| r.webhooks.clone());
        let session_id = session_id.to_owned();
        let task = tokio::spawn(async move {
            if logout {
                // One more try after a blip (Redis, or the lock lost midway); a session
                // another gateway holds is logged out there.
                for attempt in 0..2 {
                    let outcome = supervisor.logout(&session_id).await;
                    if outcome.is_settled() || attempt == 1 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            } else {
                supervisor.stop(&session_id).await;
            }
            logins.remove(&session_id);
            // Its last status went out with the stop; re-sync and the gauges forget it.
            states.remove(&session_id);
            if let Some(webhooks) = webhooks {
                webhooks.removed(&session_id);
            }
            tracing::info!(session_id = %session_id, logout, "session deleted");
        });
        async move {
            let _ = task.await;
        }
        .boxed()
        .shared()
    }

    fn configured_source(&self, session_id: &str) -> Option<&'static str> {
        self.configured.get(session_id).map(|(_, source)| *source)
    }

    /// After a write to the book: applies that one session's change here now (the follow loop
    /// re-reads the whole book at most once a second, so a burst of calls costs one read each,
    /// not one of the whole book).
    async fn apply_change(&self, session_id: &str, wanted: Option<SessionSpec>) {
        let mut applied = self.applied.lock().await;
        let before: HashMap<String, SessionSpec> = applied
            .get(session_id)
            .map(|spec| (session_id.to_owned(), spec.clone()))
            .into_iter()
            .collect();
        let after: HashMap<String, SessionSpec> = wanted
            .map(|spec| (session_id.to_owned(), spec))
            .into_iter()
            .collect();
        let mut endings = Vec::new();
        for step in plan(&before, &after) {
            self.apply(&mut applied, &step, &mut endings).await;
        }
        drop(applied);
        futures::future::join_all(endings).await;
    }

    async fn find(&self, session_id: &str) -> ManageResult<SessionSpec> {
        match self.book.get(session_id).await? {
            Some(BookEntry::Spec(spec)) => Ok(spec),
            Some(BookEntry::Unreadable) => Err(ManageError::Conflict),
            None => Err(ManageError::NotFound),
        }
    }

    /// Re-reads the book every `every` (a cheap version check) until `stop`, so sessions created
    /// or deleted through another gateway sharing the Redis start or stop here too, and a change
    /// whose immediate application failed is applied.
    pub fn spawn_follow(
        self: &Arc<Self>,
        every: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()>
    where
        D: 'static,
    {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = stop.cancelled() => return,
                }
                match this.reconcile(false).await {
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!("session book readable again");
                    }
                    Ok(_) => {}
                    Err(err) if !failing => {
                        failing = true;
                        tracing::warn!(%err, "cannot read the session book; running sessions are kept");
                    }
                    Err(_) => {}
                }
            }
        })
    }
}

/// How long the clean-up after a delete waits for the session's lock to be let go (by this
/// gateway, or by another that follows the book and logs it out).
const WIPE_WAIT: Duration = DELETED_HOLD;

/// Once nobody holds the deleted session's lock, deletes its stored state, as cluster mode does
/// for a deleted resource: a session that was not running anywhere (paused, waiting) is wiped
/// too, so creating the id again starts a new pairing. Runs on the gateway that took the delete.
async fn wipe_when_released(book: Arc<dyn SessionBook>, session_id: String) {
    let deadline = tokio::time::Instant::now() + WIPE_WAIT;
    loop {
        match book.wipe_deleted(&session_id).await {
            Ok(Wipe::Wiped(keys)) => {
                tracing::debug!(session_id = %session_id, keys, "deleted session's keys wiped");
                return;
            }
            Ok(Wipe::NotDeleted) => return,
            Ok(Wipe::Locked) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok(Wipe::Locked) => {
                tracing::warn!(session_id = %session_id, "deleted session still locked; its holder wipes its credentials on logout");
                return;
            }
            Err(err) => {
                tracing::warn!(session_id = %session_id, %err, "cannot clean a deleted session's keys up");
                return;
            }
        }
    }
}

impl<D: SessionDriver + 'static> SessionManager for LocalSessions<D> {
    fn has_webhook<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            if let Some((spec, _)) = self.configured.get(session_id) {
                return spec.webhook.is_some();
            }
            // What this gateway applied mirrors the book (every gateway wants every session;
            // the locks decide who runs it) and needs no Redis, so a PUT during a Redis outage
            // neither fails nor goes astray. Not applied here yet: the book.
            if self
                .with_webhook
                .lock()
                .expect("webhook set lock")
                .contains(session_id)
            {
                return true;
            }
            match self.book.get(session_id).await {
                Ok(Some(BookEntry::Spec(spec))) => spec.webhook.is_some(),
                Ok(Some(BookEntry::Unreadable)) => true,
                // Unknown, or Redis unreachable for a session this gateway never saw.
                Ok(None) | Err(_) => false,
            }
        })
    }

    fn create(&self, spec: SessionSpec) -> BoxFuture<'_, ManageResult<Created>> {
        Box::pin(async move {
            spec.validate()?;
            self.check_webhook(&spec).await?;
            if let Some((configured, source)) = self.configured.get(&spec.session_id) {
                return if *configured == spec {
                    Ok(Created::Unchanged)
                } else {
                    Err(ManageError::Configured(source))
                };
            }
            if self.book.hold(&spec.session_id).await? == Some(Hold::Deleted) {
                return Err(ManageError::Deleting);
            }
            let created = match self.book.insert_new(&spec).await? {
                None => Created::New,
                Some(existing) if existing == spec => Created::Unchanged,
                Some(_) => return Err(ManageError::Conflict),
            };
            if created == Created::New {
                // A hold left by an earlier delete of this id must not keep it from starting.
                let hold = if spec.paused {
                    Hold::Paused
                } else {
                    Hold::Clear
                };
                if let Err(err) = self.book.set_hold(&spec.session_id, hold).await {
                    tracing::warn!(session_id = %spec.session_id, %err, "could not set the new session's hold");
                }
                tracing::info!(session_id = %spec.session_id, paused = spec.paused, "session created");
            }
            let id = spec.session_id.clone();
            self.apply_change(&id, Some(spec)).await;
            Ok(created)
        })
    }

    fn set_paused<'a>(
        &'a self,
        session_id: &'a str,
        paused: bool,
    ) -> BoxFuture<'a, ManageResult<()>> {
        Box::pin(async move {
            if let Some(source) = self.configured_source(session_id) {
                return Err(ManageError::Configured(source));
            }
            let current = self.find(session_id).await?;
            if self.book.hold(session_id).await? == Some(Hold::Deleted) {
                return Err(ManageError::Deleting);
            }
            // Held before the book says paused, so no gateway starts it meanwhile; cleared on
            // resume even when the book already says running (a pause cut short).
            let hold = if paused { Hold::Paused } else { Hold::Clear };
            self.book.set_hold(session_id, hold).await?;
            if current.paused != paused {
                let spec = SessionSpec {
                    paused,
                    ..current.clone()
                };
                let replaced = self.book.replace(&current, &spec).await;
                if !matches!(replaced, Ok(true)) {
                    // Not stored: an identical pause may have won the race (then all is well);
                    // otherwise take the hold back, so a refused pause leaves nothing behind.
                    let now = self.find(session_id).await;
                    if let Ok(now) = now.clone()
                        && now.paused == paused
                    {
                        self.apply_change(session_id, Some(now)).await;
                        return Ok(());
                    }
                    if paused {
                        let _ = self.book.set_hold(session_id, Hold::Clear).await;
                    }
                    return match (replaced, now) {
                        (Err(err), _) => Err(err),
                        (_, Err(ManageError::NotFound)) => Err(ManageError::NotFound),
                        _ => Err(ManageError::Conflict),
                    };
                }
            }
            self.apply_change(session_id, Some(SessionSpec { paused, ..current }))
                .await;
            Ok(())
        })
    }

    fn delete<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<()>> {
        Box::pin(async move {
            if let Some(source) = self.configured_source(session_id) {
                return Err(ManageError::Configured(source));
            }
            // An entry this version cannot read can still be deleted.
            if self.book.get(session_id).await?.is_none() {
                return Err(ManageError::NotFound);
            }
            // Held first: nobody starts it again, and followers know it was deleted on purpose.
            self.book.set_hold(session_id, Hold::Deleted).await?;
            if self.book.remove(session_id).await?.is_none() {
                return Err(ManageError::NotFound);
            }
            self.apply_change(session_id, None).await;
            // The end may be the follow loop's (it saw the delete first). The wipe comes after
            // it, whether or not this call is still awaited, so the logout finds the keys.
            let ending = self.ending_of(session_id);
            let book = self.book.clone();
            let id = session_id.to_owned();
            let after = ending.clone();
            tokio::spawn(async move {
                if let Some(ending) = after {
                    ending.await;
                }
                wipe_when_released(book, id).await;
            });
            if let Some(ending) = ending {
                ending.await;
            }
            Ok(())
        })
    }

    fn list(&self) -> BoxFuture<'_, ManageResult<Vec<Listed>>> {
        Box::pin(async move {
            let mut listed: Vec<Listed> = self
                .book
                .all()
                .await?
                .specs
                .into_iter()
                .filter(|spec| !self.configured.contains_key(&spec.session_id))
                .map(|spec| Listed {
                    spec,
                    source: "api",
                    status: None,
                })
                .chain(self.configured.values().map(|(spec, _)| Listed {
                    spec: spec.clone(),
                    source: "config",
                    status: None,
                }))
                .collect();
            for item in &mut listed {
                item.status = self.states.get(&item.spec.session_id).map(|s| s.status);
            }
            listed.sort_by(|a, b| a.spec.session_id.cmp(&b.spec.session_id));
            Ok(listed)
        })
    }
}

#[cfg(test)]
mod tests;
