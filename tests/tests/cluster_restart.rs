//! An apiserver restart in the middle of a run: the operator and the gateways lose their watches,
//! get them back, keep placing and running sessions, and no session ever has two owners.

use std::collections::HashMap;
use std::time::Duration;

use crds::WhatsappSession;
use kube::api::Api;
use test_support::cluster::{
    NS, create_sessions, setup, start_gateway_with, start_operator, wait_connected_on,
    wait_operator_sees_shards,
};
use test_support::{ControlPlane, RedisServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_gateways_recover_their_watches_after_an_apiserver_restart() {
    let mut plane = ControlPlane::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let client = plane.client().await.unwrap();
    setup(&client).await;
    let _operator = start_operator(&plane).await;
    // Leases shorter than the outage (5 s down plus the apiserver's boot): every Lease lapses by
    // the clock while nobody can renew or see it, and no shard may be taken for gone once the
    // operator sees again. (With 1 s renewals both shards renew within a second of the
    // apiserver's return, so this run does not hit the window where only one has; the unit test
    // `a_lease_is_not_judged_expired_on_what_the_operator_could_not_see` covers that rule.)
    let bin = test_support::gateway::gateway_binary().unwrap();
    let args = [
        "--lease-duration-s",
        "6",
        "--lease-renew-ms",
        "1000",
        "--lock-ttl-ms",
        "3000",
    ];
    let _gateways = [
        start_gateway_with(&plane, &redis, 0, &bin, &args)
            .await
            .unwrap(),
        start_gateway_with(&plane, &redis, 1, &bin, &args)
            .await
            .unwrap(),
    ];
    wait_operator_sees_shards(&_operator, 2).await;
    let api: Api<WhatsappSession> = Api::namespaced(client.clone(), NS);
    create_sessions(&api, (0..60).map(|i| format!("r-{i:03}"))).await;
    let before = wait_connected_on(&api, 60, &["0", "1"], 90).await;

    // Down for 5 s, longer than the 6 s Leases with the apiserver's boot.
    plane
        .restart_apiserver(Duration::from_secs(5))
        .await
        .unwrap();
    let client = plane.client().await.unwrap();
    let api: Api<WhatsappSession> = Api::namespaced(client.clone(), NS);
    create_sessions(&api, (60..80).map(|i| format!("r-{i:03}"))).await;
    let after = wait_connected_on(&api, 80, &["0", "1"], 120).await;
    let moved = before
        .iter()
        .filter(|(n, s)| after.get(*n) != Some(*s))
        .count();
    assert!(
        moved <= 6,
        "{moved} sessions moved although no shard went away"
    );
    let (_, metrics) = _operator.get("/metrics").await.unwrap();
    let shard_gone = metrics
        .lines()
        .find(|l| l.starts_with("whatsapp_operator_moves_total{reason=\"shard_gone\"}"));
    assert!(
        shard_gone.is_none_or(|l| l.ends_with(" 0")),
        "no shard was taken for gone: {shard_gone:?}"
    );

    let history = gateway::session::ownership::read_history(
        &gateway::redis::connect(&redis.url()).await.unwrap(),
    )
    .await
    .unwrap();
    test_support::history::assert_no_overlap(&history, &HashMap::new());
}
