//! Per-session webhooks (`spec.webhook`) with the real binaries, a real Redis and real HTTP
//! receivers standing for the gateway's backend and two customers' webhooks:
//!
//! - standalone: a session from `--sessions-file` signs with the key from `--secrets-dir`, one
//!   created over the API goes unsigned to its own URL, and nothing of theirs reaches the
//!   backend; a webhook that is down delays only its sessions; what was spilled for a webhook
//!   survives a `kill -9` and is delivered by the restarted gateway although no session names
//!   that webhook any more;
//! - cluster: a `WhatsappSession` naming a Secret in its namespace waits for the Secret, then
//!   delivers to its webhook, signed with the Secret's key.

use std::time::Duration;

use crds::{Phase, WhatsappSession};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use test_support::cluster::{
    FAST_LEASE_ARGS, NS, setup, start_gateway_with, start_operator, wait_operator_sees_shards,
    wait_phase,
};
use test_support::gateway::GatewayProcess;
use test_support::receiver::{Mode, Receiver};
use test_support::{ControlPlane, RedisServer, wait_until};

const TOKEN: &str = "test-token-1";

async fn call(
    gateway: &GatewayProcess,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let response = reqwest::Client::new()
        .request(method, gateway.url(path))
        .bearer_auth(TOKEN)
        .json(&body)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn wait_status(receiver: &Receiver, id: &str, status: &str, within: Duration, what: &str) {
    wait_until(what, within, || async {
        let seen = receiver.statuses_of(id);
        if seen.iter().any(|(s, _)| s == status) {
            Ok(())
        } else {
            Err(format!("{id}: {seen:?}"))
        }
    })
    .await
    .unwrap();
}

/// Every request `receiver` got carries a valid signature made with `secret`.
fn assert_signed_with(receiver: &Receiver, secret: &str) {
    let received = receiver.received();
    assert!(!received.is_empty());
    for request in received {
        let timestamp: u64 = request.headers["x-signature-timestamp"].parse().unwrap();
        assert_eq!(
            request.headers["x-signature-256"],
            gateway::delivery::client::sign(secret, timestamp, &request.body),
            "signed with the webhook's own key"
        );
    }
}

fn sessions_of(receiver: &Receiver) -> std::collections::HashSet<String> {
    receiver
        .items("/status/batch")
        .into_iter()
        .chain(receiver.items("/qr/batch"))
        .filter_map(|item| item["sessionId"].as_str().map(str::to_owned))
        .collect()
}

async fn standalone(
    redis: &RedisServer,
    backend: &Receiver,
    file: &str,
    secrets: &str,
) -> GatewayProcess {
    let redis_url = redis.url();
    let backend_url = backend.url();
    GatewayProcess::start(
        &[
            "standalone",
            "--simulate",
            "20",
            "--sim-unpaired-share",
            "0",
            "--redis-url",
            &redis_url,
            "--backend-url",
            &backend_url,
            "--backend-secret",
            "backend-key",
            "--api-token",
            TOKEN,
            "--sessions-file",
            file,
            "--secrets-dir",
            secrets,
            "--identity",
            "gw-webhooks",
            "--lock-ttl-ms",
            "3000",
            "--retry-attempts",
            "1",
        ],
        &[],
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_sessions_deliver_to_their_own_webhooks_isolated_and_across_a_crash() {
    let redis = RedisServer::start().await.unwrap();
    let backend = Receiver::start().await.unwrap();
    let signed = Receiver::start().await.unwrap();
    let unsigned = Receiver::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("shop-hmac")).unwrap();
    std::fs::write(dir.path().join("shop-hmac/key"), "shop-key\n").unwrap();
    let file = dir.path().join("sessions.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: whatsapp.gateway.dev/v1alpha1\nkind: WhatsappSession\nmetadata:\n  name: shop-1\nspec:\n  webhook:\n    url: {}\n    secretRef: {{name: shop-hmac, key: key}}\n",
            signed.url()
        ),
    )
    .unwrap();
    let (file, secrets) = (file.display().to_string(), dir.path().display().to_string());

    // A configured session whose Secret is missing stops start-up, naming the file.
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: whatsapp.gateway.dev/v1alpha1\nkind: WhatsappSession\nmetadata:\n  name: lost\nspec:\n  webhook:\n    url: http://127.0.0.1:9/\n    secretRef: {name: nope, key: key}\n",
    )
    .unwrap();
    match GatewayProcess::start(
        &[
            "standalone",
            "--sessions-file",
            &broken.display().to_string(),
            "--secrets-dir",
            &secrets,
        ],
        &[],
    )
    .await
    {
        Err(test_support::Error::Exited(_, log)) => assert!(
            log.contains("--sessions-file") && log.contains("webhook.secretRef"),
            "{log}"
        ),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a session whose webhook secret is missing must stop start-up"),
    }
    let mut gateway = standalone(&redis, &backend, &file, &secrets).await;
    use reqwest::Method;

    // Over the API: an unsigned webhook; a Secret that cannot be read and a bad URL are 400.
    let (code, body) = call(
        &gateway,
        Method::POST,
        "/v1/sessions",
        json!({"sessionId": "shop-2", "webhook": {"url": unsigned.url()}}),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = call(&gateway, Method::POST, "/v1/sessions", json!({"sessionId": "shop-3", "webhook": {"url": signed.url(), "secretRef": {"name": "shop-hmac", "key": "other"}}})).await;
    assert_eq!(
        (code, body["field"].as_str()),
        (400, Some("webhook.secretRef")),
        "{body}"
    );
    let (code, body) = call(
        &gateway,
        Method::POST,
        "/v1/sessions",
        json!({"sessionId": "shop-4", "webhook": {"url": "ftp://example.com"}}),
    )
    .await;
    assert_eq!(
        (code, body["field"].as_str()),
        (400, Some("webhook.url")),
        "{body}"
    );

    let within = Duration::from_secs(30);
    wait_status(
        &signed,
        "shop-1",
        "active",
        within,
        "shop-1 active at its webhook",
    )
    .await;
    wait_status(
        &unsigned,
        "shop-2",
        "active",
        within,
        "shop-2 active at its webhook",
    )
    .await;
    wait_status(
        &backend,
        "sim-00019",
        "active",
        within,
        "simulated sessions at the backend",
    )
    .await;
    assert_signed_with(&signed, "shop-key");
    assert_signed_with(&backend, "backend-key");
    assert!(
        unsigned
            .received()
            .iter()
            .all(|r| !r.headers.contains_key("x-signature-256"))
    );
    assert_eq!(sessions_of(&signed), ["shop-1".to_owned()].into());
    assert_eq!(sessions_of(&unsigned), ["shop-2".to_owned()].into());
    let at_backend = sessions_of(&backend);
    assert!(
        !at_backend.contains("shop-1") && !at_backend.contains("shop-2"),
        "{at_backend:?}"
    );

    // A webhook that is down delays only its sessions: a session created meanwhile reaches the
    // backend at once, and shop-2's logout waits for its webhook.
    unsigned.set_mode(Mode::Down);
    let (code, _) = call(&gateway, Method::DELETE, "/v1/sessions/shop-2", Value::Null).await;
    assert_eq!(code, 202);
    let (code, _) = call(
        &gateway,
        Method::POST,
        "/v1/sessions",
        json!({"sessionId": "plain-1"}),
    )
    .await;
    assert_eq!(code, 201);
    wait_status(
        &backend,
        "plain-1",
        "active",
        Duration::from_secs(10),
        "plain-1 at the backend while a webhook is down",
    )
    .await;
    wait_until(
        "shop-2's logout spilled for its webhook",
        within,
        || async {
            let (_, metrics) = gateway.get("/metrics").await?;
            let spilled = metrics
                .lines()
                .filter(|l| l.starts_with("whatsapp_gateway_webhook_spill_backlog{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
            if spilled >= 1.0 {
                Ok(())
            } else {
                Err(format!("webhook spill backlog {spilled}"))
            }
        },
    )
    .await
    .unwrap();

    // kill -9 while it waits: the restarted gateway reopens the destination from Redis (no
    // session names it any more) and delivers the logout once the webhook is back.
    gateway.child.kill();
    drop(gateway);
    gateway = standalone(&redis, &backend, &file, &secrets).await;
    unsigned.set_mode(Mode::Ok);
    wait_until("shop-2's logout at its webhook", within, || async {
        let seen = unsigned.statuses_of("shop-2");
        if seen.contains(&("logged_out".to_owned(), "logout_requested".to_owned())) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await
    .unwrap();
    assert!(
        !sessions_of(&backend).contains("shop-2"),
        "never at the backend"
    );
    assert!(!sessions_of(&signed).contains("shop-2"));

    let (_, metrics) = gateway.get("/metrics").await.unwrap();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("whatsapp_gateway_webhook_requests_total{")
                && l.contains("code=\"200\"")
        ),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("whatsapp_gateway_webhook_destinations ")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sessions_wait_for_their_secret_then_sign_with_it() {
    let plane = ControlPlane::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let client = plane.client().await.unwrap();
    setup(&client).await;
    let backend = Receiver::start().await.unwrap();
    let webhook = Receiver::start().await.unwrap();
    let operator = start_operator(&plane).await;
    let bin = test_support::gateway::gateway_binary().unwrap();
    let backend_url = backend.url();
    let mut args = FAST_LEASE_ARGS.to_vec();
    args.extend(["--backend-url", &backend_url]);
    let gateway = start_gateway_with(&plane, &redis, 0, &bin, &args)
        .await
        .unwrap();
    wait_operator_sees_shards(&operator, 1).await;

    let sessions: Api<WhatsappSession> = Api::namespaced(client.clone(), NS);
    let session: WhatsappSession = serde_json::from_value(json!({
        "apiVersion": "whatsapp.gateway.dev/v1alpha1", "kind": "WhatsappSession",
        "metadata": {"name": "hooked"},
        "spec": {"webhook": {"url": webhook.url(), "secretRef": {"name": "hooked-hmac", "key": "hmac"}}},
    }))
    .unwrap();
    sessions
        .create(&PostParams::default(), &session)
        .await
        .unwrap();
    let plain: WhatsappSession = serde_json::from_value(json!({
        "apiVersion": "whatsapp.gateway.dev/v1alpha1", "kind": "WhatsappSession",
        "metadata": {"name": "plain"}, "spec": {},
    }))
    .unwrap();
    sessions
        .create(&PostParams::default(), &plain)
        .await
        .unwrap();

    // Without its Secret the session does not start (its events have nowhere to go); the
    // other one runs.
    wait_status(
        &backend,
        "plain",
        "active",
        Duration::from_secs(60),
        "plain active at the backend",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(webhook.received().is_empty());
    assert!(!sessions_of(&backend).contains("hooked"));

    let waiting = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("whatsapp_gateway_webhook_sessions_waiting "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    let (_, metrics) = gateway.get("/metrics").await.unwrap();
    assert_eq!(waiting(&metrics), Some(1.0), "the alert's gauge");

    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hooked-hmac"},
        "stringData": {"hmac": "hooked-key\n"},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    // Failed reads are retried every 10 s.
    wait_status(
        &webhook,
        "hooked",
        "active",
        Duration::from_secs(40),
        "hooked active at its webhook",
    )
    .await;
    assert_signed_with(&webhook, "hooked-key");
    let (_, metrics) = gateway.get("/metrics").await.unwrap();
    assert_eq!(waiting(&metrics), Some(0.0));
    assert_eq!(sessions_of(&webhook), ["hooked".to_owned()].into());
    assert!(!sessions_of(&backend).contains("hooked"));
    wait_phase(&sessions, "hooked", Phase::Connected, 30).await;
}
