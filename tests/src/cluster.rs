//! Shared pieces of the cluster end-to-end tests: the CRD and namespace, gateway shards as
//! processes, and waiting for sessions to be Connected on given shards.

use std::collections::HashMap;
use std::time::Duration;

use crds::{Phase, SHARD_LABEL, WhatsappSession};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{CustomResourceExt, ResourceExt};

use crate::gateway::GatewayProcess;
use crate::{ControlPlane, RedisServer, wait_until};

pub const NS: &str = "wa-e2e";
pub const RELEASE: &str = "wa";

/// Installs the CRD (waits until it is served) and creates [`NS`].
pub async fn setup(client: &kube::Client) {
    setup_in(client, NS).await
}

/// Installs the CRD (waits until it is served) and creates `namespace`.
pub async fn setup_in(client: &kube::Client, namespace: &str) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = WhatsappSession::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap();
    wait_until("CRD served", Duration::from_secs(30), || {
        let api: Api<WhatsappSession> = Api::all(client.clone());
        async move {
            api.list(&ListParams::default().limit(1))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await
    .unwrap();
    let ns: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}})).unwrap();
    let _ = ns.create(&PostParams::default(), &obj).await;
}

/// The tests' fast gateway timing: 6 s Leases renewed every second, 3 s session locks.
pub const FAST_LEASE_ARGS: [&str; 6] = [
    "--lease-duration-s",
    "6",
    "--lease-renew-ms",
    "1000",
    "--lock-ttl-ms",
    "3000",
];

pub async fn start_gateway(
    plane: &ControlPlane,
    redis: &RedisServer,
    ordinal: u32,
) -> GatewayProcess {
    let bin = crate::gateway::gateway_binary().unwrap();
    start_gateway_with(plane, redis, ordinal, &bin, &FAST_LEASE_ARGS)
        .await
        .unwrap()
}

/// name -> (shard label, phase)
pub async fn snapshot(
    api: &Api<WhatsappSession>,
) -> HashMap<String, (Option<String>, Option<Phase>)> {
    api.list(&ListParams::default())
        .await
        .unwrap()
        .into_iter()
        .map(|s| {
            let shard = s.labels().get(SHARD_LABEL).cloned();
            let phase = s.status.as_ref().and_then(|st| st.phase);
            (s.name_any(), (shard, phase))
        })
        .collect()
}

/// Waits until the resource `name` reports `phase`.
pub async fn wait_phase(api: &Api<WhatsappSession>, name: &str, phase: Phase, secs: u64) {
    wait_until(
        &format!("{name} {phase:?}"),
        Duration::from_secs(secs),
        || async {
            let now = api
                .get(name)
                .await
                .map_err(|e| e.to_string())?
                .status
                .and_then(|s| s.phase);
            if now == Some(phase) {
                Ok(())
            } else {
                Err(format!("phase {now:?}"))
            }
        },
    )
    .await
    .unwrap();
}

pub async fn wait_connected_on(
    api: &Api<WhatsappSession>,
    total: usize,
    shards: &[&str],
    secs: u64,
) -> HashMap<String, String> {
    let shards: Vec<String> = shards.iter().map(|s| s.to_string()).collect();
    wait_until(
        "all sessions Connected on the expected shards",
        Duration::from_secs(secs),
        || {
            let api = api.clone();
            let shards = shards.clone();
            async move {
                let snap = snapshot(&api).await;
                let good = snap
                    .values()
                    .filter(|(shard, phase)| {
                        shard.as_ref().is_some_and(|s| shards.contains(s))
                            && *phase == Some(Phase::Connected)
                    })
                    .count();
                if good == total && snap.len() == total {
                    Ok(snap
                        .into_iter()
                        .map(|(n, (s, _))| (n, s.unwrap()))
                        .collect())
                } else {
                    Err(format!("{good}/{total} connected on {shards:?}"))
                }
            }
        },
    )
    .await
    .unwrap()
}

pub fn loads(placed: &HashMap<String, String>) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for shard in placed.values() {
        *out.entry(shard.clone()).or_insert(0) += 1;
    }
    out
}

/// Waits until the operator counts `shards` live gateway shards (its `whatsapp_operator_live_shards`
/// gauge). A gateway answers `/healthz` before its first Lease write, so sessions created right
/// after the gateways start could be placed over fewer shards and then handed off, which the
/// placement assertions would mistake for needless moves.
pub async fn wait_operator_sees_shards(operator: &GatewayProcess, shards: usize) {
    let want = format!("whatsapp_operator_live_shards {shards}");
    wait_until("operator sees the shards", Duration::from_secs(60), || {
        let want = want.clone();
        async move {
            let (_, metrics) = operator.get("/metrics").await?;
            if metrics.lines().any(|l| l.trim() == want) {
                Ok(())
            } else {
                Err(metrics
                    .lines()
                    .filter(|l| l.starts_with("whatsapp_operator_live_shards"))
                    .collect::<Vec<_>>()
                    .join(" "))
            }
        }
    })
    .await
    .unwrap();
}

/// The operator binary as a process against `plane`, placing sessions over this release's shards.
pub async fn start_operator(plane: &ControlPlane) -> GatewayProcess {
    let kubeconfig = plane.kubeconfig_path().display().to_string();
    GatewayProcess::start_operator(
        &["--resync-ms", "500"],
        &[
            ("KUBECONFIG", &kubeconfig),
            ("POD_NAMESPACE", NS),
            ("WA_RELEASE", RELEASE),
            ("POD_NAME", "op-0"),
        ],
    )
    .await
    .unwrap()
}

/// Shard `ordinal` as [`start_gateway`] starts it, but from the binary at `bin` and with `args`
/// after `cluster` (lease timing, status QPS, ...) instead of [`FAST_LEASE_ARGS`]; `--sim-seed`
/// is the ordinal unless `args` sets it. Errors are returned, not unwrapped.
pub async fn start_gateway_with(
    plane: &ControlPlane,
    redis: &RedisServer,
    ordinal: u32,
    bin: &std::path::Path,
    args: &[&str],
) -> crate::Result<GatewayProcess> {
    let kubeconfig = plane.kubeconfig_path().display().to_string();
    let pod = format!("{RELEASE}-gateway-{ordinal}");
    let seed = ordinal.to_string();
    let mut full = vec!["cluster"];
    if !args.contains(&"--sim-seed") {
        full.extend(["--sim-seed", &seed]);
    }
    full.extend_from_slice(args);
    GatewayProcess::start_path(
        bin,
        &full,
        &[
            ("KUBECONFIG", &kubeconfig),
            ("POD_NAME", &pod),
            ("POD_NAMESPACE", NS),
            ("WA_RELEASE", RELEASE),
            ("WA_REDIS_URL", &redis.url()),
        ],
    )
    .await
}

/// The operator as [`start_operator`] starts it, but from the binary at `bin` and with `args`
/// instead of the tests' `--resync-ms 500`. Errors are returned, not unwrapped.
pub async fn start_operator_with(
    plane: &ControlPlane,
    bin: &std::path::Path,
    args: &[&str],
) -> crate::Result<GatewayProcess> {
    let kubeconfig = plane.kubeconfig_path().display().to_string();
    GatewayProcess::start_path(
        bin,
        args,
        &[
            ("KUBECONFIG", &kubeconfig),
            ("POD_NAMESPACE", NS),
            ("WA_RELEASE", RELEASE),
            ("POD_NAME", "op-0"),
        ],
    )
    .await
}

/// Creates a default `WhatsappSession` for each name, one after another.
pub async fn create_sessions(api: &Api<WhatsappSession>, names: impl IntoIterator<Item = String>) {
    for name in names {
        api.create(
            &PostParams::default(),
            &WhatsappSession::new(&name, Default::default()),
        )
        .await
        .unwrap();
    }
}
