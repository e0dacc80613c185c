//! Pure session-to-shard assignment: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
//! "Consistent Hashing with Bounded Loads", 2018), made sticky so that only what must move moves.
//!
//! Every shard has a fixed number of virtual nodes on a 64-bit hash ring and every session a position on it.
//! A session's *walk* is the sequence of shards met going clockwise from its position; the first is its
//! *home*. No shard may hold more than `capacity = ceil((1 + eps) * sessions / live_shards)` sessions.
//!
//! One call computes the next assignment from the current one:
//! 1. Sessions on a live shard stay there; sessions that are new, or whose shard is gone or draining, wait.
//! 2. Shards above capacity give up their excess, sessions farthest along their own walk first (those that
//!    prefer another shard, such as one just added, before those at home).
//! 3. Waiting sessions, in ring order, take the first shard on their walk below capacity: the bounded-load
//!    rule of the paper.
//! 4. Rebalance: a session moves to a shard earlier on its walk when that shard is below the mean load
//!    (`ceil(sessions / live_shards)`) and its own shard holds at least two more. This is how an added
//!    shard gets its fair share: the sessions whose walk now starts there move to it, and little else does.
//!    Requiring a heavier donor stops cascades, keeps an arbitrary (say, inherited) assignment where it is
//!    once it is balanced, and makes every move lower the sum of squared loads, so the step terminates.
//! 5. Moves are the difference between the old and the new assignment.
//!
//! The result is a fixed point: running it again on its own output moves nothing. It depends only on the
//! sets of shards and sessions, never on input order.

mod ring;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};

use ring::{Ring, ShardIndex};

pub use ring::session_position;

/// Default `eps` of the bounded-load cap.
pub const DEFAULT_EPSILON: f64 = 0.25;
/// Default virtual nodes per shard. A shard's share of the ring varies by about `1/sqrt(nodes)`: at 640
/// (about 4%) the natural loads of 1,000 shards stay near 1.15-1.2 times the mean, so the cap is a guard
/// rather than the usual limit; at 160 (8%) many shards sit on the cap. A ring of 1,000 shards still
/// builds in tens of milliseconds.
pub const DEFAULT_VIRTUAL_NODES_PER_SHARD: u32 = 640;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AssignConfig {
    /// Load slack: no shard holds more than `ceil((1 + epsilon) * mean)` sessions. Must be finite and >= 0.
    pub epsilon: f64,
    /// Virtual nodes per shard on the ring; must be >= 1.
    pub virtual_nodes_per_shard: u32,
}

impl Default for AssignConfig {
    fn default() -> Self {
        AssignConfig {
            epsilon: DEFAULT_EPSILON,
            virtual_nodes_per_shard: DEFAULT_VIRTUAL_NODES_PER_SHARD,
        }
    }
}

/// A session and the shard it is assigned to now, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionState<'a> {
    pub session: &'a str,
    pub shard: Option<&'a str>,
}

/// Why a session changes shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MoveReason {
    /// The session had no shard.
    New,
    /// Its shard is neither live nor draining.
    ShardGone,
    /// Its shard is draining.
    Draining,
    /// Its shard held more than the capacity.
    OverCap,
    /// A shard earlier on the session's walk is below the mean load, typically a shard just added.
    Rebalance,
}

impl MoveReason {
    /// Stable lowercase name, for metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::New => "new",
            MoveReason::ShardGone => "shard_gone",
            MoveReason::Draining => "draining",
            MoveReason::OverCap => "over_cap",
            MoveReason::Rebalance => "rebalance",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Move<'a> {
    pub session: &'a str,
    pub from: Option<&'a str>,
    pub to: &'a str,
    pub reason: MoveReason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment<'a> {
    /// The shard of each session, in the order of the input sessions.
    pub shards: Vec<&'a str>,
    /// The sessions whose shard changed, in ring order (by [`session_position`], then id).
    pub moves: Vec<Move<'a>>,
    /// The most sessions any shard may hold.
    pub capacity: usize,
    /// Sessions per live shard, sorted by shard id; shards with no session included.
    pub loads: Vec<(&'a str, usize)>,
}

impl Assignment<'_> {
    /// Largest shard load divided by the mean load; 0 when there is no session.
    pub fn max_over_mean_load(&self) -> f64 {
        let total: usize = self.loads.iter().map(|&(_, load)| load).sum();
        let max = self.loads.iter().map(|&(_, load)| load).max().unwrap_or(0);
        if total == 0 {
            0.0
        } else {
            max as f64 * self.loads.len() as f64 / total as f64
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AssignError {
    #[error("{sessions} sessions but no live shard to assign them to")]
    NoLiveShards { sessions: usize },
    #[error("session {0:?} appears more than once")]
    DuplicateSession(String),
    #[error("epsilon must be finite and >= 0, got {0}")]
    InvalidEpsilon(f64),
    #[error("virtual_nodes_per_shard must be >= 1")]
    NoVirtualNodes,
}

/// `ceil((1 + epsilon) * sessions / shards)`, never below `ceil(sessions / shards)`.
pub fn capacity(sessions: usize, shards: usize, epsilon: f64) -> usize {
    if sessions == 0 || shards == 0 {
        return 0;
    }
    let mean_ceiling = sessions.div_ceil(shards);
    // Shave a relative 1e-12 so that float noise (1.1 * 1000 / 10 = 110.00000000000001) does not round up.
    let bounded =
        ((1.0 + epsilon) * sessions as f64 / shards as f64 * (1.0 - 1e-12)).ceil() as usize;
    bounded.max(mean_ceiling)
}

/// Below this many light shards, rebalancing measures ring distances to each instead of walking the ring,
/// which from a far-away shard can take thousands of steps.
const SCAN_BELOW_MEAN_UP_TO: usize = 32;

/// No shard yet.
const UNASSIGNED: ShardIndex = ShardIndex::MAX;

/// Computes the next assignment.
///
/// `live` are the shards that may receive sessions; `draining` are shards that still run but hand their
/// sessions off (a shard in both lists counts as draining). Any other shard a session names is gone.
pub fn assign<'a>(
    live: &[&'a str],
    draining: &[&'a str],
    sessions: &[SessionState<'a>],
    config: &AssignConfig,
) -> Result<Assignment<'a>, AssignError> {
    if !config.epsilon.is_finite() || config.epsilon < 0.0 {
        return Err(AssignError::InvalidEpsilon(config.epsilon));
    }
    if config.virtual_nodes_per_shard == 0 {
        return Err(AssignError::NoVirtualNodes);
    }
    let draining: HashSet<&str> = draining.iter().copied().collect();
    let mut live: Vec<&'a str> = live
        .iter()
        .copied()
        .filter(|shard| !draining.contains(shard))
        .collect();
    live.sort_unstable();
    live.dedup();
    if live.is_empty() && !sessions.is_empty() {
        return Err(AssignError::NoLiveShards {
            sessions: sessions.len(),
        });
    }
    let index_of: HashMap<&str, ShardIndex> = live
        .iter()
        .enumerate()
        .map(|(index, &shard)| (shard, index as ShardIndex))
        .collect();

    let positions: Vec<u64> = sessions
        .iter()
        .map(|state| session_position(state.session))
        .collect();
    let ring_order = ring_order(sessions, &positions)?;

    let capacity = capacity(sessions.len(), live.len(), config.epsilon);
    let mean_load = sessions.len().div_ceil(live.len().max(1));
    let ring = Ring::new(&live, config.virtual_nodes_per_shard);

    // Sessions are visited in ring order, so one sweep finds every session's first virtual node.
    let mut first_nodes = vec![0; sessions.len()];
    let mut cursor = 0;
    for &session in &ring_order {
        let position = positions[session as usize];
        first_nodes[session as usize] = ring.first_node_from_sorted(position, &mut cursor);
    }

    let mut state = State {
        ring: &ring,
        positions: &positions,
        first_nodes: &first_nodes,
        shard_of: vec![UNASSIGNED; sessions.len()],
        loads: vec![0; live.len()],
        reasons: vec![None; sessions.len()],
    };

    // Step 1: keep what sits on a live shard.
    let mut previous = vec![UNASSIGNED; sessions.len()];
    for (session, current) in sessions.iter().enumerate() {
        match current.shard {
            Some(shard) => match index_of.get(shard) {
                Some(&index) => {
                    previous[session] = index;
                    state.shard_of[session] = index;
                    state.loads[index as usize] += 1;
                }
                None if draining.contains(shard) => {
                    state.reasons[session] = Some(MoveReason::Draining)
                }
                None => state.reasons[session] = Some(MoveReason::ShardGone),
            },
            None => state.reasons[session] = Some(MoveReason::New),
        }
    }

    state.shed_load_above(capacity, &ring_order);
    state.place_waiting_sessions(&ring_order, capacity);
    state.rebalance_towards_preferred_shards(&ring_order, mean_load);

    // Ring order, not id order: deterministic all the same, and a million-move sort by string is too slow.
    let moves: Vec<Move<'a>> = ring_order
        .iter()
        .map(|&session| session as usize)
        .filter(|&session| state.shard_of[session] != previous[session])
        .map(|session| Move {
            session: sessions[session].session,
            from: sessions[session].shard,
            to: live[state.shard_of[session] as usize],
            reason: state.reasons[session]
                .expect("a session that changed shard was displaced for a reason"),
        })
        .collect();

    Ok(Assignment {
        shards: state
            .shard_of
            .iter()
            .map(|&index| live[index as usize])
            .collect(),
        moves,
        capacity,
        loads: live
            .iter()
            .copied()
            .zip(state.loads.iter().map(|&load| load as usize))
            .collect(),
    })
}

/// Session indexes sorted by ring position, ties by id, so that every pass visits sessions in an order that
/// does not depend on the input order. Fails on a repeated session id (equal ids end up adjacent).
fn ring_order(sessions: &[SessionState<'_>], positions: &[u64]) -> Result<Vec<u32>, AssignError> {
    let mut keyed: Vec<(u64, u32)> = positions
        .iter()
        .enumerate()
        .map(|(session, &position)| (position, session as u32))
        .collect();
    keyed.sort_unstable();
    let mut order: Vec<u32> = keyed.iter().map(|&(_, session)| session).collect();
    let mut start = 0;
    while start < keyed.len() {
        let end = start
            + keyed[start..]
                .iter()
                .take_while(|&&(position, _)| position == keyed[start].0)
                .count();
        if end - start > 1 {
            let group = &mut order[start..end];
            group.sort_unstable_by_key(|&session| sessions[session as usize].session);
            if let Some(pair) = group.windows(2).find(|pair| {
                sessions[pair[0] as usize].session == sessions[pair[1] as usize].session
            }) {
                return Err(AssignError::DuplicateSession(
                    sessions[pair[0] as usize].session.to_owned(),
                ));
            }
        }
        start = end;
    }
    Ok(order)
}

struct State<'r> {
    ring: &'r Ring,
    positions: &'r [u64],
    /// Index of each session's first virtual node on the ring: where its walk starts.
    first_nodes: &'r [usize],
    shard_of: Vec<ShardIndex>,
    loads: Vec<u32>,
    /// Why each session left (or never had) its shard; the first reason wins.
    reasons: Vec<Option<MoveReason>>,
}

impl State<'_> {
    fn move_session(&mut self, session: usize, to: ShardIndex, reason: MoveReason) {
        let from = self.shard_of[session];
        if from != UNASSIGNED {
            self.loads[from as usize] -= 1;
        }
        self.loads[to as usize] += 1;
        self.shard_of[session] = to;
        self.reasons[session].get_or_insert(reason);
    }

    /// Virtual nodes a session's walk passes before it meets `shard`: 0 at home, more the farther the
    /// session is from where it would like to be.
    fn walk_steps(&self, session: usize, shard: ShardIndex) -> usize {
        self.ring
            .walk_from(self.first_nodes[session])
            .take_while(|&owner| owner != shard)
            .count()
    }

    /// Step 2: shards above capacity keep the sessions that prefer them most.
    fn shed_load_above(&mut self, capacity: usize, ring_order: &[u32]) {
        let over: Vec<bool> = self
            .loads
            .iter()
            .map(|&load| load as usize > capacity)
            .collect();
        if !over.contains(&true) {
            return;
        }
        let mut residents: Vec<Vec<(usize, usize)>> = vec![Vec::new(); self.loads.len()];
        for &session in ring_order {
            let session = session as usize;
            let shard = self.shard_of[session];
            if shard != UNASSIGNED && over[shard as usize] {
                residents[shard as usize].push((self.walk_steps(session, shard), session));
            }
        }
        for (shard, mut residents) in residents.into_iter().enumerate() {
            let excess = (self.loads[shard] as usize).saturating_sub(capacity);
            // Stable sort: equal steps keep ring order, so the choice is deterministic.
            residents.sort_by_key(|&(steps, _)| std::cmp::Reverse(steps));
            for &(_, session) in &residents[..excess] {
                self.loads[shard] -= 1;
                self.shard_of[session] = UNASSIGNED;
                self.reasons[session].get_or_insert(MoveReason::OverCap);
            }
        }
    }

    /// Step 3: bounded-load placement. Capacity times shards is at least the session count, so some shard
    /// always has room and the walk finds it.
    fn place_waiting_sessions(&mut self, ring_order: &[u32], capacity: usize) {
        for &session in ring_order {
            let session = session as usize;
            if self.shard_of[session] != UNASSIGNED {
                continue;
            }
            let node = self.first_nodes[session];
            let shard = self
                .ring
                .walk_from(node)
                .find(|&shard| (self.loads[shard as usize] as usize) < capacity)
                .expect("capacity * shards >= sessions, so some shard has room");
            let reason = self.reasons[session].unwrap_or(MoveReason::New);
            self.move_session(session, shard, reason);
        }
    }

    /// Step 4. Only sessions away from home can move, so only those are visited, in ring order, in passes
    /// until one moves nothing (a move can make room that a session visited earlier may now take). Each
    /// move lowers the sum of squared loads by at least 2, so the passes end.
    fn rebalance_towards_preferred_shards(&mut self, ring_order: &[u32], mean_load: usize) {
        let mean_load = mean_load as u32;
        let mut candidates: Vec<usize> = ring_order
            .iter()
            .map(|&session| session as usize)
            .filter(|&session| self.ring.owner(self.first_nodes[session]) != self.shard_of[session])
            .collect();
        loop {
            let below_mean: Vec<ShardIndex> = (0..self.loads.len() as ShardIndex)
                .filter(|&shard| self.loads[shard as usize] < mean_load)
                .collect();
            let Some(lightest) = below_mean
                .iter()
                .map(|&shard| self.loads[shard as usize])
                .min()
            else {
                break;
            };
            let mut moved_any = false;
            for &session in &candidates {
                let current = self.shard_of[session];
                let donor_load = self.loads[current as usize];
                if donor_load < lightest + 2 {
                    continue; // no shard is light enough to take a session from this one
                }
                let accepts = |shard: ShardIndex, loads: &[u32]| {
                    loads[shard as usize] < mean_load.min(donor_load - 1)
                };
                let preferred = if below_mean.len() <= SCAN_BELOW_MEAN_UP_TO {
                    self.earliest_accepting(session, current, &below_mean, |shard| {
                        accepts(shard, &self.loads)
                    })
                } else {
                    self.ring
                        .walk_from(self.first_nodes[session])
                        .take_while(|&shard| shard != current)
                        .find(|&shard| accepts(shard, &self.loads))
                };
                if let Some(shard) = preferred {
                    self.move_session(session, shard, MoveReason::Rebalance);
                    moved_any = true;
                }
            }
            if !moved_any {
                break;
            }
            candidates.retain(|&session| {
                self.ring.owner(self.first_nodes[session]) != self.shard_of[session]
            });
        }
    }

    /// Same answer as walking the ring up to `current`, for a short list of shards: the one nearest
    /// clockwise wins, ties (equal positions) to the lower index as in the ring's own order.
    fn earliest_accepting(
        &self,
        session: usize,
        current: ShardIndex,
        shards: &[ShardIndex],
        accepts: impl Fn(ShardIndex) -> bool,
    ) -> Option<ShardIndex> {
        let position = self.positions[session];
        let limit = (self.ring.clockwise_distance(current, position), current);
        shards
            .iter()
            .filter(|&&shard| accepts(shard))
            .map(|&shard| (self.ring.clockwise_distance(shard, position), shard))
            .filter(|&key| key < limit)
            .min()
            .map(|(_, shard)| shard)
    }
}
