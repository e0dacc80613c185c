//! `bench assign`: the pure assignment alone, at internet scale on paper. No cluster, no I/O in the timed part.
use std::time::Instant;

use anyhow::Context;
use operator::assign::{AssignConfig, Assignment, SessionState, assign};

#[derive(clap::Args)]
pub struct AssignArgs {
    /// Sessions to place.
    #[arg(long, default_value_t = 1_000_000)]
    sessions: usize,
    /// Live shards before one is added or removed.
    #[arg(long, default_value_t = 1000)]
    shards: usize,
    /// Load slack: cap = ceil((1 + eps) * sessions / shards).
    #[arg(long, default_value_t = operator::assign::DEFAULT_EPSILON)]
    eps: f64,
    /// Virtual nodes per shard on the hash ring.
    #[arg(long, default_value_t = operator::assign::DEFAULT_VIRTUAL_NODES_PER_SHARD)]
    virtual_nodes: u32,
    /// Varies the session ids and which shard is removed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// splitmix64: a reproducible stream of ids without a random-number crate.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut word = *state;
    word = (word ^ (word >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    word = (word ^ (word >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    word ^ (word >> 31)
}

/// The input of the next round: every session where `assignment` put it.
fn placed<'a>(sessions: &[SessionState<'a>], assignment: &Assignment<'a>) -> Vec<SessionState<'a>> {
    sessions
        .iter()
        .zip(&assignment.shards)
        .map(|(state, &shard)| SessionState {
            session: state.session,
            shard: Some(shard),
        })
        .collect()
}

pub fn run(args: AssignArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.shards >= 2,
        "--shards must be at least 2 to measure a removal"
    );
    let config = AssignConfig {
        epsilon: args.eps,
        virtual_nodes_per_shard: args.virtual_nodes,
    };

    let mut state = args.seed;
    // UUID-shaped ids, as the CRs carry.
    let session_ids: Vec<String> = (0..args.sessions)
        .map(|_| {
            let (high, low) = (splitmix64(&mut state), splitmix64(&mut state));
            format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                high >> 32,
                (high >> 16) & 0xffff,
                high & 0xffff,
                low >> 48,
                low & 0xffff_ffff_ffff
            )
        })
        .collect();
    let shard_ids: Vec<String> = (0..=args.shards).map(|index| index.to_string()).collect();
    let all_shards: Vec<&str> = shard_ids.iter().map(String::as_str).collect();
    let shards = &all_shards[..args.shards];
    let removed = shards[(splitmix64(&mut state) % args.shards as u64) as usize];
    let remaining: Vec<&str> = shards
        .iter()
        .copied()
        .filter(|&shard| shard != removed)
        .collect();

    let fresh: Vec<SessionState<'_>> = session_ids
        .iter()
        .map(|session| SessionState {
            session,
            shard: None,
        })
        .collect();
    let started = Instant::now();
    let full = assign(shards, &[], &fresh, &config).context("full placement")?;
    let seconds_full_placement = started.elapsed().as_secs_f64();

    let current = placed(&fresh, &full);
    let started = Instant::now();
    let added = assign(&all_shards, &[], &current, &config).context("adding a shard")?;
    let seconds_add_one = started.elapsed().as_secs_f64();
    let removed_one = assign(&remaining, &[], &current, &config).context("removing a shard")?;

    let sessions = args.sessions as f64;
    let added_shard_load = added
        .loads
        .iter()
        .find(|&&(shard, _)| shard == all_shards[args.shards])
        .map_or(0, |&(_, load)| load);
    let max_over_mean_load = [&full, &added, &removed_one]
        .iter()
        .map(|assignment| assignment.max_over_mean_load())
        .fold(0.0, f64::max);
    let report = serde_json::json!({
        "sessions": args.sessions,
        "shards": args.shards,
        "eps": args.eps,
        "seed": args.seed,
        "virtual_nodes_per_shard": args.virtual_nodes,
        "capacity": full.capacity,
        "seconds_full_placement": seconds_full_placement,
        "seconds_add_one": seconds_add_one,
        "moved_fraction_add_one": added.moves.len() as f64 / sessions,
        "optimal_add_one": 1.0 / (args.shards + 1) as f64,
        "moved_fraction_remove_one": removed_one.moves.len() as f64 / sessions,
        "optimal_remove_one": 1.0 / args.shards as f64,
        // Fair share: the added shard's load over the mean after the add (stickiness alone would give 0).
        "new_shard_load_over_mean": added_shard_load as f64 * (args.shards + 1) as f64 / sessions,
        "removed_shard_load_fraction": full.loads.iter().find(|&&(shard, _)| shard == removed).map_or(0, |&(_, load)| load) as f64 / sessions,
        // Worst of the three assignments: full placement, after the add, after the removal.
        "max_over_mean_load": max_over_mean_load,
    });
    println!("{report}");
    Ok(())
}
