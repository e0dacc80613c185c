//! Fallbacks ([`SessionLookup`]) for sessions no cache tier knows: this gateway's own session
//! states, the backend's session lookup endpoint, or a chain of both. Cluster mode plugs the
//! `WhatsappSession` informer store in through the same trait.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use serde::Deserialize;

use super::SessionLookup;
use super::view::SessionView;
use crate::app::SessionStates;
use crate::delivery::BackendSettings;
use crate::delivery::client::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};
use crate::events::SessionStatus;
use crate::{Error, Result};

/// Knows nothing: every unknown session is "not found".
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLookup;

impl SessionLookup for NoLookup {
    fn lookup<'a>(&'a self, _session_id: &'a str) -> BoxFuture<'a, Result<Option<SessionView>>> {
        Box::pin(async { Ok(None) })
    }
}

/// The sessions this gateway runs (standalone mode without a backend lookup).
#[derive(Debug, Clone)]
pub struct StatesLookup {
    states: Arc<SessionStates>,
    gateway: String,
}

impl StatesLookup {
    pub fn new(states: Arc<SessionStates>, gateway: impl Into<String>) -> Self {
        StatesLookup {
            states,
            gateway: gateway.into(),
        }
    }
}

impl SessionLookup for StatesLookup {
    fn lookup<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<Option<SessionView>>> {
        let found = self
            .states
            .get(session_id)
            .map(|state| SessionView::from_state(session_id, &state, &self.gateway));
        Box::pin(async move { Ok(found) })
    }
}

/// Asks each lookup in turn; the first that knows the session answers.
pub struct ChainLookup(pub Vec<Arc<dyn SessionLookup>>);

impl SessionLookup for ChainLookup {
    fn lookup<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<Option<SessionView>>> {
        Box::pin(async move {
            for lookup in &self.0 {
                if let Some(view) = lookup.lookup(session_id).await? {
                    return Ok(Some(view));
                }
            }
            Ok(None)
        })
    }
}

/// `GET {base}{path}` with `{id}` in `path` replaced by the session id (e.g.
/// `/whatsapp/session/{id}`). 200 with `{"status": "active", "reason": null}` (or the seed's
/// `{"active": true}`) is a session, 404 is "no such session", anything else an error (not
/// cached). Signed like the batch requests (HMAC over `"{timestamp}."`, empty body).
#[derive(Debug, Clone)]
pub struct BackendLookup {
    http: reqwest::Client,
    base_url: reqwest::Url,
    path: String,
    secret: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LookupAnswer {
    status: Option<SessionStatus>,
    reason: Option<String>,
    active: Option<bool>,
}

impl BackendLookup {
    pub fn new(backend: &BackendSettings, path: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(backend.request_timeout.min(Duration::from_secs(5)))
            .connect_timeout(backend.connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("whatsapp-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(Error::Http)?;
        Ok(BackendLookup {
            http,
            base_url: backend.base_url.clone(),
            path: path.to_string(),
            secret: backend.secret.clone(),
        })
    }

    fn url(&self, session_id: &str) -> reqwest::Url {
        let mut url = self.base_url.clone();
        let path = self.path.replace("{id}", session_id);
        let joined = format!(
            "{}/{}",
            url.path().trim_end_matches('/'),
            path.trim_start_matches('/')
        );
        url.set_path(&joined);
        url
    }
}

impl SessionLookup for BackendLookup {
    fn lookup<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<Option<SessionView>>> {
        Box::pin(async move {
            let mut request = self
                .http
                .get(self.url(session_id))
                .header("Accept", "application/json");
            if let Some(secret) = &self.secret {
                let timestamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                request = request
                    .header(TIMESTAMP_HEADER, timestamp.to_string())
                    .header(SIGNATURE_HEADER, sign(secret, timestamp, b""));
            }
            let response = request.send().await?;
            match response.status().as_u16() {
                404 | 410 => Ok(None),
                200 => {
                    let answer: LookupAnswer = response.json().await?;
                    let status = match (answer.status, answer.active) {
                        (Some(status), _) => status,
                        (None, Some(true)) => SessionStatus::Active,
                        (None, Some(false)) => SessionStatus::Inactive,
                        (None, None) => {
                            return Err(Error::Lookup(
                                "backend answer has neither `status` nor `active`".into(),
                            ));
                        }
                    };
                    Ok(Some(SessionView::with_status(
                        session_id,
                        status,
                        answer.reason,
                    )))
                }
                code => Err(Error::Lookup(format!("backend answered {code}"))),
            }
        })
    }
}
