//! `whatsapp_operator_*` metrics, registered into the operator's one registry.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::assign::MoveReason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: String,
}

#[derive(Debug)]
pub struct OperatorMetrics {
    passes: Family<ResultLabel, Counter>,
    pass_duration: Histogram,
    moves: Family<ReasonLabel, Counter>,
    shard_sessions: Family<ShardLabel, Gauge>,
    live_shards: Gauge,
    draining_shards: Gauge,
    id_conflicts: Gauge,
    pub is_leader: Gauge,
    known_shards: Mutex<Vec<String>>,
}

impl OperatorMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = OperatorMetrics {
            passes: Family::default(),
            pass_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            moves: Family::default(),
            shard_sessions: Family::default(),
            live_shards: Gauge::default(),
            draining_shards: Gauge::default(),
            id_conflicts: Gauge::default(),
            is_leader: Gauge::default(),
            known_shards: Mutex::default(),
        };
        registry.register(
            "whatsapp_operator_reconcile",
            "Placement passes by result",
            m.passes.clone(),
        );
        registry.register(
            "whatsapp_operator_reconcile_duration_seconds",
            "Duration of placement passes",
            m.pass_duration.clone(),
        );
        registry.register(
            "whatsapp_operator_moves",
            "Sessions moved between shards, by reason",
            m.moves.clone(),
        );
        registry.register(
            "whatsapp_operator_shard_sessions",
            "Sessions assigned per shard (bounded by the number of gateway pods)",
            m.shard_sessions.clone(),
        );
        registry.register(
            "whatsapp_operator_live_shards",
            "Gateway shards with a fresh Lease",
            m.live_shards.clone(),
        );
        registry.register(
            "whatsapp_operator_draining_shards",
            "Gateway shards handing their sessions over",
            m.draining_shards.clone(),
        );
        registry.register(
            "whatsapp_operator_session_id_conflicts",
            "Resources not run because an older resource names the same session id",
            m.id_conflicts.clone(),
        );
        registry.register(
            "whatsapp_operator_is_leader",
            "1 while this replica leads",
            m.is_leader.clone(),
        );
        m
    }

    pub fn observe_pass(&self, took: Duration, ok: bool) {
        self.pass_duration.observe(took.as_secs_f64());
        self.passes
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub fn moved(&self, reason: MoveReason) {
        self.moves
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn set_shards(&self, live: usize, draining: usize) {
        self.live_shards.set(live as i64);
        self.draining_shards.set(draining as i64);
    }

    pub fn set_id_conflicts(&self, conflicts: usize) {
        self.id_conflicts.set(conflicts as i64);
    }

    pub fn set_loads(&self, loads: &[(&str, usize)]) {
        let mut known = self.known_shards.lock().expect("metrics lock");
        // Shards that disappeared drop to zero instead of keeping a stale value.
        for shard in known.iter() {
            if !loads.iter().any(|(s, _)| s == shard) {
                self.shard_sessions
                    .get_or_create(&ShardLabel {
                        shard: shard.clone(),
                    })
                    .set(0);
            }
        }
        known.clear();
        for (shard, load) in loads {
            self.shard_sessions
                .get_or_create(&ShardLabel {
                    shard: shard.to_string(),
                })
                .set(*load as i64);
            known.push(shard.to_string());
        }
    }
}
