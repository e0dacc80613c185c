//! The HTTP client toward the backend (the Laravel app): endpoints, signatures, idempotency keys.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::render::{Endpoint, WireBatch};
use super::retry::Outcome;
use crate::{Error, Result};

/// Where the backend lives and how it wants to be called.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    /// Base URL, e.g. `https://app.example.com/api`; paths are appended.
    pub base_url: reqwest::Url,
    pub qr_batch_path: String,
    pub status_batch_path: String,
    /// Legacy single-item endpoints (`POST /qr`, `POST /whatsapp/status`): one request per item.
    pub legacy: bool,
    pub qr_path: String,
    pub status_path: String,
    /// HMAC-SHA256 key; when set every request is signed.
    pub secret: Option<String>,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

pub const SIGNATURE_HEADER: &str = "X-Signature-256";
pub const TIMESTAMP_HEADER: &str = "X-Signature-Timestamp";
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// Bytes of an error answer's body kept (for logs and dead letters).
const ERROR_BODY_MAX: usize = 512;

#[derive(Debug, Clone)]
pub struct BackendClient {
    http: reqwest::Client,
    settings: BackendSettings,
}

/// `sha256=<hex hmac>` over `"{timestamp}.{body}"`.
pub fn sign(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl BackendClient {
    pub fn new(settings: BackendSettings) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.connect_timeout)
            .pool_max_idle_per_host(32)
            // A followed 301/302 would turn the POST into a body-less GET: surface it instead.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("whatsapp-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(Error::Http)?;
        Ok(BackendClient { http, settings })
    }

    pub fn settings(&self) -> &BackendSettings {
        &self.settings
    }

    fn url(&self, path: &str) -> reqwest::Url {
        let mut url = self.settings.base_url.clone();
        let joined = format!(
            "{}/{}",
            url.path().trim_end_matches('/'),
            path.trim_start_matches('/')
        );
        url.set_path(&joined);
        url
    }

    /// The metric label of an endpoint as configured.
    pub fn endpoint_label(&self, endpoint: Endpoint) -> &'static str {
        match (endpoint, self.settings.legacy) {
            (Endpoint::Qr, false) => "qr_batch",
            (Endpoint::Status, false) => "status_batch",
            (Endpoint::Qr, true) => "qr",
            (Endpoint::Status, true) => "status",
        }
    }

    /// Sends one batch (or, in legacy mode, its items one by one; the first failure decides).
    pub async fn send(&self, batch: &WireBatch) -> Outcome {
        if !self.settings.legacy {
            let path = match batch.endpoint {
                Endpoint::Qr => &self.settings.qr_batch_path,
                Endpoint::Status => &self.settings.status_batch_path,
            };
            return self.post(path, &batch.batch_id, batch.body()).await;
        }
        let path = match batch.endpoint {
            Endpoint::Qr => &self.settings.qr_path,
            Endpoint::Status => &self.settings.status_path,
        };
        let mut last = Outcome::Delivered { code: 200 };
        for (i, item) in batch.items.iter().enumerate() {
            let key = format!("{}-{i}", batch.batch_id);
            let mut body = item.body.clone();
            body["batchId"] = serde_json::Value::String(key.clone());
            last = self
                .post(
                    path,
                    &key,
                    serde_json::to_vec(&body).expect("item serializes"),
                )
                .await;
            if !matches!(last, Outcome::Delivered { .. }) {
                return last;
            }
        }
        last
    }

    async fn post(&self, path: &str, idempotency_key: &str, body: Vec<u8>) -> Outcome {
        let mut request = self
            .http
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_HEADER, idempotency_key);
        if let Some(secret) = &self.settings.secret {
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            request = request
                .header(TIMESTAMP_HEADER, timestamp)
                .header(SIGNATURE_HEADER, sign(secret, timestamp, &body));
        }
        match request.body(body).send().await {
            Ok(response) => {
                let code = response.status().as_u16();
                let text = if (200..300).contains(&code) {
                    String::new()
                } else {
                    read_capped(response, ERROR_BODY_MAX).await
                };
                Outcome::from_status(code, text)
            }
            Err(err) => Outcome::Transient {
                code: None,
                error: error_chain(&err),
            },
        }
    }
}

/// The first `cap` bytes of a body. Reads chunk by chunk and stops there: a misbehaving backend
/// may answer with an endless body, which must neither fill memory nor hold the request until
/// its timeout. Dropping the response closes the connection.
async fn read_capped(mut response: reqwest::Response, cap: usize) -> String {
    let mut kept = Vec::new();
    while kept.len() < cap {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(cap - kept.len());
                kept.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Reference value computed independently:
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac s3cret
        assert_eq!(
            sign("s3cret", 1_700_000_000, br#"{"a":1}"#),
            "sha256=1698a50bc74d1ff1db85c4e0a5297c2ad9fdba245d5737cdb789e4cc6e098940"
        );
        assert_ne!(
            sign("s3cret", 1_700_000_001, br#"{"a":1}"#),
            sign("s3cret", 1_700_000_000, br#"{"a":1}"#)
        );
    }

    /// A backend answering 500 with a body that never ends (1 MiB, then it stalls) must neither
    /// be buffered in full nor hold the request until its timeout.
    #[tokio::test]
    async fn an_endless_error_body_is_read_only_up_to_a_cap() {
        let app = axum::Router::new().fallback(|| async {
            let chunks = (0..16)
                .map(|_| Ok::<_, std::io::Error>(axum::body::Bytes::from(vec![b'x'; 64 * 1024])));
            let body = futures::stream::iter(chunks).chain(futures::stream::pending());
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                axum::body::Body::from_stream(body),
            )
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = BackendClient::new(BackendSettings {
            base_url: url.parse().unwrap(),
            qr_batch_path: "/qr/batch".into(),
            status_batch_path: "/status/batch".into(),
            legacy: false,
            qr_path: "/qr".into(),
            status_path: "/status".into(),
            secret: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
        })
        .unwrap();
        let batch = WireBatch {
            batch_id: "b".into(),
            endpoint: Endpoint::Status,
            lane: "status_high".into(),
            items: vec![],
        };
        let started = std::time::Instant::now();
        let outcome = client.send(&batch).await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "returned after {:?}",
            started.elapsed()
        );
        let Outcome::Transient {
            code: Some(500),
            error,
        } = outcome
        else {
            panic!("expected a transient 500, got {outcome:?}");
        };
        assert_eq!(error.len(), ERROR_BODY_MAX);
        assert!(error.bytes().all(|b| b == b'x'));
    }
}
