//! A real HTTP backend on loopback standing in for the Laravel app: it records every request it
//! accepts (with its arrival time) and can be told to misbehave: refuse connections, answer with
//! an error code, hang, or answer with bytes that are not HTTP.
//!
//! A small TCP front decides per connection what happens; in normal mode it forwards the bytes to
//! an axum server behind it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::IntoResponse;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// How the receiver answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// 200 and record.
    Ok,
    /// Accept the TCP connection and close it at once (as a backend that is down behind a proxy).
    Down,
    /// Answer every request with this status (500, 413, 422, ...), recording nothing.
    Status(u16),
    /// Never answer.
    Hang,
    /// Write bytes that are not HTTP and close.
    Garbage,
    /// 413 for bodies with more than this many items, 200 otherwise.
    MaxItems(usize),
}

/// One accepted request.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub batch_id: String,
    pub items: Vec<serde_json::Value>,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    pub at_unix_ms: i64,
}

struct Shared {
    mode: Mutex<Option<Mode>>,
    /// Bumped on every mode change so open keep-alive connections are cut, as a real outage would.
    generation: tokio::sync::watch::Sender<u64>,
    received: Mutex<Vec<Received>>,
    /// Requests that arrived, whatever the answer.
    attempts: Mutex<u64>,
    processing_delay: Mutex<Duration>,
}

pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Receiver {
    pub async fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            mode: Mutex::new(Some(Mode::Ok)),
            generation: tokio::sync::watch::channel(0).0,
            received: Mutex::default(),
            attempts: Mutex::default(),
            processing_delay: Mutex::default(),
        });
        let inner = TcpListener::bind("127.0.0.1:0").await?;
        let inner_addr = inner.local_addr()?;
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(inner, app).await;
        });
        let front = TcpListener::bind("127.0.0.1:0").await?;
        let addr = front.local_addr()?;
        let front_shared = shared.clone();
        let proxy = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = front.accept().await else {
                    continue;
                };
                let mode = front_shared
                    .mode
                    .lock()
                    .unwrap()
                    .clone()
                    .unwrap_or(Mode::Ok);
                let mut changed = front_shared.generation.subscribe();
                tokio::spawn(async move {
                    match mode {
                        Mode::Down => drop(conn),
                        Mode::Garbage => {
                            let _ = conn
                                .write_all(b"\x00\x17garbage that is not HTTP\r\n\r\n")
                                .await;
                            let _ = conn.shutdown().await;
                        }
                        _ => {
                            if let Ok(mut upstream) = TcpStream::connect(inner_addr).await {
                                tokio::select! {
                                    _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream) => {}
                                    _ = changed.changed() => {}
                                }
                            }
                        }
                    }
                });
            }
        });
        Ok(Receiver {
            addr,
            shared,
            tasks: vec![server, proxy],
        })
    }

    /// Base URL to give the gateway as `--backend-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = Some(mode);
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Extra time each accepted request takes (to model a real backend's cost).
    pub fn set_processing_delay(&self, delay: Duration) {
        *self.shared.processing_delay.lock().unwrap() = delay;
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// Requests that reached the HTTP server (accepted or refused), not counting Down/Garbage.
    pub fn attempts(&self) -> u64 {
        *self.shared.attempts.lock().unwrap()
    }

    /// Items received on endpoints whose path ends with `suffix`.
    pub fn items(&self, suffix: &str) -> Vec<serde_json::Value> {
        self.received()
            .into_iter()
            .filter(|r| r.path.ends_with(suffix))
            .flat_map(|r| r.items)
            .collect()
    }

    /// Status items received for session `id`, in arrival order: (status, reason).
    pub fn statuses_of(&self, id: &str) -> Vec<(String, String)> {
        self.items("/status/batch")
            .into_iter()
            .filter(|item| item["sessionId"] == id)
            .map(|item| {
                (
                    item["status"].as_str().unwrap_or_default().to_owned(),
                    item["reason"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// The last status each session reported, in arrival order.
    pub fn last_status_by_session(&self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        for item in self
            .items("/status/batch")
            .into_iter()
            .chain(self.items("/whatsapp/status"))
        {
            if let (Some(id), Some(status)) = (item["sessionId"].as_str(), item["status"].as_str())
            {
                out.insert(id.to_string(), status.to_string());
            }
        }
        out
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    *shared.attempts.lock().unwrap() += 1;
    let mode = shared.mode.lock().unwrap().clone().unwrap_or(Mode::Ok);
    let parsed: serde_json::Value =
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    // Legacy endpoints carry one item per request (the body is the item).
    let items: Vec<serde_json::Value> = match parsed.get("items").and_then(|i| i.as_array()) {
        Some(items) => items.clone(),
        None if parsed.is_object() => vec![parsed.clone()],
        None => Vec::new(),
    };
    match mode {
        Mode::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Mode::Status(code) => {
            return (StatusCode::from_u16(code).unwrap(), "refused").into_response();
        }
        Mode::MaxItems(max) if items.len() > max => {
            return (StatusCode::PAYLOAD_TOO_LARGE, "too large").into_response();
        }
        _ => {}
    }
    let delay = *shared.processing_delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let received = Received {
        path: uri.path().to_string(),
        batch_id: parsed["batchId"].as_str().unwrap_or_default().to_string(),
        items,
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
        body: body.to_vec(),
        at_unix_ms: unix_ms(),
    };
    shared.received.lock().unwrap().push(received);
    (StatusCode::OK, axum::Json(serde_json::json!({"ok": true}))).into_response()
}
