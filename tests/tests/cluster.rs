//! Cluster mode end to end against a real kube-apiserver: the operator and three or four gateway
//! shards as separate processes (sim driver), sessions as `WhatsappSession` resources.

use std::collections::HashMap;
use std::time::Duration;

use crds::{Phase, WhatsappSession};
use kube::ResourceExt;
use kube::api::Api;
use test_support::cluster::{
    FAST_LEASE_ARGS, NS, RELEASE, create_sessions, loads, setup, snapshot, start_gateway,
    start_gateway_with, start_operator, wait_connected_on, wait_operator_sees_shards,
};
use test_support::gateway::GatewayProcess;
use test_support::{ControlPlane, RedisServer, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_connect_across_shards_and_survive_shard_loss_scale_up_and_drain() {
    let plane = ControlPlane::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let client = plane.client().await.unwrap();
    setup(&client).await;
    let api: Api<WhatsappSession> = Api::namespaced(client.clone(), NS);
    let _operator = start_operator(&plane).await;
    let mut gateways: Vec<Option<GatewayProcess>> = Vec::new();
    for k in 0..3 {
        gateways.push(Some(start_gateway(&plane, &redis, k).await));
    }
    wait_operator_sees_shards(&_operator, 3).await;

    let total = 300;
    create_sessions(&api, (0..total).map(|i| format!("s-{i:03}"))).await;
    let placed = wait_connected_on(&api, total, &["0", "1", "2"], 120).await;
    let cap = (1.25f64 * total as f64 / 3.0).ceil() as usize;
    assert!(
        loads(&placed).values().all(|&n| n <= cap),
        "loads {:?} within cap {cap}",
        loads(&placed)
    );
    let s = api.get("s-000").await.unwrap();
    let generation = s.metadata.generation;
    let s = s.status.unwrap();
    assert_eq!(
        s.gateway_pod.as_deref(),
        Some(format!("{RELEASE}-gateway-{}", placed["s-000"]).as_str())
    );
    // The gateway records the shard, the spec generation it runs and the Assigned condition.
    assert_eq!(s.shard.as_deref(), Some(placed["s-000"].as_str()));
    assert_eq!(s.observed_generation, generation);
    let assigned = s
        .conditions
        .iter()
        .find(|c| c.type_ == crds::condition::ASSIGNED)
        .expect("Assigned condition");
    assert_eq!(assigned.status, "True");

    // Any gateway answers the /v1 API for a session another shard runs.
    let (elsewhere, _) = placed.iter().find(|(_, s)| *s == "2").unwrap();
    let port = gateways[0].as_ref().unwrap().port;
    let answer: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{port}/v1/sessions/{elsewhere}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(answer["status"], "active", "{answer}");
    assert_eq!(answer["session"]["gateway"], format!("{RELEASE}-gateway-2"));
    // Unknown everywhere, the informer included: 404.
    let missing = reqwest::get(format!(
        "http://127.0.0.1:{port}/v1/sessions/no-such-session"
    ))
    .await
    .unwrap();
    assert_eq!(missing.status(), 404);

    // kill -9 shard 1: its sessions are Connected on the others within 30 s.
    let victim = gateways[1].take().unwrap();
    victim.child.signal("KILL").unwrap();
    let killed_at = test_support::receiver::unix_ms();
    let started = std::time::Instant::now();
    let after_kill = wait_connected_on(&api, total, &["0", "2"], 30).await;
    eprintln!(
        "sessions of the killed shard connected elsewhere after {:?}",
        started.elapsed()
    );
    let needless = placed
        .iter()
        .filter(|(n, s)| *s != "1" && after_kill.get(*n) != Some(*s))
        .count();
    // Bounded-load rebalancing may move a handful between the survivors, never a reshuffle.
    assert!(
        needless <= total / 50,
        "{needless} sessions on live shards moved"
    );

    // The moves off the lost shard are recorded as Events on the sessions.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), NS);
    let moved_events = wait_until("move Events", Duration::from_secs(20), || {
        let events = events.clone();
        async move {
            let list = events
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let n = list
                .items
                .iter()
                .filter(|e| e.reason.as_deref() == Some("MovedFromLostShard"))
                .count();
            (n > 0).then_some(list.items).ok_or("none yet".to_owned())
        }
    })
    .await
    .unwrap();
    let sample = moved_events
        .iter()
        .find(|e| e.reason.as_deref() == Some("MovedFromLostShard"))
        .unwrap();
    assert!(
        sample
            .note
            .as_deref()
            .is_some_and(|n| n.starts_with("moved from shard 1 to shard ")),
        "{sample:?}"
    );

    // The StatefulSet brings shard 1 back: bounded loads refill it through the drain handoff.
    gateways[1] = Some(start_gateway(&plane, &redis, 1).await);
    let three = wait_filled(&api, total, "1", 3, 90).await;

    // A 4th shard (ordinal 3): about a quarter moves through the drain handoff.
    // With room to drain on a loaded machine: the assertion below is that it hands every session
    // over before exiting, not how fast.
    let bin = test_support::gateway::gateway_binary().unwrap();
    let shard3_args = [&FAST_LEASE_ARGS[..], &["--drain-timeout-s", "60"]].concat();
    gateways.push(Some(
        start_gateway_with(&plane, &redis, 3, &bin, &shard3_args)
            .await
            .unwrap(),
    ));
    let scaled = wait_filled(&api, total, "3", 4, 90).await;
    let moved = three
        .iter()
        .filter(|(n, s)| scaled.get(*n) != Some(*s))
        .count();
    let fraction = moved as f64 / total as f64;
    eprintln!("moved fraction on 3 -> 4 shards: {fraction}");
    assert!(fraction <= 1.3 / 4.0, "moved fraction {fraction}");
    let l = loads(&scaled);
    let max_over_mean = *l.values().max().unwrap() as f64 / (total as f64 / 4.0);
    assert!(max_over_mean <= 1.25, "max/mean {max_over_mean} ({l:?})");

    // Graceful scale-down of shard 3: its sessions move before the process exits.
    let mut leaving = gateways[3].take().unwrap();
    leaving.child.signal("TERM").unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let status = leaving.child.wait_timeout(Duration::from_secs(90)).unwrap();
        (status, leaving)
    })
    .await
    .unwrap();
    assert!(status.0.is_some(), "drained gateway exited");
    let at_exit = snapshot(&api).await;
    let left_behind = at_exit
        .values()
        .filter(|(s, _)| s.as_deref() == Some("3"))
        .count();
    assert_eq!(
        left_behind,
        0,
        "every session was handed over before the process exited\n{}",
        status.1.log()
    );
    wait_connected_on(&api, total, &["0", "1", "2"], 30).await;

    // Through the kill, the restart, the scale-up and the drain, no session ever had two owners at once.
    let history = gateway::session::ownership::read_history(
        &gateway::redis::connect(&redis.url()).await.unwrap(),
    )
    .await
    .unwrap();
    let dead = HashMap::from([(format!("{RELEASE}-gateway-1"), killed_at)]);
    let dead: HashMap<&str, i64> = dead.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let handovers = test_support::history::assert_no_overlap(&history, &dead);
    assert!(handovers >= total / 4, "handovers checked: {handovers}");

    // Delete a session: its gateway logs out and wipes its Redis keys, the finalizer goes, and so
    // does the resource.
    let client_redis = gateway::redis::connect(&redis.url()).await.unwrap();
    let id = "s-007";
    let _: () = fred::prelude::KeysInterface::set(
        &client_redis,
        format!("wa:{{{id}}}:creds"),
        "paired",
        None,
        None,
        false,
    )
    .await
    .unwrap();
    api.delete(id, &Default::default()).await.unwrap();
    wait_gone(&api, id, "deleted session gone").await;
    let left: Option<String> =
        fred::prelude::KeysInterface::get(&client_redis, format!("wa:{{{id}}}:creds"))
            .await
            .unwrap();
    assert_eq!(left, None, "credentials wiped");

    // Delete a paired session while it is paused: it no longer runs anywhere, yet its gateway
    // connects once more, only to unlink the device, before the keys go.
    let id = "s-011";
    let shard: usize = snapshot(&api).await[id]
        .0
        .as_deref()
        .expect("placed")
        .parse()
        .unwrap();
    let paired: bool = fred::prelude::HashesInterface::hexists(
        &client_redis,
        format!("wa:{{{id}}}:creds"),
        "paired",
    )
    .await
    .unwrap();
    assert!(paired, "a connected sim session is recorded as paired");
    api.patch(
        id,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"spec": {"paused": true}})),
    )
    .await
    .unwrap();
    wait_until(
        "the paused session's lock released",
        Duration::from_secs(30),
        || {
            let redis = client_redis.clone();
            async move {
                let owner: Option<String> =
                    fred::prelude::KeysInterface::get(&redis, format!("wa:{{{id}}}:owner"))
                        .await
                        .map_err(|e| e.to_string())?;
                owner.map_or(Ok(()), |o| Err(format!("held by {o}")))
            }
        },
    )
    .await
    .unwrap();
    api.delete(id, &Default::default()).await.unwrap();
    wait_gone(&api, id, "deleted paused session gone").await;
    let keys: i64 =
        fred::prelude::KeysInterface::exists(&client_redis, format!("wa:{{{id}}}:creds"))
            .await
            .unwrap();
    assert_eq!(keys, 0, "credentials wiped");
    let gateway = gateways[shard].as_ref().expect("shard running");
    gateway
        .assert_metric("whatsapp_gateway_session_logouts_total{result=\"unlinked\"} 1")
        .await;
}

/// Waits until the resource `name` is gone (its finalizer removed).
async fn wait_gone(api: &Api<WhatsappSession>, name: &str, what: &str) {
    wait_until(what, Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            match api.get_opt(name).await {
                Ok(None) => Ok(()),
                Ok(Some(s)) => Err(format!(
                    "still there, finalizers {:?}, annotations {:?}",
                    s.finalizers(),
                    s.annotations()
                )),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap();
}

/// Waits until `shard` holds about its share (9/10 of total/shards) of Connected sessions and
/// every session is Connected; returns name -> shard.
async fn wait_filled(
    api: &Api<WhatsappSession>,
    total: usize,
    shard: &str,
    shards: usize,
    secs: u64,
) -> HashMap<String, String> {
    let filled = wait_until(
        &format!("shard {shard} filled"),
        Duration::from_secs(secs),
        || {
            let api = api.clone();
            async move {
                let snap = snapshot(&api).await;
                let on_shard = snap
                    .values()
                    .filter(|(s, p)| s.as_deref() == Some(shard) && *p == Some(Phase::Connected))
                    .count();
                let all_connected = snap.values().all(|(_, p)| *p == Some(Phase::Connected));
                if on_shard >= total / shards * 9 / 10 && all_connected && snap.len() == total {
                    Ok(snap)
                } else {
                    Err(format!("{on_shard} connected on shard {shard}"))
                }
            }
        },
    )
    .await
    .unwrap();
    // Then settled: the placement does not change for 3 s (no rebalance still under way).
    let mut last = filled;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = snapshot(api).await;
        if now == last {
            break;
        }
        last = now;
    }
    last.into_iter()
        .map(|(n, (s, _))| (n, s.unwrap()))
        .collect()
}

/// Two resources naming one session id (the same name in two namespaces): the older keeps the
/// account, the copy is set aside (not run, status Failed, a Warning Event, the operator's
/// gauge), deleting the copy leaves the account alone, and deleting the older one hands the
/// account to the copy without a logout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_resource_naming_a_session_id_is_set_aside_and_never_logs_the_account_out() {
    const OTHER_NS: &str = "wa-e2e-team-b";
    let plane = ControlPlane::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let client = plane.client().await.unwrap();
    setup(&client).await;
    test_support::cluster::setup_in(&client, OTHER_NS).await;
    let api: Api<WhatsappSession> = Api::namespaced(client.clone(), NS);
    let copies: Api<WhatsappSession> = Api::namespaced(client.clone(), OTHER_NS);
    let operator = start_operator(&plane).await;
    let gateway = start_gateway(&plane, &redis, 0).await;
    wait_operator_sees_shards(&operator, 1).await;
    let redis_client = gateway::redis::connect(&redis.url()).await.unwrap();
    let paired = || {
        let redis = redis_client.clone();
        async move {
            let paired: bool =
                fred::prelude::HashesInterface::hexists(&redis, "wa:{support}:creds", "paired")
                    .await
                    .unwrap();
            paired
        }
    };

    create_sessions(&api, ["support".to_string()]).await;
    test_support::cluster::wait_phase(&api, "support", Phase::Connected, 60).await;
    assert!(paired().await, "the sim session paired");

    create_sessions(&copies, ["support".to_string()]).await;
    test_support::cluster::wait_phase(&copies, "support", Phase::Failed, 30).await;
    let copy = copies.get("support").await.unwrap();
    let condition = copy
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == crds::condition::ASSIGNED)
        .cloned()
        .expect("Assigned condition");
    assert_eq!(condition.status, "False");
    assert_eq!(
        condition.reason.as_deref(),
        Some(crds::condition::REASON_SESSION_ID_CONFLICT)
    );
    assert!(
        condition
            .message
            .as_deref()
            .unwrap()
            .contains(&format!("{NS}/support")),
        "{condition:?}"
    );
    assert_eq!(
        copy.annotations()
            .get(crds::CONFLICT_ANNOTATION)
            .map(String::as_str),
        Some(format!("{NS}/support").as_str())
    );
    // It follows the original's shard, so that gateway sees both.
    assert_eq!(
        copy.labels().get(crds::SHARD_LABEL).map(String::as_str),
        Some("0")
    );
    assert_eq!(
        copy.finalizers(),
        [crds::FINALIZER],
        "deleting it goes through the operator, which keeps the credentials"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), OTHER_NS);
    wait_until("the conflict Event", Duration::from_secs(20), || {
        let events = events.clone();
        async move {
            let list = events
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some(crds::condition::REASON_SESSION_ID_CONFLICT))
                .then_some(())
                .ok_or_else(|| "none yet".to_owned())
        }
    })
    .await
    .unwrap();
    operator
        .assert_metric("whatsapp_operator_session_id_conflicts 1")
        .await;

    // Deleting the copy leaves the account alone.
    copies.delete("support", &Default::default()).await.unwrap();
    wait_gone(&copies, "support", "deleted copy gone").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        api.get("support").await.unwrap().status.unwrap().phase,
        Some(Phase::Connected)
    );
    assert!(paired().await, "credentials kept");
    gateway
        .assert_metric("whatsapp_gateway_session_logouts_total{result=\"was_running\"} 0")
        .await;

    // A copy again; now the original goes: the copy takes the account over, still paired.
    create_sessions(&copies, ["support".to_string()]).await;
    test_support::cluster::wait_phase(&copies, "support", Phase::Failed, 30).await;
    api.delete("support", &Default::default()).await.unwrap();
    wait_gone(&api, "support", "deleted original gone").await;
    test_support::cluster::wait_phase(&copies, "support", Phase::Connected, 60).await;
    let copy = copies.get("support").await.unwrap();
    assert!(
        !copy.annotations().contains_key(crds::CONFLICT_ANNOTATION),
        "{:?}",
        copy.annotations()
    );
    assert!(
        paired().await,
        "the account was handed over, not logged out"
    );
    for result in ["was_running", "unlinked", "failed"] {
        gateway
            .assert_metric(&format!(
                "whatsapp_gateway_session_logouts_total{{result=\"{result}\"}} 0"
            ))
            .await;
    }
    operator
        .assert_metric("whatsapp_operator_session_id_conflicts 0")
        .await;

    // A copy created and the original deleted at once, before the operator could set the copy
    // aside onto the original's shard: the gateway still sees (through its cluster-wide
    // informer) that another resource names the id, and keeps the account.
    const THIRD_NS: &str = "wa-e2e-team-c";
    test_support::cluster::setup_in(&client, THIRD_NS).await;
    let thirds: Api<WhatsappSession> = Api::namespaced(client.clone(), THIRD_NS);
    create_sessions(&thirds, ["support".to_string()]).await;
    copies.delete("support", &Default::default()).await.unwrap();
    wait_gone(&copies, "support", "deleted owner gone").await;
    test_support::cluster::wait_phase(&thirds, "support", Phase::Connected, 60).await;
    assert!(paired().await, "handed over again, not logged out");
    for result in ["was_running", "unlinked", "failed"] {
        gateway
            .assert_metric(&format!(
                "whatsapp_gateway_session_logouts_total{{result=\"{result}\"}} 0"
            ))
            .await;
    }
}

/// A session deleted during its handoff (drain requested and acknowledged, not yet relabelled)
/// is still logged out by its shard. No operator runs here, so nothing relabels or finalizes:
/// the test plays the operator's part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_deleted_during_its_handoff_is_still_logged_out() {
    let plane = ControlPlane::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let client = plane.client().await.unwrap();
    setup(&client).await;
    let api: Api<WhatsappSession> = Api::namespaced(client.clone(), NS);
    let gateway = start_gateway(&plane, &redis, 0).await;
    let mut session = WhatsappSession::new("moving", Default::default());
    session
        .labels_mut()
        .insert(crds::SHARD_LABEL.into(), "0".into());
    session.finalizers_mut().push(crds::FINALIZER.into());
    api.create(&Default::default(), &session).await.unwrap();
    test_support::cluster::wait_phase(&api, "moving", Phase::Connected, 60).await;

    let patch = |annotations: serde_json::Value| {
        kube::api::Patch::Merge(serde_json::json!({"metadata": {"annotations": annotations}}))
    };
    api.patch(
        "moving",
        &Default::default(),
        &patch(serde_json::json!({crds::DRAIN_ANNOTATION: "0"})),
    )
    .await
    .unwrap();
    let annotation = |key: &'static str| {
        let api = api.clone();
        async move {
            api.get("moving")
                .await
                .map_err(|e| e.to_string())?
                .annotations()
                .get(key)
                .cloned()
                .ok_or_else(|| format!("no {key} yet"))
        }
    };
    wait_until("drain acknowledged", Duration::from_secs(30), || {
        annotation(crds::DRAIN_ACK_ANNOTATION)
    })
    .await
    .unwrap();
    api.delete("moving", &Default::default()).await.unwrap();
    wait_until("cleaned by its shard", Duration::from_secs(30), || {
        annotation(crds::CLEANED_ANNOTATION)
    })
    .await
    .unwrap();
    gateway
        .assert_metric("whatsapp_gateway_session_logouts_total{result=\"unlinked\"} 1")
        .await;
}
