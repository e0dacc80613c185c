//! An isolated Kubernetes control plane: etcd + kube-apiserver (RBAC authorization on), random
//! free ports, everything under one temp dir. Authentication is a static token file with an admin
//! (`system:masters`) and a few plain users whose rights come only from RBAC, so tests can check
//! the chart's Roles.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::process::{ChildGuard, run};
use crate::{Error, Result, free_port, tools, wait_until};

/// Users in the static token file. Tokens are random per control plane.
pub const ADMIN_USER: &str = "admin";
/// Users that have no rights except what RBAC bindings give them.
pub const PLAIN_USERS: &[&str] = &["wa-operator", "wa-gateway", "wa-viewer"];

pub struct ControlPlane {
    dir: tempfile::TempDir,
    // Held only so it is reaped with the control plane.
    _etcd: ChildGuard,
    apiserver: ChildGuard,
    apiserver_args: Vec<String>,
    api_port: u16,
    etcd_port: u16,
    tokens: Vec<(String, String)>,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers ok.
    pub async fn start() -> Result<Self> {
        let apiserver_bin = tools::kube_apiserver()?;
        let etcd_bin = tools::etcd()?;
        let dir = tempfile::Builder::new()
            .prefix("wa-control-plane-")
            .tempdir()?;
        let etcd_port = free_port();
        let peer_port = free_port();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let etcd_args: Vec<String> = [
            "--name=default".to_string(),
            format!("--data-dir={}", dir.path().join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
            "--unsafe-no-fsync=true".to_string(),
            "--log-level=warn".to_string(),
        ]
        .into();
        let mut etcd = ChildGuard::spawn(
            "etcd",
            &etcd_bin,
            &etcd_args,
            Some(&dir.path().join("etcd.log")),
        )?;
        wait_until("etcd", Duration::from_secs(30), || {
            let running = etcd.check_running().map_err(|e| e.to_string());
            async move {
                running?;
                tokio::net::TcpStream::connect(("127.0.0.1", etcd_port))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .await?;

        let sa_key = dir.path().join("sa.key");
        run(
            "openssl",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([sa_key.display().to_string()])
            .collect::<Vec<_>>(),
        )?;
        let mut tokens = vec![(ADMIN_USER.to_string(), random_token())];
        tokens.extend(PLAIN_USERS.iter().map(|u| (u.to_string(), random_token())));
        let token_file = dir.path().join("tokens.csv");
        let token_lines: Vec<String> = tokens
            .iter()
            .map(|(user, token)| {
                if user == ADMIN_USER {
                    format!("{token},{user},{user}-uid,\"system:masters\"")
                } else {
                    format!("{token},{user},{user}-uid")
                }
            })
            .collect();
        std::fs::write(&token_file, token_lines.join("\n") + "\n")?;

        let api_port = free_port();
        let apiserver_args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--etcd-prefix=/registry-{api_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            // The endpoint reconciler refuses loopback addresses; nothing here needs the
            // `kubernetes` Service endpoints.
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", dir.path().join("certs").display()),
            format!("--token-auth-file={}", token_file.display()),
            "--authorization-mode=RBAC".into(),
            "--anonymous-auth=false".into(),
            format!("--service-account-key-file={}", sa_key.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            "--service-cluster-ip-range=10.96.0.0/24".into(),
            "--allow-privileged=true".into(),
            // No controller-manager runs, so nothing would create the default ServiceAccount pods need.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--v=0".into(),
        ];
        let apiserver = ChildGuard::spawn(
            "kube-apiserver",
            &apiserver_bin,
            &apiserver_args,
            Some(&dir.path().join("kube-apiserver.log")),
        )?;
        let mut plane = Self {
            dir,
            _etcd: etcd,
            apiserver,
            apiserver_args,
            api_port,
            etcd_port,
            tokens,
        };
        for user in std::iter::once(ADMIN_USER).chain(PLAIN_USERS.iter().copied()) {
            plane.write_kubeconfig(user)?;
        }
        plane.wait_ready().await?;
        Ok(plane)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let kubeconfig = self.kubeconfig_path();
        let log = self.dir.path().join("kube-apiserver.log");
        let apiserver = &mut self.apiserver;
        wait_until("kube-apiserver /readyz", Duration::from_secs(90), || {
            let running = apiserver.check_running().map_err(|e| {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                // The lines that say why it stopped, not the last (informational) ones.
                let tail: String = tail
                    .lines()
                    .filter(|l| l.starts_with('E') || l.starts_with('F'))
                    .take(10)
                    .collect::<Vec<_>>()
                    .join("\n");
                format!("{e}\n{tail}")
            });
            let kubeconfig = kubeconfig.clone();
            async move {
                running?;
                let client = client_from(&kubeconfig).await.map_err(|e| e.to_string())?;
                let req = http::Request::get("/readyz")
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                let text = client.request_text(req).await.map_err(|e| e.to_string())?;
                if text.trim() == "ok" {
                    Ok(())
                } else {
                    Err(text)
                }
            }
        })
        .await
    }

    fn write_kubeconfig(&self, user: &str) -> Result<()> {
        let token = &self
            .tokens
            .iter()
            .find(|(u, _)| u == user)
            .expect("known user")
            .1;
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {user}\n    namespace: default\ncurrent-context: test\n",
            port = self.api_port
        );
        std::fs::write(self.kubeconfig_for(user), yaml)?;
        Ok(())
    }

    /// Path of the admin kubeconfig (for kubectl, helm and processes under test).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.kubeconfig_for(ADMIN_USER)
    }

    /// Path of a kubeconfig that authenticates as `user` (one of [`PLAIN_USERS`] or the admin).
    pub fn kubeconfig_for(&self, user: &str) -> PathBuf {
        self.dir.path().join(format!("kubeconfig-{user}.yaml"))
    }

    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// A new admin client. Create one per tokio runtime (each `#[tokio::test]` has its own).
    pub async fn client(&self) -> Result<kube::Client> {
        client_from(&self.kubeconfig_for(ADMIN_USER)).await
    }

    /// A client authenticating as `user`.
    pub async fn client_as(&self, user: &str) -> Result<kube::Client> {
        client_from(&self.kubeconfig_for(user)).await
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn etcd_port(&self) -> u16 {
        self.etcd_port
    }

    /// Kills kube-apiserver, waits `down_for`, starts it again on the same port and data, and
    /// waits for readiness: clients see the API go away and come back.
    pub async fn restart_apiserver(&mut self, down_for: Duration) -> Result<()> {
        self.apiserver.kill();
        tokio::time::sleep(down_for).await;
        let bin = tools::kube_apiserver()?;
        self.apiserver = ChildGuard::spawn(
            "kube-apiserver",
            &bin,
            &self.apiserver_args,
            Some(&self.dir.path().join("kube-apiserver.log")),
        )?;
        self.wait_ready().await
    }

    /// The kube-apiserver's `/metrics` (Prometheus text), read as admin.
    pub async fn apiserver_metrics(&self) -> Result<String> {
        let client = self.client().await?;
        let req = http::Request::get("/metrics")
            .body(Vec::new())
            .map_err(|e| Error::Command {
                cmd: "GET /metrics".into(),
                output: e.to_string(),
            })?;
        Ok(client.request_text(req).await?)
    }

    /// Runs kubectl against this control plane as admin.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut full = vec![format!(
            "--kubeconfig={}",
            self.kubeconfig_for(ADMIN_USER).display()
        )];
        full.extend(args.iter().map(|s| s.to_string()));
        run(tools::kubectl()?, &full)
    }

    /// Runs helm against this control plane as admin, with its caches inside the temp dir.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let helm_home = self.dir.path().join("helm");
        let mut cmd = std::process::Command::new(tools::helm()?);
        cmd.args(args)
            .env("KUBECONFIG", self.kubeconfig_for(ADMIN_USER))
            .env("HELM_CACHE_HOME", helm_home.join("cache"))
            .env("HELM_CONFIG_HOME", helm_home.join("config"))
            .env("HELM_DATA_HOME", helm_home.join("data"));
        let out = cmd.output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(Error::Command {
                cmd: format!("helm {}", args.join(" ")),
                output: text,
            });
        }
        Ok(text)
    }
}

async fn client_from(kubeconfig: &Path) -> Result<kube::Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    // Not a secret that matters (loopback, throwaway cluster); just unique per control plane.
    let mut out = String::new();
    for _ in 0..4 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// One control plane per test binary, started on first use and killed when the binary exits
/// (through the parent-death signal). Tests sharing it must use their own namespaces and names.
/// Build a fresh [`kube::Client`] per test with [`ControlPlane::client`].
pub fn shared() -> &'static ControlPlane {
    static SHARED: OnceLock<ControlPlane> = OnceLock::new();
    SHARED.get_or_init(|| {
        // Start from a thread with its own runtime: the caller may be inside a runtime already.
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(ControlPlane::start())
        })
        .join()
        .expect("control-plane starter thread")
        .unwrap_or_else(|e| panic!("start the shared control plane: {e}"))
    })
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server", &self.server_url())
            .field("dir", &self.dir.path())
            .finish()
    }
}
