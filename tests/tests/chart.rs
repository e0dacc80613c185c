//! The Helm chart and what ships in it: rendered manifests against checked-in snapshots, bad
//! values rejected with the field named, the alert rules under promtool's unit tests, the Grafana
//! dashboard's queries parsed by promtool, every metric those name exported by the real binaries,
//! and `helm install` / `helm upgrade` into a real kube-apiserver.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crds::WhatsappSession;
use gateway::session::ownership::owner_key;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::ApiResource;
use test_support::cluster::{
    FAST_LEASE_ARGS, NS, create_sessions, setup, start_gateway_with, start_operator,
    wait_connected_on,
};
use test_support::gateway::gateway_binary;
use test_support::receiver::{Mode, Receiver};
use test_support::{ControlPlane, RedisServer, tools, wait_until};

fn chart_dir() -> PathBuf {
    tools::workspace_root().join("charts/whatsapp-gateway")
}

fn alerts_path() -> PathBuf {
    chart_dir().join("files/alerts.yaml")
}

fn dashboard_path() -> PathBuf {
    chart_dir().join("files/dashboards/whatsapp-gateway.json")
}

/// The value sets whose rendering is checked in under `tests/snapshots/`: the defaults, and each
/// optional part switched on at least once.
const SNAPSHOTS: &[(&str, &[&str])] = &[
    ("default", &[]),
    (
        "monitoring",
        &[
            "--api-versions",
            "monitoring.coreos.com/v1/ServiceMonitor",
            "--api-versions",
            "monitoring.coreos.com/v1/PrometheusRule",
            "--set",
            "operator.replicas=2",
            "--set",
            "gateway.autoscaling.sessionsMetric=true",
            "--set",
            "monitoring.labels.release=kube-prometheus-stack",
            // A private CA for rediss://, mounted from a Secret.
            "--set",
            "gateway.extraEnv[0].name=SSL_CERT_FILE",
            "--set",
            "gateway.extraEnv[0].value=/etc/wa-ca/ca.pem",
            "--set",
            "gateway.extraEnv[1].name=SSL_CERT_DIR",
            "--set",
            "gateway.extraEnv[1].value=/etc/ssl/certs",
            "--set",
            "gateway.extraVolumes[0].name=wa-ca",
            "--set",
            "gateway.extraVolumes[0].secret.secretName=redis-ca",
            "--set",
            "gateway.extraVolumeMounts[0].name=wa-ca",
            "--set",
            "gateway.extraVolumeMounts[0].mountPath=/etc/wa-ca",
            "--set",
            "gateway.extraVolumeMounts[0].readOnly=true",
        ],
    ),
    (
        "keda",
        &[
            "--set",
            "gateway.autoscaling.keda.enabled=true",
            "--set",
            "gateway.autoscaling.keda.prometheusServerAddress=http://prometheus-operated.monitoring:9090",
            // The API token, and with it the Role that lets gateways create and delete sessions.
            "--set",
            "api.tokenSecretName=wa-api",
        ],
    ),
    (
        "fixed-replicas",
        &[
            "--set",
            "gateway.autoscaling.enabled=false",
            "--set",
            "gateway.replicas=4",
            "--set",
            "gateway.podDisruptionBudget.enabled=false",
            "--set",
            "grafana.dashboard=false",
            "--set",
            "redis.url=rediss://redis.shared.svc:6380",
            "--set",
            "redis.embedded.persistence.enabled=false",
        ],
    ),
];

/// `helm template wa <chart> --namespace wa-system <args>`: stdout, or the error output.
fn helm_template(args: &[&str]) -> Result<String, String> {
    let home = tempfile::tempdir().unwrap();
    let chart = chart_dir();
    let out = std::process::Command::new(tools::helm().unwrap())
        .args(["template", "wa", &chart.display().to_string()])
        .args(["--namespace", "wa-system"])
        // Every rendering has a backend (required with the real driver); later --set win.
        .args(["--set", "backend.baseUrl=https://app.example.com/api"])
        .args(args)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn run_promtool(args: &[&str], cwd: &Path) -> Result<String, String> {
    let out = std::process::Command::new(tools::promtool().unwrap())
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// `WA_UPDATE_SNAPSHOTS=1` (what `scripts/gen.sh` sets) rewrites them instead of comparing.
#[test]
fn chart_renderings_match_the_checked_in_snapshots() {
    let update = std::env::var_os("WA_UPDATE_SNAPSHOTS").is_some();
    let dir = tools::workspace_root().join("tests/snapshots");
    let mut stale = Vec::new();
    for (name, args) in SNAPSHOTS {
        let rendered = helm_template(args).unwrap_or_else(|e| panic!("render {name}: {e}"));
        let path = dir.join(format!("chart-{name}.yaml"));
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &rendered).unwrap();
        } else if std::fs::read_to_string(&path).unwrap_or_default() != rendered {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale chart snapshots {stale:?}: run `scripts/gen.sh` and review the diff"
    );
}

#[test]
fn bad_values_are_rejected_naming_the_field() {
    let cases: &[(&[&str], &str)] = &[
        (&["--set", "gateway.driver=baileys"], "/gateway/driver"),
        (
            &["--set", "api.manageSessions=maybe"],
            "/api/manageSessions",
        ),
        (&["--set", "redis.url=localhost:6379"], "/redis/url"),
        (
            &["--set", "gateway.podDisruptionBudget.maxUnavailable=0"],
            "/gateway/podDisruptionBudget/maxUnavailable",
        ),
        (&["--set", "gateway.replicass=3"], "replicass"),
        (
            &["--set", "backend.baseUrl=app.example.com"],
            "/backend/baseUrl",
        ),
        (
            &["--set", "gateway.autoscaling.minReplicas=0"],
            "/gateway/autoscaling/minReplicas",
        ),
        (
            &["--set", "monitoring.serviceMonitor=yes"],
            "/monitoring/serviceMonitor",
        ),
        (
            &[
                "--set",
                "gateway.autoscaling.minReplicas=5",
                "--set",
                "gateway.autoscaling.maxReplicas=3",
            ],
            "gateway.autoscaling.minReplicas (5) must not exceed gateway.autoscaling.maxReplicas (3)",
        ),
        (
            &["--set", "gateway.autoscaling.keda.enabled=true"],
            "gateway.autoscaling.keda.prometheusServerAddress is required",
        ),
        (
            &[
                "--set",
                "gateway.autoscaling.targetCPUUtilizationPercentage=0",
                "--set",
                "gateway.autoscaling.targetMemoryUtilizationPercentage=0",
            ],
            "gateway.autoscaling is enabled but has no metric",
        ),
        (
            &["--set", "backend.baseUrl="],
            "backend.baseUrl is required with gateway.driver=whatsapp",
        ),
        (
            &["--set", "monitoring.prometheusRule=true"],
            // Not an error: rendered regardless of the cluster's APIs.
            "",
        ),
    ];
    for (args, expected) in cases {
        match helm_template(args) {
            Err(e) => assert!(
                !expected.is_empty() && e.contains(expected),
                "{args:?}: expected an error naming {expected:?}, got: {e}"
            ),
            Ok(out) => assert!(
                expected.is_empty() && out.contains("kind: PrometheusRule"),
                "{args:?} rendered but should fail naming {expected:?}"
            ),
        }
    }
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let root = tools::workspace_root();
    let rules = alerts_path().display().to_string();
    run_promtool(&["check", "rules", &rules], &root)
        .unwrap_or_else(|e| panic!("promtool check rules: {e}"));
    run_promtool(
        &["test", "rules", "alerts_test.yaml"],
        &root.join("tests/prometheus"),
    )
    .unwrap_or_else(|e| panic!("promtool test rules: {e}"));
}

/// Every panel query of the dashboard, in order.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        // Template variables' queries are label_values(...), not PromQL.
                        ("templating", _) => {}
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, &mut out);
    out
}

fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        // Collapsed rows keep their panels inside.
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Grafana's variables replaced by what Prometheus would see.
fn substitute_variables(expr: &str) -> String {
    let mut s = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    for var in ["namespace", "pod"] {
        s = s
            .replace(&format!("${{{var}}}"), "x")
            .replace(&format!("${var}"), "x");
    }
    s
}

#[test]
fn dashboard_is_well_formed_and_every_query_parses() {
    let text = std::fs::read_to_string(dashboard_path()).expect("dashboard JSON");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert_eq!(dashboard["uid"], "whatsapp-gateway");
    let panels = panels(&dashboard);
    assert!(panels.len() >= 10, "only {} panels", panels.len());
    let mut ids = BTreeSet::new();
    for panel in &panels {
        let id = panel["id"].as_u64().expect("every panel has a numeric id");
        assert!(ids.insert(id), "panel id {id} used twice");
        assert!(panel["gridPos"].is_object(), "panel {id} has no gridPos");
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "panel {id} must use the datasource variable"
            );
        }
    }
    let exprs = dashboard_exprs(&dashboard);
    assert!(!exprs.is_empty());
    for expr in &exprs {
        assert!(
            !substitute_variables(expr).contains('$'),
            "unknown variable in {expr}"
        );
    }
    // promtool parses PromQL as part of checking rules: one recording rule per query.
    let rules = serde_json::json!({"groups": [{
        "name": "dashboard",
        "rules": exprs.iter().enumerate().map(|(i, e)| serde_json::json!({
            "record": format!("dashboard:query_{i}"),
            "expr": substitute_variables(e),
        })).collect::<Vec<_>>(),
    }]});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard_rules.yaml");
    std::fs::write(&file, serde_yaml::to_string(&rules).unwrap()).unwrap();
    run_promtool(&["check", "rules", &file.display().to_string()], dir.path())
        .unwrap_or_else(|e| panic!("a dashboard query does not parse: {e}"));
}

/// A metric named in a query, with the label names its selector uses (`{a="…", b=~"…"}`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct MetricRef {
    name: String,
    labels: BTreeSet<String>,
    from: String,
}

fn metric_refs(text: &str, from: &str) -> Vec<MetricRef> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("whatsapp_") {
        let preceded_by_ident = rest[..at].chars().last().is_some_and(is_ident);
        let tail = &rest[at..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        let name = &tail[..end];
        let mut labels = BTreeSet::new();
        if let Some(selector) = tail[end..].strip_prefix('{') {
            let close = selector.find('}').unwrap_or(selector.len());
            for matcher in selector[..close].split(',') {
                let label = matcher.split(['=', '!']).next().unwrap_or_default().trim();
                if !label.is_empty() {
                    labels.insert(label.to_string());
                }
            }
        }
        if !preceded_by_ident {
            out.push(MetricRef {
                name: name.to_string(),
                labels,
                from: from.to_string(),
            });
        }
        rest = &tail[end..];
    }
    out
}

/// Family name -> (type, label names seen on its samples), from Prometheus text format.
fn families(exposition: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                out.entry(name.to_string()).or_default().0 = kind.to_string();
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let sample = &line[..name_end];
            let family = out
                .keys()
                .filter(|f| sample.starts_with(f.as_str()))
                .max_by_key(|f| f.len())
                .cloned();
            if let (Some(family), Some(selector)) = (family, line[name_end..].strip_prefix('{')) {
                let close = selector.find('}').unwrap_or(selector.len());
                for pair in selector[..close].split(',') {
                    if let Some((label, _)) = pair.split_once('=') {
                        out.get_mut(&family)
                            .unwrap()
                            .1
                            .insert(label.trim().to_string());
                    }
                }
            }
        }
    }
    out
}

/// The family a sample name belongs to: counters are scraped with `_total`, histograms with
/// `_bucket` / `_sum` / `_count`.
fn family_of<'a>(
    name: &str,
    families: &'a BTreeMap<String, (String, BTreeSet<String>)>,
) -> Option<(&'a String, &'a (String, BTreeSet<String>))> {
    if let Some(found) = families.get_key_value(name) {
        // A gauge or an unsuffixed name; counters are never queried without `_total`.
        return (found.1.0 != "counter").then_some(found);
    }
    for (suffix, kinds) in [
        ("_total", &["counter"][..]),
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ] {
        if let Some(base) = name.strip_suffix(suffix)
            && let Some(found) = families.get_key_value(base)
            && kinds.contains(&found.1.0.as_str())
        {
            return Some(found);
        }
    }
    None
}

/// Labels Prometheus adds at scrape time, and the histogram bucket bound.
const TARGET_LABELS: &[&str] = &["namespace", "pod", "job", "instance", "service", "le"];

#[tokio::test]
async fn dashboard_alerts_and_autoscaling_name_only_metrics_the_binaries_export() {
    // What the chart's observability names.
    let mut refs = Vec::new();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard_path()).unwrap()).unwrap();
    for expr in dashboard_exprs(&dashboard) {
        refs.extend(metric_refs(&expr, "dashboard"));
    }
    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(alerts_path()).unwrap()).unwrap();
    for group in alerts["groups"].as_sequence().expect("alert groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().or(rule["record"].as_str());
            let expr = rule["expr"].as_str().expect("rule expr");
            refs.extend(metric_refs(expr, &format!("alert {}", name.unwrap())));
        }
    }
    for (name, args) in SNAPSHOTS {
        let rendered = helm_template(args).unwrap();
        for doc in rendered.split("\n---\n") {
            if doc.contains("kind: HorizontalPodAutoscaler") || doc.contains("kind: ScaledObject") {
                refs.extend(metric_refs(doc, &format!("autoscaling ({name})")));
            }
        }
    }
    assert!(refs.iter().any(|r| r.from == "dashboard"));
    assert!(refs.iter().any(|r| r.from.starts_with("alert")));
    assert!(refs.iter().any(|r| r.from.starts_with("autoscaling")));

    // The binaries, driven so that the families that appear only after their first event have
    // samples: sessions running, a backend that first refuses batches for good (dead letters)
    // and then accepts them, a read through the cache, and a session whose ownership lock
    // vanishes (a loss, a restart, new events to deliver).
    let plane = ControlPlane::start().await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let receiver = Receiver::start().await.unwrap();
    receiver.set_mode(Mode::Status(422));
    let client = plane.client().await.unwrap();
    setup(&client).await;
    let operator = start_operator(&plane).await;
    let backend = receiver.url();
    let mut args = FAST_LEASE_ARGS.to_vec();
    args.extend(["--backend-url", &backend]);
    let gateway = start_gateway_with(&plane, &redis, 0, &gateway_binary().unwrap(), &args)
        .await
        .unwrap();
    let api: Api<WhatsappSession> = Api::namespaced(client.clone(), NS);
    create_sessions(&api, (0..3).map(|i| format!("m-{i}"))).await;
    wait_connected_on(&api, 3, &["0"], 60).await;
    // The sessions' first events were refused; from now on batches are accepted.
    wait_until("a refused batch", Duration::from_secs(30), || {
        let attempts = receiver.attempts();
        async move {
            if attempts > 0 {
                Ok(())
            } else {
                Err("no request yet".to_string())
            }
        }
    })
    .await
    .unwrap();
    receiver.set_mode(Mode::Ok);
    // A session with its own webhook (the same receiver), for the webhook families.
    let hooked: WhatsappSession = serde_json::from_value(serde_json::json!({
        "apiVersion": "whatsapp.gateway.dev/v1alpha1", "kind": "WhatsappSession",
        "metadata": {"name": "m-hook"},
        "spec": {"webhook": {"url": receiver.url()}},
    }))
    .unwrap();
    api.create(&kube::api::PostParams::default(), &hooked)
        .await
        .unwrap();
    let (code, _) = gateway.get("/v1/sessions/m-0").await.unwrap();
    assert_eq!(code, 200);
    let redis_client =
        fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&redis.url()).unwrap())
            .build()
            .unwrap();
    fred::prelude::ClientLike::init(&redis_client)
        .await
        .unwrap();
    let _: i64 = fred::prelude::KeysInterface::del(&redis_client, owner_key("m-1"))
        .await
        .unwrap();

    let problems = |exported: &BTreeMap<String, (String, BTreeSet<String>)>| {
        let mut problems = Vec::new();
        for r in &refs {
            match family_of(&r.name, exported) {
                None => problems.push(format!("{}: {} is not exported", r.from, r.name)),
                Some((family, (_, labels))) => {
                    // A family whose samples have no labels at all (a plain gauge) can only be
                    // filtered by the labels Prometheus adds.
                    for label in &r.labels {
                        if !labels.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                            problems.push(format!(
                                "{}: {family} has no label {label} (it has {labels:?})",
                                r.from
                            ));
                        }
                    }
                }
            }
        }
        problems.sort();
        problems.dedup();
        problems
    };
    wait_until(
        "every metric the chart names is exported",
        Duration::from_secs(30),
        || {
            let gateway = &gateway;
            let operator = &operator;
            let problems = &problems;
            async move {
                let mut exported = BTreeMap::new();
                for process in [gateway, operator] {
                    let (code, body) = process.get("/metrics").await?;
                    if code != 200 {
                        return Err(format!("/metrics answered {code}"));
                    }
                    exported.extend(families(&body));
                }
                let found = problems(&exported);
                if found.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{found:#?}"))
                }
            }
        },
    )
    .await
    .unwrap();
}

#[test]
fn metric_refs_and_families_parse_what_they_should() {
    let refs = metric_refs(
        r#"sum by (lane) (rate(whatsapp_gateway_batch_flushes_total{namespace=~"x", lane!="qr"}[5m])) / my_whatsapp_other"#,
        "t",
    );
    assert_eq!(refs.len(), 1, "{refs:?}");
    assert_eq!(refs[0].name, "whatsapp_gateway_batch_flushes_total");
    assert_eq!(
        refs[0].labels,
        BTreeSet::from(["namespace".to_string(), "lane".to_string()])
    );
    let exported = families(
        "# HELP whatsapp_x_requests A.\n# TYPE whatsapp_x_requests counter\nwhatsapp_x_requests_total{code=\"200\"} 1\n# TYPE whatsapp_x_seconds histogram\nwhatsapp_x_seconds_bucket{le=\"0.1\"} 1\n# TYPE whatsapp_x_up gauge\nwhatsapp_x_up 1\n",
    );
    assert!(family_of("whatsapp_x_requests_total", &exported).is_some());
    assert!(family_of("whatsapp_x_requests", &exported).is_none());
    assert!(family_of("whatsapp_x_seconds_bucket", &exported).is_some());
    assert!(family_of("whatsapp_x_seconds_total", &exported).is_none());
    assert!(family_of("whatsapp_x_up", &exported).is_some());
    assert!(family_of("whatsapp_x_down", &exported).is_none());
    assert_eq!(
        exported["whatsapp_x_requests"].1,
        BTreeSet::from(["code".to_string()])
    );
}

fn monitoring_api(client: &kube::Client, kind: &str) -> Api<DynamicObject> {
    let resource =
        ApiResource::from_gvk(&GroupVersionKind::gvk("monitoring.coreos.com", "v1", kind));
    Api::namespaced_with(client.clone(), "wa-system", &resource)
}

#[tokio::test]
async fn helm_install_and_upgrade_on_a_real_apiserver() {
    // A control plane of its own: the CRD must come from the chart, not from another test.
    let plane = ControlPlane::start().await.expect("start control plane");
    let chart = chart_dir().display().to_string();
    // gateway.replicas differs from minReplicas: with autoscaling on it must not be used.
    let install = [
        "install",
        "wa",
        &chart,
        "--namespace",
        "wa-system",
        "--create-namespace",
        "--wait=false",
        "--set",
        "gateway.replicas=3",
        "--set",
        "backend.baseUrl=http://backend.example:8000/api",
    ];
    let out = plane.helm(&install).expect("helm install");
    assert!(out.contains("STATUS: deployed"), "{out}");
    let client = plane.client().await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.get("whatsappsessions.whatsapp.gateway.dev")
        .await
        .expect("chart installed the CRD");

    // Autoscaling on by default: the HPA owns the StatefulSet, which starts at minReplicas.
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), "wa-system");
    let sts = statefulsets.get("wa-gateway").await.expect("StatefulSet");
    assert_eq!(sts.spec.replicas, Some(2));
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), "wa-system");
    let hpa = hpas.get("wa-gateway").await.expect("HPA").spec;
    assert_eq!(hpa.scale_target_ref.kind, "StatefulSet");
    assert_eq!(hpa.scale_target_ref.name, "wa-gateway");
    assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(2), 20));
    let scale_down = hpa.behavior.unwrap().scale_down.unwrap();
    assert_eq!(scale_down.policies.unwrap()[0].value, 1);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "wa-system");
    let pdb = pdbs.get("wa-gateway").await.expect("gateway PDB");
    assert_eq!(
        pdb.spec.unwrap().max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    // Every API call the binaries make is allowed to the chart's service accounts (the other
    // tests run the binaries as cluster admin, so a missing verb would only show in production).
    assert_service_accounts_may_do_what_the_binaries_do(&client).await;
    let services: Api<Service> = Api::namespaced(client.clone(), "wa-system");
    services.get("wa-operator").await.expect("operator Service");
    // No redis.url: the chart runs its own Redis, and both binaries are pointed at it.
    services.get("wa-redis").await.expect("Redis Service");
    let redis = statefulsets
        .get("wa-redis")
        .await
        .expect("Redis StatefulSet");
    assert_eq!(redis.spec.volume_claim_templates.unwrap().len(), 1);
    let gateway_env = sts.spec.template.spec.clone().unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let redis_url = gateway_env
        .iter()
        .find(|e| e.name == "WA_REDIS_URL")
        .unwrap();
    assert_eq!(redis_url.value.as_deref(), Some("redis://wa-redis:6379"));
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "wa-system");
    let dashboard = configmaps.get("wa-dashboard").await.expect("dashboard");
    assert_eq!(dashboard.metadata.labels.unwrap()["grafana_dashboard"], "1");
    let json = &dashboard.data.unwrap()["whatsapp-gateway.json"];
    serde_json::from_str::<serde_json::Value>(json).expect("dashboard JSON in the ConfigMap");
    // No Prometheus Operator in this cluster: "auto" leaves its objects out.
    let manifest = plane
        .helm(&["get", "manifest", "wa", "-n", "wa-system"])
        .unwrap();
    assert!(!manifest.contains("kind: ServiceMonitor"), "{manifest}");

    // The HPA scaled the shards; then the Prometheus Operator's CRDs appear and the release is
    // upgraded: the shard count stays, and "auto" now renders the ServiceMonitors and rules.
    statefulsets
        .patch(
            "wa-gateway",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    // The add-ons' real CRDs (fetched by scripts/provision.sh), schemas included.
    let addon_crds = tools::addon_crds().unwrap();
    for file in [
        "monitoring.coreos.com_servicemonitors.yaml",
        "monitoring.coreos.com_prometheusrules.yaml",
        "keda.sh_scaledobjects.yaml",
    ] {
        plane
            .kubectl(&["create", "-f", &addon_crds.join(file).display().to_string()])
            .unwrap_or_else(|e| panic!("install {file}: {e}"));
    }
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        let api = monitoring_api(&client, kind);
        wait_until(&format!("{kind} served"), Duration::from_secs(30), || {
            let api = api.clone();
            async move {
                api.list(&Default::default())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .await
        .unwrap();
    }
    // Every rendering, checked by the apiserver against the built-in and the add-ons' schemas
    // with unknown or duplicate fields as errors (a misspelt field would otherwise be dropped).
    let rendered_dir = tempfile::tempdir().unwrap();
    for (name, args) in SNAPSHOTS {
        let path = rendered_dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, helm_template(args).unwrap()).unwrap();
        let path = path.display().to_string();
        let validate = [
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-n",
            "wa-system",
            "-f",
            path.as_str(),
        ];
        // Discovery of the fresh CRDs may lag a moment in kubectl's cache.
        wait_until(
            &format!("{name} rendering passes strict validation"),
            Duration::from_secs(30),
            || {
                let out = plane.kubectl(&validate);
                async move { out.map(|_| ()).map_err(|e| e.to_string()) }
            },
        )
        .await
        .unwrap();
    }
    let mut upgrade = install.to_vec();
    upgrade[0] = "upgrade";
    upgrade.retain(|a| *a != "--create-namespace");
    // Helm reads the cluster's API groups through discovery, which may lag a fresh CRD briefly.
    wait_until(
        "upgrade renders the monitoring objects",
        Duration::from_secs(30),
        || {
            let out = plane.helm(&upgrade);
            let manifest = plane.helm(&["get", "manifest", "wa", "-n", "wa-system"]);
            async move {
                out.map_err(|e| e.to_string())?;
                let manifest = manifest.map_err(|e| e.to_string())?;
                if manifest.contains("kind: PrometheusRule") {
                    Ok(())
                } else {
                    Err("no PrometheusRule in the release yet".to_string())
                }
            }
        },
    )
    .await
    .unwrap();
    let sts = statefulsets.get("wa-gateway").await.unwrap();
    assert_eq!(
        sts.spec.replicas,
        Some(5),
        "an upgrade must keep the autoscaled shard count"
    );
    let monitors = monitoring_api(&client, "ServiceMonitor");
    for name in ["wa-gateway", "wa-operator"] {
        monitors.get(name).await.expect("ServiceMonitor");
    }
    let rule = monitoring_api(&client, "PrometheusRule")
        .get("wa")
        .await
        .expect("PrometheusRule");
    let alerts: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(alerts_path()).unwrap()).unwrap();
    let groups = rule.data["spec"]["groups"].as_array().expect("rule groups");
    assert_eq!(groups.len(), alerts["groups"].as_sequence().unwrap().len());

    // Bad values never reach the cluster: the upgrade fails naming the field, the release stays.
    let mut bad = upgrade.clone();
    bad.extend(["--set", "gateway.driver=baileys"]);
    let err = plane.helm(&bad).expect_err("bad driver rejected");
    assert!(err.to_string().contains("/gateway/driver"), "{err}");
    let history = plane.helm(&["history", "wa", "-n", "wa-system"]).unwrap();
    assert!(!history.contains("failed"), "{history}");
}

/// Asks the apiserver's RBAC authorizer (SubjectAccessReview) about each call the gateway and
/// the operator make, as the service account the chart gives each.
async fn assert_service_accounts_may_do_what_the_binaries_do(client: &kube::Client) {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    const SESSIONS: (&str, &str, &str) = ("whatsapp.gateway.dev", "whatsappsessions", "");
    const STATUS: (&str, &str, &str) = ("whatsapp.gateway.dev", "whatsappsessions", "status");
    const LEASES: (&str, &str, &str) = ("coordination.k8s.io", "leases", "");
    const SECRETS: (&str, &str, &str) = ("", "secrets", "");
    const EVENTS: (&str, &str, &str) = ("events.k8s.io", "events", "");
    // (service account, verb, resource, namespace: "" for cluster-wide)
    let calls = [
        // shard.rs: its shard's sessions, drain acknowledgements and `cleaned`; status.rs.
        ("wa-gateway", "list", SESSIONS, ""),
        ("wa-gateway", "watch", SESSIONS, ""),
        ("wa-gateway", "patch", SESSIONS, "tenant-a"),
        ("wa-gateway", "patch", STATUS, "tenant-a"),
        // Its own Lease: heartbeat by apply, deleted on exit.
        ("wa-gateway", "get", LEASES, "wa-system"),
        ("wa-gateway", "create", LEASES, "wa-system"),
        ("wa-gateway", "patch", LEASES, "wa-system"),
        ("wa-gateway", "delete", LEASES, "wa-system"),
        // secrets.rs: a session's webhook key, in the session's namespace.
        ("wa-gateway", "get", SECRETS, "tenant-a"),
        // placement.rs: every session, labels, finalizers, handoff annotations, status.
        ("wa-operator", "list", SESSIONS, ""),
        ("wa-operator", "watch", SESSIONS, ""),
        ("wa-operator", "patch", SESSIONS, "tenant-a"),
        ("wa-operator", "patch", STATUS, "tenant-a"),
        // The gateways' Leases and its own leader-election Lease.
        ("wa-operator", "list", LEASES, "wa-system"),
        ("wa-operator", "watch", LEASES, "wa-system"),
        ("wa-operator", "get", LEASES, "wa-system"),
        ("wa-operator", "create", LEASES, "wa-system"),
        ("wa-operator", "patch", LEASES, "wa-system"),
        ("wa-operator", "update", LEASES, "wa-system"),
        // Move, conflict and finalize Events on sessions.
        ("wa-operator", "create", EVENTS, "tenant-a"),
    ];
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    let mut refused = Vec::new();
    for (account, verb, (group, resource, subresource), namespace) in calls {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(format!("system:serviceaccount:wa-system:{account}")),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    "system:serviceaccounts:wa-system".into(),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.into()),
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    subresource: (!subresource.is_empty()).then(|| subresource.into()),
                    namespace: (!namespace.is_empty()).then(|| namespace.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = reviews
            .create(&Default::default(), &review)
            .await
            .expect("SubjectAccessReview");
        if !answer.status.is_some_and(|s| s.allowed) {
            refused.push(format!(
                "{account}: {verb} {group}/{resource}/{subresource} in {namespace:?}"
            ));
        }
    }
    assert!(
        refused.is_empty(),
        "refused by the chart's RBAC: {refused:#?}"
    );
}
