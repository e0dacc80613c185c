//! Smoke tests of the test ground against the real pieces: kube-apiserver + etcd, kubectl,
//! redis-server.

use crds::{Login, LoginMethod, WhatsappSession, WhatsappSessionSpec};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{CustomResourceExt, ResourceExt};
use std::time::Duration;
use test_support::{RedisServer, control_plane, tools, wait_until};

async fn install_crd(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = WhatsappSession::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("smoke-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    wait_until("CRD established", Duration::from_secs(30), || {
        let crds = crds.clone();
        async move {
            let crd = crds
                .get("whatsappsessions.whatsapp.gateway.dev")
                .await
                .map_err(|e| e.to_string())?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                Ok(())
            } else {
                Err("not established".into())
            }
        }
    })
    .await
    .expect("CRD established");
}

async fn namespace(client: &kube::Client, name: &str) {
    let ns: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    match ns.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create namespace {name}: {e}"),
    }
}

#[tokio::test]
async fn apiserver_version_is_pinned() {
    let client = control_plane::shared().client().await.unwrap();
    let version = client.apiserver_version().await.unwrap();
    eprintln!(
        "kube-apiserver under test: {} ({})",
        version.git_version, version.platform
    );
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "37"),
        "{version:?}"
    );
}

#[tokio::test]
async fn crd_installs_and_sessions_round_trip_and_invalid_ones_are_rejected() {
    let client = control_plane::shared().client().await.unwrap();
    install_crd(&client).await;
    namespace(&client, "smoke-crd").await;
    let api: Api<WhatsappSession> = Api::namespaced(client.clone(), "smoke-crd");

    let session = WhatsappSession::new(
        "alice",
        WhatsappSessionSpec {
            session_id: Some("alice-1".into()),
            login: Login {
                method: LoginMethod::PairingCode,
                phone_number: Some("+5215512345678".into()),
            },
            ..Default::default()
        },
    );
    api.create(&PostParams::default(), &session)
        .await
        .expect("create valid session");
    let read = api.get("alice").await.unwrap();
    assert_eq!(read.spec, session.spec);
    assert_eq!(read.session_id(), "alice-1");

    // Defaults are applied by the apiserver from the schema.
    let minimal: WhatsappSession = serde_json::from_value(serde_json::json!({
        "apiVersion": "whatsapp.gateway.dev/v1alpha1", "kind": "WhatsappSession",
        "metadata": {"name": "bob"}, "spec": {}
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &minimal).await.unwrap();
    assert!(
        created.spec.logout_on_delete,
        "logoutOnDelete defaults to true"
    );
    assert_eq!(created.spec.login.method, LoginMethod::Qr);

    // pairingCode without a phone number: rejected by the CEL rule, with its message.
    let bad = WhatsappSession::new(
        "carol",
        WhatsappSessionSpec {
            login: Login {
                method: LoginMethod::PairingCode,
                phone_number: None,
            },
            ..Default::default()
        },
    );
    let err = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("pairingCode without phone is invalid");
    assert!(
        err.to_string().contains("login.phoneNumber is required"),
        "{err}"
    );

    // Malformed phone number: rejected by the schema pattern.
    let bad = WhatsappSession::new(
        "dave",
        WhatsappSessionSpec {
            login: Login {
                method: LoginMethod::PairingCode,
                phone_number: Some("12-34".into()),
            },
            ..Default::default()
        },
    );
    let err = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("bad phone is invalid");
    assert!(err.to_string().contains("phoneNumber"), "{err}");

    // sessionId is immutable.
    let patch = serde_json::json!({"spec": {"sessionId": "alice-2"}});
    let err = api
        .patch("alice", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect_err("changing sessionId is refused");
    assert!(
        err.to_string().contains("spec.sessionId is immutable"),
        "{err}"
    );

    api.delete("alice", &DeleteParams::default()).await.unwrap();
    api.delete("bob", &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
async fn kubectl_apply_of_the_examples_works() {
    let plane = control_plane::shared();
    let client = plane.client().await.unwrap();
    install_crd(&client).await;
    namespace(&client, "smoke-kubectl").await;
    for example in [
        "session-qr.yaml",
        "session-pairing-code.yaml",
        "session-webhook.yaml",
    ] {
        let path = tools::workspace_root().join("examples").join(example);
        let path = path.display().to_string();
        // kubectl's discovery can lag the CRD's Established condition by a moment.
        let out = test_support::wait_until("kubectl apply", Duration::from_secs(15), || {
            let result = plane.kubectl(&["apply", "-n", "smoke-kubectl", "-f", &path]);
            async move {
                match result {
                    Ok(out) => Ok(Ok(out)),
                    Err(e) => {
                        let e = e.to_string();
                        if e.contains("no matches for kind")
                            || e.contains("resource mapping not found")
                        {
                            Err(e)
                        } else {
                            Ok(Err(e))
                        }
                    }
                }
            }
        })
        .await
        .unwrap()
        .unwrap();
        assert!(
            out.contains("created") || out.contains("configured"),
            "{out}"
        );
    }
    let out = plane
        .kubectl(&["get", "wasession", "-n", "smoke-kubectl", "-o", "name"])
        .unwrap();
    assert!(
        out.contains("whatsappsession.whatsapp.gateway.dev/shop-support"),
        "{out}"
    );
    assert!(
        out.contains("whatsappsession.whatsapp.gateway.dev/sales-line"),
        "{out}"
    );
    assert!(
        out.contains("whatsappsession.whatsapp.gateway.dev/shop-orders"),
        "{out}"
    );
    // Unknown fields: kubectl's (default) strict server-side field validation rejects them and
    // names the field, instead of silently pruning it.
    let bad = plane.dir().join("unknown-field.yaml");
    std::fs::write(
        &bad,
        "apiVersion: whatsapp.gateway.dev/v1alpha1\nkind: WhatsappSession\nmetadata:\n  name: typo\nspec:\n  logoutOnDelet: false\n",
    )
    .unwrap();
    let err = plane
        .kubectl(&[
            "apply",
            "-n",
            "smoke-kubectl",
            "-f",
            &bad.display().to_string(),
        ])
        .expect_err("unknown field is rejected");
    assert!(
        err.to_string().contains("unknown field") && err.to_string().contains("logoutOnDelet"),
        "{err}"
    );
    // Missing required fields inside an object: a webhook without its url.
    let bad = plane.dir().join("missing-field.yaml");
    std::fs::write(
        &bad,
        "apiVersion: whatsapp.gateway.dev/v1alpha1\nkind: WhatsappSession\nmetadata:\n  name: nourl\nspec:\n  webhook:\n    secretRef: {name: s, key: k}\n",
    )
    .unwrap();
    let err = plane
        .kubectl(&[
            "apply",
            "-n",
            "smoke-kubectl",
            "-f",
            &bad.display().to_string(),
        ])
        .expect_err("webhook without url is rejected");
    assert!(
        err.to_string().contains("spec.webhook.url") && err.to_string().contains("Required"),
        "{err}"
    );
    // A webhook URL without a host (or with a space in it) is refused by the schema too, instead
    // of leaving the session waiting for a webhook that can never be resolved.
    for (name, url) in [
        ("nohost", "https://"),
        ("spaced", "https://shop example.com"),
    ] {
        let bad = plane.dir().join(format!("{name}.yaml"));
        std::fs::write(
            &bad,
            format!("apiVersion: whatsapp.gateway.dev/v1alpha1\nkind: WhatsappSession\nmetadata:\n  name: {name}\nspec:\n  webhook:\n    url: \"{url}\"\n"),
        )
        .unwrap();
        let err = plane
            .kubectl(&[
                "apply",
                "-n",
                "smoke-kubectl",
                "-f",
                &bad.display().to_string(),
            ])
            .expect_err("a webhook URL without a host is rejected");
        assert!(err.to_string().contains("spec.webhook.url"), "{err}");
    }

    let table = plane
        .kubectl(&["get", "wasession", "-n", "smoke-kubectl"])
        .unwrap();
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "PHASE", "SHARD", "CONNECTED", "AGE"] {
        assert!(header.contains(column), "missing column {column}: {table}");
    }
}

#[tokio::test]
async fn fred_round_trips_a_value_through_redis() {
    use fred::prelude::*;
    let redis = RedisServer::start().await.expect("start redis-server");
    let config = Config::from_url(&redis.url()).unwrap();
    let client = Builder::from_config(config).build().unwrap();
    client.init().await.expect("connect");
    let _: () = client
        .set(
            "wa:{smoke}:key",
            "value",
            Some(Expiration::EX(60)),
            None,
            false,
        )
        .await
        .unwrap();
    let value: Option<String> = client.get("wa:{smoke}:key").await.unwrap();
    assert_eq!(value.as_deref(), Some("value"));
    client.quit().await.unwrap();
}
