//! The gateway's HTTP server (axum): `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;

use crate::delivery::Delivery;

#[derive(Clone)]
pub struct HttpState {
    pub registry: Arc<Registry>,
    pub redis: Option<fred::clients::Client>,
    pub delivery: Delivery,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::render(&state.registry),
    )
        .into_response()
}

/// The checks `/readyz` makes, by the names `?exclude=` takes.
const READINESS_CHECKS: [&str; 2] = ["redis", "backend"];

/// Ready when Redis (if configured) answers and the backend's last answer was not a failure.
/// A degraded gateway keeps working (memory spill, local state), but says so here.
///
/// `?exclude=redis&exclude=backend` leaves checks out of the answer's code (the body still
/// reports them), as kube-apiserver's `/readyz?exclude=` does. The chart's readiness probe
/// excludes both: every gateway shares one Redis and one backend, so failing the probe in their
/// outage would only empty the Service (the `/v1` API, which keeps answering from its cache) and
/// block node drains through the disruption budget, without routing anything to a healthier pod.
async fn readyz(State(state): State<HttpState>, uri: axum::http::Uri) -> Response {
    // Like kube-apiserver, anything else in the query (an unknown check, `verbose`) is ignored:
    // a probe must not fail for a parameter it did not need.
    let excluded: Vec<&str> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.strip_prefix("exclude="))
        .filter_map(|check| READINESS_CHECKS.iter().copied().find(|c| *c == check))
        .collect();
    let redis = match &state.redis {
        None => "not_configured",
        Some(client) if crate::redis::is_up(client).await => "ok",
        Some(_) => "unreachable",
    };
    let backend = if state.delivery.backend_healthy() {
        "ok"
    } else {
        "failing"
    };
    let ready = (redis != "unreachable" || excluded.contains(&"redis"))
        && (backend == "ok" || excluded.contains(&"backend"));
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "degraded" },
        "redis": redis,
        "backend": backend,
        "spillBacklog": state.delivery.backlog(),
        "deadLetters": state.delivery.dead_letters(),
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}
