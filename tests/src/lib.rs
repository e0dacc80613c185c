#![forbid(unsafe_code)]
//! Test support shared by every integration test of the project: a real, isolated control plane
//! (etcd + kube-apiserver with RBAC), a real redis-server, and the helm/kubectl binaries that
//! `scripts/provision.sh` builds. Every process is reaped when its guard drops, and also when the
//! test process dies (panic, abort, `kill -9`): see [`process`].

pub mod cluster;
pub mod control_plane;
pub mod fake_whatsapp;
pub mod gateway;
pub mod history;
pub mod process;
pub mod receiver;
pub mod redis;
pub mod tools;

pub use control_plane::ControlPlane;
pub use redis::{RedisCluster, RedisServer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found: run `bash scripts/provision.sh` first (or set {1})")]
    MissingTool(String, &'static str),
    #[error("could not start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} did not become ready within {secs} s; last error: {last}")]
    NotReady {
        what: String,
        secs: u64,
        last: String,
    },
    #[error("{0} exited early: {1}")]
    Exited(String, String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("command `{cmd}` failed: {output}")]
    Command { cmd: String, output: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A free TCP port on loopback. The OS picks it; another process may in theory take it before we
/// bind, so the gateway and redis-server starters retry on another port when the child exits at
/// start because its port was taken.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}

/// Polls `check` until it returns Ok or `timeout` passes.
pub async fn wait_until<F, Fut, T>(
    what: &str,
    timeout: std::time::Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("never checked");
    while tokio::time::Instant::now() < deadline {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) => last = e,
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(Error::NotReady {
        what: what.to_string(),
        secs: timeout.as_secs(),
        last,
    })
}
