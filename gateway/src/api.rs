//! The read API (`/v1`), answered by any gateway through the cache (see `docs/api.md`).
//!
//! - `GET /v1/sessions/{id}`: status JSON;
//! - `GET /v1/sessions/{id}/qr`: the latest unexpired QR as JSON, or PNG with `Accept: image/png`;
//! - `PUT /v1/sessions/{id}/status`: reports a status change through this gateway's event router,
//!   exactly as a session driver would (cache write-through, invalidation, backend delivery);
//! - `GET /v1/sessions`, `POST /v1/sessions`, `PATCH /v1/sessions/{id}`, `DELETE /v1/sessions/{id}`:
//!   session management (see [`crate::manage`]).
//!
//! With a token configured every `/v1` request needs `Authorization: Bearer <token>`.

use std::io::Cursor;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use chrono::{SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::json;

use crate::cache::{SessionCache, SessionView, valid_session_id};
use crate::events::{Priority, SessionStatus, StatusEvent};
use crate::manage::{Created, ManageError, SessionManager, SessionSpec};
use crate::session::EventSink;

#[derive(Clone)]
pub struct ApiState {
    pub cache: Arc<SessionCache>,
    /// Where `PUT .../status` reports changes; `None` disables the endpoint (405).
    pub events: Option<EventSink>,
    pub token: Option<Arc<str>>,
    /// Session management; `None` answers its endpoints with 405.
    pub sessions: Option<Arc<dyn SessionManager>>,
    /// Per-session webhooks this gateway routes to (`PUT .../status` checks them).
    pub webhooks: Option<Arc<crate::delivery::Webhooks>>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/sessions", get(list_sessions).post(create_session))
        .route(
            "/v1/sessions/{id}",
            get(session_status)
                .patch(patch_session)
                .delete(delete_session),
        )
        .route("/v1/sessions/{id}/qr", get(session_qr))
        .route("/v1/sessions/{id}/status", put(put_status))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
}

fn error(code: StatusCode, error: &str) -> Response {
    (code, axum::Json(json!({ "error": error }))).into_response()
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive
/// (RFC 7235), so `bearer` and `BEARER` clients are not refused a valid token.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without an early exit, so response time does not leak how much of a guess matched.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Creating, pausing or deleting a session, or reporting its status (which reaches the
/// customer's backend as if WhatsApp had said it).
fn is_write(request: &Request) -> bool {
    let path = request.uri().path();
    let method = request.method();
    let session_path = path.starts_with("/v1/sessions/") && path.matches('/').count() == 3;
    (path == "/v1/sessions" && method == axum::http::Method::POST)
        || (session_path
            && (method == axum::http::Method::PATCH || method == axum::http::Method::DELETE))
        || (path.starts_with("/v1/sessions/")
            && path.ends_with("/status")
            && path.matches('/').count() == 4
            && method == axum::http::Method::PUT)
}

fn from_loopback(request: &Request) -> bool {
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        // `::ffff:127.0.0.1` on a dual-stack listener is loopback too.
        .is_some_and(|info| info.0.ip().to_canonical().is_loopback())
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if state.token.is_none() && is_write(&request) && !from_loopback(&request) {
        // Without a token reads are open; writes (logging accounts out, telling the backend a
        // session changed) are not, beyond this machine.
        return (
            StatusCode::FORBIDDEN,
            axum::Json(json!({
                "error": "forbidden",
                "detail": "without --api-token / WA_API_TOKEN, sessions can only be created, paused, deleted or have their status reported from this machine (loopback)",
            })),
        )
            .into_response();
    }
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        if !given.is_some_and(|g| same_token(g.as_bytes(), token.as_bytes())) {
            let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return response;
        }
    }
    next.run(request).await
}

/// Looks a session up through the cache; the error response when it cannot be answered.
async fn lookup(state: &ApiState, id: &str) -> Result<Arc<SessionView>, Response> {
    if !valid_session_id(id) {
        return Err(error(StatusCode::BAD_REQUEST, "invalid_session_id"));
    }
    match state.cache.get(id).await {
        Ok(Some(view)) => Ok(view),
        Ok(None) => Err(error(StatusCode::NOT_FOUND, "session_not_found")),
        Err(err) => {
            tracing::warn!(session_id = id, %err, "session lookup failed");
            Err(error(StatusCode::SERVICE_UNAVAILABLE, "lookup_failed"))
        }
    }
}

async fn session_status(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    let view = match lookup(&state, &id).await {
        Ok(view) => view,
        Err(response) => return response,
    };
    let qr = view.live_qr(Utc::now());
    axum::Json(json!({
        "sessionId": view.session_id,
        "status": view.status.status,
        "active": view.status.status == SessionStatus::Active,
        "reason": view.status.reason,
        "since": view.status.since.to_rfc3339_opts(SecondsFormat::Millis, true),
        "version": view.status.version,
        "connection": {
            "state": view.connection.state,
            "since": view.connection.since.to_rfc3339_opts(SecondsFormat::Millis, true),
        },
        "session": {
            "gateway": view.session.gateway,
            "updatedAt": view.session.updated_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        },
        "qrAvailable": qr.is_some(),
        "qrExpiresAt": qr.map(|q| q.expires_at.to_rfc3339_opts(SecondsFormat::Millis, true)),
    }))
    .into_response()
}

fn wants_png(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with("image/png")))
}

async fn session_qr(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let view = match lookup(&state, &id).await {
        Ok(view) => view,
        Err(response) => return response,
    };
    let Some(qr) = view.live_qr(Utc::now()) else {
        let reason = if view.qr.is_some() {
            "qr_expired"
        } else {
            "no_qr"
        };
        return error(StatusCode::NOT_FOUND, reason);
    };
    if wants_png(&headers) {
        return match qr_png(&qr.code) {
            Ok(png) => (
                [
                    (header::CONTENT_TYPE, "image/png"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                png,
            )
                .into_response(),
            Err(err) => {
                tracing::warn!(session_id = %id, %err, "QR rendering failed");
                error(StatusCode::INTERNAL_SERVER_ERROR, "qr_render_failed")
            }
        };
    }
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(json!({
            "sessionId": view.session_id,
            "qr": qr.code,
            "expiresAt": qr.expires_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "seq": qr.seq,
        })),
    )
        .into_response()
}

fn qr_png(code: &str) -> crate::Result<Vec<u8>> {
    let qr =
        qrcode::QrCode::new(code.as_bytes()).map_err(|e| crate::Error::QrRender(e.to_string()))?;
    let image = qr
        .render::<image::Luma<u8>>()
        .min_dimensions(256, 256)
        .build();
    let mut png = Vec::with_capacity(4096);
    image::DynamicImage::ImageLuma8(image)
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| crate::Error::QrRender(e.to_string()))?;
    Ok(png)
}

#[derive(Debug, Deserialize)]
struct StatusChange {
    status: SessionStatus,
    #[serde(default)]
    reason: Option<String>,
}

async fn put_status(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<axum::Json<StatusChange>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(events) = &state.events else {
        return error(StatusCode::METHOD_NOT_ALLOWED, "read_only");
    };
    if !valid_session_id(&id) {
        return error(StatusCode::BAD_REQUEST, "invalid_session_id");
    }
    let axum::Json(change) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({ "error": "invalid_body", "detail": rejection.body_text() })),
            )
                .into_response();
        }
    };
    // A session with its own webhook that this gateway does not run: from here the change
    // would reach the gateway's backend, which the session did not name.
    if let Some(sessions) = &state.sessions
        && !state
            .webhooks
            .as_ref()
            .is_some_and(|webhooks| webhooks.routes_to_webhook(&id))
        && sessions.has_webhook(&id).await
    {
        return (
            StatusCode::CONFLICT,
            axum::Json(json!({
                "error": "session_has_webhook",
                "detail": "the session delivers to its own webhook from the gateway that runs it; this gateway does not",
            })),
        )
            .into_response();
    }
    let event = StatusEvent::new(id.clone(), change.status, Priority::High, change.reason);
    if events.emit(event).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down");
    }
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "sessionId": id, "status": change.status })),
    )
        .into_response()
}

fn invalid_body(detail: impl Into<String>, field: Option<&str>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": "invalid_body", "field": field, "detail": detail.into() })),
    )
        .into_response()
}

fn manage_error(err: ManageError) -> Response {
    let detail = err.to_string();
    let (code, error) = match &err {
        ManageError::Invalid { field, reason } => return invalid_body(reason.clone(), Some(field)),
        ManageError::NotFound => (StatusCode::NOT_FOUND, "session_not_found"),
        ManageError::Conflict => (StatusCode::CONFLICT, "session_exists"),
        ManageError::Deleting => (StatusCode::CONFLICT, "session_deleting"),
        ManageError::Configured(_) => (StatusCode::CONFLICT, "configured_at_startup"),
        ManageError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        ManageError::Unavailable(_) => {
            tracing::warn!(%err, "session management failed");
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        }
    };
    (
        code,
        axum::Json(json!({ "error": error, "detail": detail })),
    )
        .into_response()
}

/// The session manager, or the 405 answer when this gateway has none.
fn manager(state: &ApiState) -> Result<&Arc<dyn SessionManager>, Box<Response>> {
    state
        .sessions
        .as_ref()
        .ok_or_else(|| Box::new(error(StatusCode::METHOD_NOT_ALLOWED, "read_only")))
}

async fn list_sessions(State(state): State<ApiState>) -> Response {
    let sessions = match manager(&state) {
        Ok(manager) => manager.list().await,
        Err(response) => return *response,
    };
    match sessions {
        Ok(sessions) => axum::Json(json!({ "sessions": sessions })).into_response(),
        Err(err) => manage_error(err),
    }
}

async fn create_session(
    State(state): State<ApiState>,
    body: Result<axum::Json<SessionSpec>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let spec = match body {
        Ok(axum::Json(spec)) => spec,
        Err(rejection) => return invalid_body(rejection.body_text(), None),
    };
    let id = spec.session_id.clone();
    let created = match manager(&state) {
        Ok(manager) => manager.create(spec).await,
        Err(response) => return *response,
    };
    match created {
        Ok(created) => (
            if created == Created::New {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            axum::Json(json!({ "sessionId": id, "created": created == Created::New })),
        )
            .into_response(),
        Err(err) => manage_error(err),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionPatch {
    paused: bool,
}

async fn patch_session(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<axum::Json<SessionPatch>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !valid_session_id(&id) {
        return error(StatusCode::BAD_REQUEST, "invalid_session_id");
    }
    let patch = match body {
        Ok(axum::Json(patch)) => patch,
        Err(rejection) => return invalid_body(rejection.body_text(), None),
    };
    let paused = patch.paused;
    let result = match manager(&state) {
        Ok(manager) => manager.set_paused(&id, paused).await,
        Err(response) => return *response,
    };
    match result {
        Ok(()) => axum::Json(json!({ "sessionId": id, "paused": paused })).into_response(),
        Err(err) => manage_error(err),
    }
}

async fn delete_session(State(state): State<ApiState>, Path(id): Path<String>) -> Response {
    if !valid_session_id(&id) {
        return error(StatusCode::BAD_REQUEST, "invalid_session_id");
    }
    let result = match manager(&state) {
        Ok(manager) => manager.delete(&id).await,
        Err(response) => return *response,
    };
    match result {
        Ok(()) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({ "sessionId": id, "deleted": true })),
        )
            .into_response(),
        Err(err) => manage_error(err),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use tower::ServiceExt;

    use super::*;
    use crate::cache::{CacheMetrics, ChainLookup, SessionCache};
    use crate::manage::{Listed, ManageResult};
    use futures::future::BoxFuture;

    /// Accepts every call: what is tested is who may reach it. Knows one session, `hooked`,
    /// that names its own webhook.
    struct Accepting;

    impl SessionManager for Accepting {
        fn create(&self, _: SessionSpec) -> BoxFuture<'_, ManageResult<Created>> {
            Box::pin(async { Ok(Created::New) })
        }
        fn set_paused<'a>(&'a self, _: &'a str, _: bool) -> BoxFuture<'a, ManageResult<()>> {
            Box::pin(async { Ok(()) })
        }
        fn delete<'a>(&'a self, _: &'a str) -> BoxFuture<'a, ManageResult<()>> {
            Box::pin(async { Ok(()) })
        }
        fn list(&self) -> BoxFuture<'_, ManageResult<Vec<Listed>>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn has_webhook<'a>(&'a self, id: &'a str) -> BoxFuture<'a, bool> {
            Box::pin(async move { id == "hooked" })
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[tokio::test]
    async fn a_status_change_for_a_webhook_session_run_elsewhere_is_refused() {
        let (events, mut rx) = crate::session::EventSink::channel(8);
        let app = app_with(None, Some(events));
        let put = |id: &str| {
            let mut request = Request::builder()
                .method("PUT")
                .uri(format!("/v1/sessions/{id}/status"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"status":"inactive"}"#))
                .unwrap();
            request
                .extensions_mut()
                .insert(ConnectInfo("127.0.0.1:1".parse::<SocketAddr>().unwrap()));
            app.clone().oneshot(request)
        };
        assert_eq!(put("hooked").await.unwrap().status().as_u16(), 409);
        assert!(rx.try_recv().is_err(), "nothing reaches the pipeline");
        assert_eq!(put("plain").await.unwrap().status().as_u16(), 202);
        assert_eq!(rx.try_recv().unwrap().session_id(), "plain");
    }

    fn app(token: Option<&str>) -> Router {
        app_with(token, None)
    }

    /// `docs/openapi.yaml` parses, and on every path it documents, the router serves exactly
    /// the documented methods (each reaches a handler; any other gets axum's bare 405); its
    /// status enum is the gateway's.
    #[tokio::test]
    async fn the_openapi_document_matches_the_router() {
        let doc: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../../docs/openapi.yaml")).expect("valid YAML");
        let (events, _rx) = crate::session::EventSink::channel(16);
        let app = app_with(None, Some(events));
        let paths = doc["paths"].as_mapping().expect("paths");
        assert!(paths.len() >= 4, "{paths:?}");
        for (path, item) in paths {
            let path = path.as_str().unwrap();
            let documented: Vec<String> = item
                .as_mapping()
                .unwrap()
                .keys()
                .map(|m| m.as_str().unwrap().to_uppercase())
                .collect();
            for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
                let body = match method {
                    "POST" => r#"{"sessionId":"s"}"#,
                    "PATCH" => r#"{"paused":true}"#,
                    "PUT" => r#"{"status":"inactive"}"#,
                    _ => "",
                };
                let mut request = Request::builder()
                    .method(method)
                    .uri(path.replace("{id}", "s"))
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body))
                    .unwrap();
                let local: SocketAddr = "127.0.0.1:1".parse().unwrap();
                request.extensions_mut().insert(ConnectInfo(local));
                let response = app.clone().oneshot(request).await.unwrap();
                let code = response.status().as_u16();
                let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .unwrap();
                // The router's own answers have no body; every handler answers with JSON.
                let routed = !(bytes.is_empty() && (code == 404 || code == 405));
                assert_eq!(
                    routed,
                    documented.iter().any(|m| m == method),
                    "{method} {path}: {code} {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
        }
        let statuses: Vec<&str> = doc["components"]["schemas"]["Status"]["enum"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let ours: Vec<&str> = SessionStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(statuses, ours);
    }

    fn app_with(token: Option<&str>, events: Option<crate::session::EventSink>) -> Router {
        let mut registry = prometheus_client::registry::Registry::default();
        let cache = SessionCache::new(
            Default::default(),
            None,
            Arc::new(ChainLookup(Vec::new())),
            CacheMetrics::register(&mut registry),
        );
        router(ApiState {
            cache,
            events,
            token: token.map(Arc::from),
            sessions: Some(Arc::new(Accepting)),
            webhooks: None,
        })
    }

    async fn status(
        app: Router,
        method: &str,
        path: &str,
        peer: &str,
        bearer: Option<&str>,
    ) -> u16 {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match method {
            "POST" => r#"{"sessionId":"s"}"#,
            "PATCH" => r#"{"paused":true}"#,
            "PUT" => r#"{"status":"inactive"}"#,
            _ => "",
        };
        let mut request = request.body(Body::from(body)).unwrap();
        let peer: SocketAddr = peer.parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(peer));
        app.oneshot(request).await.unwrap().status().as_u16()
    }

    #[tokio::test]
    async fn without_a_token_only_this_machine_writes() {
        let remote = "10.1.2.3:5555";
        let local = "127.0.0.1:5555";
        for (method, path, ok) in [
            ("POST", "/v1/sessions", 201),
            ("PATCH", "/v1/sessions/s", 200),
            ("DELETE", "/v1/sessions/s", 202),
            // Reaches the route (read-only here: no event pipeline) only when allowed.
            ("PUT", "/v1/sessions/s/status", 405),
        ] {
            assert_eq!(
                status(app(None), method, path, remote, None).await,
                403,
                "{method}"
            );
            assert_eq!(
                status(app(None), method, path, local, None).await,
                ok,
                "{method}"
            );
            assert_eq!(
                status(app(None), method, path, "[::1]:1", None).await,
                ok,
                "{method}"
            );
            // With a token, the token decides, wherever the call comes from.
            let with_token = app(Some("t"));
            assert_eq!(
                status(with_token, method, path, remote, None).await,
                401,
                "{method}"
            );
            assert_eq!(
                status(app(Some("t")), method, path, remote, Some("t")).await,
                ok
            );
        }
        // Reads stay open without a token.
        assert_eq!(
            status(app(None), "GET", "/v1/sessions", remote, None).await,
            200
        );
    }
}
