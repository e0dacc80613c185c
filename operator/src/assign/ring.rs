//! The hash ring: stable positions for sessions and shard virtual nodes.
//!
//! The hash is FNV-1a followed by the murmur3 64-bit finalizer. Both are fixed algorithms written here, so
//! positions never change with a crate upgrade, a Rust release or a process restart (std's `RandomState`
//! would reshuffle every session on each operator restart).

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// murmur3's fmix64: a bijection that spreads FNV's weak high bits over the whole word.
fn finalize(mut word: u64) -> u64 {
    word ^= word >> 33;
    word = word.wrapping_mul(0xff51_afd7_ed55_8ccd);
    word ^= word >> 33;
    word = word.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    word ^ (word >> 33)
}

/// Position of a session on the ring; stable across processes and versions.
pub fn session_position(session: &str) -> u64 {
    finalize(fnv1a(session.as_bytes()))
}

/// Position of one virtual node of a shard. Distinct for every node of one shard, because `finalize` is a
/// bijection.
pub fn virtual_node_position(shard: &str, node: u32) -> u64 {
    finalize(fnv1a(shard.as_bytes()).wrapping_add(finalize(u64::from(node) + 1)))
}

/// Shard index used by the ring; indexes the sorted live shard list.
pub type ShardIndex = u32;

pub struct Ring {
    /// Virtual node positions in ring order.
    positions: Vec<u64>,
    /// Owner of each entry of `positions`.
    owners: Vec<ShardIndex>,
    /// Each shard's own positions, sorted; shard `i` holds `nodes_per_shard` entries starting at
    /// `i * nodes_per_shard`. Used to measure how far a session is from a given shard.
    positions_by_shard: Vec<u64>,
    nodes_per_shard: usize,
}

impl Ring {
    /// Builds the ring of `shards`, which must be sorted and distinct so that ties between equal positions
    /// break the same way in every process.
    pub fn new(shards: &[&str], nodes_per_shard: u32) -> Self {
        let nodes = nodes_per_shard as usize;
        let mut entries = Vec::with_capacity(shards.len() * nodes);
        let mut positions_by_shard = Vec::with_capacity(shards.len() * nodes);
        for (index, shard) in shards.iter().enumerate() {
            let start = positions_by_shard.len();
            for node in 0..nodes_per_shard {
                let position = virtual_node_position(shard, node);
                entries.push((position, index as ShardIndex));
                positions_by_shard.push(position);
            }
            positions_by_shard[start..].sort_unstable();
        }
        entries.sort_unstable();
        let (positions, owners) = entries.into_iter().unzip();
        Ring {
            positions,
            owners,
            positions_by_shard,
            nodes_per_shard: nodes,
        }
    }

    /// Index of the first virtual node at or clockwise after `position`.
    #[cfg(test)]
    pub fn first_node_from(&self, position: u64) -> usize {
        let index = self.positions.partition_point(|&node| node < position);
        if index == self.positions.len() {
            0
        } else {
            index
        }
    }

    /// `first_node_from` for positions visited in increasing order: `cursor` carries the last answer, so a
    /// sweep over sorted sessions costs one pass over the ring instead of a binary search each.
    pub fn first_node_from_sorted(&self, position: u64, cursor: &mut usize) -> usize {
        while *cursor < self.positions.len() && self.positions[*cursor] < position {
            *cursor += 1;
        }
        if *cursor == self.positions.len() {
            0
        } else {
            *cursor
        }
    }

    pub fn owner(&self, node: usize) -> ShardIndex {
        self.owners[node]
    }

    /// Owners of the virtual nodes met walking clockwise from `node`, once around the ring.
    pub fn walk_from(&self, node: usize) -> impl Iterator<Item = ShardIndex> + '_ {
        self.owners[node..]
            .iter()
            .chain(&self.owners[..node])
            .copied()
    }

    /// Clockwise distance from `position` to the nearest virtual node of `shard`: small when the shard is
    /// the session's natural home, large when the session only landed there by overflow.
    pub fn clockwise_distance(&self, shard: ShardIndex, position: u64) -> u64 {
        let start = shard as usize * self.nodes_per_shard;
        let own = &self.positions_by_shard[start..start + self.nodes_per_shard];
        let index = own.partition_point(|&node| node < position);
        let node = if index == own.len() {
            own[0]
        } else {
            own[index]
        };
        node.wrapping_sub(position)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(super::fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
