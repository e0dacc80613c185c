//! An isolated redis-server on a random loopback port, no persistence, reaped on drop.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::ChildGuard;
use crate::{Result, free_port, tools, wait_until};

pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<ChildGuard>,
}

impl RedisServer {
    pub async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("wa-redis-").tempdir()?;
        let mut server = Self {
            port: free_port(),
            dir,
            child: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> Result<()> {
        let args: Vec<String> = vec![
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
        let mut child = ChildGuard::spawn(
            "redis-server",
            &tools::redis_server()?,
            &args,
            Some(&self.dir.path().join("redis.log")),
        )?;
        let port = self.port;
        wait_until("redis-server PING", Duration::from_secs(20), || {
            let running = child.check_running().map_err(|e| e.to_string());
            async move {
                running?;
                ping(port).await
            }
        })
        .await?;
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

async fn ping(port: u16) -> std::result::Result<(), String> {
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
