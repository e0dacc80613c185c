//! Fault tests of the delivery core under load, against a real HTTP receiver and a real
//! redis-server: backend down, backend misbehaving, gateway killed mid-outage, Redis away.

use std::time::Duration;

use clap::Parser;
use fred::prelude::*;
use gateway::app::Pipeline;
use gateway::config::{Cli, Mode as CliMode};
use gateway::session::SessionDriver;
use gateway::session::sim::{SimConfig, SimDriver};
use test_support::gateway::GatewayProcess;
use test_support::receiver::{Mode, Receiver};
use test_support::{RedisServer, wait_until};

fn settings(
    receiver: &Receiver,
    redis: &RedisServer,
    identity: &str,
    extra: &[&str],
) -> gateway::config::Settings {
    let mut args = vec![
        "gateway".to_string(),
        "standalone".into(),
        "--backend-url".into(),
        receiver.url(),
        "--redis-url".into(),
        redis.url(),
        "--identity".into(),
        identity.into(),
        "--resync-interval-s".into(),
        "0".into(),
        "--request-timeout-ms".into(),
        "1000".into(),
        "--rate-limit-rps".into(),
        "2000".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let CliMode::Standalone(a) = Cli::try_parse_from(args).unwrap().mode else {
        unreachable!("standalone args")
    };
    a.common.validate().unwrap()
}

fn churny_sim(seed: u64) -> SimDriver {
    SimDriver::new(SimConfig {
        seed,
        mean_connected: Duration::from_secs(20),
        scan_probability: 0.3,
        reconnect_delay_min: Duration::from_millis(200),
        reconnect_delay_max: Duration::from_secs(2),
        logout_probability: 0.05,
        ..SimConfig::default()
    })
    .unwrap()
}

async fn redis_client(redis: &RedisServer) -> fred::clients::Client {
    gateway::redis::connect(&redis.url()).await.unwrap()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_for_30s_loses_nothing_and_every_final_status_arrives() {
    let redis = RedisServer::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let settings = settings(&receiver, &redis, "gw-outage", &[]);
    let mut registry = gateway::metrics::new_registry();
    let pipeline = Pipeline::start(
        &settings,
        Some(redis_client(&redis).await),
        &mut registry,
        None,
    )
    .await
    .unwrap();
    let states = pipeline.states.clone();
    let stats = pipeline.batch_stats().clone();
    let delivery = pipeline.delivery.clone();

    let sim = churny_sim(7);
    let mut sessions = Vec::new();
    for i in 0..300 {
        sessions.push(
            sim.start(&format!("out-{i:03}"), pipeline.event_sink())
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !receiver.received().is_empty(),
        "deliveries before the outage"
    );

    receiver.set_mode(Mode::Down);
    let mut max_backlog = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        max_backlog = max_backlog.max(delivery.backlog());
    }
    assert!(max_backlog > 0, "batches spilled during the outage");
    let spill_len: u64 = redis_client(&redis)
        .await
        .xlen("wa:{gw:gw-outage}:spill:status")
        .await
        .unwrap();
    assert!(spill_len > 0, "the spill lives in Redis");
    assert!(!delivery.backend_healthy());

    receiver.set_mode(Mode::Ok);
    wait_until("spill drained", Duration::from_secs(90), || {
        let backlog = delivery.backlog();
        async move {
            if backlog == 0 {
                Ok(())
            } else {
                Err(format!("backlog {backlog}"))
            }
        }
    })
    .await
    .unwrap();

    let ids: Vec<String> = sessions
        .iter()
        .map(|s| s.session_id().to_string())
        .collect();
    pipeline.shutdown(sessions, Duration::from_secs(30)).await;

    // Every session's final status reached the backend, last.
    let delivered = receiver.last_status_by_session();
    for id in &ids {
        let state = states.get(id).expect("state of every session");
        assert_eq!(
            delivered.get(id).map(String::as_str),
            Some(state.status.as_str()),
            "final status of {id} at the backend"
        );
    }
    // Counts reconcile: every event was delivered, superseded by a newer one, or expired (QR).
    let accounted = delivery.delivered_items()
        + stats.total_superseded()
        + stats.expired()
        + delivery.expired_items();
    assert_eq!(
        stats.total_received(),
        accounted,
        "lost = received - delivered - superseded - expired"
    );
    assert_eq!(delivery.dead_letters(), 0);
    let at_receiver: usize = receiver.received().iter().map(|r| r.items.len()).sum();
    assert!(at_receiver as u64 >= delivery.delivered_items());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_receiver_is_retried_split_and_dead_lettered_without_crash() {
    let redis = RedisServer::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let settings = settings(&receiver, &redis, "gw-misbehave", &[]);
    let mut registry = gateway::metrics::new_registry();
    let pipeline = Pipeline::start(
        &settings,
        Some(redis_client(&redis).await),
        &mut registry,
        None,
    )
    .await
    .unwrap();
    let stats = pipeline.batch_stats().clone();
    let delivery = pipeline.delivery.clone();
    let sim = churny_sim(11);
    let mut sessions = Vec::new();
    for i in 0..300 {
        sessions.push(
            sim.start(&format!("bad-{i:03}"), pipeline.event_sink())
                .await
                .unwrap(),
        );
    }
    let rss_before = rss_kib();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (mode, secs) in [
        (Mode::Status(500), 5),
        (Mode::Hang, 5),
        (Mode::Garbage, 5),
        (Mode::Ok, 2),
        (Mode::MaxItems(1), 8),
    ] {
        receiver.set_mode(mode);
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    // Under the item limit until a split half got through: after the hangs the drainer may be
    // in a backoff of up to a minute (30 s plus jitter), so a fixed 8 s window could pass
    // without a single attempt.
    let split_delivered = || {
        let received = receiver.received();
        async move {
            received
                .iter()
                .any(|r| r.batch_id.ends_with("-a") || r.batch_id.ends_with("-b"))
                .then_some(())
                .ok_or_else(|| "no split half yet".to_owned())
        }
    };
    wait_until(
        "a split half delivered",
        Duration::from_secs(90),
        split_delivered,
    )
    .await
    .unwrap();
    receiver.set_mode(Mode::Status(422));
    tokio::time::sleep(Duration::from_secs(4)).await;
    receiver.set_mode(Mode::Ok);
    wait_until("spill drained", Duration::from_secs(90), || {
        let backlog = delivery.backlog();
        async move {
            if backlog == 0 {
                Ok(())
            } else {
                Err(format!("backlog {backlog}"))
            }
        }
    })
    .await
    .unwrap();
    pipeline.shutdown(sessions, Duration::from_secs(30)).await;

    assert!(
        receiver.attempts() > receiver.received().len() as u64,
        "failed requests were retried"
    );
    assert!(delivery.dead_letters() > 0, "422 answers are dead-lettered");
    let dead: u64 = redis_client(&redis)
        .await
        .xlen("wa:{gw:gw-misbehave}:dead")
        .await
        .unwrap();
    assert_eq!(
        dead,
        delivery.dead_letters(),
        "dead letters are in the Redis stream"
    );
    // 413 made the gateway split batches down to what the receiver takes.
    let under_413: Vec<_> = receiver
        .received()
        .into_iter()
        .filter(|r| r.batch_id.ends_with("-a") || r.batch_id.ends_with("-b"))
        .collect();
    assert!(!under_413.is_empty(), "split halves were delivered");
    let accounted = delivery.delivered_items()
        + delivery.dead_letter_items()
        + stats.total_superseded()
        + stats.expired()
        + delivery.expired_items();
    assert!(
        accounted >= stats.total_received(),
        "nothing lost: {accounted} accounted of {}",
        stats.total_received()
    );
    let growth = rss_kib().saturating_sub(rss_before);
    assert!(
        growth < 200 * 1024,
        "memory stays bounded: grew {growth} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_mid_outage_delivers_the_spill_after_restart() {
    let redis = RedisServer::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode::Down);
    let env = [
        ("WA_BACKEND_URL", receiver.url()),
        ("WA_REDIS_URL", redis.url()),
        ("POD_NAME", "gw-kill".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut first = GatewayProcess::start(
        &[
            "standalone",
            "--simulate",
            "200",
            "--sim-mean-connected-s",
            "20",
            "--retry-attempts",
            "1",
        ],
        &env,
    )
    .await
    .unwrap();
    let client = redis_client(&redis).await;
    let spilled = wait_until("batches spilled to Redis", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let n: u64 = client
                .xlen("wa:{gw:gw-kill}:spill:status")
                .await
                .map_err(|e| e.to_string())?;
            if n >= 3 {
                Ok(n)
            } else {
                Err(format!("{n} spilled"))
            }
        }
    })
    .await
    .unwrap();
    first.child.signal("KILL").unwrap();
    first
        .child
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("killed");
    let entries: Vec<(String, std::collections::HashMap<String, String>)> = client
        .xrange("wa:{gw:gw-kill}:spill:status", "-", "+", None)
        .await
        .unwrap();
    assert!(entries.len() as u64 >= spilled);
    let batch_ids: Vec<String> = entries
        .iter()
        .map(|(_, f)| {
            serde_json::from_str::<serde_json::Value>(&f["batch"]).unwrap()["batch_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();

    receiver.set_mode(Mode::Ok);
    let second = GatewayProcess::start(&["standalone", "--simulate", "0"], &env)
        .await
        .unwrap();
    wait_until(
        "spill delivered after restart",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move {
                let n: u64 = client
                    .xlen("wa:{gw:gw-kill}:spill:status")
                    .await
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    Ok(())
                } else {
                    Err(format!("{n} still spilled"))
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", second.log()));
    let received: std::collections::HashSet<String> = receiver
        .received()
        .into_iter()
        .map(|r| r.batch_id)
        .collect();
    for id in &batch_ids {
        assert!(
            received.contains(id),
            "spilled batch {id} delivered by the restarted gateway"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_degrades_readiness_and_recovers() {
    let mut redis = RedisServer::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let env = [
        ("WA_BACKEND_URL", receiver.url()),
        ("WA_REDIS_URL", redis.url()),
        ("POD_NAME", "gw-redis".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut gw = GatewayProcess::start(
        &[
            "standalone",
            "--simulate",
            "100",
            "--sim-mean-connected-s",
            "10",
        ],
        &env,
    )
    .await
    .unwrap();
    let ready = |code: u16| {
        let gw = &gw;
        move || async move {
            let (status, body) = gw.get("/readyz").await?;
            if status == code {
                Ok(body)
            } else {
                Err(format!("{status} {body}"))
            }
        }
    };
    wait_until("ready", Duration::from_secs(20), ready(200))
        .await
        .unwrap();

    redis.stop();
    let body = wait_until("degraded", Duration::from_secs(20), ready(503))
        .await
        .unwrap();
    assert!(body.contains("unreachable"), "{body}");
    assert_eq!(
        gw.get("/healthz").await.unwrap().0,
        200,
        "alive while degraded"
    );
    // The chart's readiness probe leaves the shared dependencies out: the pod stays in its
    // Service (its /v1 API answers from the cache) while /readyz reports the outage.
    let (code, body) = gw
        .get("/readyz?exclude=redis&exclude=backend")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("unreachable"), "{body}");
    assert_eq!(gw.get("/readyz?exclude=redis").await.unwrap().0, 200);
    assert_eq!(gw.get("/readyz?exclude=radis").await.unwrap().0, 503);
    assert_eq!(gw.get("/readyz?verbose").await.unwrap().0, 503);
    let before = receiver.received().len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        receiver.received().len() > before,
        "still delivering while Redis is away"
    );

    redis.restart().await.unwrap();
    wait_until("ready again", Duration::from_secs(30), ready(200))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    gw.child.check_running().expect("never crashed");
}
