//! Where batches wait when the backend fails: a Redis stream per endpoint (it survives a gateway
//! restart and a pod move within the same identity), and a bounded in-memory queue when Redis is
//! not configured or not reachable. Permanent failures go to a dead-letter stream.

use std::collections::VecDeque;
use std::sync::Mutex;

use fred::prelude::*;
use fred::types::streams::XCap;

use super::render::{Endpoint, WireBatch};
use crate::Result;

/// Dead letters kept per gateway (older ones are trimmed by Redis).
const DEAD_LETTER_MAX: i64 = 100_000;

/// One spilled batch and the id needed to acknowledge it.
#[derive(Debug, Clone)]
pub struct SpilledBatch {
    pub id: String,
    pub batch: WireBatch,
}

/// Keys: `wa:{gw:<identity>}:spill:<endpoint>` (a webhook destination's:
/// `wa:{gw:<identity>}:wh:<destination>:spill:<endpoint>`) and `wa:{gw:<identity>}:dead`. The hash
/// tag keeps one gateway's streams on one Redis Cluster slot.
#[derive(Debug, Clone)]
pub struct SpillKeys {
    identity: String,
    webhook: Option<String>,
}

impl SpillKeys {
    pub fn new(identity: &str) -> Self {
        SpillKeys {
            identity: identity.to_string(),
            webhook: None,
        }
    }
    pub fn for_webhook(identity: &str, destination: &str) -> Self {
        SpillKeys {
            identity: identity.to_string(),
            webhook: Some(destination.to_string()),
        }
    }
    pub fn spill(&self, endpoint: Endpoint) -> String {
        match &self.webhook {
            None => format!("wa:{{gw:{}}}:spill:{}", self.identity, endpoint.as_str()),
            Some(destination) => format!(
                "wa:{{gw:{}}}:wh:{destination}:spill:{}",
                self.identity,
                endpoint.as_str()
            ),
        }
    }
    /// The registry of this gateway's webhook destinations (hash: destination -> target).
    pub fn webhooks(&self) -> String {
        format!("wa:{{gw:{}}}:webhooks", self.identity)
    }
    pub fn dead(&self) -> String {
        format!("wa:{{gw:{}}}:dead", self.identity)
    }
}

/// Redis streams (fred).
#[derive(Clone)]
pub struct RedisSpill {
    client: fred::clients::Client,
    keys: SpillKeys,
}

impl RedisSpill {
    pub fn new(client: fred::clients::Client, keys: SpillKeys) -> Self {
        RedisSpill { client, keys }
    }

    pub async fn append(&self, batch: &WireBatch) -> Result<()> {
        let data = serde_json::to_string(batch)?;
        let _: String = self
            .client
            .xadd(
                self.keys.spill(batch.endpoint),
                false,
                None::<()>,
                "*",
                vec![("batch", data)],
            )
            .await?;
        Ok(())
    }

    pub async fn oldest(&self, endpoint: Endpoint, count: u64) -> Result<Vec<SpilledBatch>> {
        let entries: Vec<(String, std::collections::HashMap<String, String>)> = self
            .client
            .xrange(self.keys.spill(endpoint), "-", "+", Some(count))
            .await?;
        let mut out = Vec::with_capacity(entries.len());
        for (id, mut fields) in entries {
            match fields
                .remove("batch")
                .map(|data| serde_json::from_str::<WireBatch>(&data))
            {
                Some(Ok(batch)) => out.push(SpilledBatch { id, batch }),
                // An entry we cannot read would block the stream forever: move it aside.
                other => {
                    tracing::error!(entry = %id, ?other, "unreadable spill entry moved to dead letters");
                    let _: String = self
                        .client
                        .xadd(
                            self.keys.dead(),
                            false,
                            dead_cap(),
                            "*",
                            vec![("unreadable", id.clone())],
                        )
                        .await?;
                    let _: u64 = self.client.xdel(self.keys.spill(endpoint), id).await?;
                }
            }
        }
        Ok(out)
    }

    pub async fn ack(&self, endpoint: Endpoint, id: &str) -> Result<()> {
        let _: u64 = self.client.xdel(self.keys.spill(endpoint), id).await?;
        Ok(())
    }

    pub async fn len(&self, endpoint: Endpoint) -> Result<u64> {
        Ok(self.client.xlen(self.keys.spill(endpoint)).await?)
    }

    /// `destination`: the webhook's (redacted) URL for a per-session webhook's batch.
    pub async fn dead_letter(
        &self,
        batch: &WireBatch,
        code: u16,
        body: &str,
        destination: Option<&str>,
    ) -> Result<()> {
        let data = serde_json::to_string(batch)?;
        let mut fields = vec![
            ("batch", data),
            ("code", code.to_string()),
            ("body", body.chars().take(512).collect()),
        ];
        if let Some(destination) = destination {
            fields.push(("destination", destination.to_owned()));
        }
        let _: String = self
            .client
            .xadd(self.keys.dead(), false, dead_cap(), "*", fields)
            .await?;
        Ok(())
    }

    pub async fn dead_len(&self) -> Result<u64> {
        Ok(self.client.xlen(self.keys.dead()).await?)
    }
}

fn dead_cap() -> XCap {
    XCap::try_from(("MAXLEN", "~", DEAD_LETTER_MAX)).expect("valid XCAP")
}

/// Bounded in-memory spill, per endpoint; used without Redis and while Redis is unreachable.
#[derive(Debug)]
pub struct MemorySpill {
    capacity: usize,
    queues: Mutex<Queues>,
    next_id: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct Queues {
    by_endpoint: [VecDeque<(u64, WireBatch)>; 2],
    /// Set at the end of a shutdown: what is held then is counted as lost, and nothing more is
    /// taken (it would be lost uncounted).
    closed: bool,
}

/// Why the memory spill handed a batch back.
#[derive(Debug)]
pub enum Refused {
    /// At capacity: the caller may wait for the drainer (backpressure).
    Full(WireBatch),
    /// Closed by the shutdown: the batch cannot be kept.
    Closed(WireBatch),
}

fn slot(endpoint: Endpoint) -> usize {
    match endpoint {
        Endpoint::Qr => 0,
        Endpoint::Status => 1,
    }
}

impl MemorySpill {
    pub fn new(capacity: usize) -> Self {
        MemorySpill {
            capacity,
            queues: Mutex::default(),
            next_id: 0.into(),
        }
    }

    /// Appends unless full; a full queue hands the batch back so the caller can wait (backpressure).
    pub fn try_append(&self, batch: WireBatch) -> std::result::Result<(), Refused> {
        self.append(batch, true)
    }

    /// Appends even past the capacity. For shutdown, when no drainer may be left to make room:
    /// the excess is bounded by the deliveries in flight.
    pub fn append_unbounded(&self, batch: WireBatch) -> std::result::Result<(), Refused> {
        self.append(batch, false)
    }

    fn append(&self, batch: WireBatch, bounded: bool) -> std::result::Result<(), Refused> {
        let mut queues = self.queues.lock().expect("spill lock");
        if queues.closed {
            return Err(Refused::Closed(batch));
        }
        let queue = &mut queues.by_endpoint[slot(batch.endpoint)];
        if bounded && queue.len() >= self.capacity {
            return Err(Refused::Full(batch));
        }
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        queue.push_back((id, batch));
        Ok(())
    }

    /// Takes no more batches; returns how many it holds (both endpoints). Under the same lock as
    /// appends, so every batch is either counted here or refused with `Closed`.
    pub fn close(&self) -> usize {
        let mut queues = self.queues.lock().expect("spill lock");
        queues.closed = true;
        queues.by_endpoint.iter().map(VecDeque::len).sum()
    }

    pub fn oldest(&self, endpoint: Endpoint, count: usize) -> Vec<SpilledBatch> {
        let queues = self.queues.lock().expect("spill lock");
        queues.by_endpoint[slot(endpoint)]
            .iter()
            .take(count)
            .map(|(id, batch)| SpilledBatch {
                id: id.to_string(),
                batch: batch.clone(),
            })
            .collect()
    }

    pub fn ack(&self, endpoint: Endpoint, id: &str) {
        let mut queues = self.queues.lock().expect("spill lock");
        queues.by_endpoint[slot(endpoint)].retain(|(i, _)| i.to_string() != id);
    }

    pub fn len(&self, endpoint: Endpoint) -> usize {
        self.queues.lock().expect("spill lock").by_endpoint[slot(endpoint)].len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(endpoint: Endpoint, id: &str) -> WireBatch {
        WireBatch {
            batch_id: id.into(),
            endpoint,
            lane: "qr".into(),
            items: vec![],
        }
    }

    #[test]
    fn memory_spill_is_fifo_bounded_and_acknowledged() {
        let spill = MemorySpill::new(2);
        spill.try_append(batch(Endpoint::Qr, "a")).unwrap();
        spill.try_append(batch(Endpoint::Qr, "b")).unwrap();
        assert!(
            spill.try_append(batch(Endpoint::Qr, "c")).is_err(),
            "bounded"
        );
        spill.try_append(batch(Endpoint::Status, "s")).unwrap();
        let oldest = spill.oldest(Endpoint::Qr, 10);
        assert_eq!(
            oldest
                .iter()
                .map(|s| s.batch.batch_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        spill.ack(Endpoint::Qr, &oldest[0].id);
        assert_eq!(spill.len(Endpoint::Qr), 1);
        assert_eq!(spill.len(Endpoint::Status), 1);
    }

    #[test]
    fn memory_spill_takes_past_capacity_only_when_asked_and_nothing_once_closed() {
        let spill = MemorySpill::new(1);
        spill.try_append(batch(Endpoint::Qr, "a")).unwrap();
        assert!(matches!(
            spill.try_append(batch(Endpoint::Qr, "b")),
            Err(Refused::Full(_))
        ));
        spill.append_unbounded(batch(Endpoint::Qr, "b")).unwrap();
        spill.try_append(batch(Endpoint::Status, "s")).unwrap();
        assert_eq!(spill.close(), 3);
        assert!(matches!(
            spill.append_unbounded(batch(Endpoint::Qr, "c")),
            Err(Refused::Closed(_))
        ));
        assert_eq!(spill.len(Endpoint::Qr), 2);
    }

    #[test]
    fn keys_share_a_hash_tag_per_gateway() {
        let keys = SpillKeys::new("wa-gateway-2");
        assert_eq!(keys.spill(Endpoint::Qr), "wa:{gw:wa-gateway-2}:spill:qr");
        assert_eq!(keys.dead(), "wa:{gw:wa-gateway-2}:dead");
        let webhook = SpillKeys::for_webhook("wa-gateway-2", "0123abcd");
        assert_eq!(
            webhook.spill(Endpoint::Status),
            "wa:{gw:wa-gateway-2}:wh:0123abcd:spill:status"
        );
        assert_eq!(webhook.dead(), keys.dead());
    }
}
