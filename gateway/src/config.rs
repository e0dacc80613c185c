//! Command line and environment, validated once into typed settings with named defaults.
//! Every invalid value stops start-up with a message that names the flag and the variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::batch::{BatchConfig, BatchPolicy};
use crate::delivery::{BackendSettings, DeliverySettings, QrFormat, RetryPolicy};
use crate::{Error, Result};

pub const DEFAULT_PORT: u16 = 4000;

#[derive(Parser, Debug)]
#[command(
    name = "gateway",
    version,
    about = "Runs WhatsApp sessions and pushes their QR codes and status to your backend"
)]
pub struct Cli {
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(Subcommand, Debug)]
pub enum Mode {
    /// One gateway, no Kubernetes: sessions from the simulator; Redis and backend optional.
    Standalone(StandaloneArgs),
    /// One shard of the gateway StatefulSet: sessions from WhatsappSession resources.
    Cluster(ClusterArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Helm release name: this gateway's Lease is `<release>-gateway-<ordinal of POD_NAME>`.
    #[arg(long, env = "WA_RELEASE", default_value = "wa")]
    pub release: String,
    /// Namespace of the gateway Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    #[arg(long, env = "WA_LEASE_DURATION_S", default_value_t = 15)]
    pub lease_duration_s: u64,
    #[arg(long, env = "WA_LEASE_RENEW_MS", default_value_t = 5_000)]
    pub lease_renew_ms: u64,
    /// Status writes to the apiserver per second, for the whole gateway.
    #[arg(long, env = "WA_STATUS_QPS", default_value_t = 50)]
    pub status_qps: u32,
    /// On SIGTERM, how long to wait for the operator to move this shard's sessions away.
    #[arg(long, env = "WA_DRAIN_TIMEOUT_S", default_value_t = 20)]
    pub drain_timeout_s: u64,
    #[arg(long, env = "WA_SIM_SEED", default_value_t = 1)]
    pub sim_seed: u64,
    #[arg(long, env = "WA_SIM_MEAN_CONNECTED_S", default_value_t = 1800)]
    pub sim_mean_connected_s: u64,
    #[arg(long, env = "WA_SIM_UNPAIRED_SHARE", default_value_t = 0.0)]
    pub sim_unpaired_share: f64,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args, Debug, Clone)]
pub struct StandaloneArgs {
    /// Run this many simulated sessions (the `sim` driver).
    #[arg(long, env = "WA_SIMULATE", default_value_t = 0)]
    pub simulate: usize,
    /// Seed of the simulator (same seed, same event sequence).
    #[arg(long, env = "WA_SIM_SEED", default_value_t = 1)]
    pub sim_seed: u64,
    /// Simulator: mean time a connected session stays up before it drops, seconds.
    #[arg(long, env = "WA_SIM_MEAN_CONNECTED_S", default_value_t = 1800)]
    pub sim_mean_connected_s: u64,
    /// Simulator: share of sessions that start awaiting a QR scan.
    #[arg(long, env = "WA_SIM_UNPAIRED_SHARE", default_value_t = 0.2)]
    pub sim_unpaired_share: f64,
    /// `whatsapp` driver: ids of the sessions to run (comma-separated in the variable).
    #[arg(long = "session", env = "WA_SESSIONS", value_delimiter = ',')]
    pub sessions: Vec<String>,
    /// Sessions to run from `WhatsappSession` manifests (the YAML `kubectl apply` takes; several
    /// documents allowed). More can be created at run time with `POST /v1/sessions`.
    #[arg(long, env = "WA_SESSIONS_FILE")]
    pub sessions_file: Option<std::path::PathBuf>,
    /// Where a session's `webhook.secretRef` is read from, laid out as a mounted Secret:
    /// `<dir>/<name>/<key>`. Without it only unsigned webhooks are accepted.
    #[arg(long, env = "WA_SECRETS_DIR")]
    pub secrets_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Port of the HTTP server (/metrics, /healthz, /readyz, /v1).
    #[arg(long, env = "WA_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Address to bind the HTTP server to.
    #[arg(long, env = "WA_BIND", default_value = "0.0.0.0")]
    pub bind: String,
    /// Redis URL (`redis://host:6379`); without it everything is kept in memory.
    #[arg(long, env = "WA_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Base URL of the backend (e.g. `https://app.example.com/api`); without it batches are logged.
    #[arg(long, env = "WA_BACKEND_URL")]
    pub backend_url: Option<String>,
    /// HMAC-SHA256 secret to sign backend requests with.
    #[arg(long, env = "WA_BACKEND_SECRET", hide_env_values = true)]
    pub backend_secret: Option<String>,
    #[arg(long, env = "WA_QR_BATCH_PATH", default_value = "/qr/batch")]
    pub qr_batch_path: String,
    #[arg(
        long,
        env = "WA_STATUS_BATCH_PATH",
        default_value = "/whatsapp/status/batch"
    )]
    pub status_batch_path: String,
    /// Use the legacy one-item endpoints instead of the batch endpoints.
    #[arg(long, env = "WA_LEGACY_ENDPOINTS", default_value_t = false)]
    pub legacy_endpoints: bool,
    #[arg(long, env = "WA_QR_PATH", default_value = "/qr")]
    pub qr_path: String,
    #[arg(long, env = "WA_STATUS_PATH", default_value = "/whatsapp/status")]
    pub status_path: String,
    /// How QR codes are sent: a PNG data URL (as the Node.js gateway) or the raw string.
    #[arg(long, env = "WA_QR_FORMAT", value_enum, default_value_t = QrFormat::Png)]
    pub qr_format: QrFormat,
    /// Batching policy: adaptive (default), seed (fixed 50 / 5 s / 500 ms) or naive (one request per event).
    #[arg(long, env = "WA_BATCH_POLICY", default_value = "adaptive")]
    pub batch_policy: String,
    /// Seed policy: items per batch.
    #[arg(long, env = "WA_BATCH_SIZE", default_value_t = 50)]
    pub batch_size: usize,
    /// Seed policy: flush interval of the QR and normal status lanes (ms).
    #[arg(long, env = "WA_BATCH_INTERVAL_MS", default_value_t = 5_000)]
    pub batch_interval_ms: u64,
    /// Seed policy: flush interval of the high-priority status lane (ms).
    #[arg(long, env = "WA_PRIORITY_INTERVAL_MS", default_value_t = 500)]
    pub priority_interval_ms: u64,
    /// Adaptive policy: longest a QR code waits before it is sent (ms).
    #[arg(long, env = "WA_QR_MAX_DELAY_MS")]
    pub qr_max_delay_ms: Option<u64>,
    /// Adaptive policy: most items in one request.
    #[arg(long, env = "WA_MAX_BATCH_ITEMS")]
    pub max_batch_items: Option<usize>,
    #[arg(long, env = "WA_REQUEST_TIMEOUT_MS", default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    #[arg(long, env = "WA_CONNECT_TIMEOUT_MS", default_value_t = 2_000)]
    pub connect_timeout_ms: u64,
    /// Quick attempts before a failing batch is spilled to the retry stream.
    #[arg(long, env = "WA_RETRY_ATTEMPTS", default_value_t = 3)]
    pub retry_attempts: usize,
    /// Token bucket toward the backend: requests per second.
    #[arg(long, env = "WA_RATE_LIMIT_RPS", default_value_t = 200)]
    pub rate_limit_rps: u32,
    /// Token bucket toward the backend: burst.
    #[arg(long, env = "WA_RATE_LIMIT_BURST", default_value_t = 50)]
    pub rate_limit_burst: u32,
    /// Every session's current status is re-sent this often (level-triggered repair), seconds; 0 = off.
    #[arg(long, env = "WA_RESYNC_INTERVAL_S", default_value_t = 300)]
    pub resync_interval_s: u64,
    /// Name of this gateway (its spill streams are keyed by it). In Kubernetes, the pod name.
    #[arg(long, env = "POD_NAME", default_value = "standalone")]
    pub identity: String,
    /// Log format: json (default) or text.
    #[arg(long, env = "WA_LOG_FORMAT", default_value = "json")]
    pub log_format: String,
    /// Bearer token required by the `/v1` API; without it the API is open (metrics and health
    /// endpoints are always open).
    #[arg(long, env = "WA_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Cache: time an entry stays in the in-process tier, seconds.
    #[arg(long, env = "WA_CACHE_LOCAL_TTL_S", default_value_t = 30)]
    pub cache_local_ttl_s: u64,
    /// Cache: time a "no such session" answer stays in the in-process tier, ms.
    #[arg(long, env = "WA_CACHE_NEGATIVE_TTL_MS", default_value_t = 5_000)]
    pub cache_negative_ttl_ms: u64,
    /// Cache: TTL of the session keys in Redis, seconds.
    #[arg(long, env = "WA_CACHE_REDIS_TTL_S", default_value_t = 120)]
    pub cache_redis_ttl_s: u64,
    /// Cache: most entries in the in-process tier.
    #[arg(long, env = "WA_CACHE_LOCAL_CAPACITY", default_value_t = 100_000)]
    pub cache_local_capacity: u64,
    /// Backend path of the session lookup fallback, `{id}` replaced by the session id (e.g.
    /// `/whatsapp/session/{id}`); needs --backend-url. Without it, unknown sessions are unknown.
    #[arg(long, env = "WA_SESSION_LOOKUP_PATH")]
    pub session_lookup_path: Option<String>,
    /// TTL of each session's ownership lock in Redis, ms; renewed every third of it. A gateway
    /// that stops renewing (dead, frozen, cut off) loses its sessions to another after this long.
    #[arg(long, env = "WA_LOCK_TTL_MS", default_value_t = 10_000)]
    pub lock_ttl_ms: u64,
    /// Most session connection attempts (lock, credentials, connect) in progress at once.
    #[arg(long, env = "WA_MAX_CONNECT_ATTEMPTS", default_value_t = 64)]
    pub max_connect_attempts: usize,
    /// Session driver: `sim` (simulated sessions, no WhatsApp) or `whatsapp` (real sessions on
    /// whatsapp-rust; the Helm chart's default).
    #[arg(long, env = "WA_DRIVER", default_value = "sim")]
    pub driver: String,
    /// `whatsapp` driver: WebSocket URL of the chat server; WhatsApp's own when unset.
    #[arg(long, env = "WA_WHATSAPP_URL")]
    pub whatsapp_url: Option<String>,
    /// `whatsapp` driver: client version to announce (`2.3000.1023456789`); fetched from
    /// WhatsApp at each start when unset.
    #[arg(long, env = "WA_WHATSAPP_VERSION")]
    pub whatsapp_version: Option<String>,
}

/// Which driver runs the sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverChoice {
    Sim,
    /// Real WhatsApp sessions: chat server URL (`None` = WhatsApp's) and client version (`None` =
    /// fetched at start).
    Whatsapp {
        url: Option<String>,
        version: Option<(u32, u32, u32)>,
    },
}

fn parse_version(field: &'static str, text: &str) -> Result<(u32, u32, u32)> {
    let parts: Vec<&str> = text.split('.').collect();
    let parsed: Option<Vec<u32>> = parts.iter().map(|p| p.parse().ok()).collect();
    match parsed.as_deref() {
        Some(&[a, b, c]) => Ok((a, b, c)),
        _ => Err(Error::config(
            field,
            format!("`{text}` must be three dot-separated numbers, e.g. 2.3000.1023456789"),
        )),
    }
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub redis_url: Option<String>,
    pub backend: Option<BackendSettings>,
    /// Paths, timeouts and legacy mode for per-session webhooks (`spec.webhook`).
    pub webhook_endpoints: BackendSettings,
    pub delivery: DeliverySettings,
    pub batch: BatchConfig,
    pub resync_interval: Option<Duration>,
    pub identity: String,
    pub log_json: bool,
    pub api_token: Option<String>,
    pub cache: crate::cache::CacheSettings,
    /// Backend path of the session lookup fallback (`{id}` = session id).
    pub session_lookup_path: Option<String>,
    /// TTL of the session ownership locks.
    pub lock_ttl: Duration,
    pub max_connect_attempts: usize,
    pub driver: DriverChoice,
}

fn positive_ms(field: &'static str, ms: u64) -> Result<Duration> {
    if ms == 0 {
        return Err(Error::config(field, "must be greater than 0"));
    }
    Ok(Duration::from_millis(ms))
}

fn path(field: &'static str, value: &str) -> Result<String> {
    if !value.starts_with('/') {
        return Err(Error::config(
            field,
            format!("`{value}` must start with `/`"),
        ));
    }
    Ok(value.to_string())
}

/// The Redis URL schemes fred speaks (the `s` forms over TLS).
pub const REDIS_SCHEMES: [&str; 6] = [
    "redis",
    "rediss",
    "redis-cluster",
    "rediss-cluster",
    "redis-sentinel",
    "rediss-sentinel",
];

/// A secret as configured, without surrounding whitespace: a Kubernetes Secret made from a file
/// usually ends in a newline, and the backend (Laravel's `trim`) compares the trimmed value.
/// Set but blank is an error: it is almost always a Secret key or a shell variable that came out
/// empty, and taking it for "none" would open the API or send unsigned requests unannounced.
fn trimmed_secret(value: Option<&str>, field: &'static str) -> Result<Option<String>> {
    match value.map(str::trim) {
        None => Ok(None),
        Some("") => Err(Error::config(
            field,
            "is set but empty; unset it to run without one",
        )),
        Some(secret) => Ok(Some(secret.to_owned())),
    }
}

/// `url` with any password replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The userinfo ends at the last `@` before the first `/` of the path.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let redacted = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        // redis://secret@host: a lone userinfo is Redis's password.
        None => "***".to_string(),
    };
    format!("{scheme}://{redacted}{}", &rest[at..])
}

impl CommonArgs {
    pub fn validate(&self) -> Result<Settings> {
        // Checking a rediss:// URL builds its TLS client configuration.
        crate::install_crypto_provider();
        let ip: std::net::IpAddr = self
            .bind
            .parse()
            .map_err(|e| Error::config("--bind / WA_BIND", format!("`{}`: {e}", self.bind)))?;
        let redis_url = match &self.redis_url {
            Some(url) if url.trim().is_empty() => None,
            Some(url) => {
                let scheme = url.split("://").next().unwrap_or_default();
                if !REDIS_SCHEMES.contains(&scheme) {
                    return Err(Error::config(
                        "--redis-url / WA_REDIS_URL",
                        format!(
                            "`{}` must start with one of {}",
                            redact_url(url),
                            REDIS_SCHEMES.map(|s| format!("{s}://")).join(", ")
                        ),
                    ));
                }
                fred::prelude::Config::from_url(url).map_err(|e| {
                    Error::config(
                        "--redis-url / WA_REDIS_URL",
                        format!("`{}`: {e}", redact_url(url)),
                    )
                })?;
                Some(url.clone())
            }
            None => None,
        };
        // Paths, timeouts and legacy mode apply to the backend and to every per-session webhook
        // (which only overrides the base URL and the key), so they are checked with or without
        // a backend URL.
        let endpoints = BackendSettings {
            base_url: reqwest::Url::parse("http://backend.invalid/").expect("valid URL"),
            qr_batch_path: path("--qr-batch-path / WA_QR_BATCH_PATH", &self.qr_batch_path)?,
            status_batch_path: path(
                "--status-batch-path / WA_STATUS_BATCH_PATH",
                &self.status_batch_path,
            )?,
            legacy: self.legacy_endpoints,
            qr_path: path("--qr-path / WA_QR_PATH", &self.qr_path)?,
            status_path: path("--status-path / WA_STATUS_PATH", &self.status_path)?,
            secret: None,
            request_timeout: positive_ms(
                "--request-timeout-ms / WA_REQUEST_TIMEOUT_MS",
                self.request_timeout_ms,
            )?,
            connect_timeout: positive_ms(
                "--connect-timeout-ms / WA_CONNECT_TIMEOUT_MS",
                self.connect_timeout_ms,
            )?,
        };
        let backend = match &self.backend_url {
            Some(url) if url.trim().is_empty() => None,
            Some(url) => {
                let base_url = reqwest::Url::parse(url).map_err(|e| {
                    Error::config(
                        "--backend-url / WA_BACKEND_URL",
                        format!("`{}`: {e}", redact_url(url)),
                    )
                })?;
                if !matches!(base_url.scheme(), "http" | "https") {
                    return Err(Error::config(
                        "--backend-url / WA_BACKEND_URL",
                        format!("`{}` must be http or https", redact_url(url)),
                    ));
                }
                Some(BackendSettings {
                    base_url,
                    secret: trimmed_secret(
                        self.backend_secret.as_deref(),
                        "--backend-secret / WA_BACKEND_SECRET",
                    )?,
                    ..endpoints.clone()
                })
            }
            None => None,
        };
        let policy = match self.batch_policy.as_str() {
            "adaptive" => BatchPolicy::Adaptive,
            "seed" => BatchPolicy::Seed,
            "naive" => BatchPolicy::Naive,
            other => {
                return Err(Error::config(
                    "--batch-policy / WA_BATCH_POLICY",
                    format!("`{other}` is not one of adaptive, seed, naive"),
                ));
            }
        };
        let mut batch = BatchConfig::for_policy(policy);
        if !(1..=10_000).contains(&self.batch_size) {
            return Err(Error::config(
                "--batch-size / WA_BATCH_SIZE",
                "must be between 1 and 10000",
            ));
        }
        batch.batch_size = self.batch_size;
        batch.batch_interval = positive_ms(
            "--batch-interval-ms / WA_BATCH_INTERVAL_MS",
            self.batch_interval_ms,
        )?;
        batch.priority_interval = positive_ms(
            "--priority-interval-ms / WA_PRIORITY_INTERVAL_MS",
            self.priority_interval_ms,
        )?;
        if let Some(ms) = self.qr_max_delay_ms {
            batch.qr_max_delay = positive_ms("--qr-max-delay-ms / WA_QR_MAX_DELAY_MS", ms)?;
        }
        if let Some(n) = self.max_batch_items {
            if !(1..=10_000).contains(&n) {
                return Err(Error::config(
                    "--max-batch-items / WA_MAX_BATCH_ITEMS",
                    "must be between 1 and 10000",
                ));
            }
            batch.max_batch_items = n;
        }
        batch.validate().map_err(|e| match e {
            crate::batch::BatchError::InvalidConfig { field, reason } => {
                Error::config(field, reason)
            }
            other => Error::config("batch", other.to_string()),
        })?;
        if self.retry_attempts == 0 || self.retry_attempts > 20 {
            return Err(Error::config(
                "--retry-attempts / WA_RETRY_ATTEMPTS",
                "must be between 1 and 20",
            ));
        }
        if self.rate_limit_rps == 0 {
            return Err(Error::config(
                "--rate-limit-rps / WA_RATE_LIMIT_RPS",
                "must be greater than 0",
            ));
        }
        if self.rate_limit_burst == 0 {
            return Err(Error::config(
                "--rate-limit-burst / WA_RATE_LIMIT_BURST",
                "must be greater than 0",
            ));
        }
        if self.identity.is_empty() || self.identity.contains(['{', '}', ' ']) {
            return Err(Error::config(
                "--identity / POD_NAME",
                "must be non-empty without spaces or braces",
            ));
        }
        let log_json = match self.log_format.as_str() {
            "json" => true,
            "text" => false,
            other => {
                return Err(Error::config(
                    "--log-format / WA_LOG_FORMAT",
                    format!("`{other}` is not json or text"),
                ));
            }
        };
        let cache = self.cache_settings()?;
        let session_lookup_path = match &self.session_lookup_path {
            Some(p) if p.trim().is_empty() => None,
            Some(p) => {
                let p = path("--session-lookup-path / WA_SESSION_LOOKUP_PATH", p)?;
                if !p.contains("{id}") {
                    return Err(Error::config(
                        "--session-lookup-path / WA_SESSION_LOOKUP_PATH",
                        format!("`{p}` must contain `{{id}}`"),
                    ));
                }
                if backend.is_none() {
                    return Err(Error::config(
                        "--session-lookup-path / WA_SESSION_LOOKUP_PATH",
                        "needs --backend-url / WA_BACKEND_URL",
                    ));
                }
                Some(p)
            }
            None => None,
        };
        Ok(Settings {
            api_token: trimmed_secret(self.api_token.as_deref(), "--api-token / WA_API_TOKEN")?,
            cache,
            session_lookup_path,
            listen: SocketAddr::new(ip, self.port),
            redis_url,
            backend,
            webhook_endpoints: endpoints,
            delivery: DeliverySettings {
                qr_format: self.qr_format,
                retry: RetryPolicy {
                    hot_attempts: self.retry_attempts,
                    ..RetryPolicy::default()
                },
                rate_limit_per_second: self.rate_limit_rps,
                rate_limit_burst: self.rate_limit_burst,
                ..DeliverySettings::default()
            },
            batch,
            resync_interval: (self.resync_interval_s > 0)
                .then(|| Duration::from_secs(self.resync_interval_s)),
            identity: self.identity.clone(),
            log_json,
            lock_ttl: self.lock_ttl()?,
            max_connect_attempts: self.max_connect_attempts()?,
            driver: self.driver_choice()?,
        })
    }

    fn driver_choice(&self) -> Result<DriverChoice> {
        const DRIVER: &str = "--driver / WA_DRIVER";
        match self.driver.as_str() {
            "sim" => Ok(DriverChoice::Sim),
            "whatsapp" if !cfg!(feature = "whatsapp") => Err(Error::config(
                DRIVER,
                "this build has no whatsapp driver (cargo feature `whatsapp`)",
            )),
            "whatsapp" => {
                let url = match &self.whatsapp_url {
                    Some(u) if u.trim().is_empty() => None,
                    Some(u) if u.starts_with("ws://") || u.starts_with("wss://") => Some(u.clone()),
                    Some(u) => {
                        return Err(Error::config(
                            "--whatsapp-url / WA_WHATSAPP_URL",
                            format!("`{u}` must be a ws:// or wss:// URL"),
                        ));
                    }
                    None => None,
                };
                let version = match &self.whatsapp_version {
                    Some(v) if v.trim().is_empty() => None,
                    Some(v) => Some(parse_version(
                        "--whatsapp-version / WA_WHATSAPP_VERSION",
                        v,
                    )?),
                    None => None,
                };
                Ok(DriverChoice::Whatsapp { url, version })
            }
            other => Err(Error::config(
                DRIVER,
                format!("`{other}` is not one of sim, whatsapp"),
            )),
        }
    }

    fn lock_ttl(&self) -> Result<Duration> {
        if !(300..=600_000).contains(&self.lock_ttl_ms) {
            return Err(Error::config(
                "--lock-ttl-ms / WA_LOCK_TTL_MS",
                "must be between 300 and 600000",
            ));
        }
        Ok(Duration::from_millis(self.lock_ttl_ms))
    }

    fn max_connect_attempts(&self) -> Result<usize> {
        if !(1..=10_000).contains(&self.max_connect_attempts) {
            return Err(Error::config(
                "--max-connect-attempts / WA_MAX_CONNECT_ATTEMPTS",
                "must be between 1 and 10000",
            ));
        }
        Ok(self.max_connect_attempts)
    }
}

impl CommonArgs {
    fn cache_settings(&self) -> Result<crate::cache::CacheSettings> {
        if self.cache_local_ttl_s == 0 || self.cache_local_ttl_s > 3_600 {
            return Err(Error::config(
                "--cache-local-ttl-s / WA_CACHE_LOCAL_TTL_S",
                "must be between 1 and 3600",
            ));
        }
        if self.cache_redis_ttl_s < self.cache_local_ttl_s || self.cache_redis_ttl_s > 86_400 {
            return Err(Error::config(
                "--cache-redis-ttl-s / WA_CACHE_REDIS_TTL_S",
                "must be at least the local TTL and at most 86400",
            ));
        }
        let negative_ttl = positive_ms(
            "--cache-negative-ttl-ms / WA_CACHE_NEGATIVE_TTL_MS",
            self.cache_negative_ttl_ms,
        )?;
        if self.cache_local_capacity == 0 {
            return Err(Error::config(
                "--cache-local-capacity / WA_CACHE_LOCAL_CAPACITY",
                "must be greater than 0",
            ));
        }
        let redis_ttl = Duration::from_secs(self.cache_redis_ttl_s);
        Ok(crate::cache::CacheSettings {
            local_ttl: Duration::from_secs(self.cache_local_ttl_s),
            negative_ttl,
            redis_ttl,
            local_capacity: self.cache_local_capacity,
            // A third of the TTL: two refreshes may fail before a live session's keys expire.
            refresh_interval: redis_ttl / 3,
            ..crate::cache::CacheSettings::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("redis://:s3cret@redis:6379/0"),
            "redis://:***@redis:6379/0"
        );
        assert_eq!(
            redact_url("rediss://user:p@ss@host:6380"),
            "rediss://user:***@host:6380"
        );
        assert_eq!(redact_url("redis://token@host"), "redis://***@host");
        assert_eq!(
            redact_url("https://app.example.com/api?x=a@b"),
            "https://app.example.com/api?x=a@b"
        );
        assert_eq!(redact_url("redis://redis:6379"), "redis://redis:6379");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn secrets_are_trimmed_and_blank_means_none() {
        assert_eq!(
            trimmed_secret(Some("s3cret\n"), "f").unwrap(),
            Some("s3cret".into())
        );
        assert!(
            trimmed_secret(Some("  \n"), "--api-token / WA_API_TOKEN")
                .unwrap_err()
                .to_string()
                .contains("--api-token / WA_API_TOKEN")
        );
        assert_eq!(trimmed_secret(None, "f").unwrap(), None);
    }

    #[test]
    fn tls_cluster_and_sentinel_redis_urls_are_accepted_and_others_named() {
        for url in [
            "rediss-cluster://h:30001?node=h2:30002",
            "rediss-sentinel://h:26379/0?sentinelServiceName=main&node=h2:26379",
        ] {
            let parsed = parse(&["--redis-url", url]);
            assert!(parsed.is_ok(), "{url}: {parsed:?}");
        }
        let err = parse(&["--redis-url", "memcached://:pw@h:1"]).unwrap_err();
        assert!(
            err.contains("WA_REDIS_URL") && err.contains(":***@"),
            "{err}"
        );
        assert!(!err.contains("pw"), "{err}");
    }

    fn parse(args: &[&str]) -> std::result::Result<Settings, String> {
        let cli = Cli::try_parse_from(["gateway", "standalone"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        let Mode::Standalone(a) = cli.mode else {
            unreachable!("parsed a standalone command line")
        };
        a.common.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_embedded_standalone_setup() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.listen.port(), DEFAULT_PORT);
        assert!(s.redis_url.is_none() && s.backend.is_none());
        assert_eq!(s.batch.policy, BatchPolicy::Adaptive);
        assert_eq!(s.batch.batch_size, 50);
        assert_eq!(s.resync_interval, Some(Duration::from_secs(300)));
        assert_eq!(s.cache.local_ttl, Duration::from_secs(30));
        assert_eq!(s.cache.redis_ttl, Duration::from_secs(120));
        assert_eq!(s.cache.negative_ttl, Duration::from_secs(5));
        assert!(s.api_token.is_none() && s.session_lookup_path.is_none());
        assert_eq!(s.driver, DriverChoice::Sim);
    }

    #[cfg(feature = "whatsapp")]
    #[test]
    fn the_whatsapp_driver_takes_a_server_and_a_version() {
        let s = parse(&[
            "--driver",
            "whatsapp",
            "--whatsapp-url",
            "ws://127.0.0.1:9/ws",
            "--whatsapp-version",
            "2.3000.1023456789",
        ])
        .unwrap();
        assert_eq!(
            s.driver,
            DriverChoice::Whatsapp {
                url: Some("ws://127.0.0.1:9/ws".into()),
                version: Some((2, 3000, 1_023_456_789)),
            }
        );
    }

    #[test]
    fn invalid_values_name_their_field() {
        for (args, field) in [
            (&["--backend-url", "not a url"][..], "WA_BACKEND_URL"),
            (&["--backend-url", "ftp://x"][..], "WA_BACKEND_URL"),
            (&["--redis-url", "mysql://x"][..], "WA_REDIS_URL"),
            (&["--batch-policy", "fast"][..], "WA_BATCH_POLICY"),
            (&["--batch-size", "0"][..], "WA_BATCH_SIZE"),
            (
                &["--priority-interval-ms", "0"][..],
                "WA_PRIORITY_INTERVAL_MS",
            ),
            (
                &["--backend-url", "http://x", "--qr-batch-path", "qr"][..],
                "WA_QR_BATCH_PATH",
            ),
            (&["--bind", "localhost:80"][..], "WA_BIND"),
            (&["--log-format", "xml"][..], "WA_LOG_FORMAT"),
            (&["--lock-ttl-ms", "100"][..], "WA_LOCK_TTL_MS"),
            (&["--api-token", " "][..], "WA_API_TOKEN"),
            (
                &["--backend-url", "http://x", "--backend-secret", ""][..],
                "WA_BACKEND_SECRET",
            ),
            (
                &["--max-connect-attempts", "0"][..],
                "WA_MAX_CONNECT_ATTEMPTS",
            ),
            (&["--cache-local-ttl-s", "0"][..], "WA_CACHE_LOCAL_TTL_S"),
            (
                &["--cache-local-ttl-s", "60", "--cache-redis-ttl-s", "30"][..],
                "WA_CACHE_REDIS_TTL_S",
            ),
            (
                &["--cache-negative-ttl-ms", "0"][..],
                "WA_CACHE_NEGATIVE_TTL_MS",
            ),
            (
                &["--session-lookup-path", "/s/{id}"][..],
                "WA_SESSION_LOOKUP_PATH",
            ),
            (
                &["--backend-url", "http://x", "--session-lookup-path", "/s"][..],
                "WA_SESSION_LOOKUP_PATH",
            ),
            (&["--driver", "baileys"][..], "WA_DRIVER"),
            (
                &["--driver", "whatsapp", "--whatsapp-url", "http://x"][..],
                "WA_WHATSAPP_URL",
            ),
            (
                &["--driver", "whatsapp", "--whatsapp-version", "2.3000"][..],
                "WA_WHATSAPP_VERSION",
            ),
        ] {
            let err = parse(args).expect_err(&format!("{args:?} must be refused"));
            assert!(err.contains(field), "{args:?}: `{err}` should name {field}");
        }
    }

    #[test]
    fn seed_knobs_are_applied() {
        let s = parse(&[
            "--batch-policy",
            "seed",
            "--batch-size",
            "100",
            "--batch-interval-ms",
            "3000",
        ])
        .unwrap();
        assert_eq!(s.batch.policy, BatchPolicy::Seed);
        assert_eq!(s.batch.batch_size, 100);
        assert_eq!(s.batch.batch_interval, Duration::from_secs(3));
    }
}
