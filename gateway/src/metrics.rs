//! The gateway's one Prometheus registry. Modules register their own metrics into it at start-up
//! (`delivery`, `cache`, ...); the batcher's lock-free counters are exported at scrape time by
//! [`BatchStatsCollector`], so the batcher itself knows nothing of Prometheus.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::batch::{BatchStats, FlushReason, Lane};

/// A fresh registry with the process-wide prefix-free names used in DESIGN.md.
pub fn new_registry() -> Registry {
    Registry::default()
}

/// Renders the registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("encoding metrics into a String");
    out
}

#[derive(Debug)]
pub struct BatchStatsCollector(pub Arc<BatchStats>);

impl Collector for BatchStatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.0;
        {
            let mut family = encoder.encode_descriptor(
                "whatsapp_gateway_batch_pending",
                "Items waiting in the batcher, by lane",
                None,
                MetricType::Gauge,
            )?;
            for lane in Lane::ALL {
                let labels = vec![("lane", lane.as_str())];
                ConstGauge::new(stats.pending(lane) as i64)
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "whatsapp_gateway_batch_flushes",
                "Batches flushed, by lane and reason",
                None,
                MetricType::Counter,
            )?;
            for lane in Lane::ALL {
                for reason in FlushReason::ALL {
                    let labels = vec![("lane", lane.as_str()), ("reason", reason.as_str())];
                    ConstCounter::new(stats.flushes(lane, reason))
                        .encode(family.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "whatsapp_gateway_batch_received_items",
                "Events accepted by the batcher, by lane",
                None,
                MetricType::Counter,
            )?;
            for lane in Lane::ALL {
                let labels = vec![("lane", lane.as_str())];
                ConstCounter::new(stats.received(lane)).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "whatsapp_gateway_batch_superseded_items",
                "Items replaced by a newer one of the same session before they were sent, by lane",
                None,
                MetricType::Counter,
            )?;
            for lane in Lane::ALL {
                let labels = vec![("lane", lane.as_str())];
                ConstCounter::new(stats.superseded(lane)).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let family = encoder.encode_descriptor(
                "whatsapp_gateway_batch_expired_items",
                "QR codes dropped in the batcher because they expired before they could be sent",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(stats.expired()).encode(family)?;
        }
        Ok(())
    }
}
