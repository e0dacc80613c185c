//! Session ids are global (they key Redis: lock, credentials, cache) but resources are
//! namespaced, so two resources can name the same id: the same manifest applied in two
//! namespaces, or the same name in two namespaces without `spec.sessionId`. Running both would
//! fight over one account, and deleting the copy would log out and wipe the account the other
//! one runs. The oldest resource keeps the id; the others are conflicts: not run, reported on
//! their status, and deleting them leaves the account alone.

use std::collections::HashMap;

/// What the conflict check needs of a resource that is not being deleted.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// `namespace/name`.
    pub key: &'a str,
    pub session_id: &'a str,
    /// `metadata.creationTimestamp` in milliseconds (absent only on objects never stored).
    pub created_ms: Option<i64>,
}

/// Maps every losing resource (key) to the resource that keeps its session id (key). The
/// oldest wins; equal timestamps (they have one-second resolution) fall back to the key, so
/// every pass and every operator replica picks the same winner.
pub fn losers(claims: &[Claim<'_>]) -> HashMap<String, String> {
    let mut owner: HashMap<&str, Claim<'_>> = HashMap::new();
    for claim in claims {
        owner
            .entry(claim.session_id)
            .and_modify(|current| {
                if rank(claim) < rank(current) {
                    *current = *claim;
                }
            })
            .or_insert(*claim);
    }
    claims
        .iter()
        .filter_map(|claim| {
            let winner = owner[claim.session_id];
            (winner.key != claim.key).then(|| (claim.key.to_string(), winner.key.to_string()))
        })
        .collect()
}

fn rank<'a>(claim: &Claim<'a>) -> (i64, &'a str) {
    (claim.created_ms.unwrap_or(i64::MAX), claim.key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim<'a>(key: &'a str, id: &'a str, created_ms: i64) -> Claim<'a> {
        Claim {
            key,
            session_id: id,
            created_ms: Some(created_ms),
        }
    }

    #[test]
    fn distinct_ids_never_conflict() {
        let claims = [claim("a/x", "x", 1), claim("b/y", "y", 1)];
        assert!(losers(&claims).is_empty());
    }

    #[test]
    fn the_oldest_resource_keeps_the_id() {
        let claims = [
            claim("team-b/support", "support", 2_000),
            claim("team-a/support", "support", 1_000),
            claim("team-c/other", "support", 3_000),
        ];
        let losers = losers(&claims);
        assert_eq!(losers.len(), 2);
        assert_eq!(losers["team-b/support"], "team-a/support");
        assert_eq!(losers["team-c/other"], "team-a/support");
    }

    #[test]
    fn a_tie_is_broken_by_key_whatever_the_order() {
        let forward = [claim("b/s", "s", 1_000), claim("a/s", "s", 1_000)];
        let backward = [claim("a/s", "s", 1_000), claim("b/s", "s", 1_000)];
        for claims in [&forward[..], &backward[..]] {
            let losers = losers(claims);
            assert_eq!(losers.len(), 1);
            assert_eq!(losers["b/s"], "a/s");
        }
    }

    #[test]
    fn a_resource_without_a_timestamp_loses() {
        let claims = [
            Claim {
                key: "a/s",
                session_id: "s",
                created_ms: None,
            },
            claim("b/s", "s", 5_000),
        ];
        assert_eq!(losers(&claims)["a/s"], "b/s");
    }
}
