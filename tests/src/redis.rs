//! An isolated redis-server on a random loopback port, no persistence, reaped on drop; optionally
//! also serving TLS on a second port.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::ChildGuard;
use crate::{Result, free_port, tools};

pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<ChildGuard>,
    tls: Option<Tls>,
    /// More redis-server arguments (cluster mode).
    extra: Vec<String>,
}

/// PEM files for redis-server's TLS port (clients are not asked for certificates).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
}

struct Tls {
    files: TlsFiles,
    port: u16,
}

impl RedisServer {
    pub async fn start() -> Result<Self> {
        Self::start_with(None, Vec::new()).await
    }

    /// Also serves TLS on [`Self::tls_url`]'s port, with these files; the plain port stays open
    /// for readiness checks and inspection.
    pub async fn start_tls(files: TlsFiles) -> Result<Self> {
        Self::start_with(Some(files), Vec::new()).await
    }

    async fn start_with(tls: Option<TlsFiles>, extra: Vec<String>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("wa-redis-").tempdir()?;
        let mut server = Self {
            port: free_port(),
            dir,
            child: None,
            tls: tls.map(|files| Tls {
                files,
                port: free_port(),
            }),
            extra,
        };
        // `free_port` lets the port go before redis-server binds it; if something else took it
        // in between, redis-server exits at once and another port is tried.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match server.spawn().await {
                Err(crate::Error::Exited(..)) if attempt < 3 => {
                    server.port = free_port();
                    if let Some(tls) = &mut server.tls {
                        tls.port = free_port();
                    }
                }
                other => return other.map(|()| server),
            }
        }
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            self.port.to_string(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--protected-mode".into(),
            "no".into(),
        ];
        args.extend(self.extra.iter().cloned());
        if let Some(tls) = &self.tls {
            let path = |p: &std::path::Path| p.display().to_string();
            args.extend([
                "--tls-port".into(),
                tls.port.to_string(),
                "--tls-cert-file".into(),
                path(&tls.files.cert),
                "--tls-key-file".into(),
                path(&tls.files.key),
                "--tls-ca-cert-file".into(),
                path(&tls.files.ca),
                "--tls-auth-clients".into(),
                "no".into(),
            ]);
        }
        let mut child = ChildGuard::spawn(
            "redis-server",
            &tools::redis_server()?,
            &args,
            Some(&self.dir.path().join("redis.log")),
        )?;
        let port = self.port;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            // An exited server (say, its port was taken) is reported at once, not waited on.
            child.check_running()?;
            let last = match ping(port).await {
                Ok(()) => break,
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(crate::Error::NotReady {
                    what: "redis-server PING".into(),
                    secs: 20,
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://localhost:<tls port>` (the name the test certificates are issued for).
    pub fn tls_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|tls| format!("rediss://localhost:{}", tls.port))
    }

    /// Kills the server (its data is gone: no persistence).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn().await
    }

    pub fn guard(&self) -> Option<&ChildGuard> {
        self.child.as_ref()
    }
}

/// A Redis Cluster of `primaries` redis-servers (no replicas) on loopback, formed with
/// `redis-cli --cluster create`; the slots are spread over all of them.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start(primaries: usize) -> Result<Self> {
        let mut nodes = Vec::with_capacity(primaries);
        for _ in 0..primaries {
            let extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ];
            nodes.push(
                RedisServer::start_with(None, extra.iter().map(|a| a.to_string()).collect())
                    .await?,
            );
        }
        let cli = tools::redis_server()?.with_file_name("redis-cli");
        let mut create = std::process::Command::new(&cli);
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()?;
        if !out.status.success() {
            return Err(crate::Error::NotReady {
                what: "redis-cli --cluster create".into(),
                secs: 0,
                last: String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            });
        }
        // Every node must know the whole slot map before clients are pointed at it.
        for node in &nodes {
            let port = node.port.to_string();
            crate::wait_until("cluster_state:ok", Duration::from_secs(30), || {
                let cli = cli.clone();
                let port = port.clone();
                async move {
                    let out = std::process::Command::new(&cli)
                        .args(["-p", &port, "cluster", "info"])
                        .output()
                        .map_err(|e| e.to_string())?;
                    let info = String::from_utf8_lossy(&out.stdout).into_owned();
                    info.contains("cluster_state:ok").then_some(()).ok_or(info)
                }
            })
            .await?;
        }
        Ok(RedisCluster { nodes })
    }

    /// `redis-cluster://127.0.0.1:<first node>` (clients discover the others).
    pub fn url(&self) -> String {
        format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port)
    }
}

async fn ping(port: u16) -> std::result::Result<(), String> {
    // Bounded: whatever else holds the port may accept and never answer.
    tokio::time::timeout(Duration::from_secs(1), ping_once(port))
        .await
        .map_err(|_| "no answer to PING within 1 s".to_string())?
}

async fn ping_once(port: u16) -> std::result::Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"PING\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 16];
    let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
    if buf[..n].starts_with(b"+PONG") {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A taken port makes redis-server exit at once, which `spawn` reports as `Exited` (the
    /// case `start` retries on another port) instead of waiting out its 20 s.
    #[tokio::test]
    async fn a_taken_port_is_reported_as_an_early_exit() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut server = RedisServer {
            port: taken.local_addr().unwrap().port(),
            dir: tempfile::Builder::new()
                .prefix("wa-redis-")
                .tempdir()
                .unwrap(),
            child: None,
            tls: None,
            extra: Vec::new(),
        };
        let started = std::time::Instant::now();
        let err = server.spawn().await.unwrap_err();
        assert!(matches!(err, crate::Error::Exited(..)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        // And `start` gets a server on a free port.
        let redis = RedisServer::start().await.unwrap();
        ping(redis.port()).await.unwrap();
    }
}
