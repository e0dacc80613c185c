//! The ownership history (`wa:owners:history`) read back as tenures, to prove that no session
//! ever had two owners at once.

use std::collections::{BTreeMap, HashMap};

use gateway::session::ownership::{HistoryEntry, HistoryEvent};

/// One owner's hold on a session: [start, end] in unix ms; `end` is None while it still holds it.
#[derive(Debug, Clone)]
pub struct Tenure {
    // Fields are read by the checks below.
    pub owner: String,
    pub start: i64,
    pub end: Option<i64>,
}

/// Per session, the tenures ordered by token.
pub fn tenures(history: &[HistoryEntry]) -> HashMap<String, BTreeMap<u64, Tenure>> {
    let mut out: HashMap<String, BTreeMap<u64, Tenure>> = HashMap::new();
    for entry in history {
        let tenure = out
            .entry(entry.session_id.clone())
            .or_default()
            .entry(entry.token)
            .or_insert_with(|| Tenure {
                owner: entry.owner.clone(),
                start: i64::MAX,
                end: None,
            });
        assert_eq!(tenure.owner, entry.owner, "one owner per token: {entry:?}");
        match entry.event {
            HistoryEvent::Acquire => tenure.start = entry.at_ms,
            HistoryEvent::Release | HistoryEvent::Lost => {
                assert!(tenure.end.is_none(), "ended twice: {entry:?}");
                tenure.end = Some(entry.at_ms);
            }
        }
    }
    out
}

/// Asserts that no two owners of a session overlap. `dead` closes the open tenures of killed
/// gateways at the time they were known dead. Returns the number of handovers checked.
pub fn assert_no_overlap(history: &[HistoryEntry], dead: &HashMap<&str, i64>) -> usize {
    let mut handovers = 0;
    for (session, by_token) in tenures(history) {
        let list: Vec<(u64, Tenure)> = by_token.into_iter().collect();
        for (token, tenure) in &list {
            assert!(
                tenure.start != i64::MAX,
                "{session} token {token}: no acquire"
            );
        }
        for pair in list.windows(2) {
            let ((t1, first), (t2, next)) = (&pair[0], &pair[1]);
            let end = first
                .end
                .or_else(|| dead.get(first.owner.as_str()).copied())
                .unwrap_or_else(|| {
                    panic!(
                        "{session}: token {t1} ({}) never ended, yet token {t2} ({}) started",
                        first.owner, next.owner
                    )
                });
            assert!(
                end <= next.start,
                "{session}: {} (token {t1}) held it until {end}, {} (token {t2}) from {}",
                first.owner,
                next.owner,
                next.start
            );
            handovers += 1;
        }
    }
    handovers
}
