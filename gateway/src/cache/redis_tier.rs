//! The shared tier on Redis (fred): a thin shell over `MGET`, pipelined `SET ... EX`, expiry
//! indexes for key counts, and the pub/sub listener that evicts local entries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fred::clients::{Client, SubscriberClient};
use fred::interfaces::{
    ClientLike, EventInterface, KeysInterface, PubsubInterface, SortedSetsInterface,
};
use fred::types::config::Options;
use fred::types::{Expiration, SetOptions};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::view::{Kind, SessionView, index_key, key};
use super::{INVALIDATION_CHANNEL, PendingWrite, RemoteTier, SessionCache, WriteMode};
use crate::Result;

/// Reads give up quickly: a slow Redis must not make API lookups slower than the fallback.
const READ_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub struct RedisTier {
    client: Client,
    ttl: Duration,
    /// Follows fred's connection events. fred keeps reporting "connected" until its first
    /// reconnect attempt (100 ms later); the error event comes at once, so lookups stop waiting
    /// on a dead Redis right away.
    up: Arc<AtomicBool>,
}

impl RedisTier {
    /// Must be called within a tokio runtime: it starts a task that follows connection events
    /// (it ends with the client).
    pub fn new(client: Client, ttl: Duration) -> Self {
        let up = Arc::new(AtomicBool::new(client.is_connected()));
        let mut errors = client.error_rx();
        let mut reconnects = client.reconnect_rx();
        let flag = up.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let now_up = tokio::select! {
                    e = errors.recv() => match e {
                        Err(RecvError::Closed) => return,
                        _ => false,
                    },
                    r = reconnects.recv() => match r {
                        Err(RecvError::Closed) => return,
                        _ => true,
                    },
                };
                flag.store(now_up, Ordering::Release);
            }
        });
        RedisTier { client, ttl, up }
    }

    fn read_options() -> Options {
        Options {
            timeout: Some(READ_TIMEOUT),
            max_attempts: Some(1),
            ..Options::default()
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl RemoteTier for RedisTier {
    fn available(&self) -> bool {
        self.up.load(Ordering::Acquire) && self.client.is_connected()
    }

    fn read<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<Option<SessionView>>> {
        Box::pin(async move {
            let keys: Vec<String> = Kind::ALL.iter().map(|k| key(session_id, *k)).collect();
            let values: Vec<Option<String>> = self
                .client
                .with_options(&Self::read_options())
                .mget(keys)
                .await?;
            SessionView::from_redis_values(session_id, &values)
        })
    }

    fn write<'a>(&'a self, writes: &'a [PendingWrite]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let pipeline = self.client.pipeline();
            let ttl_ms = self.ttl.as_millis() as i64;
            let now = now_ms();
            for write in writes {
                let view = &write.view;
                let id = view.session_id.as_str();
                let values = view.to_redis_values()?;
                let if_absent = (write.mode == WriteMode::IfAbsent).then_some(SetOptions::NX);
                for kind in Kind::ALL {
                    let k = key(id, kind);
                    match &values[kind.index()] {
                        Some(value) => {
                            // A QR key lives no longer than the QR itself.
                            let px = match (kind, &view.qr) {
                                (Kind::Qr, Some(qr)) => {
                                    (qr.expires_at.timestamp_millis() - now).clamp(1, ttl_ms)
                                }
                                _ => ttl_ms,
                            };
                            let _: () = pipeline
                                .set(
                                    k,
                                    value.as_str(),
                                    Some(Expiration::PX(px)),
                                    if_absent.clone(),
                                    false,
                                )
                                .await?;
                            let _: () = pipeline
                                .zadd(
                                    index_key(kind),
                                    None,
                                    None,
                                    false,
                                    false,
                                    ((now + px) as f64, id),
                                )
                                .await?;
                        }
                        None if write.mode != WriteMode::IfAbsent => {
                            let _: () = pipeline.del(k).await?;
                            let _: () = pipeline.zrem(index_key(kind), id).await?;
                        }
                        None => {}
                    }
                }
                if write.mode == WriteMode::Change {
                    // After the SETs on the same connection: whoever gets the message reads the new state.
                    let _: () = pipeline.publish(INVALIDATION_CHANNEL, id).await?;
                }
            }
            let _: Vec<fred::types::Value> = pipeline.all().await?;
            Ok(())
        })
    }

    fn count_keys(&self) -> BoxFuture<'_, Result<[u64; 4]>> {
        Box::pin(async move {
            let pipeline = self.client.pipeline();
            let now = now_ms() as f64;
            for kind in Kind::ALL {
                let _: () = pipeline
                    .zremrangebyscore(index_key(kind), f64::NEG_INFINITY, now)
                    .await?;
                let _: () = pipeline.zcard(index_key(kind)).await?;
            }
            let replies: Vec<fred::types::Value> = pipeline.all().await?;
            let mut counts = [0u64; 4];
            for kind in Kind::ALL {
                counts[kind.index()] = replies
                    .get(kind.index() * 2 + 1)
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0);
            }
            Ok(counts)
        })
    }
}

/// Subscribes to [`INVALIDATION_CHANNEL`] on a dedicated connection (pub/sub needs its own) and
/// evicts local entries of the sessions named there. On every (re)connection it subscribes again
/// and then clears the local tier, since messages sent while it was away are lost.
pub async fn spawn_invalidation_listener(
    client: &Client,
    cache: Arc<SessionCache>,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let subscriber = SubscriberClient::new(
        client.client_config(),
        Some(client.perf_config()),
        Some(client.connection_config().clone()),
        client.client_reconnect_policy(),
    );
    let mut messages = subscriber.message_rx();
    let mut reconnects = subscriber.reconnect_rx();
    if let Err(err) = subscriber.init().await {
        tracing::warn!(%err, "invalidation listener: Redis not reachable yet; retrying in the background");
    } else if let Err(err) = subscriber.subscribe(INVALIDATION_CHANNEL).await {
        tracing::warn!(%err, "invalidation listener: subscribe failed; retrying on reconnect");
    }
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                message = messages.recv() => match message {
                    Ok(message) => {
                        if let Some(id) = message.value.as_str() {
                            cache.invalidate(&id).await;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "invalidation listener lagged; clearing the local tier");
                        cache.invalidate_all();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                reconnect = reconnects.recv() => {
                    match reconnect {
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                    if let Err(err) = subscriber.subscribe(INVALIDATION_CHANNEL).await {
                        tracing::warn!(%err, "invalidation listener: resubscribe failed");
                    }
                    tracing::info!("invalidation listener (re)connected; clearing the local tier");
                    cache.invalidate_all();
                }
            }
        }
        let _ = subscriber.quit().await;
    }))
}
