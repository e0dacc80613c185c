//! The cache core against a real redis-server, with two gateway processes sharing it: cross-process
//! invalidation within the propagation delay, single-flight fallback, Redis outage, API auth.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use gateway::cache::{
    CacheMetrics, CacheSettings, QrRecord, RedisTier, RemoteTier, SessionCache, SessionLookup,
    SessionView,
};
use gateway::events::SessionStatus;
use test_support::gateway::GatewayProcess;
use test_support::{RedisServer, wait_until};

const TOKEN: &str = "test-token-123";
/// The propagation delay `docs/api.md` promises on a healthy Redis (measured figures are far
/// below it; the margin absorbs a loaded CI machine).
const PROPAGATION_BUDGET: Duration = Duration::from_millis(250);

async fn gateway(redis: &RedisServer, identity: &str) -> GatewayProcess {
    let url = redis.url();
    GatewayProcess::start(
        &[
            "standalone",
            "--redis-url",
            &url,
            "--identity",
            identity,
            "--resync-interval-s",
            "0",
        ],
        &[("WA_API_TOKEN", TOKEN)],
    )
    .await
    .unwrap()
}

/// One client for the whole test binary: building one costs milliseconds, which would blur the
/// propagation figures.
fn http() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap()
        })
        .clone()
}

async fn get_status(gw: &GatewayProcess, id: &str) -> (u16, Option<String>, Duration) {
    let started = Instant::now();
    let response = http()
        .get(gw.url(&format!("/v1/sessions/{id}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let code = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let status = body["status"].as_str().map(str::to_string);
    (code, status, started.elapsed())
}

async fn put_status(gw: &GatewayProcess, id: &str, status: &str) {
    let response = http()
        .put(gw.url(&format!("/v1/sessions/{id}/status")))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "status": status }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202, "PUT {id} {status}");
}

async fn wait_for_status(gw: &GatewayProcess, id: &str, want: &str, timeout: Duration) {
    wait_until(&format!("{id} is {want}"), timeout, || async {
        match get_status(gw, id).await {
            (200, Some(s), _) if s == want => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
}

fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_change_through_one_process_is_seen_by_the_other_within_the_propagation_delay() {
    let redis = RedisServer::start().await.unwrap();
    let a = gateway(&redis, "gw-a").await;
    let b = gateway(&redis, "gw-b").await;

    put_status(&a, "prop-1", "active").await;
    wait_for_status(&b, "prop-1", "active", Duration::from_secs(5)).await;

    let mut delays = Vec::new();
    for round in 0..20 {
        let want = if round % 2 == 0 { "inactive" } else { "active" };
        // b has the previous status in its local tier: only the invalidation can make it change.
        let (code, seen, _) = get_status(&b, "prop-1").await;
        assert_eq!(code, 200);
        assert_ne!(seen.as_deref(), Some(want));
        put_status(&a, "prop-1", want).await;
        let put_done = Instant::now();
        loop {
            let (code, seen, _) = get_status(&b, "prop-1").await;
            assert_eq!(code, 200);
            if seen.as_deref() == Some(want) {
                break;
            }
            assert!(
                put_done.elapsed() < Duration::from_secs(5),
                "b never saw {want}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        delays.push(put_done.elapsed());
    }
    delays.sort();
    let p50 = delays[delays.len() / 2];
    let max = *delays.last().unwrap();
    eprintln!(
        "propagation delay over {} changes: p50 {p50:?}, max {max:?}",
        delays.len()
    );
    assert!(
        max <= PROPAGATION_BUDGET,
        "propagation took {max:?} (budget {PROPAGATION_BUDGET:?})"
    );

    let (_, metrics) = b.get("/metrics").await.unwrap();
    assert!(
        metric(
            &metrics,
            "whatsapp_gateway_cache_invalidations_total{direction=\"received\"}"
        ) >= 20.0
    );
    assert!(
        metric(
            &metrics,
            "whatsapp_gateway_cache_requests_total{tier=\"local\",result=\"hit\"}"
        ) >= 1.0
    );
    let (_, metrics) = a.get("/metrics").await.unwrap();
    assert!(
        metric(
            &metrics,
            "whatsapp_gateway_cache_invalidations_total{direction=\"sent\"}"
        ) >= 21.0
    );
    assert!(metrics.contains("whatsapp_gateway_cache_keys{kind=\"status\"}"));
}

/// A fallback that counts its calls and takes a while, like a backend under load.
struct SlowCountingLookup {
    calls: AtomicUsize,
}

impl SessionLookup for SlowCountingLookup {
    fn lookup<'a>(
        &'a self,
        session_id: &'a str,
    ) -> BoxFuture<'a, gateway::Result<Option<SessionView>>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(Some(SessionView::with_status(
                session_id,
                SessionStatus::Active,
                None,
            )))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thundering_herd_on_one_key_makes_exactly_one_fallback_call() {
    let redis = RedisServer::start().await.unwrap();
    let client = gateway::redis::connect(&redis.url()).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let lookup = Arc::new(SlowCountingLookup {
        calls: AtomicUsize::new(0),
    });
    let new_cache = || {
        let remote: Arc<dyn RemoteTier> =
            Arc::new(RedisTier::new(client.clone(), Duration::from_secs(120)));
        let cache = SessionCache::new(
            CacheSettings::default(),
            Some(remote),
            lookup.clone(),
            CacheMetrics::default(),
        );
        cache.spawn_background(stop.clone());
        cache
    };
    let first = new_cache();
    let herd = |cache: Arc<SessionCache>| async move {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..1_000 {
            let cache = cache.clone();
            tasks.spawn(async move { cache.is_active("herd-1").await.unwrap() });
        }
        while let Some(active) = tasks.join_next().await {
            assert!(active.unwrap());
        }
    };
    herd(first.clone()).await;
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 1);

    // The answer was written to Redis: a second gateway's herd makes no fallback call at all.
    wait_until("fallback answer in Redis", Duration::from_secs(5), || {
        let first = first.clone();
        let client = client.clone();
        async move {
            // The queue empties when the write is taken, before Redis has it: wait for the key.
            let stored: i64 = fred::prelude::KeysInterface::exists(&client, "wa:{herd-1}:status")
                .await
                .map_err(|e| e.to_string())?;
            match (first.pending_writes(), stored) {
                (0, 1) => Ok(()),
                (n, stored) => Err(format!("{n} pending, key stored: {stored}")),
            }
        }
    })
    .await
    .unwrap();
    let second = new_cache();
    herd(second.clone()).await;
    assert_eq!(lookup.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        second
            .metrics()
            .requests(gateway::cache::Tier::Redis, gateway::cache::Outcome::Hit),
        1,
        "one Redis read for the whole herd"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_degrades_without_api_errors_and_recovers() {
    let mut redis = RedisServer::start().await.unwrap();
    let a = gateway(&redis, "gw-a").await;
    let b = gateway(&redis, "gw-b").await;
    put_status(&a, "away-1", "active").await;
    wait_for_status(&b, "away-1", "active", Duration::from_secs(5)).await;
    // A read that raced the invalidation is answered but not kept; one more read after the
    // message has surely arrived puts the entry in b's local tier.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get_status(&b, "away-1").await.1.as_deref(), Some("active"));

    redis.stop();
    // Both keep answering, fast: a from its own sessions, b from its local tier.
    let outage = Instant::now();
    let mut slowest = Duration::ZERO;
    while outage.elapsed() < Duration::from_secs(3) {
        for gw in [&a, &b] {
            let (code, status, took) = get_status(gw, "away-1").await;
            assert_eq!((code, status.as_deref()), (200, Some("active")));
            slowest = slowest.max(took);
        }
        // Unknown sessions are "not found", not a server error.
        let (code, _, took) = get_status(&b, "never-seen").await;
        assert_eq!(code, 404);
        if took > Duration::from_millis(100) {
            eprintln!("slow unknown lookup at {:?}: {took:?}", outage.elapsed());
        }
        slowest = slowest.max(took);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        // (The first lookup after the stop may still wait out one 250 ms Redis read timeout.)
        slowest < Duration::from_secs(1),
        "lookups stayed fast during the outage: {slowest:?}"
    );
    // Changes keep flowing on the owner.
    put_status(&a, "away-1", "inactive").await;
    wait_for_status(&a, "away-1", "inactive", Duration::from_secs(2)).await;

    redis.restart().await.unwrap();
    let back = Instant::now();
    // The owner's queued write lands once Redis is back, and b drops what it may have missed.
    wait_for_status(&b, "away-1", "inactive", Duration::from_secs(20)).await;
    eprintln!("b caught up {:?} after Redis came back", back.elapsed());
    put_status(&a, "away-1", "active").await;
    wait_for_status(&b, "away-1", "active", Duration::from_secs(2)).await;
    let (_, metrics) = a.get("/metrics").await.unwrap();
    assert_eq!(
        metric(&metrics, "whatsapp_gateway_cache_pending_writes "),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_a_missing_or_wrong_token_get_401() {
    let redis = RedisServer::start().await.unwrap();
    let gw = gateway(&redis, "gw-auth").await;
    let client = http();
    for path in ["/v1/sessions/x", "/v1/sessions/x/qr"] {
        let none = client.get(gw.url(path)).send().await.unwrap();
        assert_eq!(none.status().as_u16(), 401, "{path} without token");
        assert_eq!(none.headers().get("www-authenticate").unwrap(), "Bearer");
        let wrong = client
            .get(gw.url(path))
            .bearer_auth("test-token-124")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status().as_u16(), 401, "{path} with a wrong token");
        let basic = client
            .get(gw.url(path))
            .header("Authorization", format!("Basic {TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(basic.status().as_u16(), 401, "{path} with another scheme");
        let right = client
            .get(gw.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(right.status().as_u16(), 404, "{path}: unknown session");
    }
    let put = client
        .put(gw.url("/v1/sessions/x/status"))
        .json(&serde_json::json!({ "status": "active" }))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 401);
    for open in ["/metrics", "/healthz"] {
        assert_eq!(gw.get(open).await.unwrap().0, 200, "{open} stays open");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qr_endpoint_serves_json_or_png_and_404_once_expired() {
    let cache = SessionCache::new(
        CacheSettings::default(),
        None,
        Arc::new(gateway::cache::NoLookup),
        CacheMetrics::default(),
    );
    let mut view = SessionView::with_status("qr-1", SessionStatus::QrPending, None);
    // Far enough ahead for the requests below on a loaded machine (PNG rendering in a debug build).
    let expires_at = chrono::Utc::now() + chrono::Duration::milliseconds(4000);
    view.qr = Some(QrRecord {
        code: "2@abcdef,ghijkl".into(),
        expires_at,
        seq: 1,
    });
    cache.write(view);
    cache.write(SessionView::with_status(
        "no-qr",
        SessionStatus::Active,
        None,
    ));
    let app = gateway::api::router(gateway::api::ApiState {
        cache,
        events: None,
        token: None,
        sessions: None,
        webhooks: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    // Served as the gateway serves it: with the peer address (writes without a token are
    // taken from loopback only).
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
    });
    let client = http();

    let json: serde_json::Value = client
        .get(format!("{base}/v1/sessions/qr-1/qr"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(json["qr"], "2@abcdef,ghijkl");
    assert_eq!(json["seq"], 1);
    let png = client
        .get(format!("{base}/v1/sessions/qr-1/qr"))
        .header("Accept", "image/png")
        .send()
        .await
        .unwrap();
    assert_eq!(png.status().as_u16(), 200);
    assert_eq!(png.headers()["content-type"], "image/png");
    assert!(png.bytes().await.unwrap().starts_with(b"\x89PNG"));
    let status: serde_json::Value = client
        .get(format!("{base}/v1/sessions/qr-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "qr_pending");
    assert_eq!(status["qrAvailable"], true);

    let none = client
        .get(format!("{base}/v1/sessions/no-qr/qr"))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status().as_u16(), 404);
    let until_expired = (expires_at - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(until_expired + Duration::from_millis(100)).await;
    let expired = client
        .get(format!("{base}/v1/sessions/qr-1/qr"))
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status().as_u16(), 404);
    let body: serde_json::Value = expired.json().await.unwrap();
    assert_eq!(body["error"], "qr_expired");
    let put = client
        .put(format!("{base}/v1/sessions/qr-1/status"))
        .json(&serde_json::json!({ "status": "active" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        put.status().as_u16(),
        405,
        "read-only without an event sink"
    );
    let bad = client
        .get(format!("{base}/v1/sessions/a%7Bb%7D"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
}
