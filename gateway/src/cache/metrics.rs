//! The cache's Prometheus metrics (they replace the seed's `/metrics/cache`). No session ids as
//! labels: every label takes a handful of fixed values.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::view::Kind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    tier: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// Tiers of the `tier` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Local,
    Redis,
    Fallback,
}

impl Tier {
    fn as_str(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Redis => "redis",
            Tier::Fallback => "fallback",
        }
    }
}

/// Results of the `result` label: `hit` (found), `negative_hit` (known to be absent), `miss`
/// (asked the next tier), `skipped` (tier unavailable, not asked), `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    NegativeHit,
    Miss,
    Skipped,
    Error,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::NegativeHit => "negative_hit",
            Outcome::Miss => "miss",
            Outcome::Skipped => "skipped",
            Outcome::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct CacheMetrics {
    requests: Family<RequestLabels, Counter>,
    fallback_calls: Counter,
    fallback_duration: Option<Histogram>,
    invalidations: Family<DirectionLabel, Counter>,
    keys: Family<KindLabel, Gauge>,
    local_entries: Gauge,
    pending_writes: Gauge,
    write_errors: Counter,
}

impl CacheMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = CacheMetrics {
            fallback_duration: Some(Histogram::new(exponential_buckets(0.000_1, 2.0, 16))),
            ..CacheMetrics::default()
        };
        registry.register(
            "whatsapp_gateway_cache_requests",
            "Cache lookups by tier (local, redis, fallback) and result (hit, negative_hit, miss, skipped, error)",
            m.requests.clone(),
        );
        registry.register(
            "whatsapp_gateway_cache_fallback_calls",
            "Lookups that reached the fallback (backend or informer store)",
            m.fallback_calls.clone(),
        );
        if let Some(h) = &m.fallback_duration {
            registry.register(
                "whatsapp_gateway_cache_fallback_duration_seconds",
                "Duration of fallback lookups",
                h.clone(),
            );
        }
        registry.register(
            "whatsapp_gateway_cache_invalidations",
            "Invalidation messages published (sent) and evictions from other gateways' messages (received)",
            m.invalidations.clone(),
        );
        registry.register(
            "whatsapp_gateway_cache_keys",
            "Keys in the shared Redis tier by kind (from the expiry indexes, refreshed every few seconds; the owned sessions when there is no Redis)",
            m.keys.clone(),
        );
        registry.register(
            "whatsapp_gateway_cache_local_entries",
            "Entries in this process's local tier (positive and negative)",
            m.local_entries.clone(),
        );
        registry.register(
            "whatsapp_gateway_cache_pending_writes",
            "Session writes waiting for the Redis writer",
            m.pending_writes.clone(),
        );
        registry.register(
            "whatsapp_gateway_cache_write_errors",
            "Redis write batches that failed (they are retried)",
            m.write_errors.clone(),
        );
        m
    }

    pub(crate) fn request(&self, tier: Tier, outcome: Outcome) {
        self.requests
            .get_or_create(&RequestLabels {
                tier: tier.as_str(),
                result: outcome.as_str(),
            })
            .inc();
    }

    pub(crate) fn fallback_call(&self, seconds: f64) {
        self.fallback_calls.inc();
        if let Some(h) = &self.fallback_duration {
            h.observe(seconds);
        }
    }

    pub(crate) fn invalidation_sent(&self, n: u64) {
        self.invalidations
            .get_or_create(&DirectionLabel { direction: "sent" })
            .inc_by(n);
    }

    pub(crate) fn invalidation_received(&self) {
        self.invalidations
            .get_or_create(&DirectionLabel {
                direction: "received",
            })
            .inc();
    }

    pub(crate) fn set_keys(&self, counts: [u64; 4]) {
        for kind in Kind::ALL {
            self.keys
                .get_or_create(&KindLabel {
                    kind: kind.as_str(),
                })
                .set(counts[kind.index()] as i64);
        }
    }

    pub(crate) fn set_local_entries(&self, n: u64) {
        self.local_entries.set(n as i64);
    }

    pub(crate) fn set_pending_writes(&self, n: usize) {
        self.pending_writes.set(n as i64);
    }

    pub(crate) fn write_error(&self) {
        self.write_errors.inc();
    }

    /// Lookups answered per tier/result so far (for the benchmark and tests).
    pub fn requests(&self, tier: Tier, outcome: Outcome) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                tier: tier.as_str(),
                result: outcome.as_str(),
            })
            .get()
    }

    pub fn fallback_calls(&self) -> u64 {
        self.fallback_calls.get()
    }
}
