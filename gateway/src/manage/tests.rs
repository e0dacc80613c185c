use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use super::*;
use crate::session::EventSink;
use crate::session::sim::{SimConfig, SimDriver};

fn specs(list: &[SessionSpec]) -> HashMap<String, SessionSpec> {
    list.iter()
        .map(|s| (s.session_id.clone(), s.clone()))
        .collect()
}

fn paused(id: &str) -> SessionSpec {
    SessionSpec {
        paused: true,
        ..SessionSpec::qr(id)
    }
}

#[test]
fn plan_starts_pauses_resumes_and_ends() {
    let keep = SessionSpec {
        logout_on_delete: false,
        ..SessionSpec::qr("gone-keep")
    };
    let applied = specs(&[
        SessionSpec::qr("same"),
        SessionSpec::qr("to-pause"),
        paused("to-resume"),
        SessionSpec::qr("gone"),
        keep,
    ]);
    let wanted = specs(&[
        SessionSpec::qr("same"),
        paused("to-pause"),
        SessionSpec::qr("to-resume"),
        SessionSpec::qr("new"),
        paused("new-paused"),
    ]);
    assert_eq!(
        plan(&applied, &wanted),
        vec![
            Step::End {
                session_id: "gone".into(),
                logout: true
            },
            Step::End {
                session_id: "gone-keep".into(),
                logout: false
            },
            Step::Pause(paused("new-paused")),
            Step::Pause(paused("to-pause")),
            Step::Run(SessionSpec::qr("new")),
            Step::Run(SessionSpec::qr("to-resume")),
        ]
    );
    assert!(plan(&wanted, &wanted).is_empty(), "nothing to do twice");
}

#[test]
fn validation_names_the_field() {
    assert!(SessionSpec::qr("shop-42").validate().is_ok());
    let bad_id = SessionSpec::qr("has space").validate().unwrap_err();
    assert!(matches!(bad_id, ManageError::Invalid { ref field, .. } if field == "sessionId"));
    let mut pairing = SessionSpec::qr("p");
    pairing.login.method = crds::LoginMethod::PairingCode;
    let missing = pairing.validate().unwrap_err();
    assert!(
        matches!(missing, ManageError::Invalid { ref field, .. } if field == "login.phoneNumber")
    );
    for bad in ["123", "+0123456789", "+54 911 2233", "+1234567890123456"] {
        pairing.login.phone_number = Some(bad.into());
        assert!(pairing.validate().is_err(), "{bad}");
    }
    pairing.login.phone_number = Some("+5491122334455".into());
    assert!(pairing.validate().is_ok());
}

#[test]
fn the_json_is_the_resource_spec_with_an_id() {
    let spec: SessionSpec = serde_json::from_str(
        r#"{"sessionId":"s","login":{"method":"pairingCode","phoneNumber":"+5491122334455"},"logoutOnDelete":false}"#,
    )
    .unwrap();
    assert!(!spec.paused && !spec.logout_on_delete);
    let minimal: SessionSpec = serde_json::from_str(r#"{"sessionId":"s"}"#).unwrap();
    assert_eq!(minimal, SessionSpec::qr("s"));
    assert!(serde_json::from_str::<SessionSpec>(r#"{"sessionId":"s","pasued":true}"#).is_err());
}

fn local(
    configured: Vec<(SessionSpec, &'static str)>,
    book: Arc<dyn SessionBook>,
) -> (
    Arc<LocalSessions<SimDriver>>,
    tokio::sync::mpsc::Receiver<crate::events::GatewayEvent>,
) {
    let driver = Arc::new(SimDriver::new(SimConfig::default()).unwrap());
    let (events, rx) = EventSink::channel(4096);
    let supervisor = Arc::new(Supervisor::new(driver, events));
    let sessions = LocalSessions::new(
        supervisor,
        LoginDirectory::default(),
        Arc::new(SessionStates::default()),
        configured,
        book,
    );
    (Arc::new(sessions), rx)
}

async fn running(sessions: &LocalSessions<SimDriver>) -> Vec<String> {
    let mut running = sessions.supervisor().running().await;
    running.sort();
    running
}

#[tokio::test(start_paused = true)]
async fn create_pause_resume_delete_through_the_book() {
    let (sessions, _rx) = local(
        vec![(SessionSpec::qr("fixed"), "--session")],
        Arc::new(MemoryBook::default()),
    );
    sessions.reconcile(true).await.unwrap();
    assert_eq!(running(&sessions).await, ["fixed"]);

    assert_eq!(
        sessions.create(SessionSpec::qr("api-1")).await,
        Ok(Created::New)
    );
    assert_eq!(
        sessions.create(SessionSpec::qr("api-1")).await,
        Ok(Created::Unchanged),
        "a retried create is not an error"
    );
    assert_eq!(
        sessions.create(paused("api-1")).await,
        Err(ManageError::Conflict)
    );
    assert_eq!(running(&sessions).await, ["api-1", "fixed"]);

    sessions.set_paused("api-1", true).await.unwrap();
    assert_eq!(running(&sessions).await, ["fixed"]);
    sessions.set_paused("api-1", false).await.unwrap();
    assert_eq!(running(&sessions).await, ["api-1", "fixed"]);

    let listed = sessions.list().await.unwrap();
    let sources: Vec<_> = listed
        .iter()
        .map(|l| (l.spec.session_id.as_str(), l.source))
        .collect();
    assert_eq!(sources, [("api-1", "api"), ("fixed", "config")]);

    sessions.delete("api-1").await.unwrap();
    assert_eq!(running(&sessions).await, ["fixed"]);
    assert_eq!(sessions.delete("api-1").await, Err(ManageError::NotFound));
    assert_eq!(
        sessions.set_paused("nope", true).await,
        Err(ManageError::NotFound)
    );
}

#[tokio::test(start_paused = true)]
async fn configured_sessions_are_not_the_apis_to_change() {
    let (sessions, _rx) = local(
        vec![(SessionSpec::qr("fixed"), "--sessions-file")],
        Arc::new(MemoryBook::default()),
    );
    sessions.reconcile(true).await.unwrap();
    assert_eq!(
        sessions.create(SessionSpec::qr("fixed")).await,
        Ok(Created::Unchanged)
    );
    for result in [
        sessions.create(paused("fixed")).await.map(|_| ()),
        sessions.delete("fixed").await,
        sessions.set_paused("fixed", true).await,
    ] {
        assert_eq!(result, Err(ManageError::Configured("--sessions-file")));
    }
    assert_eq!(running(&sessions).await, ["fixed"]);
    let invalid = sessions.create(SessionSpec::qr("no spaces")).await;
    assert!(matches!(invalid, Err(ManageError::Invalid { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_gateway_follows_what_another_wrote_to_a_shared_book() {
    let book: Arc<dyn SessionBook> = Arc::new(MemoryBook::default());
    let (a, _rx_a) = local(Vec::new(), book.clone());
    let (b, _rx_b) = local(Vec::new(), book.clone());
    let stop = CancellationToken::new();
    let follow = b.spawn_follow(Duration::from_secs(1), stop.clone());

    a.create(SessionSpec::qr("shared")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        running(&b).await,
        ["shared"],
        "b wants it too (the locks decide who runs it)"
    );

    a.delete("shared").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(running(&b).await.is_empty());
    stop.cancel();
    follow.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn deleting_logs_a_live_session_out_unless_told_otherwise() {
    let (sessions, mut rx) = local(Vec::new(), Arc::new(MemoryBook::default()));
    // A session that is connected: the sim driver, every session paired.
    let keep = SessionSpec {
        logout_on_delete: false,
        ..SessionSpec::qr("keep")
    };
    sessions.create(SessionSpec::qr("bye")).await.unwrap();
    sessions.create(keep).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    while rx.try_recv().is_ok() {}
    sessions.delete("bye").await.unwrap();
    sessions.delete("keep").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut logged_out = Vec::new();
    while let Ok(event) = rx.try_recv() {
        if let crate::events::GatewayEvent::Status(s) = &event
            && s.status == SessionStatus::LoggedOut
        {
            logged_out.push(s.session_id.clone());
        }
    }
    assert_eq!(logged_out, ["bye"]);
}

fn logged_out(rx: &mut tokio::sync::mpsc::Receiver<crate::events::GatewayEvent>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(event) = rx.try_recv() {
        if let crate::events::GatewayEvent::Status(s) = &event
            && s.status == SessionStatus::LoggedOut
        {
            out.push(s.session_id.clone());
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_session_that_vanished_without_a_delete_is_stopped_not_logged_out() {
    let book = Arc::new(MemoryBook::default());
    let (sessions, mut rx) = local(Vec::new(), book.clone());
    sessions.create(SessionSpec::qr("lost")).await.unwrap();
    sessions.create(SessionSpec::qr("deleted")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    logged_out(&mut rx);
    // As if Redis lost the book: the entry is gone, and no delete held it.
    book.remove("lost").await.unwrap();
    sessions.delete("deleted").await.unwrap();
    sessions.reconcile(true).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(running(&sessions).await.is_empty());
    assert_eq!(logged_out(&mut rx), ["deleted"]);
}

/// A [`MemoryBook`] shared with other writers: a newer gateway that wrote an entry this version
/// cannot read (`unreadable`), or one that always changes an entry first (`lose_races`: every
/// compare-and-set fails).
#[derive(Default)]
struct SharedBook {
    inner: MemoryBook,
    unreadable: Option<&'static str>,
    lose_races: bool,
}

impl SessionBook for SharedBook {
    fn insert_new(&self, spec: &SessionSpec) -> BoxFuture<'_, ManageResult<Option<SessionSpec>>> {
        self.inner.insert_new(spec)
    }
    fn replace<'a>(
        &'a self,
        old: &'a SessionSpec,
        new: &'a SessionSpec,
    ) -> BoxFuture<'a, ManageResult<bool>> {
        if self.lose_races {
            return Box::pin(async { Ok(false) });
        }
        self.inner.replace(old, new)
    }
    fn remove<'a>(
        &'a self,
        session_id: &'a str,
    ) -> BoxFuture<'a, ManageResult<Option<SessionSpec>>> {
        self.inner.remove(session_id)
    }
    fn all(&self) -> BoxFuture<'_, ManageResult<BookSnapshot>> {
        Box::pin(async move {
            let mut snapshot = self.inner.all().await?;
            if let Some(id) = self.unreadable {
                snapshot.specs.retain(|s| s.session_id != id);
                snapshot.unreadable.push(id.to_owned());
            }
            Ok(snapshot)
        })
    }
    fn get<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<Option<BookEntry>>> {
        self.inner.get(session_id)
    }
    fn version(&self) -> BoxFuture<'_, ManageResult<u64>> {
        self.inner.version()
    }
    fn set_hold<'a>(&'a self, session_id: &'a str, hold: Hold) -> BoxFuture<'a, ManageResult<()>> {
        self.inner.set_hold(session_id, hold)
    }
    fn hold<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<Option<Hold>>> {
        self.inner.hold(session_id)
    }
    fn wipe_deleted<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<Wipe>> {
        self.inner.wipe_deleted(session_id)
    }
}

#[tokio::test(start_paused = true)]
async fn an_entry_this_version_cannot_read_is_left_running() {
    let inner = MemoryBook::default();
    inner.insert_new(&SessionSpec::qr("newer")).await.unwrap();
    let (sessions, _rx) = local(
        Vec::new(),
        Arc::new(SharedBook {
            inner,
            unreadable: Some("newer"),
            ..SharedBook::default()
        }),
    );
    // Started before the entry became unreadable (say, before a newer gateway rewrote it).
    sessions.start_configured().await;
    sessions.supervisor().want("newer");
    sessions
        .applied
        .lock()
        .await
        .insert("newer".into(), SessionSpec::qr("newer"));
    sessions.reconcile(true).await.unwrap();
    assert_eq!(running(&sessions).await, ["newer"], "not taken for deleted");
}

#[tokio::test(start_paused = true)]
async fn configured_sessions_start_without_the_book() {
    struct Down;
    impl SessionBook for Down {
        fn insert_new(&self, _: &SessionSpec) -> BoxFuture<'_, ManageResult<Option<SessionSpec>>> {
            Box::pin(async { Err(ManageError::Unavailable("down".into())) })
        }
        fn replace<'a>(
            &'a self,
            _: &'a SessionSpec,
            _: &'a SessionSpec,
        ) -> BoxFuture<'a, ManageResult<bool>> {
            Box::pin(async { Err(ManageError::Unavailable("down".into())) })
        }
        fn remove<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ManageResult<Option<SessionSpec>>> {
            Box::pin(async { Err(ManageError::Unavailable("down".into())) })
        }
        fn all(&self) -> BoxFuture<'_, ManageResult<BookSnapshot>> {
            Box::pin(async { Err(ManageError::Unavailable("down".into())) })
        }
        fn get<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ManageResult<Option<BookEntry>>> {
            Box::pin(async { Err(ManageError::Unavailable("down".into())) })
        }
        fn version(&self) -> BoxFuture<'_, ManageResult<u64>> {
            Box::pin(async { Err(ManageError::Unavailable("down".into())) })
        }
        fn set_hold<'a>(&'a self, _: &'a str, _: Hold) -> BoxFuture<'a, ManageResult<()>> {
            Box::pin(async { Err(ManageError::Unavailable("down".into())) })
        }
        fn hold<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ManageResult<Option<Hold>>> {
            Box::pin(async { Err(ManageError::Unavailable("down".into())) })
        }
        fn wipe_deleted<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ManageResult<Wipe>> {
            Box::pin(async { Err(ManageError::Unavailable("down".into())) })
        }
    }
    let (sessions, _rx) = local(
        vec![(SessionSpec::qr("fixed"), "--session")],
        Arc::new(Down),
    );
    sessions.start_configured().await;
    assert!(sessions.reconcile(true).await.is_err());
    assert_eq!(running(&sessions).await, ["fixed"]);
    assert!(matches!(
        sessions.create(SessionSpec::qr("new")).await,
        Err(ManageError::Unavailable(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_refused_pause_leaves_no_hold_behind() {
    let book = Arc::new(SharedBook {
        lose_races: true,
        ..SharedBook::default()
    });
    let (sessions, _rx) = local(Vec::new(), book.clone());
    sessions.create(SessionSpec::qr("s")).await.unwrap();
    assert_eq!(
        sessions.set_paused("s", true).await,
        Err(ManageError::Conflict)
    );
    assert_eq!(
        book.hold("s").await.unwrap(),
        None,
        "the pause's hold was taken back"
    );
    assert_eq!(running(&sessions).await, ["s"]);
}

#[tokio::test(start_paused = true)]
async fn pause_and_resume_never_replace_a_deletes_hold() {
    let book = MemoryBook::default();
    book.set_hold("s", Hold::Deleted).await.unwrap();
    book.set_hold("s", Hold::Paused).await.unwrap();
    book.set_hold("s", Hold::Clear).await.unwrap();
    assert_eq!(book.hold("s").await.unwrap(), Some(Hold::Deleted));
    book.set_hold("t", Hold::Paused).await.unwrap();
    assert_eq!(book.hold("t").await.unwrap(), Some(Hold::Paused));
    book.set_hold("t", Hold::Clear).await.unwrap();
    assert_eq!(book.hold("t").await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn a_deleted_id_cannot_be_created_while_it_is_held() {
    let book = Arc::new(MemoryBook::default());
    let (sessions, _rx) = local(Vec::new(), book.clone());
    sessions.create(SessionSpec::qr("s")).await.unwrap();
    book.set_hold("s", Hold::Deleted).await.unwrap();
    assert_eq!(
        sessions.create(SessionSpec::qr("s")).await,
        Err(ManageError::Deleting)
    );
    assert_eq!(
        sessions.set_paused("s", true).await,
        Err(ManageError::Deleting)
    );
}

/// The sim driver, whose unlink of an idle session takes 5 s (a slow WhatsApp login).
struct SlowUnlink(SimDriver);

impl crate::session::SessionDriver for SlowUnlink {
    async fn start(
        &self,
        session_id: &str,
        events: EventSink,
    ) -> Result<crate::session::RunningSession, crate::session::DriverError> {
        self.0.start(session_id, events).await
    }

    async fn unlink(
        &self,
        _session_id: &str,
        _fence: Option<&crate::session::credentials::Fence>,
        _wait: Duration,
    ) -> Result<crate::session::Unlink, crate::session::DriverError> {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(crate::session::Unlink::Unlinked)
    }
}

/// A gateway on `book` whose unlinks take 5 s, with `id` created, connected (paired) and paused.
async fn paused_with_slow_unlink(
    book: Arc<MemoryBook>,
    id: &str,
) -> (
    Arc<LocalSessions<SlowUnlink>>,
    tokio::sync::mpsc::Receiver<crate::events::GatewayEvent>,
) {
    let driver = Arc::new(SlowUnlink(
        SimDriver::new(SimConfig {
            unpaired_share: 0.0,
            ..SimConfig::default()
        })
        .unwrap(),
    ));
    let (events, rx) = EventSink::channel(4096);
    let supervisor = Arc::new(Supervisor::new(driver, events));
    let sessions = Arc::new(LocalSessions::new(
        supervisor,
        LoginDirectory::default(),
        Arc::new(SessionStates::default()),
        Vec::new(),
        book,
    ));
    sessions.create(SessionSpec::qr(id)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    sessions.set_paused(id, true).await.unwrap();
    (sessions, rx)
}

/// Deleting a paused session connects it to unlink it, which takes seconds: meanwhile the
/// gateway's other calls are not held up, and the delete returns once the device is unlinked.
#[tokio::test(start_paused = true)]
async fn a_slow_unlink_does_not_hold_up_other_calls() {
    let (sessions, mut rx) =
        paused_with_slow_unlink(Arc::new(MemoryBook::default()), "paused").await;
    while rx.try_recv().is_ok() {}

    let began = tokio::time::Instant::now();
    let delete = tokio::spawn({
        let sessions = sessions.clone();
        async move { sessions.delete("paused").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Shutdown waits for it, within bounds.
    assert!(!sessions.finish_ends(Duration::from_millis(200)).await);
    sessions.create(SessionSpec::qr("other")).await.unwrap();
    sessions.set_paused("other", true).await.unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "held up for {:?}",
        began.elapsed()
    );
    delete.await.unwrap().unwrap();
    assert!(
        began.elapsed() >= Duration::from_secs(5),
        "returns once unlinked"
    );
    assert_eq!(logged_out(&mut rx), ["paused"]);
    assert!(
        sessions.finish_ends(Duration::from_secs(1)).await,
        "nothing left"
    );
}

/// A session created again under the same id while its previous incarnation is still being
/// unlinked waits for that end (refused while the delete's hold lasts, then started), and the
/// old end does not stop the new one or forget its login.
#[tokio::test(start_paused = true)]
async fn a_new_incarnation_waits_for_the_previous_end() {
    let (sessions, _rx) = paused_with_slow_unlink(Arc::new(MemoryBook::default()), "x").await;
    let delete = tokio::spawn({
        let sessions = sessions.clone();
        async move { sessions.delete("x").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        matches!(
            sessions.create(SessionSpec::qr("x")).await,
            Err(ManageError::Deleting)
        ),
        "refused while the old incarnation is being unlinked"
    );
    delete.await.unwrap().unwrap();
    // The wipe after the end lets the id go.
    tokio::time::sleep(Duration::from_millis(10)).await;
    sessions.create(SessionSpec::qr("x")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(sessions.supervisor().running().await, ["x"]);
    assert!(sessions.supervisor().is_running("x").await);
}

/// Another gateway took the delete and this one's follow loop is unlinking the paused session
/// when the id is created again: the new incarnation starts only after that end, which would
/// otherwise stop it or forget its login.
#[tokio::test(start_paused = true)]
async fn a_create_during_a_followed_delete_starts_after_the_end() {
    let book = Arc::new(MemoryBook::default());
    let (sessions, _rx) = paused_with_slow_unlink(book.clone(), "x").await;
    // The other gateway's delete, as this one reads it from the shared book.
    book.set_hold("x", Hold::Deleted).await.unwrap();
    book.remove("x").await.unwrap();
    let follow = tokio::spawn({
        let sessions = sessions.clone();
        async move { sessions.reconcile(false).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    book.wipe_deleted("x").await.unwrap();
    sessions.create(SessionSpec::qr("x")).await.unwrap();
    assert!(
        sessions.supervisor().running().await.is_empty(),
        "not started while its previous incarnation is being unlinked"
    );
    follow.await.unwrap().unwrap();
    sessions.reconcile(false).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(sessions.supervisor().running().await, ["x"]);
    assert!(sessions.supervisor().is_running("x").await);
}

#[test]
fn unknown_webhook_fields_are_refused() {
    let spec: SessionSpec = serde_json::from_value(serde_json::json!({
        "sessionId": "s",
        "webhook": {"url": "https://hooks.example", "secretRef": {"name": "n", "key": "k"}},
    }))
    .unwrap();
    assert_eq!(spec.webhook.unwrap().secret_ref.unwrap().key, "k");
    for (body, field) in [
        (
            serde_json::json!({"url": "https://hooks.example", "secret_ref": {"name": "n", "key": "k"}}),
            "secret_ref",
        ),
        (
            serde_json::json!({"url": "https://hooks.example", "secretRef": {"name": "n", "key": "k", "namespace": "x"}}),
            "namespace",
        ),
    ] {
        let err = serde_json::from_value::<SessionSpec>(
            serde_json::json!({"sessionId": "s", "webhook": body}),
        )
        .unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
}
