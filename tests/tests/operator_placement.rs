//! The operator's placement against a real kube-apiserver: gateway membership comes from Leases
//! that this test renews (standing in for gateway pods, which a later step runs as processes).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crds::{
    DRAIN_ACK_ANNOTATION, DRAIN_ANNOTATION, GATEWAY_LEASE_LABEL, SHARD_LABEL, WhatsappSession,
};
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use operator::placement::PlacementSettings;
use test_support::{control_plane, wait_until};

const NS: &str = "placement";
const RELEASE: &str = "wa-place";

/// Renews `<release>-gateway-<k>` every second, as a gateway would. The 10 s lease leaves room
/// for a busy apiserver's watch lag on a 2-core CI machine (a lapsed Lease would move sessions).
fn heartbeat(client: kube::Client, shard: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let leases: Api<Lease> = Api::namespaced(client, NS);
        let name = format!("{RELEASE}-gateway-{shard}");
        loop {
            // MicroTime: RFC 3339 with microseconds.
            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let lease = serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "labels": {GATEWAY_LEASE_LABEL: RELEASE}},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 10, "renewTime": now},
            });
            let _ = leases
                .patch(
                    &name,
                    &PatchParams::apply("fake-gateway").force(),
                    &Patch::Apply(&lease),
                )
                .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// Acknowledges drain requests at once, as a gateway that stopped the session would.
fn drain_acker(client: kube::Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: Api<WhatsappSession> = Api::namespaced(client, NS);
        loop {
            if let Ok(list) = api.list(&ListParams::default()).await {
                for s in list {
                    let ann = s.annotations();
                    if let Some(from) = ann.get(DRAIN_ANNOTATION)
                        && ann.get(DRAIN_ACK_ANNOTATION) != Some(from)
                    {
                        let patch = serde_json::json!({"metadata": {"annotations": {DRAIN_ACK_ANNOTATION: from}}});
                        let _ = api
                            .patch(
                                &s.name_any(),
                                &PatchParams::default(),
                                &Patch::Merge(&patch),
                            )
                            .await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

async fn shards(api: &Api<WhatsappSession>) -> HashMap<String, String> {
    api.list(&ListParams::default())
        .await
        .unwrap()
        .into_iter()
        .filter_map(|s| {
            s.labels()
                .get(SHARD_LABEL)
                .cloned()
                .map(|shard| (s.name_any(), shard))
        })
        .collect()
}

async fn wait_all_on(
    api: &Api<WhatsappSession>,
    count: usize,
    allowed: &[&str],
    secs: u64,
) -> HashMap<String, String> {
    let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
    wait_until("sessions placed", Duration::from_secs(secs), || {
        let api = api.clone();
        let allowed = allowed.clone();
        async move {
            let placed = shards(&api).await;
            let ok = placed.len() == count && placed.values().all(|s| allowed.contains(s));
            if ok {
                Ok(placed)
            } else {
                Err(format!(
                    "{} placed on allowed shards of {count}",
                    placed.values().filter(|s| allowed.contains(s)).count()
                ))
            }
        }
    })
    .await
    .unwrap()
}

fn loads(placed: &HashMap<String, String>) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for shard in placed.values() {
        *out.entry(shard.clone()).or_insert(0) += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_spread_over_shards_within_cap_and_move_only_what_must() {
    let client = control_plane::shared().client().await.unwrap();
    test_support::cluster::setup_in(&client, NS).await;
    let api: Api<WhatsappSession> = Api::namespaced(client.clone(), NS);
    let mut beats: Vec<_> = (0..3).map(|k| heartbeat(client.clone(), k)).collect();
    let acker = drain_acker(client.clone());
    // All three Leases exist before the operator starts: otherwise (on a slow machine) it can
    // place sessions while only some shards are members and then rebalance them, and a move
    // writes status, which the one-write first placement check below would mistake.
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    wait_until("3 gateway Leases", Duration::from_secs(30), || {
        let leases = leases.clone();
        async move {
            let n = leases
                .list(&ListParams::default().labels(&format!("{GATEWAY_LEASE_LABEL}={RELEASE}")))
                .await
                .map(|l| l.items.len())
                .unwrap_or(0);
            if n == 3 {
                Ok(())
            } else {
                Err(format!("{n} Leases"))
            }
        }
    })
    .await
    .unwrap();

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(operator::metrics::OperatorMetrics::register(&mut registry));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let settings = PlacementSettings {
        release: RELEASE.into(),
        lease_namespace: NS.into(),
        epsilon: 0.25,
        resync: Duration::from_millis(500),
        debounce: Duration::from_millis(200),
        cleanup_timeout: Duration::from_secs(30),
        redis: None,
        recorder: None,
        lease_sight: Default::default(),
    };
    let placement = tokio::spawn(operator::placement::run(
        client.clone(),
        settings,
        metrics.clone(),
        stop_rx,
    ));

    let total = 300;
    for i in 0..total {
        let s = WhatsappSession::new(&format!("s-{i:03}"), Default::default());
        api.create(&PostParams::default(), &s).await.unwrap();
    }
    let placed = wait_all_on(&api, total, &["0", "1", "2"], 60).await;
    let cap = (1.25f64 * total as f64 / 3.0).ceil() as usize;
    let l = loads(&placed);
    assert!(
        l.values().all(|&n| n <= cap),
        "loads {l:?} within cap {cap}"
    );
    // A first placement is the label alone (one write); the gateway's first status write
    // records the shard (no gateway runs in this test). Only a move writes status: while the
    // sessions were being created the operator may have rebalanced a few that an early, small
    // cap had kept from their preferred shard, so count moves rather than expect none.
    let with_status = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.status.as_ref().is_some_and(|st| st.shard.is_some()))
        .count();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let moves: f64 = text
        .lines()
        .filter(|l| l.starts_with("whatsapp_operator_moves_total{") && !l.contains("\"new\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        with_status as f64 <= moves,
        "{with_status} sessions have an operator status but only {moves} moves were made"
    );

    // A 4th shard: about a quarter moves (through the drain handoff), no more.
    beats.push(heartbeat(client.clone(), 3));
    let after = wait_until("4th shard filled", Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let p = shards(&api).await;
            let on_new = p.values().filter(|s| *s == "3").count();
            if on_new >= total / 4 * 9 / 10 {
                Ok(p)
            } else {
                Err(format!("{on_new} on shard 3"))
            }
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = {
        let mut a = after;
        a.extend(shards(&api).await);
        a
    };
    let moved = placed
        .iter()
        .filter(|(name, shard)| after.get(*name) != Some(*shard))
        .count();
    let fraction = moved as f64 / total as f64;
    assert!(fraction <= 1.3 / 4.0, "moved fraction {fraction}");
    // A move records the new shard in the status at once.
    let (mover, new_shard) = after
        .iter()
        .find(|(name, shard)| placed.get(*name) != Some(*shard))
        .expect("a moved session");
    // (The label and the status are two writes; the snapshot may fall between them.)
    let status = wait_until("status of a move", Duration::from_secs(10), || {
        let api = api.clone();
        async move {
            let status = api.get(mover).await.map_err(|e| e.to_string())?.status;
            match status {
                Some(s) if s.shard.as_deref() == Some(new_shard.as_str()) => Ok(s),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(status.phase, Some(crds::Phase::Assigned));
    let l = loads(&after);
    let max_over_mean = *l.values().max().unwrap() as f64 / (total as f64 / 4.0);
    assert!(max_over_mean <= 1.25, "max/mean {max_over_mean} ({l:?})");

    // Shard 1 dies (its Lease expires): its sessions go straight to the others, nobody else moves.
    beats[1].abort();
    let before = shards(&api).await;
    let gone = wait_all_on(&api, total, &["0", "2", "3"], 45).await;
    let needless = before
        .iter()
        .filter(|(n, s)| *s != "1" && gone.get(*n) != Some(*s))
        .count();
    assert!(
        needless <= total / 20,
        "{needless} sessions moved off live shards"
    );

    let _ = stop_tx.send(true);
    let _ = placement.await;
    acker.abort();
    for b in beats {
        b.abort();
    }
}

/// Cluster mode's cache fallback: the informer index answers for every session of the namespace
/// by session id, follows status changes and forgets deleted sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_informer_index_answers_by_session_id_and_follows_changes() {
    use gateway::cache::SessionLookup;
    use gateway::events::SessionStatus;
    const NS_INF: &str = "informer";
    let client = control_plane::shared().client().await.unwrap();
    test_support::cluster::setup_in(&client, NS_INF).await;
    let api: Api<WhatsappSession> = Api::namespaced(client.clone(), NS_INF);
    let spec = crds::WhatsappSessionSpec {
        session_id: Some("acct-inf-1".into()),
        ..Default::default()
    };
    api.create(
        &PostParams::default(),
        &WhatsappSession::new("inf-one", spec),
    )
    .await
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let (informer, task) =
        gateway::informer::InformerLookup::spawn(client.clone(), Some(NS_INF), stop.clone());
    tokio::time::timeout(Duration::from_secs(30), informer.ready())
        .await
        .expect("informer listed");
    // Listed before any status: a session that exists but is not connected yet.
    let view = informer.lookup("acct-inf-1").await.unwrap().unwrap();
    assert_eq!(view.status.status, SessionStatus::Connecting);
    assert!(
        informer.lookup("inf-one").await.unwrap().is_none(),
        "keyed by sessionId, not name"
    );

    let status =
        serde_json::json!({"status": {"phase": "Connected", "gatewayPod": "wa-gateway-2"}});
    api.patch_status("inf-one", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    wait_until("informer sees Connected", Duration::from_secs(20), || {
        let informer = informer.clone();
        async move {
            match informer.lookup("acct-inf-1").await.unwrap() {
                Some(v) if v.status.status == SessionStatus::Active => {
                    assert_eq!(v.session.gateway.as_deref(), Some("wa-gateway-2"));
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();

    api.delete("inf-one", &Default::default()).await.unwrap();
    // The placement test beside this one runs an operator over every namespace, which may have
    // placed this session and added its finalizer; no gateway runs here to clean up, so drop it.
    let _ = api
        .patch(
            "inf-one",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await;
    wait_until(
        "informer forgets the deleted session",
        Duration::from_secs(20),
        || {
            let informer = informer.clone();
            async move {
                match informer.lookup("acct-inf-1").await.unwrap() {
                    None => Ok(()),
                    Some(v) => Err(format!("still there: {v:?}")),
                }
            }
        },
    )
    .await
    .unwrap();
    stop.cancel();
    task.await.unwrap();
}

/// A drain acknowledgement left over from a cancelled drain (it landed after the cancel) is not
/// an answer to a later request: the operator asks again and relabels only once the shard
/// answers that request. Before, it relabelled at once while the shard still ran the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_drain_acknowledgement_does_not_move_a_session_without_a_fresh_one() {
    const NS: &str = "stale-ack";
    const RELEASE: &str = "wa-stale";
    // A control plane of its own: an operator places every session of the cluster, so the
    // other tests' operators must not see this one's sessions (nor this one theirs).
    let plane = test_support::ControlPlane::start().await.unwrap();
    let client = plane.client().await.unwrap();
    test_support::cluster::setup_in(&client, NS).await;
    let api: Api<WhatsappSession> = Api::namespaced(client.clone(), NS);
    // Shard 0 is draining (its sessions must go to shard 1), shard 1 is live; no gateway runs.
    let beats = {
        let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
        tokio::spawn(async move {
            loop {
                for (shard, draining) in [(0, "true"), (1, "false")] {
                    let name = format!("{RELEASE}-gateway-{shard}");
                    let now =
                        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                    let lease = serde_json::json!({
                        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": name, "labels": {GATEWAY_LEASE_LABEL: RELEASE},
                                     "annotations": {crds::DRAINING_ANNOTATION: draining}},
                        "spec": {"holderIdentity": name, "leaseDurationSeconds": 10, "renewTime": now},
                    });
                    let _ = leases
                        .patch(
                            &name,
                            &PatchParams::apply("fake-gateway").force(),
                            &Patch::Apply(&lease),
                        )
                        .await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let mut session = WhatsappSession::new("moving", Default::default());
    session.labels_mut().insert(SHARD_LABEL.into(), "0".into());
    session
        .annotations_mut()
        .insert(DRAIN_ACK_ANNOTATION.into(), "0".into());
    api.create(&PostParams::default(), &session).await.unwrap();

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(operator::metrics::OperatorMetrics::register(&mut registry));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let settings = PlacementSettings {
        release: RELEASE.into(),
        lease_namespace: NS.into(),
        epsilon: 0.25,
        resync: Duration::from_millis(500),
        debounce: Duration::from_millis(200),
        cleanup_timeout: Duration::from_secs(30),
        redis: None,
        recorder: None,
        lease_sight: Default::default(),
    };
    let placement = tokio::spawn(operator::placement::run(
        client.clone(),
        settings,
        metrics,
        stop_rx,
    ));
    wait_until("a fresh drain request", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            let s = api.get("moving").await.map_err(|e| e.to_string())?;
            let ann = s.annotations();
            (ann.get(DRAIN_ANNOTATION).map(String::as_str) == Some("0")
                && !ann.contains_key(DRAIN_ACK_ANNOTATION))
            .then_some(())
            .ok_or_else(|| format!("labels {:?}, annotations {ann:?}", s.labels()))
        }
    })
    .await
    .unwrap();
    // Nobody answers it: the session stays on shard 0.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = api.get("moving").await.unwrap();
    assert_eq!(
        s.labels().get(SHARD_LABEL).map(String::as_str),
        Some("0"),
        "{:?}",
        s.annotations()
    );
    // The shard answers: then it moves.
    api.patch(
        "moving",
        &PatchParams::default(),
        &Patch::Merge(
            serde_json::json!({"metadata": {"annotations": {DRAIN_ACK_ANNOTATION: "0"}}}),
        ),
    )
    .await
    .unwrap();
    wait_until("moved to shard 1", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            let s = api.get("moving").await.map_err(|e| e.to_string())?;
            (s.labels().get(SHARD_LABEL).map(String::as_str) == Some("1"))
                .then_some(())
                .ok_or_else(|| format!("labels {:?}", s.labels()))
        }
    })
    .await
    .unwrap();
    stop_tx.send(true).unwrap();
    let _ = placement.await;
    beats.abort();
}
