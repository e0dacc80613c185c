//! The unsent items of one request stream, in arrival order, with per-session superseding.

use std::collections::{HashMap, VecDeque};

use tokio::time::Instant;

use super::Lane;
use super::stats::BatchStats;
use crate::events::{GatewayEvent, Priority};

/// What a newer event of a session does to an unsent older one in the same queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Supersede {
    /// Both are kept.
    Never,
    /// The newer one takes the older one's place and keeps the earlier deadline. For QR codes:
    /// only the latest is worth showing, and it should not wait longer than the one it replaced.
    InPlace,
    /// The older one is dropped and the newer one queued at the back, so it stays after anything
    /// that arrived in between. For normal-priority status.
    Requeue,
}

struct Slot {
    /// `None` once superseded by a later arrival (a tombstone).
    event: Option<GatewayEvent>,
    /// When the item must be sent at the latest, if its policy has such a bound.
    deadline: Option<Instant>,
}

/// Tombstones are compacted away once they outnumber live items by this much, so a stalled queue
/// full of superseded items cannot hold back input for long.
const COMPACT_MIN_TOMBSTONES: usize = 256;

#[derive(Default)]
pub(super) struct PendingQueue {
    slots: VecDeque<Slot>,
    /// Absolute arrival index of `slots[0]`; indices stay valid while the front is popped.
    first_index: u64,
    live: usize,
    live_high: usize,
    tombstones: usize,
    /// The replaceable unsent item of each session, by arrival index.
    replaceable: HashMap<String, u64>,
    earliest_deadline: Option<Instant>,
}

impl PendingQueue {
    /// Slots held, superseded ones included: what bounds memory.
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn live(&self) -> usize {
        self.live
    }

    pub(super) fn has_high(&self) -> bool {
        self.live_high > 0
    }

    pub(super) fn earliest_deadline(&self) -> Option<Instant> {
        self.earliest_deadline
    }

    pub(super) fn push(
        &mut self,
        event: GatewayEvent,
        deadline: Option<Instant>,
        supersede: Supersede,
        stats: &BatchStats,
    ) {
        if supersede != Supersede::Never
            && let Some(&index) = self.replaceable.get(event.session_id())
        {
            let position = (index - self.first_index) as usize;
            let slot = &mut self.slots[position];
            if let Some(old) = slot.event.as_ref().filter(|old| is_replaceable(old)) {
                if is_older(&event, old) {
                    // A re-sync repeat snapshotted before a newer event of the session was
                    // queued: the newer one stays, the repeat is dropped.
                    stats.on_superseded(Lane::of(&event));
                    return;
                }
                stats.on_superseded(Lane::of(old));
                match supersede {
                    Supersede::InPlace => {
                        slot.event = Some(event);
                        slot.deadline = earlier(slot.deadline, deadline);
                        self.earliest_deadline = earlier(self.earliest_deadline, slot.deadline);
                        return;
                    }
                    Supersede::Requeue => {
                        slot.event = None;
                        slot.deadline = None;
                        self.live -= 1;
                        self.tombstones += 1;
                    }
                    Supersede::Never => unreachable!("checked above"),
                }
            }
        }
        let index = self.first_index + self.slots.len() as u64;
        if supersede != Supersede::Never {
            self.replaceable
                .insert(event.session_id().to_owned(), index);
        }
        if is_high(&event) {
            self.live_high += 1;
        }
        self.live += 1;
        self.earliest_deadline = earlier(self.earliest_deadline, deadline);
        self.slots.push_back(Slot {
            event: Some(event),
            deadline,
        });
        if self.tombstones >= COMPACT_MIN_TOMBSTONES && self.tombstones > self.live {
            self.compact();
        }
    }

    /// Takes up to `max` items from the front, in arrival order. QR codes that expired by `now`
    /// are dropped and counted instead of sent.
    pub(super) fn take(
        &mut self,
        max: usize,
        now: Instant,
        stats: &BatchStats,
    ) -> Vec<GatewayEvent> {
        let mut items = Vec::with_capacity(max.min(self.live));
        while items.len() < max {
            let Some(slot) = self.slots.pop_front() else {
                break;
            };
            let index = self.first_index;
            self.first_index += 1;
            let Some(event) = slot.event else {
                self.tombstones -= 1;
                continue;
            };
            self.live -= 1;
            if is_high(&event) {
                self.live_high -= 1;
            }
            if self.replaceable.get(event.session_id()) == Some(&index) {
                self.replaceable.remove(event.session_id());
            }
            if let GatewayEvent::Qr(qr) = &event
                && qr.is_expired_at(now)
            {
                stats.on_expired();
                continue;
            }
            stats.on_sent(Lane::of(&event));
            items.push(event);
        }
        if self.live == 0 {
            // Only tombstones left: drop them so they cannot hold the queue "full".
            self.first_index += self.slots.len() as u64;
            self.slots.clear();
            self.tombstones = 0;
        }
        self.earliest_deadline = self.slots.iter().filter_map(|slot| slot.deadline).min();
        items
    }

    fn compact(&mut self) {
        self.slots.retain(|slot| slot.event.is_some());
        self.tombstones = 0;
        // Positions moved, so rebuild the index; the last replaceable slot of a session wins, as
        // it would have on arrival.
        self.replaceable.clear();
        for (position, slot) in self.slots.iter().enumerate() {
            if let Some(event) = &slot.event
                && is_replaceable(event)
            {
                self.replaceable.insert(
                    event.session_id().to_owned(),
                    self.first_index + position as u64,
                );
            }
        }
    }
}

fn is_high(event: &GatewayEvent) -> bool {
    matches!(event, GatewayEvent::Status(status) if status.priority == Priority::High)
}

/// Whether a newer event of the same session may drop this one: QR codes always; normal-priority
/// status unless it is a status the backend must see (logged out, banned).
fn is_replaceable(event: &GatewayEvent) -> bool {
    match event {
        GatewayEvent::Qr(_) => true,
        GatewayEvent::Status(status) => {
            status.priority == Priority::Normal && !status.status.must_not_be_superseded()
        }
    }
}

/// Whether `incoming` is known to be older than the unsent `queued` of the same session. Live
/// events arrive in order; only re-sync repeats (which keep their original `at`, `seq` and
/// expiry) can arrive after something newer. A status is ordered by `at`, as the backend orders
/// it. A QR only when both its `seq` and its expiry say so: `seq` starts again at 1 with each
/// pairing cycle, so a lower `seq` with a later expiry is a newer cycle.
fn is_older(incoming: &GatewayEvent, queued: &GatewayEvent) -> bool {
    match (incoming, queued) {
        (GatewayEvent::Status(incoming), GatewayEvent::Status(queued)) => incoming.at < queued.at,
        (GatewayEvent::Qr(incoming), GatewayEvent::Qr(queued)) => {
            incoming.seq < queued.seq && incoming.valid_until <= queued.valid_until
        }
        _ => false,
    }
}

fn earlier(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
