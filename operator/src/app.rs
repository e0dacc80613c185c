//! Config, leader election, HTTP (`/metrics`, `/healthz`, `/readyz`) and the placement loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use prometheus_client::registry::Registry;

use crate::metrics::OperatorMetrics;
use crate::placement::{self, PlacementSettings};
use crate::{Error, Result};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "operator",
    version,
    about = "Assigns WhatsappSessions to gateway shards"
)]
pub struct Args {
    /// Helm release name: gateway Leases are `<release>-gateway-<k>`.
    #[arg(long, env = "WA_RELEASE", default_value = "wa")]
    pub release: String,
    /// Namespace of the gateway Leases and of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Identity in leader election (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "operator")]
    pub identity: String,
    /// Load slack of the assignment: no shard above ceil((1+eps) * mean).
    #[arg(long, env = "WA_EPSILON", default_value_t = crate::assign::DEFAULT_EPSILON)]
    pub epsilon: f64,
    #[arg(long, env = "WA_PORT", default_value_t = 8080)]
    pub port: u16,
    #[arg(long, env = "WA_BIND", default_value = "0.0.0.0")]
    pub bind: String,
    /// Placement runs at least this often (ms), since Lease expiry is a matter of time.
    #[arg(long, env = "WA_RESYNC_MS", default_value_t = 2_000)]
    pub resync_ms: u64,
    /// Redis URL, used to wipe a deleted session's credentials when no gateway does.
    #[arg(long, env = "WA_REDIS_URL")]
    pub redis_url: Option<String>,
    /// How long a deleted session waits for its gateway to log out before the operator wipes it.
    #[arg(long, env = "WA_CLEANUP_TIMEOUT_S", default_value_t = 30)]
    pub cleanup_timeout_s: u64,
    /// Log format: json or text.
    #[arg(long, env = "WA_LOG_FORMAT", default_value = "json")]
    pub log_format: String,
}

impl Args {
    pub fn placement(&self) -> Result<PlacementSettings> {
        if !self.epsilon.is_finite() || self.epsilon < 0.0 {
            return Err(Error::Config {
                field: "--epsilon / WA_EPSILON",
                reason: "must be a number >= 0".into(),
            });
        }
        if self.resync_ms == 0 {
            return Err(Error::Config {
                field: "--resync-ms / WA_RESYNC_MS",
                reason: "must be greater than 0".into(),
            });
        }
        if self.cleanup_timeout_s == 0 {
            // 0 would wipe a deleted session's credentials at once, before its gateway could
            // log it out: the device would stay linked on the phone.
            return Err(Error::Config {
                field: "--cleanup-timeout-s / WA_CLEANUP_TIMEOUT_S",
                reason:
                    "must be greater than 0 (the time a gateway gets to log a deleted session out)"
                        .into(),
            });
        }
        if self.release.is_empty() {
            return Err(Error::Config {
                field: "--release / WA_RELEASE",
                reason: "must not be empty".into(),
            });
        }
        Ok(PlacementSettings {
            release: self.release.clone(),
            lease_namespace: self.namespace.clone(),
            epsilon: self.epsilon,
            resync: Duration::from_millis(self.resync_ms),
            debounce: Duration::from_millis(200),
            cleanup_timeout: Duration::from_secs(self.cleanup_timeout_s),
            redis: None,
            recorder: None,
            lease_sight: Default::default(),
        })
    }
}

#[derive(Clone)]
struct HttpState {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Runs the operator until SIGTERM / ctrl-c.
pub async fn run(args: Args) -> Result<()> {
    let settings = args.placement()?;
    let json_logs = match args.log_format.as_str() {
        "json" => true,
        "text" => false,
        other => {
            return Err(crate::Error::Config {
                field: "--log-format / WA_LOG_FORMAT",
                reason: format!("`{other}` is not one of json, text"),
            });
        }
    };
    init_logging(json_logs);
    let client = kube::Client::try_default().await?;
    let mut settings = settings;
    settings.recorder = Some(Arc::new(kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "whatsapp-operator".into(),
            instance: Some(args.identity.clone()),
        },
    )));
    if let Some(url) = args.redis_url.as_deref().filter(|u| !u.is_empty()) {
        use fred::prelude::*;
        let config = Config::from_url(url).map_err(|e| crate::Error::Config {
            field: "--redis-url / WA_REDIS_URL",
            // Not the URL itself: it may carry the password.
            reason: e.to_string(),
        })?;
        let redis = Builder::from_config(config)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build()
            .map_err(|e| crate::Error::Config {
                field: "--redis-url / WA_REDIS_URL",
                reason: e.to_string(),
            })?;
        if let Err(err) = redis.init().await {
            tracing::warn!(%err, "Redis not reachable yet; reconnecting in the background");
        }
        settings.redis = Some(redis);
    }
    let mut registry = Registry::default();
    let metrics = Arc::new(OperatorMetrics::register(&mut registry));
    let ready = Arc::new(AtomicBool::new(false));
    let state = HttpState {
        registry: Arc::new(registry),
        ready: ready.clone(),
    };
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    let bind: std::net::IpAddr = args.bind.parse().map_err(|e| Error::Config {
        field: "--bind / WA_BIND",
        reason: format!("{e}"),
    })?;
    let listener = tokio::net::TcpListener::bind((bind, args.port)).await?;
    tracing::info!(listen = %listener.local_addr()?, "operator listening (/metrics, /healthz, /readyz)");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    // Leader election: only the leader places sessions. The lease manager's watch task ends on
    // API errors (an apiserver restart, say): then placement stops and a new manager is built,
    // instead of the operator exiting.
    let lease_name = format!("{}-operator-leader", args.release);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut placement_task: Option<tokio::task::JoinHandle<Result<()>>> = None;
    ready.store(true, Ordering::Relaxed);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    'elections: loop {
        let manager = match LeaseManagerBuilder::new(client.clone(), &lease_name)
            .with_namespace(&args.namespace)
            .with_create_mode(kube_lease_manager::LeaseCreateMode::AutoCreate)
            .with_parameters(
                LeaseParams::new(&args.identity, 15, 5)
                    .with_field_manager("whatsapp-operator-leader"),
            )
            .build()
            .await
        {
            Ok(manager) => manager,
            Err(err) => {
                tracing::warn!(%err, "leader election unavailable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'elections,
                    _ = &mut shutdown => break 'elections,
                }
            }
        };
        let (mut leading, lease_task) = manager.watch().await;
        loop {
            let is_leader = *leading.borrow_and_update();
            metrics.is_leader.set(is_leader as i64);
            match (is_leader, placement_task.is_some()) {
                (true, false) => {
                    tracing::info!(identity = %args.identity, "became leader: placing sessions");
                    let _ = stop_tx.send(false);
                    placement_task = Some(tokio::spawn(placement::run(
                        client.clone(),
                        settings.clone(),
                        metrics.clone(),
                        stop_rx.clone(),
                    )));
                }
                (false, true) => {
                    tracing::warn!("lost leadership: stopping placement");
                    let _ = stop_tx.send(true);
                    if let Some(task) = placement_task.take() {
                        let _ = task.await;
                    }
                }
                _ => {}
            }
            tokio::select! {
                changed = leading.changed() => if changed.is_err() {
                    // The manager's task ended: leadership is unknown, so stop placing.
                    tracing::warn!("leader election task ended; stopping placement and electing again");
                    let _ = stop_tx.send(true);
                    if let Some(task) = placement_task.take() {
                        let _ = task.await;
                    }
                    metrics.is_leader.set(0);
                    let _ = lease_task.await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue 'elections;
                },
                _ = &mut shutdown => {
                    let _ = stop_tx.send(true);
                    if let Some(task) = placement_task.take() {
                        let _ = task.await;
                    }
                    drop(leading);
                    if let Ok(Ok(manager)) = lease_task.await {
                        let _ = manager.release().await;
                    }
                    break 'elections;
                }
            }
        }
    }
    tracing::info!("operator stopped");
    Ok(())
}

async fn render_metrics(State(state): State<HttpState>) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &state.registry);
    out
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
