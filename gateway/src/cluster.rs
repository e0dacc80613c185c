//! Cluster mode: the gateway as shard `<k>` of a StatefulSet, sessions from `WhatsappSession`
//! resources labelled for the shard (see [`crate::shard`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::{SHUTDOWN_GRACE, SessionStates, init_logging};
use crate::config::ClusterArgs;
use crate::informer::InformerLookup;
use crate::session::LoginDirectory;
use crate::session::any::AnyDriver;
use crate::session::sim::SimConfig;
use crate::session::supervisor::Supervisor;
use crate::shard::{ShardSettings, shard_of_pod};
use crate::{Error, Result};

pub async fn run_cluster(args: ClusterArgs) -> Result<()> {
    let settings = args.common.validate()?;
    init_logging(settings.log_json);
    let shard = shard_of_pod(&settings.identity).ok_or_else(|| {
        Error::config(
            "POD_NAME",
            format!(
                "`{}` must end in the StatefulSet ordinal, e.g. wa-gateway-2",
                settings.identity
            ),
        )
    })?;
    if args.status_qps == 0 {
        return Err(Error::config(
            "--status-qps / WA_STATUS_QPS",
            "must be at least 1 (status writes per second to the apiserver)",
        ));
    }
    if args.lease_renew_ms == 0 || args.lease_duration_s * 1000 <= args.lease_renew_ms {
        return Err(Error::config(
            "--lease-renew-ms / WA_LEASE_RENEW_MS",
            "must be > 0 and shorter than the lease duration",
        ));
    }
    let logins = LoginDirectory::default();
    let mut shard_settings = ShardSettings {
        release: args.release.clone(),
        namespace: args.namespace.clone(),
        pod: settings.identity.clone(),
        shard,
        lease_duration: Duration::from_secs(args.lease_duration_s),
        lease_renew: Duration::from_millis(args.lease_renew_ms),
        status_qps: args.status_qps,
        drain_timeout: Duration::from_secs(args.drain_timeout_s),
        logins: logins.clone(),
        names: None,
    };
    crate::app::announce_backend(&settings);
    let client = kube::Client::try_default().await?;
    let redis = match &settings.redis_url {
        Some(url) => Some(crate::redis::connect(url).await?),
        None => None,
    };
    let mut registry = crate::metrics::new_registry();
    let stop_background = CancellationToken::new();
    // The /v1 API answers for every session of the namespace, whichever shard runs it: owned
    // sessions from memory, others from the cache tiers, then from the informer store.
    let (informer, informer_task) =
        InformerLookup::spawn(client.clone(), None, stop_background.clone());
    shard_settings.names = Some(informer.clone());
    let manager = crate::manage::metered::Metered::new(
        crate::manage::kube::KubeSessions::new(
            client.clone(),
            args.namespace.clone(),
            informer.clone(),
            settings.api_token.is_some(),
        ),
        &mut registry,
    );
    let (pipeline, cache, cache_tasks) = crate::app::start_pipeline_with_cache(
        &settings,
        redis.as_ref(),
        Some(Arc::new(informer)),
        &mut registry,
        &stop_background,
    )
    .await?;
    let states: Arc<SessionStates> = pipeline.states.clone();
    // A session runs only while this gateway holds its Redis lock (fencing token): a shard that
    // lost its Lease but still runs cannot drive an account another shard took over.
    let options = crate::app::supervisor_options(&settings, redis.as_ref(), &mut registry);
    let sim_config = SimConfig {
        seed: args.sim_seed,
        mean_connected: Duration::from_secs(args.sim_mean_connected_s.max(1)),
        unpaired_share: args.sim_unpaired_share,
        ..SimConfig::default()
    };
    let driver = AnyDriver::new(
        &settings.driver,
        sim_config,
        options.credentials.clone(),
        redis.as_ref(),
        logins.clone(),
    )
    .map_err(|e| Error::config("--driver / WA_DRIVER, --sim-* / WA_SIM_*", e.to_string()))?;
    tracing::info!(driver = driver.name(), "session driver");
    let supervisor = Arc::new(Supervisor::with_options(
        Arc::new(driver),
        pipeline.event_sink(),
        options,
    ));

    let redis_for_shard = redis.clone();
    let http_state = crate::http::HttpState {
        registry: Arc::new(registry),
        redis,
        delivery: pipeline.delivery.clone(),
    };
    let api = crate::api::ApiState {
        cache,
        events: Some(pipeline.event_sink()),
        token: settings.api_token.as_deref().map(Arc::from),
        sessions: Some(Arc::new(manager)),
        webhooks: Some(pipeline.webhooks.clone()),
    };
    if api.token.is_none() {
        tracing::warn!("no API token (--api-token / WA_API_TOKEN): the /v1 API is open");
    }
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, shard = %shard_settings.shard, "gateway (cluster mode) listening (/metrics, /healthz, /readyz, /v1)");
    let stop_http = CancellationToken::new();
    let server = {
        let stop = stop_http.clone();
        let app = crate::http::router(http_state).merge(crate::api::router(api));
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        })
    };
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            crate::app::shutdown_signal().await;
            shutdown.cancel();
        });
    }
    crate::shard::run(
        client.clone(),
        redis_for_shard,
        shard_settings,
        supervisor,
        states,
        crate::secrets::WebhookRouting::new(
            pipeline.webhooks.clone(),
            crate::secrets::WebhookResolver::kube(client.clone()),
        ),
        shutdown,
    )
    .await?;
    // The HTTP server stops first: the API holds a pipeline sink, and the pipeline flushes only
    // once every sink is gone.
    stop_http.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    pipeline.shutdown(Vec::new(), SHUTDOWN_GRACE).await;
    stop_background.cancel();
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        futures::future::join_all(cache_tasks.into_iter().chain([informer_task])),
    )
    .await;
    tracing::info!("stopped");
    Ok(())
}
