//! The real `whatsapp-rust` client inside the real gateway pipeline (driver -> Pipeline ->
//! delivery) against the project's fake WhatsApp server: the first QR code reaches the backend
//! receiver as a PNG data URL and the session shows `qr_pending`.

use std::time::{Duration, Instant};

use base64::Engine;
use clap::Parser;
use gateway::app::Pipeline;
use gateway::config::{Cli, Mode as CliMode};
use gateway::events::SessionStatus;
use gateway::session::SessionDriver;
use gateway::session::whatsapp::{WhatsappConfig, WhatsappDriver};
use test_support::fake_whatsapp::FakeWhatsapp;
use test_support::receiver::Receiver;
use test_support::wait_until;

/// Waits for the gateway's own state of `id` to be Active: the client's `Connected` reaches it
/// through the driver and the event router, a moment after the fake saw the client's sync.
async fn wait_state_active(states: &gateway::app::SessionStates, id: &str) {
    wait_until(
        "the session state to be active",
        Duration::from_secs(10),
        || {
            let status = states.get(id).map(|s| s.status);
            async move {
                match status {
                    Some(SessionStatus::Active) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
    .unwrap();
}

fn settings(receiver: &Receiver) -> gateway::config::Settings {
    let args = [
        "gateway",
        "standalone",
        "--backend-url",
        &receiver.url(),
        "--resync-interval-s",
        "0",
    ];
    let CliMode::Standalone(a) = Cli::try_parse_from(args).unwrap().mode else {
        unreachable!("standalone args")
    };
    a.common.validate().unwrap()
}

/// The whatsapp driver pointed at the fake (its client version given, so no HTTP fetch).
fn fake_driver(fake: &FakeWhatsapp) -> WhatsappDriver {
    WhatsappDriver::new(WhatsappConfig {
        ws_url: Some(fake.url()),
        version: Some((2, 3000, 0)),
        ..WhatsappConfig::production()
    })
    .unwrap()
}

/// The gateway pipeline without Redis, delivering to `receiver`.
async fn memory_pipeline(receiver: &Receiver) -> Pipeline {
    let mut registry = gateway::metrics::new_registry();
    Pipeline::start(&settings(receiver), None, &mut registry, None)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_client_reaches_qr_pending_through_the_gateway() {
    let fake = FakeWhatsapp::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let pipeline = memory_pipeline(&receiver).await;
    let driver = fake_driver(&fake);

    let started = Instant::now();
    let session = driver
        .start("wa-fake-1", pipeline.event_sink())
        .await
        .unwrap();
    let qr = wait_until("a QR at the receiver", Duration::from_secs(30), || {
        let items = receiver.items("/qr/batch");
        async move {
            items
                .into_iter()
                .next()
                .ok_or_else(|| "no QR yet".to_owned())
        }
    })
    .await
    .unwrap();
    let latency = started.elapsed();
    eprintln!("first QR at the receiver {latency:?} after start");

    assert_eq!(qr["sessionId"], "wa-fake-1");
    assert_eq!(qr["seq"], 1);
    let data_url = qr["qr"].as_str().unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(
            data_url
                .strip_prefix("data:image/png;base64,")
                .expect("PNG data URL"),
        )
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    let state = pipeline.states.get("wa-fake-1").expect("session state");
    assert_eq!(state.status, SessionStatus::QrPending);
    let latest = state.latest_qr.expect("QR on display");
    assert_eq!(latest.seq, 1);
    // The code carries the fake's first ref: `ref,noise,identity,adv,client_type`.
    let refs = FakeWhatsapp::refs(0);
    assert!(
        latest.code.starts_with(&format!("{},", refs[0])),
        "{}",
        latest.code
    );
    assert_eq!(latest.code.split(',').count(), 5, "{}", latest.code);

    wait_until(
        "qr_pending at the receiver",
        Duration::from_secs(10),
        || {
            let statuses = receiver.items("/whatsapp/status/batch");
            async move {
                statuses
                    .iter()
                    .any(|s| s["sessionId"] == "wa-fake-1" && s["status"] == "qr_pending")
                    .then_some(())
                    .ok_or_else(|| format!("statuses so far: {statuses:?}"))
            }
        },
    )
    .await
    .unwrap();
    let stats = fake.stats();
    assert_eq!(
        stats.handshakes.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        stats.acks.load(std::sync::atomic::Ordering::Relaxed) >= 1,
        "pair-device acked"
    );

    pipeline
        .shutdown(vec![session], Duration::from_secs(10))
        .await;
}

/// Every start builds a new client (0.7.0 cannot reconnect a stopped one): after a stop and a
/// start, the fake sees a second connection and the session shows the new connection's first ref
/// with the rotation count starting again at 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_session_runs_a_new_client() {
    let fake = FakeWhatsapp::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let pipeline = memory_pipeline(&receiver).await;
    let driver = fake_driver(&fake);
    let refs = [FakeWhatsapp::refs(0), FakeWhatsapp::refs(1)];

    let mut sessions = Vec::new();
    for (round, refs) in refs.iter().enumerate() {
        let session = driver
            .start("wa-fake-2", pipeline.event_sink())
            .await
            .unwrap();
        let states = pipeline.states.clone();
        let expected = format!("{},", refs[0]);
        wait_until(
            &format!("QR of connection {round}"),
            Duration::from_secs(30),
            || {
                let qr = states.get("wa-fake-2").and_then(|s| s.latest_qr);
                let expected = expected.clone();
                async move {
                    match qr {
                        Some(qr) if qr.code.starts_with(&expected) && qr.seq == 1 => Ok(()),
                        other => Err(format!("latest QR {other:?}")),
                    }
                }
            },
        )
        .await
        .unwrap();
        if round == 0 {
            let stopping = Instant::now();
            session.stop().await;
            let took = stopping.elapsed();
            eprintln!("stop took {took:?}");
            assert!(took < Duration::from_secs(6), "stop took {took:?}");
        } else {
            sessions.push(session);
        }
    }
    let stats = fake.stats();
    assert_eq!(
        stats.handshakes.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(stats.errors.load(std::sync::atomic::Ordering::Relaxed), 0);
    pipeline.shutdown(sessions, Duration::from_secs(10)).await;
}

/// The fake plays the phone: the test reads the QR code the gateway received and scans it; the
/// fake sends `pair-success`, the client signs its device identity, the fake restarts the stream
/// (515), the client logs in again as the paired device, gets `<success>`, passes its start-up
/// IQs and app-state sync, and emits `Connected`. The session shows `active` and the receiver gets
/// a high-priority `active` status. Then the fake drops the connection: the client resumes with
/// Noise IK and logs in again without a new scan. Last, a stop with logout unlinks the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scanning_the_qr_pairs_the_real_client_and_logs_it_in() {
    use std::sync::atomic::Ordering::Relaxed;

    let fake = FakeWhatsapp::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let pipeline = memory_pipeline(&receiver).await;
    let driver = fake_driver(&fake);
    let session = driver
        .start("wa-fake-3", pipeline.event_sink())
        .await
        .unwrap();

    wait_until("a QR at the receiver", Duration::from_secs(30), || {
        let items = receiver.items("/qr/batch");
        async move {
            items
                .iter()
                .any(|qr| qr["sessionId"] == "wa-fake-3")
                .then_some(())
                .ok_or_else(|| "no QR yet".to_owned())
        }
    })
    .await
    .unwrap();
    // What the phone's camera would read off the PNG: the code on display.
    let code = pipeline
        .states
        .get("wa-fake-3")
        .and_then(|s| s.latest_qr)
        .expect("QR on display")
        .code;

    let scanned = Instant::now();
    let device = fake.scan(&code).await.unwrap();
    eprintln!("paired as {} ({})", device.jid(), device.lid_jid());
    assert_eq!(fake.paired_devices(), vec![device.clone()]);
    assert_eq!(fake.stats().pair_successes.load(Relaxed), 1);

    // The client restarts its connection and logs in as the paired device.
    wait_until(
        "the paired device to log in",
        Duration::from_secs(30),
        || {
            let logins = fake.stats().logins.load(Relaxed);
            async move {
                (logins >= 1)
                    .then_some(())
                    .ok_or_else(|| "no login yet".to_owned())
            }
        },
    )
    .await
    .unwrap();
    // The client syncs the regular app-state collections only after it has emitted
    // `Connected` (the critical ones first wait up to 10 s for an app-state key share that this
    // fake does not send).
    wait_until(
        "the client to emit Connected (post-connect app-state sync)",
        Duration::from_secs(60),
        || {
            let syncs = fake.stats().post_connect_syncs.load(Relaxed);
            async move {
                (syncs >= 1)
                    .then_some(())
                    .ok_or_else(|| "no post-connect sync yet".to_owned())
            }
        },
    )
    .await
    .unwrap();
    eprintln!("connected {:?} after the scan", scanned.elapsed());

    wait_state_active(&pipeline.states, "wa-fake-3").await;
    wait_until(
        "a high-priority active status at the receiver",
        Duration::from_secs(10),
        || {
            let statuses = receiver.items("/whatsapp/status/batch");
            async move {
                statuses
                    .iter()
                    .any(|s| {
                        s["sessionId"] == "wa-fake-3"
                            && s["status"] == "active"
                            && s["priority"] == "high"
                    })
                    .then_some(())
                    .ok_or_else(|| format!("statuses so far: {statuses:?}"))
            }
        },
    )
    .await
    .unwrap();
    // Nothing after `active`: the 515 restart is an expected disconnect, not an outage.
    let statuses = receiver.items("/whatsapp/status/batch");
    let last = statuses
        .iter()
        .rfind(|s| s["sessionId"] == "wa-fake-3")
        .expect("statuses");
    assert_eq!(last["status"], "active", "{statuses:?}");

    let stats = fake.stats();
    assert_eq!(stats.handshakes.load(Relaxed), 2, "registration + login");
    assert_eq!(stats.ik_handshakes.load(Relaxed), 0, "both XX");
    assert_eq!(stats.logins.load(Relaxed), 1);
    assert_eq!(stats.login_failures.load(Relaxed), 0);
    assert_eq!(stats.pair_errors.load(Relaxed), 0);

    // The server goes away: the client reports the outage, resumes with Noise IK (it cached the
    // server's key at login), logs in without a new scan and is active again.
    let before = statuses.len();
    fake.drop_logged_in_connections();
    wait_until(
        "inactive, then active again at the receiver",
        Duration::from_secs(30),
        || {
            let statuses = receiver.items("/whatsapp/status/batch");
            async move {
                let after: Vec<_> = statuses[before.min(statuses.len())..]
                    .iter()
                    .filter(|s| s["sessionId"] == "wa-fake-3")
                    .map(|s| {
                        (
                            s["status"].as_str().unwrap_or("").to_owned(),
                            s["priority"].clone(),
                        )
                    })
                    .collect();
                let inactive = after.iter().position(|(s, _)| s == "inactive");
                match inactive {
                    Some(i)
                        if after[i + 1..]
                            .iter()
                            .any(|(s, p)| s == "active" && p == "high") =>
                    {
                        Ok(())
                    }
                    _ => Err(format!("statuses since the drop: {after:?}")),
                }
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        pipeline
            .states
            .get("wa-fake-3")
            .expect("session state")
            .status,
        SessionStatus::Active
    );
    assert_eq!(stats.connections_dropped.load(Relaxed), 1);
    assert_eq!(stats.ik_handshakes.load(Relaxed), 1, "resumed with IK");
    assert_eq!(stats.logins.load(Relaxed), 2);
    assert_eq!(stats.pair_successes.load(Relaxed), 1, "no new pairing");
    assert_eq!(stats.errors.load(Relaxed), 0);

    // Stopping with a logout unlinks the device at the "phone".
    session.stop_and_logout().await;
    assert_eq!(stats.logouts.load(Relaxed), 1);
    assert!(fake.paired_devices().is_empty());
    pipeline.shutdown(Vec::new(), Duration::from_secs(10)).await;
}

/// One gateway of a pair: its own pipeline, supervisor (Redis ownership locks) and whatsapp
/// driver keeping session keys in the shared Redis.
struct RedisGateway {
    pipeline: Pipeline,
    supervisor: gateway::session::supervisor::Supervisor<WhatsappDriver>,
}

impl RedisGateway {
    async fn start(
        identity: &str,
        receiver: &Receiver,
        redis_url: &str,
        fake: &FakeWhatsapp,
    ) -> Self {
        use gateway::session::ownership::LeaseConfig;
        use gateway::session::supervisor::{Supervisor, SupervisorConfig, SupervisorOptions};
        let settings = settings(receiver);
        let redis = gateway::redis::connect(redis_url).await.unwrap();
        let mut registry = gateway::metrics::new_registry();
        let pipeline = Pipeline::start(&settings, Some(redis.clone()), &mut registry, None)
            .await
            .unwrap();
        let options = SupervisorOptions::new(
            Some(&redis),
            identity,
            LeaseConfig::new(Duration::from_secs(3)),
            SupervisorConfig::default(),
            &mut registry,
        );
        let driver = fake_driver(fake).with_redis_store(redis);
        let supervisor =
            Supervisor::with_options(std::sync::Arc::new(driver), pipeline.event_sink(), options);
        RedisGateway {
            pipeline,
            supervisor,
        }
    }

    /// Starts `id` and scans its first QR code with the fake phone.
    async fn start_and_scan(&self, fake: &FakeWhatsapp, id: &str) {
        self.supervisor.want(id);
        wait_until(&format!("a QR for {id}"), Duration::from_secs(30), || {
            let qr = self.pipeline.states.get(id).and_then(|s| s.latest_qr);
            async move { qr.ok_or_else(|| "no QR yet".to_owned()) }
        })
        .await
        .unwrap();
        let code = self
            .pipeline
            .states
            .get(id)
            .and_then(|s| s.latest_qr)
            .unwrap()
            .code;
        fake.scan(&code).await.unwrap();
    }

    async fn stop(self) {
        self.supervisor
            .drain(
                Duration::from_secs(10),
                self.pipeline.shutdown(Vec::new(), Duration::from_secs(10)),
            )
            .await;
    }
}

/// The stretch goal of the session runtime: a session paired on one gateway keeps its keys in
/// Redis (fenced by its ownership lock); after that gateway stops, another gateway takes the
/// session and the real client logs in from the stored keys: no new QR code, no new pairing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paired_session_moves_to_another_gateway_without_a_new_scan() {
    use std::sync::atomic::Ordering::Relaxed;
    const ID: &str = "wa-fake-moves";

    let fake = FakeWhatsapp::start().await.unwrap();
    let redis = test_support::RedisServer::start().await.unwrap();
    let first_backend = Receiver::start().await.unwrap();
    let first = RedisGateway::start("gw-a", &first_backend, &redis.url(), &fake).await;
    first.start_and_scan(&fake, ID).await;
    wait_until("connected on gateway A", Duration::from_secs(60), || {
        let syncs = fake.stats().post_connect_syncs.load(Relaxed);
        async move {
            (syncs >= 1)
                .then_some(())
                .ok_or_else(|| "not connected yet".to_owned())
        }
    })
    .await
    .unwrap();
    wait_state_active(&first.pipeline.states, ID).await;
    let client = gateway::redis::connect(&redis.url()).await.unwrap();
    let device: Option<Vec<u8>> =
        fred::prelude::KeysInterface::get(&client, format!("wa:{{{ID}}}:wa:device"))
            .await
            .unwrap();
    assert!(device.is_some(), "the paired device is stored in Redis");
    let logins_before = fake.stats().logins.load(Relaxed);
    first.stop().await;

    // Gateway B, with a backend receiver of its own: whatever it reports, it reports there.
    let second_backend = Receiver::start().await.unwrap();
    let second = RedisGateway::start("gw-b", &second_backend, &redis.url(), &fake).await;
    second.supervisor.want(ID);
    wait_until(
        "active on gateway B at its backend",
        Duration::from_secs(60),
        || {
            let statuses = second_backend.items("/whatsapp/status/batch");
            async move {
                statuses
                    .iter()
                    .any(|s| s["sessionId"] == ID && s["status"] == "active")
                    .then_some(())
                    .ok_or_else(|| format!("statuses so far: {statuses:?}"))
            }
        },
    )
    .await
    .unwrap();
    assert!(
        second_backend.items("/qr/batch").is_empty(),
        "no QR code after the move"
    );
    assert!(
        second.pipeline.states.get(ID).unwrap().latest_qr.is_none(),
        "no QR on display"
    );
    let stats = fake.stats();
    assert_eq!(stats.pair_successes.load(Relaxed), 1, "paired once");
    assert!(
        stats.logins.load(Relaxed) > logins_before,
        "gateway B logged in as the paired device"
    );
    assert_eq!(stats.login_failures.load(Relaxed), 0);
    second.stop().await;
}

/// Deleting a paired session while it is paused still unlinks the device from the phone: the
/// gateway connects with the stored keys only to log out (as soon as the server accepts the
/// login), wipes them, and the backend hears `logged_out`; nothing of that connection's own
/// events reaches the backend. A second logout finds nothing to unlink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_paused_session_unlinks_its_device() {
    use gateway::session::supervisor::{LOGOUT_REQUESTED, Logout};
    use std::sync::atomic::Ordering::Relaxed;
    const ID: &str = "wa-fake-paused-delete";

    let fake = FakeWhatsapp::start().await.unwrap();
    let redis = test_support::RedisServer::start().await.unwrap();
    let backend = Receiver::start().await.unwrap();
    let gateway = RedisGateway::start("gw-a", &backend, &redis.url(), &fake).await;
    gateway.start_and_scan(&fake, ID).await;
    wait_state_active(&gateway.pipeline.states, ID).await;
    let logins_before = fake.stats().logins.load(Relaxed);
    assert!(gateway.supervisor.pause(ID).await, "was running");
    assert_eq!(fake.stats().logouts.load(Relaxed), 0);
    let statuses_before = backend.statuses_of(ID).len();

    let begun = Instant::now();
    assert_eq!(gateway.supervisor.logout(ID).await, Logout::Unlinked);
    eprintln!("unlinked in {:?}", begun.elapsed());
    let stats = fake.stats();
    assert_eq!(
        stats.logouts.load(Relaxed),
        1,
        "the phone no longer lists the device"
    );
    assert!(fake.paired_devices().is_empty());
    assert_eq!(
        stats.logins.load(Relaxed),
        logins_before + 1,
        "logged in once to log out"
    );
    let client = gateway::redis::connect(&redis.url()).await.unwrap();
    let device: Option<Vec<u8>> =
        fred::prelude::KeysInterface::get(&client, format!("wa:{{{ID}}}:wa:device"))
            .await
            .unwrap();
    assert!(device.is_none(), "the device keys are wiped");
    wait_until("logged_out at the backend", Duration::from_secs(10), || {
        let after: Vec<_> = backend.statuses_of(ID)[statuses_before..].to_vec();
        async move {
            match after.last() {
                Some((status, reason)) if status == "logged_out" && reason == LOGOUT_REQUESTED => {
                    Ok(())
                }
                _ => Err(format!("statuses since the pause: {after:?}")),
            }
        }
    })
    .await
    .unwrap();
    let since_pause = backend.statuses_of(ID)[statuses_before..].to_vec();
    assert!(
        since_pause
            .iter()
            .all(|(status, _)| status != "connecting" && status != "active"),
        "the unlinking connection's own events stay private: {since_pause:?}"
    );
    assert_eq!(gateway.supervisor.logout(ID).await, Logout::NothingToUnlink);
    assert_eq!(
        fake.stats().logins.load(Relaxed),
        logins_before + 1,
        "no second connection"
    );
    gateway.stop().await;
}

/// A gateway whose whatsapp driver links `id` by pairing code for `phone`, with its pipeline.
async fn pairing_code_gateway(
    fake: &FakeWhatsapp,
    receiver: &Receiver,
    id: &str,
    phone: &str,
) -> (Pipeline, WhatsappDriver) {
    let pipeline = memory_pipeline(receiver).await;
    let logins = gateway::session::LoginDirectory::default();
    logins.set(
        id,
        &crds::Login {
            method: crds::LoginMethod::PairingCode,
            phone_number: Some(phone.into()),
        },
    );
    let driver = fake_driver(fake).with_logins(logins);
    (pipeline, driver)
}

/// Waits for a status of `id` at the receiver that `matches`.
async fn wait_for_status(
    receiver: &Receiver,
    id: &str,
    what: &str,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_until(what, Duration::from_secs(60), || {
        let statuses = receiver.items("/whatsapp/status/batch");
        let found = statuses
            .iter()
            .find(|s| s["sessionId"] == id && matches(s))
            .cloned();
        async move { found.ok_or_else(|| format!("statuses so far: {statuses:?}")) }
    })
    .await
    .unwrap()
}

/// Linking by phone number: a session whose login is a pairing code asks the fake for a code
/// (`companion_hello`); the 8-character code reaches the backend raw in the QR lane as
/// `"type": "pairing_code"` with `qr_pending`, and never a QR code. The fake's phone then types
/// codes: a wrong one does not open the client's key bundle and pairs nothing; the one the backend
/// got does, the fake vouches for the companion under the requested number, and the session
/// logs in and is `active`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pairing_code_reaches_the_backend_and_typing_it_links_the_session() {
    use std::sync::atomic::Ordering::Relaxed;
    const ID: &str = "wa-fake-code";
    const PHONE: &str = "+15551234567";

    let fake = FakeWhatsapp::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let (pipeline, driver) = pairing_code_gateway(&fake, &receiver, ID, PHONE).await;
    let session = driver.start(ID, pipeline.event_sink()).await.unwrap();

    let item = wait_until(
        "a pairing code at the receiver",
        Duration::from_secs(60),
        || {
            let items = receiver.items("/qr/batch");
            async move {
                items
                    .into_iter()
                    .find(|qr| qr["sessionId"] == ID)
                    .ok_or_else(|| "no pairing code yet".to_owned())
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(item["type"], "pairing_code", "{item}");
    let code = item["qr"].as_str().expect("code").to_owned();
    assert_eq!(code.len(), 8, "{code}");
    assert!(
        code.bytes()
            .all(|b| b"123456789ABCDEFGHJKLMNPQRSTVWXYZ".contains(&b)),
        "{code}"
    );
    wait_for_status(&receiver, ID, "qr_pending at the receiver", |s| {
        s["status"] == "qr_pending"
    })
    .await;
    let requests = fake.pairing_code_requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].phone_number, "15551234567");
    assert_eq!(requests[0].code, None, "the code travels wrapped");
    assert_eq!(fake.stats().pairing_code_requests.load(Relaxed), 1);

    // A mistyped code: the client's key bundle does not open, the phone pairs nothing.
    let wrong = if code == "ABCDEFGH" {
        "HGFEDCBA"
    } else {
        "ABCDEFGH"
    };
    let refused = fake.enter_pairing_code(PHONE, wrong).await.unwrap_err();
    assert!(
        matches!(refused, test_support::fake_whatsapp::ScanError::Refused(_)),
        "{refused}"
    );
    let stats = fake.stats();
    assert_eq!(stats.key_bundle_failures.load(Relaxed), 1);
    assert_eq!(stats.pair_successes_sent.load(Relaxed), 0);
    assert_eq!(fake.pairing_code_requests()[0].code, None);

    // The code the backend got: the bundle opens, the phone vouches for the companion.
    let linked = Instant::now();
    let device = fake.enter_pairing_code(PHONE, &code).await.unwrap();
    eprintln!(
        "linked by code as {} in {:?}",
        device.jid(),
        linked.elapsed()
    );
    assert_eq!(device.phone, 15_551_234_567);
    assert_eq!(
        fake.pairing_code_requests()[0].code.as_deref(),
        Some(code.as_str()),
        "the code the fake saw is the one the backend got"
    );
    assert_eq!(stats.key_bundles_opened.load(Relaxed), 1);
    assert_eq!(stats.primary_hellos_sent.load(Relaxed), 2);
    assert_eq!(stats.pair_successes.load(Relaxed), 1);

    wait_for_status(
        &receiver,
        ID,
        "a high-priority active status at the receiver",
        |s| s["status"] == "active" && s["priority"] == "high",
    )
    .await;
    wait_until(
        "the client to emit Connected (post-connect app-state sync)",
        Duration::from_secs(60),
        || {
            let syncs = stats.post_connect_syncs.load(Relaxed);
            async move {
                (syncs >= 1)
                    .then_some(())
                    .ok_or_else(|| "no post-connect sync yet".to_owned())
            }
        },
    )
    .await
    .unwrap();
    wait_state_active(&pipeline.states, ID).await;
    assert_eq!(stats.logins.load(Relaxed), 1);
    assert_eq!(stats.login_failures.load(Relaxed), 0);
    assert_eq!(stats.errors.load(Relaxed), 0);

    // Only the pairing code ever went to the QR lane: the client's QR codes were held back.
    let items: Vec<_> = receiver
        .items("/qr/batch")
        .into_iter()
        .filter(|qr| qr["sessionId"] == ID)
        .collect();
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["type"], "pairing_code");
    let statuses = receiver.items("/whatsapp/status/batch");
    let last = statuses
        .iter()
        .rfind(|s| s["sessionId"] == ID)
        .expect("statuses");
    assert_eq!(last["status"], "active", "{statuses:?}");

    pipeline
        .shutdown(vec![session], Duration::from_secs(10))
        .await;
}

/// The server refuses the pairing-code request (`429 rate-overlimit`): no code is coming, so the
/// session reports `inactive` with a `pairing_code_error` reason, and nothing reaches the QR lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pairing_code_request_reports_inactive() {
    use std::sync::atomic::Ordering::Relaxed;
    const ID: &str = "wa-fake-code-refused";

    let fake = FakeWhatsapp::start().await.unwrap();
    fake.refuse_pairing_codes(Some((429, "rate-overlimit")));
    let receiver = Receiver::start().await.unwrap();
    let (pipeline, driver) = pairing_code_gateway(&fake, &receiver, ID, "+15557654321").await;
    let session = driver.start(ID, pipeline.event_sink()).await.unwrap();

    let status = wait_for_status(
        &receiver,
        ID,
        "inactive with a pairing_code_error reason",
        |s| s["status"] == "inactive",
    )
    .await;
    let reason = status["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("pairing_code_error"), "{status}");
    assert!(reason.contains("429"), "{status}");
    let requests = fake.pairing_code_requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].phone_number, "15557654321");
    assert!(requests[0].pairing_ref.is_empty(), "refused: no ref");
    assert_eq!(fake.stats().pairing_code_refusals.load(Relaxed), 1);
    assert!(
        !receiver
            .items("/qr/batch")
            .iter()
            .any(|qr| qr["sessionId"] == ID),
        "no code and no QR code in the QR lane"
    );

    pipeline
        .shutdown(vec![session], Duration::from_secs(10))
        .await;
}

/// The server voids the code on display (`refresh_code`): the client emits `PairingCodeRefresh`,
/// the driver asks for a new code, and the new code reaches the backend as the next item of the
/// QR lane. The old code no longer links; the new one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_pairing_code_replaces_the_old_one_at_the_backend() {
    use std::sync::atomic::Ordering::Relaxed;
    const ID: &str = "wa-fake-code-refresh";
    const PHONE: &str = "+15550001111";

    let fake = FakeWhatsapp::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let (pipeline, driver) = pairing_code_gateway(&fake, &receiver, ID, PHONE).await;
    let session = driver.start(ID, pipeline.event_sink()).await.unwrap();

    let codes = |n: usize| {
        let items = receiver.items("/qr/batch");
        async move {
            let codes: Vec<_> = items
                .into_iter()
                .filter(|qr| qr["sessionId"] == ID)
                .collect();
            if codes.len() >= n {
                Ok(codes)
            } else {
                Err(format!("pairing codes so far: {codes:?}"))
            }
        }
    };
    let first = wait_until("a pairing code", Duration::from_secs(60), || codes(1))
        .await
        .unwrap()[0]
        .clone();
    fake.refresh_pairing_code(PHONE).await.unwrap();
    let items = wait_until("a second pairing code", Duration::from_secs(60), || {
        codes(2)
    })
    .await
    .unwrap();
    assert_eq!(items.len(), 2, "{items:?}");
    let second = &items[1];
    assert_eq!(second["type"], "pairing_code", "{second}");
    assert_eq!(second["seq"], 2, "{second}");
    let (old, new) = (
        first["qr"].as_str().unwrap(),
        second["qr"].as_str().unwrap(),
    );
    assert_eq!(new.len(), 8, "{new}");
    assert_ne!(old, new);
    let stats = fake.stats();
    assert_eq!(stats.code_refreshes_sent.load(Relaxed), 1);
    assert_eq!(stats.pairing_code_requests.load(Relaxed), 2);
    let requests = fake.pairing_code_requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_ne!(requests[0].pairing_ref, requests[1].pairing_ref);

    // The old code is void: the client's bundle (made with the new one) does not open with it.
    let refused = fake.enter_pairing_code(PHONE, old).await.unwrap_err();
    assert!(
        matches!(refused, test_support::fake_whatsapp::ScanError::Refused(_)),
        "{refused}"
    );
    fake.enter_pairing_code(PHONE, new).await.unwrap();
    assert_eq!(
        fake.pairing_code_requests()[1].code.as_deref(),
        Some(new),
        "linked with the new code"
    );
    wait_for_status(&receiver, ID, "active at the receiver", |s| {
        s["status"] == "active"
    })
    .await;
    assert!(
        !receiver
            .items("/whatsapp/status/batch")
            .iter()
            .any(|s| s["sessionId"] == ID && s["status"] == "inactive"),
        "a refresh is no outage"
    );

    pipeline
        .shutdown(vec![session], Duration::from_secs(10))
        .await;
}
