//! Session management over HTTP (`GET/POST /v1/sessions`, `PATCH/DELETE /v1/sessions/{id}`),
//! with the real binaries:
//!
//! - standalone: two gateways sharing a real Redis and a real HTTP backend; a session created on
//!   one is run (once) by either, survives both restarting, and a delete logs it out;
//! - cluster: the API creates, pauses and deletes `WhatsappSession` resources on a real
//!   kube-apiserver, which the operator and a shard then run as if `kubectl` had applied them.

use std::time::Duration;

use crds::{Phase, WhatsappSession};
use fred::prelude::*;
use kube::ResourceExt;
use kube::api::Api;
use serde_json::{Value, json};
use test_support::cluster::{
    FAST_LEASE_ARGS, NS, setup, start_gateway_with, start_operator, wait_operator_sees_shards,
    wait_phase,
};
use test_support::gateway::GatewayProcess;
use test_support::receiver::Receiver;
use test_support::{ControlPlane, RedisServer, tools, wait_until};

const TOKEN: &str = "test-token-1";

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Sends `method path [body]` with the test token; (status, JSON body or Null).
async fn call(
    gateway: &GatewayProcess,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http().request(method, gateway.url(path)).bearer_auth(TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn listed(list: &Value, id: &str) -> Option<Value> {
    list["sessions"]
        .as_array()?
        .iter()
        .find(|s| s["sessionId"] == id)
        .cloned()
}

/// How many times the backend heard `id` connect.
fn connects(receiver: &Receiver, id: &str) -> usize {
    receiver
        .statuses_of(id)
        .iter()
        .filter(|(s, _)| s == "active")
        .count()
}

async fn wait_active_count(receiver: &Receiver, id: &str, at_least: usize, what: &str) {
    wait_until(what, Duration::from_secs(30), || async {
        let active = connects(receiver, id);
        if active >= at_least {
            Ok(())
        } else {
            Err(format!(
                "{active} `active` for {id}: {:?}",
                receiver.statuses_of(id)
            ))
        }
    })
    .await
    .unwrap();
}

async fn owner(redis: &Client, id: &str) -> Option<String> {
    redis.get(format!("wa:{{{id}}}:owner")).await.unwrap()
}

/// Every Redis key of a session (`wa:{id}:*`).
async fn session_keys(redis: &Client, id: &str) -> Vec<String> {
    use fred::types::scan::Scanner;
    use futures::TryStreamExt;
    let mut keys = Vec::new();
    let mut scan = redis.scan(format!("wa:{{{id}}}:*"), Some(100), None);
    while let Some(mut page) = scan.try_next().await.unwrap() {
        if let Some(found) = page.take_results() {
            keys.extend(found.into_iter().filter_map(|k| k.into_string()));
        }
    }
    keys
}

/// Waits until no gateway holds the session's lock.
async fn wait_unlocked(redis: &Client, id: &str, what: &str) {
    wait_until(what, Duration::from_secs(15), || async {
        match owner(redis, id).await {
            None => Ok(()),
            Some(holder) => Err(format!("held by {holder}")),
        }
    })
    .await
    .unwrap();
}

/// Waits until a deleted session's credentials and cache entries are gone: only the fencing
/// counter and the hold stay.
async fn wait_only_fence_and_hold(redis: &Client, id: &str, what: &str) {
    let expected = [format!("wa:{{{id}}}:fence"), format!("wa:{{{id}}}:hold")];
    wait_until(what, Duration::from_secs(15), || async {
        let mut keys = session_keys(redis, id).await;
        keys.sort();
        if keys == expected {
            Ok(())
        } else {
            Err(format!("{keys:?}"))
        }
    })
    .await
    .unwrap();
}

/// The session's hold (no gateway may take its lock): `paused`, `deleted` or none.
async fn hold(redis: &Client, id: &str) -> Option<String> {
    redis.get(format!("wa:{{{id}}}:hold")).await.unwrap()
}

async fn start_standalone(
    redis: &RedisServer,
    receiver: &Receiver,
    pod: &str,
    extra: &[&str],
) -> GatewayProcess {
    let redis_url = redis.url();
    let backend = receiver.url();
    let mut args = vec![
        "standalone",
        "--redis-url",
        &redis_url,
        "--backend-url",
        &backend,
        "--api-token",
        TOKEN,
        "--sim-unpaired-share",
        "0",
        "--lock-ttl-ms",
        "3000",
        "--identity",
        pod,
    ];
    args.extend_from_slice(extra);
    GatewayProcess::start(&args, &[]).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_sessions_created_over_http_run_once_persist_and_log_out_on_delete() {
    let redis = RedisServer::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    let client = gateway::redis::connect(&redis.url()).await.unwrap();
    let file = tools::workspace_root().join("examples/session-qr.yaml");
    let file = file.display().to_string();
    let mut a = start_standalone(&redis, &receiver, "gw-a", &["--sessions-file", &file]).await;
    let b = start_standalone(&redis, &receiver, "gw-b", &[]).await;
    use reqwest::Method;

    // Without the token: refused.
    let unauthorized = http()
        .post(a.url("/v1/sessions"))
        .json(&json!({"sessionId": "api-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status().as_u16(), 401);

    // Create; a retry is not an error; the same id with another spec is a conflict.
    let created = call(
        &a,
        Method::POST,
        "/v1/sessions",
        Some(json!({"sessionId": "api-1"})),
    )
    .await;
    assert_eq!(
        created,
        (201, json!({"sessionId": "api-1", "created": true}))
    );
    let again = call(
        &a,
        Method::POST,
        "/v1/sessions",
        Some(json!({"sessionId": "api-1"})),
    )
    .await;
    assert_eq!(
        again,
        (200, json!({"sessionId": "api-1", "created": false}))
    );
    let (code, body) = call(
        &b,
        Method::POST,
        "/v1/sessions",
        Some(json!({"sessionId": "api-1", "paused": true})),
    )
    .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("session_exists"))
    );

    // Bad input names the field, and stores nothing.
    let (code, body) = call(
        &a,
        Method::POST,
        "/v1/sessions",
        Some(json!({"sessionId": "p-1", "login": {"method": "pairingCode"}})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["field"], "login.phoneNumber");
    let (code, body) = call(
        &a,
        Method::POST,
        "/v1/sessions",
        Some(json!({"sessionId": "x", "pasued": true})),
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        body["detail"].as_str().unwrap().contains("pasued"),
        "{body}"
    );

    // It runs, on exactly one of the two gateways, and the backend hears it connect.
    wait_active_count(&receiver, "api-1", 1, "api-1 active").await;
    let holder = owner(&client, "api-1").await.expect("someone holds api-1");
    // The lock's value is `<gateway>:<fencing token>`.
    assert!(
        holder.starts_with("gw-a:") || holder.starts_with("gw-b:"),
        "{holder}"
    );

    // Either gateway lists it; the file's session is listed (and fixed) where it was configured.
    let (code, list) = call(&b, Method::GET, "/v1/sessions", None).await;
    assert_eq!(code, 200);
    let item = listed(&list, "api-1").expect("api-1 listed on b");
    assert_eq!(item["source"], "api");
    assert_eq!(item["logoutOnDelete"], true);
    assert!(listed(&list, "shop-support").is_none());
    let (_, list) = call(&a, Method::GET, "/v1/sessions", None).await;
    assert_eq!(listed(&list, "shop-support").unwrap()["source"], "config");
    let (code, body) = call(&a, Method::DELETE, "/v1/sessions/shop-support", None).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("configured_at_startup"))
    );
    wait_active_count(&receiver, "shop-support", 1, "the file's session active").await;

    // Pause (through the other gateway): the session stops and its lock is let go.
    let paused = call(
        &b,
        Method::PATCH,
        "/v1/sessions/api-1",
        Some(json!({"paused": true})),
    )
    .await;
    assert_eq!(paused, (200, json!({"sessionId": "api-1", "paused": true})));
    wait_unlocked(&client, "api-1", "api-1 unlocked").await;
    let (_, list) = call(&a, Method::GET, "/v1/sessions", None).await;
    assert_eq!(listed(&list, "api-1").unwrap()["paused"], true);
    // Held, so neither gateway takes it in the second before both follow the pause.
    assert_eq!(hold(&client, "api-1").await.as_deref(), Some("paused"));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        owner(&client, "api-1").await,
        None,
        "nobody took it while paused"
    );
    let before = connects(&receiver, "api-1");
    let resumed = call(
        &a,
        Method::PATCH,
        "/v1/sessions/api-1",
        Some(json!({"paused": false})),
    )
    .await;
    assert_eq!(resumed.0, 200);
    wait_active_count(
        &receiver,
        "api-1",
        before + 1,
        "api-1 active again after resume",
    )
    .await;

    // Both gateways go; a new one (without the file) runs api-1 again: it was kept in Redis.
    a.child.kill();
    drop(b);
    let before = connects(&receiver, "api-1");
    let c = start_standalone(&redis, &receiver, "gw-c", &[]).await;
    wait_active_count(&receiver, "api-1", before + 1, "api-1 back after a restart").await;
    assert!(owner(&client, "api-1").await.unwrap().starts_with("gw-c:"));
    let (_, list) = call(&c, Method::GET, "/v1/sessions", None).await;
    assert_eq!(listed(&list, "api-1").unwrap()["status"], "active");

    assert!(
        session_keys(&client, "api-1")
            .await
            .contains(&"wa:{api-1}:creds".to_string()),
        "paired sessions have credentials"
    );
    // Delete: the session logs out, the backend hears `logged_out`, and it is gone.
    let deleted = call(&c, Method::DELETE, "/v1/sessions/api-1", None).await;
    assert_eq!(
        deleted,
        (202, json!({"sessionId": "api-1", "deleted": true}))
    );
    wait_until("logged_out delivered", Duration::from_secs(15), || async {
        match receiver.statuses_of("api-1").last() {
            Some((s, reason)) if s == "logged_out" && reason == "logout_requested" => Ok(()),
            other => Err(format!("last status {other:?}")),
        }
    })
    .await
    .unwrap();
    assert_eq!(owner(&client, "api-1").await, None);
    // Its credentials and cache entries go; only the fencing counter and the hold stay.
    wait_only_fence_and_hold(&client, "api-1", "api-1's keys wiped").await;
    let (_, list) = call(&c, Method::GET, "/v1/sessions", None).await;
    assert!(listed(&list, "api-1").is_none(), "{list}");
    let (code, _) = call(&c, Method::DELETE, "/v1/sessions/api-1", None).await;
    assert_eq!(code, 404);
    let (code, _) = call(
        &c,
        Method::PATCH,
        "/v1/sessions/api-1",
        Some(json!({"paused": true})),
    )
    .await;
    assert_eq!(code, 404);

    // Held for a while after the delete: creating the id again waits until every gateway has
    // seen it gone, then starts afresh.
    assert_eq!(hold(&client, "api-1").await.as_deref(), Some("deleted"));
    let hold_ttl: i64 = client.ttl("wa:{api-1}:hold").await.unwrap();
    assert!((1..=15).contains(&hold_ttl), "{hold_ttl}");
    let (code, body) = call(
        &c,
        Method::POST,
        "/v1/sessions",
        Some(json!({"sessionId": "api-1"})),
    )
    .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("session_deleting"))
    );
    let before = connects(&receiver, "api-1");
    wait_until("api-1 created again", Duration::from_secs(25), || async {
        let (code, body) = call(
            &c,
            Method::POST,
            "/v1/sessions",
            Some(json!({"sessionId": "api-1"})),
        )
        .await;
        if code == 201 {
            Ok(())
        } else {
            Err(format!("{code} {body}"))
        }
    })
    .await
    .unwrap();
    assert_eq!(hold(&client, "api-1").await, None);
    wait_active_count(&receiver, "api-1", before + 1, "api-1 running again").await;

    // Paused, then deleted: it runs nowhere, yet the delete still unlinks its device (a
    // connection made for that alone, whose own `active` the backend never hears) and the
    // backend hears `logged_out`.
    let paused = call(
        &c,
        Method::PATCH,
        "/v1/sessions/api-1",
        Some(json!({"paused": true})),
    )
    .await;
    assert_eq!(paused.0, 200);
    wait_unlocked(&client, "api-1", "api-1 unlocked again").await;
    let connects_before = connects(&receiver, "api-1");
    let deleted = call(&c, Method::DELETE, "/v1/sessions/api-1", None).await;
    assert_eq!(deleted.0, 202);
    wait_until(
        "logged_out after the pause",
        Duration::from_secs(15),
        || async {
            let statuses = receiver.statuses_of("api-1");
            match statuses.last() {
                Some((s, reason)) if s == "logged_out" && reason == "logout_requested" => Ok(()),
                _ => Err(format!("statuses {statuses:?}")),
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(connects(&receiver, "api-1"), connects_before);
    wait_only_fence_and_hold(&client, "api-1", "api-1's keys wiped again").await;
    c.assert_metric("whatsapp_gateway_session_logouts_total{result=\"unlinked\"} 1")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_gateways_bridge_the_session_api_to_resources() {
    let plane = ControlPlane::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let client = plane.client().await.unwrap();
    setup(&client).await;
    let api: Api<WhatsappSession> = Api::namespaced(client.clone(), NS);
    let operator = start_operator(&plane).await;
    let bin = test_support::gateway::gateway_binary().unwrap();
    let mut args = FAST_LEASE_ARGS.to_vec();
    args.extend(["--api-token", TOKEN]);
    let with_token = start_gateway_with(&plane, &redis, 0, &bin, &args)
        .await
        .unwrap();
    let without_token = start_gateway_with(&plane, &redis, 1, &bin, &FAST_LEASE_ARGS)
        .await
        .unwrap();
    wait_operator_sees_shards(&operator, 2).await;
    use reqwest::Method;

    // An id that is not a valid resource name gets a derived one; the spec keeps the id.
    let created = call(
        &with_token,
        Method::POST,
        "/v1/sessions",
        Some(json!({"sessionId": "Shop_42", "logoutOnDelete": false})),
    )
    .await;
    assert_eq!(created.0, 201, "{:?}", created.1);
    let name = gateway::manage::kube::resource_name("Shop_42");
    let resource = api.get(&name).await.unwrap();
    assert_eq!(resource.spec.session_id.as_deref(), Some("Shop_42"));
    assert!(!resource.spec.logout_on_delete);
    assert_eq!(
        resource
            .annotations()
            .get(gateway::manage::kube::CREATED_BY_ANNOTATION)
            .map(String::as_str),
        Some("gateway-api")
    );
    let again = call(
        &with_token,
        Method::POST,
        "/v1/sessions",
        Some(json!({"sessionId": "Shop_42", "logoutOnDelete": false})),
    )
    .await;
    assert_eq!(again.0, 200, "a retried create: {:?}", again.1);

    // The operator places it and a shard connects it, as for `kubectl apply`.
    wait_phase(&api, &name, Phase::Connected, 60).await;
    let (_, list) = call(&without_token, Method::GET, "/v1/sessions", None).await;
    let item = listed(&list, "Shop_42").expect("listed by any gateway");
    assert_eq!(
        (item["source"].as_str(), item["status"].as_str()),
        (Some("resource"), Some("active"))
    );

    // The schema still has the last word: `@` is fine for a gateway, not for a resource.
    let (code, body) = call(
        &with_token,
        Method::POST,
        "/v1/sessions",
        Some(json!({"sessionId": "549112233@s.whatsapp.net"})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("sessionId"),
        "{body}"
    );

    // Without a token the gateway refuses to write resources.
    let (code, body) = call(
        &without_token,
        Method::POST,
        "/v1/sessions",
        Some(json!({"sessionId": "nope"})),
    )
    .await;
    assert_eq!((code, body["error"].as_str()), (403, Some("forbidden")));
    assert!(api.get_opt("nope").await.unwrap().is_none());

    // Sessions of other namespaces are readable through /v1/sessions/{id} but not managed.
    test_support::cluster::setup_in(&client, "elsewhere").await;
    let elsewhere: Api<WhatsappSession> = Api::namespaced(client.clone(), "elsewhere");
    test_support::cluster::create_sessions(&elsewhere, ["other-ns".to_string()]).await;
    wait_until("other-ns indexed", Duration::from_secs(20), || async {
        let (code, _) = call(&with_token, Method::GET, "/v1/sessions/other-ns", None).await;
        if code == 200 {
            Ok(())
        } else {
            Err(format!("{code}"))
        }
    })
    .await
    .unwrap();
    let (_, list) = call(&with_token, Method::GET, "/v1/sessions", None).await;
    assert!(listed(&list, "other-ns").is_none(), "{list}");
    let (code, _) = call(
        &with_token,
        Method::PATCH,
        "/v1/sessions/other-ns",
        Some(json!({"paused": true})),
    )
    .await;
    assert_eq!(code, 404);
    let (code, _) = call(&with_token, Method::DELETE, "/v1/sessions/other-ns", None).await;
    assert_eq!(code, 404);
    assert!(!elsewhere.get("other-ns").await.unwrap().spec.paused);
    // Its id is taken all the same: ids key Redis, so they are global.
    let (code, body) = call(
        &with_token,
        Method::POST,
        "/v1/sessions",
        Some(json!({"sessionId": "other-ns"})),
    )
    .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("session_exists"))
    );
    assert!(api.get_opt("other-ns").await.unwrap().is_none());

    // Pause and delete go to the resource.
    let (code, _) = call(
        &with_token,
        Method::PATCH,
        "/v1/sessions/Shop_42",
        Some(json!({"paused": true})),
    )
    .await;
    assert_eq!(code, 200);
    assert!(api.get(&name).await.unwrap().spec.paused);
    // With the operator away the finalizer stays: the session is "being deleted" meanwhile,
    // and creating it again is refused rather than answered with a resource about to vanish.
    drop(operator);
    let (code, _) = call(&with_token, Method::DELETE, "/v1/sessions/Shop_42", None).await;
    assert_eq!(code, 202);
    wait_until(
        "create refused while deleting",
        Duration::from_secs(20),
        || async {
            let (code, body) = call(
                &with_token,
                Method::POST,
                "/v1/sessions",
                Some(json!({"sessionId": "Shop_42", "logoutOnDelete": false})),
            )
            .await;
            if (code, body["error"].as_str()) == (409, Some("session_deleting")) {
                Ok(())
            } else {
                Err(format!("{code} {body}"))
            }
        },
    )
    .await
    .unwrap();
    let (_, list) = call(&with_token, Method::GET, "/v1/sessions", None).await;
    assert!(listed(&list, "Shop_42").is_none(), "{list}");
    let (code, _) = call(&with_token, Method::DELETE, "/v1/sessions/Shop_42", None).await;
    assert_eq!(code, 202, "deleting again is accepted");
    let _operator = start_operator(&plane).await;
    wait_until("resource gone", Duration::from_secs(30), || async {
        match api.get_opt(&name).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(s) => Err(format!("still there, finalizers {:?}", s.finalizers())),
        }
    })
    .await
    .unwrap();
    let (code, _) = call(&with_token, Method::DELETE, "/v1/sessions/Shop_42", None).await;
    assert_eq!(code, 404);
    let created = call(
        &with_token,
        Method::POST,
        "/v1/sessions",
        Some(json!({"sessionId": "Shop_42"})),
    )
    .await;
    assert_eq!(created.0, 201, "created again once gone: {:?}", created.1);
}
