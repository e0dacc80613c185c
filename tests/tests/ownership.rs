//! Session ownership across gateway *processes* sharing one real redis-server: at most one
//! gateway runs a session at any instant, a frozen gateway stops its copies and writes nothing when
//! it wakes up, and a killed gateway's sessions move to another without a new QR code.
//!
//! The proof of "never two owners" is the ownership history (`wa:owners:history`): each gateway
//! stamps an acquisition after Redis granted the lock and before the session starts, a release
//! after the session stopped and before the lock is deleted, and a loss at the instant its lease
//! stopped being usable (from then on its gate lets nothing out). Tokens come from the per-session
//! fence, so they order the owners; consecutive owners' intervals must not overlap.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use fred::prelude::*;
use gateway::session::credentials::{
    CredentialStore, Credentials, Fence, RedisCredentials, Write, creds_key,
};
use gateway::session::ownership::{
    Acquired, HistoryEntry, HistoryEvent, LockStore, RedisLockStore, fence_key, hold_key,
    read_history,
};
use test_support::gateway::GatewayProcess;
use test_support::history::assert_no_overlap;
use test_support::receiver::{Receiver, unix_ms};
use test_support::{RedisCluster, RedisServer, wait_until};

/// Lock TTL of the gateways under test. A lease is usable for about 0.62 × TTL after a renewal
/// is sent and renewals run every TTL/3, so a process stalled for more than ~0.28 × TTL loses its
/// locks: 4 s tolerates a ~1.1 s stall of a loaded 2-core CI machine.
const TTL_MS: &str = "4000";

fn ttl_ms() -> i64 {
    TTL_MS.parse().unwrap()
}

async fn redis_client(redis: &RedisServer) -> Client {
    gateway::redis::connect(&redis.url()).await.unwrap()
}

async fn start_gateway(
    redis: &RedisServer,
    receiver: &Receiver,
    identity: &str,
    sessions: usize,
    extra: &[&str],
) -> GatewayProcess {
    let env = [
        ("WA_BACKEND_URL", receiver.url()),
        ("WA_REDIS_URL", redis.url()),
        ("POD_NAME", identity.to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let sessions = sessions.to_string();
    let mut args = vec![
        "standalone",
        "--simulate",
        &sessions,
        "--lock-ttl-ms",
        TTL_MS,
        "--resync-interval-s",
        "0",
        "--sim-mean-connected-s",
        "3600",
        "--qr-format",
        "raw",
    ];
    args.extend_from_slice(extra);
    GatewayProcess::start(&args, &env).await.unwrap()
}

/// A sample's value from the Prometheus text format (first line starting with `series`).
async fn metric(gw: &GatewayProcess, series: &str) -> Result<f64, String> {
    let (status, body) = gw.get("/metrics").await?;
    if status != 200 {
        return Err(format!("/metrics answered {status}"));
    }
    body.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().ok())?
        })
        .ok_or_else(|| format!("no `{series}` in /metrics"))
}

async fn running(gw: &GatewayProcess) -> Result<u64, String> {
    metric(gw, "whatsapp_gateway_sessions_running")
        .await
        .map(|v| v as u64)
}

async fn wait_running(gw: &GatewayProcess, what: &str, check: impl Fn(u64) -> bool) -> u64 {
    wait_until(what, Duration::from_secs(30), || async {
        let n = running(gw).await?;
        if check(n) {
            Ok(n)
        } else {
            Err(format!("{n} running"))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&gw.log())))
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Sessions whose credentials say paired, with who wrote them.
async fn paired_sessions(client: &Client, n: usize) -> HashMap<String, Credentials> {
    let store = RedisCredentials::new(client.clone());
    let mut out = HashMap::new();
    for i in 0..n {
        let id = format!("sim-{i:05}");
        if let Some(creds) = store.load(&id).await.unwrap()
            && creds.paired
        {
            out.insert(id, creds);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lock_fences_stale_writers() {
    let redis = RedisServer::start().await.unwrap();
    let client = redis_client(&redis).await;
    let locks = RedisLockStore::new(client.clone());
    let creds = RedisCredentials::new(client.clone());
    let ttl = Duration::from_millis(300);

    let Acquired::Yes {
        token: a,
        value: a_value,
    } = locks.acquire("s", "gw-a", ttl).await.unwrap()
    else {
        panic!("free lock not granted");
    };
    assert_eq!(
        locks.acquire("s", "gw-b", ttl).await.unwrap(),
        Acquired::HeldBy(a_value.clone())
    );
    let fence_a = Fence {
        owner: a_value.clone(),
        token: a,
    };
    assert_eq!(
        creds.save_paired("s", &fence_a).await.unwrap(),
        Write::Written
    );
    assert!(locks.renew("s", &a_value, ttl).await.unwrap());

    // gw-a stalls past its TTL; gw-b takes over with a newer token.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let Acquired::Yes {
        token: b,
        value: b_value,
    } = locks.acquire("s", "gw-b", ttl).await.unwrap()
    else {
        panic!("expired lock not granted");
    };
    assert_eq!(b, a + 1, "tokens are monotonic per session");
    assert!(
        !locks.renew("s", &a_value, ttl).await.unwrap(),
        "stale renewal refused"
    );
    assert!(
        !locks.release("s", &a_value).await.unwrap(),
        "stale release refused"
    );
    assert_eq!(
        creds.save_paired("s", &fence_a).await.unwrap(),
        Write::Fenced
    );
    assert_eq!(creds.wipe("s", &fence_a).await.unwrap(), Write::Fenced);
    let fence_b = Fence {
        owner: b_value.clone(),
        token: b,
    };
    assert_eq!(
        creds.save_paired("s", &fence_b).await.unwrap(),
        Write::Written
    );
    let stored = creds.load("s").await.unwrap().unwrap();
    assert_eq!((stored.owner.as_str(), stored.token), (b_value.as_str(), b));
    assert!(locks.release("s", &b_value).await.unwrap());
    let fence: u64 = client.get(fence_key("s")).await.unwrap();
    assert_eq!(fence, b);
    let keys: i64 = client.exists(creds_key("s")).await.unwrap();
    assert_eq!(keys, 1, "credentials outlive the lock");

    // A held session (paused or deleted through the API) is granted to nobody, and its holder
    // (if any) keeps renewing until it follows the pause itself.
    let Acquired::Yes { value: c_value, .. } = locks.acquire("s", "gw-c", ttl).await.unwrap()
    else {
        panic!("released lock not granted");
    };
    let _: () = client
        .set(hold_key("s"), "paused", None, None, false)
        .await
        .unwrap();
    assert!(locks.renew("s", &c_value, ttl).await.unwrap());
    assert!(locks.release("s", &c_value).await.unwrap());
    assert_eq!(
        locks.acquire("s", "gw-a", ttl).await.unwrap(),
        Acquired::HeldBy("hold:paused".into())
    );
    let _: i64 = client.del(hold_key("s")).await.unwrap();
    assert!(matches!(
        locks.acquire("s", "gw-a", ttl).await.unwrap(),
        Acquired::Yes { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_contend_and_never_run_a_session_twice() {
    const N: usize = 60;
    let redis = RedisServer::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let client = redis_client(&redis).await;
    // Started together, they race for the same sessions.
    let (a, b) = tokio::join!(
        start_gateway(&redis, &receiver, "gw-a", N, &[]),
        start_gateway(&redis, &receiver, "gw-b", N, &[])
    );
    wait_until(
        "every session runs once",
        Duration::from_secs(30),
        || async {
            let total = running(&a).await? + running(&b).await?;
            if total == N as u64 {
                Ok(())
            } else {
                Err(format!("{total} running"))
            }
        },
    )
    .await
    .unwrap();
    // They keep contending (each retries the other's sessions) and the split holds.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ra, rb) = (running(&a).await.unwrap(), running(&b).await.unwrap());
        assert_eq!(ra + rb, N as u64, "a {ra} + b {rb}");
    }
    let contended = metric(&a, "whatsapp_gateway_lock_contended_total")
        .await
        .unwrap()
        + metric(&b, "whatsapp_gateway_lock_contended_total")
            .await
            .unwrap();
    assert!(contended > 0.0, "the gateways contended");

    // gw-a shuts down gracefully: its locks are released after its events are flushed and gw-b
    // takes everything over.
    let ra = running(&a).await.unwrap();
    a.child.signal("TERM").unwrap();
    let mut a = a;
    a.child
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("gw-a drained and exited");
    wait_running(&b, "gw-b runs all", |n| n == N as u64).await;

    // gw-a comes back and contends again; then gw-b is killed and gw-a takes over all.
    let a = start_gateway(&redis, &receiver, "gw-a", N, &[]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(running(&a).await.unwrap(), 0, "all held by gw-b");
    let mut b = b;
    b.child.signal("KILL").unwrap();
    b.child
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("killed");
    let b_dead = unix_ms();
    wait_running(&a, "gw-a runs all", |n| n == N as u64).await;

    let history = read_history(&client).await.unwrap();
    let handovers = assert_no_overlap(&history, &HashMap::from([("gw-b", b_dead)]));
    // ra sessions moved a -> b, then all N moved b -> a.
    assert!(handovers >= ra as usize + N, "{handovers} handovers");
    let owners: HashSet<&str> = history.iter().map(|e| e.owner.as_str()).collect();
    assert_eq!(owners, HashSet::from(["gw-a", "gw-b"]));
    // At the end every lock is gw-a's.
    for i in 0..N {
        let holder: Option<String> = client
            .get(format!("wa:{{sim-{i:05}}}:owner"))
            .await
            .unwrap();
        assert!(holder.is_some_and(|h| h.starts_with("gw-a:")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_gateway_stops_its_copies_and_writes_nothing_on_wake_up() {
    const N: usize = 40;
    let redis = RedisServer::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let client = redis_client(&redis).await;
    let a = start_gateway(&redis, &receiver, "gw-a", N, &[]).await;
    wait_running(&a, "gw-a runs all", |n| n == N as u64).await;
    let b = start_gateway(&redis, &receiver, "gw-b", N, &[]).await;
    // Paired sessions connect within 2 s and record their pairing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(running(&b).await.unwrap(), 0);
    let written_by_a = metric(
        &a,
        "whatsapp_gateway_credential_writes_total{result=\"written\"}",
    )
    .await
    .unwrap();
    assert!(written_by_a > 0.0);

    a.child.signal("STOP").unwrap();
    let stopped_at = unix_ms();
    wait_running(&b, "gw-b took over", |n| n == N as u64).await;
    // The sessions gw-b restored record their pairing with gw-b's tokens (once connected, which
    // the simulator does within 2 s).
    let before_wake = wait_until(
        "gw-b re-recorded every pairing",
        Duration::from_secs(15),
        || {
            let client = client.clone();
            async move {
                let paired = paired_sessions(&client, N).await;
                let not_b: Vec<_> = paired
                    .iter()
                    .filter(|(_, c)| !c.owner.starts_with("gw-b:"))
                    .map(|(id, c)| format!("{id}: {}", c.owner))
                    .collect();
                if !paired.is_empty() && not_b.is_empty() {
                    Ok(paired)
                } else {
                    Err(format!(
                        "{} paired, not yet gw-b's: {not_b:?}",
                        paired.len()
                    ))
                }
            }
        },
    )
    .await
    .unwrap();

    let woke_at = unix_ms();
    a.child.signal("CONT").unwrap();
    assert!(woke_at - stopped_at >= ttl_ms(), "frozen past the TTL");
    wait_running(&a, "gw-a stopped its copies", |n| n == 0).await;
    let stopped_after = unix_ms() - woke_at;
    // Let anything gw-a might still do happen.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // It wrote nothing: its write counter did not move, and every credential is gw-b's, with
    // gw-b's current token.
    let written_after = metric(
        &a,
        "whatsapp_gateway_credential_writes_total{result=\"written\"}",
    )
    .await
    .unwrap();
    assert_eq!(
        written_after, written_by_a,
        "gw-a wrote credentials after waking up"
    );
    let after = paired_sessions(&client, N).await;
    assert!(after.len() >= before_wake.len());
    for (id, creds) in &after {
        assert!(creds.owner.starts_with("gw-b:"), "{id}: {creds:?}");
        let fence: u64 = client.get(fence_key(id)).await.unwrap();
        assert_eq!(creds.token, fence, "{id}: written with the current token");
    }
    // It noticed the loss (expired: checked against the clock before renewing anything).
    let lost = metric(&a, "whatsapp_gateway_lock_losses_total{reason=\"expired\"}")
        .await
        .unwrap();
    assert_eq!(lost, N as f64);
    assert_eq!(running(&b).await.unwrap(), N as u64);

    let history = read_history(&client).await.unwrap();
    let handovers = assert_no_overlap(&history, &HashMap::new());
    assert_eq!(handovers, N);
    let losses: Vec<&HistoryEntry> = history
        .iter()
        .filter(|e| e.owner == "gw-a" && e.event == HistoryEvent::Lost)
        .collect();
    assert_eq!(losses.len(), N);
    for loss in losses {
        // Stamped at the lease's end (while frozen), noticed after waking up.
        assert!(loss.at_ms <= stopped_at + ttl_ms(), "{loss:?}");
        assert!(loss.detected_ms >= woke_at, "{loss:?}");
    }
    eprintln!("gw-a stopped its {N} copies {stopped_after} ms after SIGCONT");
    assert!(stopped_after < 3_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_sessions_move_without_a_new_qr_code() {
    const N: usize = 40;
    let redis = RedisServer::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let client = redis_client(&redis).await;
    let a = start_gateway(
        &redis,
        &receiver,
        "gw-a",
        N,
        &["--sim-unpaired-share", "0.5"],
    )
    .await;
    wait_running(&a, "gw-a runs all", |n| n == N as u64).await;
    // Paired sessions connect within 2 s; their pairing is in Redis.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let paired = paired_sessions(&client, N).await;
    assert!(
        (5..N - 5).contains(&paired.len()),
        "a mix of paired and unpaired: {} paired",
        paired.len()
    );

    let mut a = a;
    let kill_sent = unix_ms();
    a.child.signal("KILL").unwrap();
    a.child
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("killed");
    let dead_at = unix_ms();
    let b = start_gateway(
        &redis,
        &receiver,
        "gw-b",
        N,
        &["--sim-unpaired-share", "0.5"],
    )
    .await;
    wait_running(&b, "gw-b restored all", |n| n == N as u64).await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    // gw-b had to wait for the locks' TTL: none was taken before the last renewal + TTL.
    let history = read_history(&client).await.unwrap();
    let first_b = history
        .iter()
        .filter(|e| e.owner == "gw-b" && e.event == HistoryEvent::Acquire)
        .map(|e| e.at_ms)
        .min()
        .unwrap();
    // The last renewal before the kill was at most TTL/3 (plus scheduling) earlier, and Redis
    // keeps the lock for the TTL from it.
    let ttl = ttl_ms();
    assert!(
        first_b >= kill_sent + ttl / 2,
        "gw-b took a lock {} ms after the kill",
        first_b - kill_sent
    );
    assert_eq!(
        assert_no_overlap(&history, &HashMap::from([("gw-a", dead_at)])),
        N
    );

    // No session that was paired before the kill was asked for a QR code afterwards; they came
    // back `active`.
    let after_kill: Vec<_> = receiver
        .received()
        .into_iter()
        .filter(|r| r.at_unix_ms > dead_at)
        .collect();
    let mut qr_after: HashSet<String> = HashSet::new();
    let mut active_after: HashSet<String> = HashSet::new();
    for request in &after_kill {
        for item in &request.items {
            let id = item["sessionId"].as_str().unwrap_or_default().to_string();
            if request.path.ends_with("/qr/batch") {
                qr_after.insert(id);
            } else if item["status"] == "active" {
                active_after.insert(id);
            }
        }
    }
    for id in paired.keys() {
        assert!(
            !qr_after.contains(id),
            "{id} was paired yet got a new QR code"
        );
        assert!(active_after.contains(id), "{id} restored as active");
    }
    // The unpaired ones do show a QR again (they never had credentials).
    assert!(
        !qr_after.is_empty(),
        "unpaired sessions show QR codes on gw-b"
    );
    let now_paired = paired_sessions(&client, N).await;
    for id in paired.keys() {
        assert!(
            now_paired[id].owner.starts_with("gw-b:"),
            "{id} re-recorded by gw-b"
        );
    }
}

/// On a Redis Cluster (three primaries, the slots spread over them) each session's lock, fence
/// and credentials sit on the slot of its `{id}` hash tag, so every Lua script must run on
/// whichever node holds that slot. Scripts used to be loaded on one node only (`SCRIPT LOAD` is
/// routed by the script's text), and about two thirds of the sessions never got their lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_run_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3).await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let env = [
        ("WA_BACKEND_URL", receiver.url()),
        ("WA_REDIS_URL", cluster.url()),
        ("POD_NAME", "gw-cluster".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gw = GatewayProcess::start(
        &[
            "standalone",
            "--simulate",
            "30",
            "--lock-ttl-ms",
            TTL_MS,
            "--qr-format",
            "raw",
        ],
        &env,
    )
    .await
    .unwrap();
    wait_running(&gw, "30 sessions running on the cluster", |n| n == 30).await;
    let client = gateway::redis::connect(&cluster.url()).await.unwrap();
    for i in 0..30 {
        let id = format!("sim-{i:05}");
        let owner: Option<String> = client
            .get(gateway::session::ownership::owner_key(&id))
            .await
            .unwrap();
        assert!(
            owner.is_some_and(|o| o.starts_with("gw-cluster")),
            "{id} locked by the gateway\n{}",
            tail(&gw.log())
        );
    }
    assert_eq!(
        metric(&gw, "whatsapp_gateway_lock_errors_total").await,
        Ok(0.0),
        "{}",
        tail(&gw.log())
    );
}
