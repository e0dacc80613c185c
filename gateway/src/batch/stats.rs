//! Counters the batcher keeps so metrics can be wired without the batcher knowing Prometheus.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{FlushReason, Lane};

const LANES: usize = Lane::ALL.len();
const REASONS: usize = FlushReason::ALL.len();

/// Shared, lock-free counters of one batcher. Items are counted by their own lane (a high-priority
/// status batch may carry normal items along); flushes by the batch's lane.
#[derive(Debug, Default)]
pub struct BatchStats {
    received: [AtomicU64; LANES],
    pending: [AtomicU64; LANES],
    sent: [AtomicU64; LANES],
    superseded: [AtomicU64; LANES],
    expired: AtomicU64,
    flushes: [[AtomicU64; REASONS]; LANES],
}

impl BatchStats {
    /// Items accepted from the input channel.
    pub fn received(&self, lane: Lane) -> u64 {
        self.received[lane.index()].load(Ordering::Relaxed)
    }

    /// Items waiting to be sent (gauge).
    pub fn pending(&self, lane: Lane) -> u64 {
        self.pending[lane.index()].load(Ordering::Relaxed)
    }

    /// Items handed to the sink.
    pub fn sent(&self, lane: Lane) -> u64 {
        self.sent[lane.index()].load(Ordering::Relaxed)
    }

    /// Items replaced by a newer one of the same session before they were sent.
    pub fn superseded(&self, lane: Lane) -> u64 {
        self.superseded[lane.index()].load(Ordering::Relaxed)
    }

    /// QR codes dropped because they expired before they could be sent.
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    pub fn flushes(&self, lane: Lane, reason: FlushReason) -> u64 {
        self.flushes[lane.index()][reason.index()].load(Ordering::Relaxed)
    }

    pub fn total_received(&self) -> u64 {
        Lane::ALL.iter().map(|&lane| self.received(lane)).sum()
    }

    pub fn total_sent(&self) -> u64 {
        Lane::ALL.iter().map(|&lane| self.sent(lane)).sum()
    }

    pub fn total_superseded(&self) -> u64 {
        Lane::ALL.iter().map(|&lane| self.superseded(lane)).sum()
    }

    pub fn total_flushes(&self) -> u64 {
        Lane::ALL
            .iter()
            .flat_map(|&lane| FlushReason::ALL.map(|reason| self.flushes(lane, reason)))
            .sum()
    }

    pub(super) fn on_received(&self, lane: Lane) {
        self.received[lane.index()].fetch_add(1, Ordering::Relaxed);
        self.pending[lane.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn on_superseded(&self, lane: Lane) {
        self.superseded[lane.index()].fetch_add(1, Ordering::Relaxed);
        self.pending[lane.index()].fetch_sub(1, Ordering::Relaxed);
    }

    pub(super) fn on_expired(&self) {
        self.expired.fetch_add(1, Ordering::Relaxed);
        self.pending[Lane::Qr.index()].fetch_sub(1, Ordering::Relaxed);
    }

    pub(super) fn on_sent(&self, lane: Lane) {
        self.sent[lane.index()].fetch_add(1, Ordering::Relaxed);
        self.pending[lane.index()].fetch_sub(1, Ordering::Relaxed);
    }

    pub(super) fn on_flush(&self, lane: Lane, reason: FlushReason) {
        self.flushes[lane.index()][reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}
