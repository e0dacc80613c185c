//! The gateway binary as a separate process (for tests where processes, not threads, matter:
//! `kill -9`, SIGSTOP, restarts).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::process::{ChildGuard, pdeath_command};
use crate::{Error, Result, free_port};

/// Path of the gateway binary of this workspace, built once per test binary if needed.
pub fn gateway_binary() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    workspace_binary(&BUILT, "gateway")
}

/// Path of the operator binary of this workspace, built once per test binary if needed.
pub fn operator_binary() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    workspace_binary(&BUILT, "operator")
}

fn workspace_binary(
    built: &OnceLock<std::result::Result<PathBuf, String>>,
    package: &str,
) -> Result<PathBuf> {
    built
        .get_or_init(|| {
            // target/<profile>/deps/<test-binary> -> target/<profile>/<package>
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let profile_dir = exe
                .parent()
                .and_then(|p| p.parent())
                .ok_or("no target dir")?
                .to_path_buf();
            build_binaries_into(&profile_dir, &[package])
                .map(|mut bins| bins.remove(0))
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| Error::Command {
            cmd: format!("cargo build -p {package}"),
            output: e,
        })
}

/// A running gateway process with its HTTP port.
pub struct GatewayProcess {
    pub child: ChildGuard,
    pub port: u16,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts `gateway <args...> --port <free>` with extra environment, and waits for `/healthz`.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_binary(gateway_binary()?, args, env).await
    }

    /// Starts the operator binary the same way.
    pub async fn start_operator(args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_binary(operator_binary()?, args, env).await
    }

    async fn start_binary(bin: PathBuf, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        // `free_port` lets the port go before the child binds it; if something else took it in
        // between, the child exits at once and a new port is tried.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_on(&bin, free_port(), args, env).await {
                Err(Error::Exited(name, log)) if attempt < 3 && log.contains("in use") => {
                    eprintln!("{name} could not bind its port; retrying on another one");
                }
                other => return other,
            }
        }
    }

    async fn start_on(
        bin: &std::path::Path,
        port: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("wa-gateway-").tempdir()?;
        let log = dir.path().join("gateway.log");
        let file = std::fs::File::create(&log)?;
        let mut cmd = pdeath_command(bin);
        cmd.args(args)
            .arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1");
        cmd.env("WA_LOG_FORMAT", "json").env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(file.try_clone()?).stderr(file);
        let name = bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut child = ChildGuard::spawn_command(&name, cmd)?;
        let url = format!("http://127.0.0.1:{port}/healthz");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            // An exited process is reported at once, with its log, rather than waited on.
            if let Err(Error::Exited(name, status)) = child.check_running() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(Error::Exited(name, format!("{status}: {log}")));
            }
            let last = match http_get(&url).await {
                Ok(_) => break,
                Err(e) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NotReady {
                    what: format!("{name} /healthz"),
                    secs: 30,
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(GatewayProcess {
            child,
            port,
            log,
            _dir: dir,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// GET a path; returns (status, body).
    pub async fn get(&self, path: &str) -> std::result::Result<(u16, String), String> {
        http_get(&self.url(path)).await
    }

    /// Asserts that `/metrics` holds the sample line `sample` (name, labels and value); on
    /// failure shows that family's lines.
    pub async fn assert_metric(&self, sample: &str) {
        let (_, metrics) = self.get("/metrics").await.expect("GET /metrics");
        let family = sample.split(['{', ' ']).next().unwrap_or(sample);
        assert!(
            metrics.lines().any(|line| line == sample),
            "{} has no `{sample}`:\n{}",
            self.url("/metrics"),
            metrics
                .lines()
                .filter(|line| line.starts_with(family))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection (no client library needed in tests).
pub async fn http_get(url: &str) -> std::result::Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(host))
            .await
            .map_err(|_| "connect timeout".to_string())?
            .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .map_err(|_| "read timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(format!("bad response: {text}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Bodies may be chunked; the JSON we read is small: strip chunk-size lines.
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body.lines()
            .filter(|l| !l.chars().all(|c| c.is_ascii_hexdigit()) || l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        body
    };
    Ok((status, body))
}

/// The profile dir (`<target>/<profile>`) of a binary that `cargo run`/`cargo build` put directly
/// in it, such as the bench at `target/release/bench` (unlike test binaries, which live in
/// `target/<profile>/deps/`).
pub fn own_profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .map(|p| p.to_path_buf())
        .ok_or_else(|| Error::Command {
            cmd: "current_exe".into(),
            output: format!("{} has no parent dir", exe.display()),
        })
}

/// Builds the binaries of `packages` into `profile_dir` (`<target>/<profile>`: release when its
/// name is `release`) and returns their paths, in the order of `packages`.
pub fn build_binaries_into(
    profile_dir: &std::path::Path,
    packages: &[&str],
) -> Result<Vec<PathBuf>> {
    build_binaries_with_features(profile_dir, packages, &[])
}

/// [`build_binaries_into`] with cargo `features` on (give such a build a target dir of its own,
/// so its binaries never replace the default build's).
pub fn build_binaries_with_features(
    profile_dir: &std::path::Path,
    packages: &[&str],
    features: &[&str],
) -> Result<Vec<PathBuf>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-q"])
        .current_dir(crate::tools::workspace_root());
    for package in packages {
        cmd.args(["-p", package, "--bin", package]);
    }
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target_dir) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target_dir);
    }
    let what = format!("cargo build -p {}", packages.join(" -p "));
    let status = cmd.status()?;
    if !status.success() {
        return Err(Error::Command {
            cmd: what,
            output: status.to_string(),
        });
    }
    Ok(packages.iter().map(|p| profile_dir.join(p)).collect())
}

impl GatewayProcess {
    /// Starts the binary at `bin` (a gateway or operator built elsewhere, see
    /// [`build_binaries_into`]) like [`GatewayProcess::start`] does.
    pub async fn start_path(
        bin: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_binary(bin.to_path_buf(), args, env).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gateway whose port is taken exits at once; the starter reports that with the log (which
    /// names the bind error) instead of waiting out its 30 s, and `start_binary` retries on that.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_taken_port_is_reported_as_an_early_exit_with_the_log() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let bin = gateway_binary().unwrap();
        let started = std::time::Instant::now();
        let err = GatewayProcess::start_on(&bin, port, &["standalone"], &[])
            .await
            .err()
            .expect("the port is taken");
        match &err {
            Error::Exited(_, log) => assert!(log.contains("in use"), "{log}"),
            other => panic!("{other}"),
        }
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
