//! Where the provisioned binaries live. `scripts/provision.sh` builds them into
//! `~/.cache/wa-gateway/...` keyed by version and prints the environment variables below; tests
//! fall back to those default locations so `cargo test` works after provisioning without sourcing.

use std::path::PathBuf;

use crate::{Error, Result};

pub const K8S_VERSION: &str = "v1.37.2";
pub const ETCD_VERSION: &str = "v3.6.16";
pub const HELM_VERSION: &str = "v3.22.0";

fn cache_root() -> PathBuf {
    std::env::var_os("WA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/wa-gateway")
        })
}

fn find(name: &str, env: &'static str, default: PathBuf) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    if default.is_file() {
        return Ok(default);
    }
    // Last resort: PATH.
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(Error::MissingTool(name.to_string(), env))
}

pub fn kube_apiserver() -> Result<PathBuf> {
    find(
        "kube-apiserver",
        "WA_KUBE_APISERVER",
        cache_root().join(format!("k8s/{K8S_VERSION}/bin/kube-apiserver")),
    )
}

pub fn kubectl() -> Result<PathBuf> {
    find(
        "kubectl",
        "WA_KUBECTL",
        cache_root().join(format!("k8s/{K8S_VERSION}/bin/kubectl")),
    )
}

pub fn etcd() -> Result<PathBuf> {
    find(
        "etcd",
        "WA_ETCD",
        cache_root().join(format!("etcd/{ETCD_VERSION}/bin/etcd")),
    )
}

pub fn helm() -> Result<PathBuf> {
    find(
        "helm",
        "WA_HELM",
        cache_root().join(format!("helm/{HELM_VERSION}/bin/helm")),
    )
}

pub fn redis_server() -> Result<PathBuf> {
    find(
        "redis-server",
        "WA_REDIS_SERVER",
        PathBuf::from("/usr/bin/redis-server"),
    )
}

/// The workspace root (for examples/, charts/, crds/).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn promtool() -> Result<PathBuf> {
    find(
        "promtool",
        "WA_PROMTOOL",
        PathBuf::from("/usr/bin/promtool"),
    )
}

pub const PROMETHEUS_OPERATOR_VERSION: &str = "v0.85.0";
pub const KEDA_VERSION: &str = "v2.21.0";

/// The folder with the add-ons' CRDs that `scripts/provision.sh` fetches: the Prometheus
/// Operator's ServiceMonitor and PrometheusRule, KEDA's ScaledObject.
pub fn addon_crds() -> Result<PathBuf> {
    let dir = std::env::var_os("WA_ADDON_CRDS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            cache_root().join(format!(
                "addon-crds/prometheus-operator-{PROMETHEUS_OPERATOR_VERSION}-keda-{KEDA_VERSION}"
            ))
        });
    if dir.join("keda.sh_scaledobjects.yaml").is_file() {
        Ok(dir)
    } else {
        Err(Error::MissingTool(
            format!("add-on CRDs in {}", dir.display()),
            "WA_ADDON_CRDS",
        ))
    }
}
