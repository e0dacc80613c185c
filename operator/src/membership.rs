//! Which gateway shards are alive, from their Leases (pure: takes the Leases and the time).
//!
//! A gateway pod `<release>-gateway-<k>` renews Lease `<release>-gateway-<k>`; the shard id is the
//! ordinal `k`. A Lease is live while `renewTime + leaseDurationSeconds` is in the future; a live
//! Lease annotated `whatsapp.gateway.dev/draining=true` is draining: its gateway is shutting down
//! and hands its sessions over.
//!
//! Expiry is only judged on what the operator could see: after its Lease watch failed (an
//! apiserver or etcd outage, a network blip), every Lease gets one more lease duration from the
//! moment the watch was last broken. Otherwise the first pass after an outage longer than a
//! Lease would find every shard but the first to renew gone and pile all sessions onto it, only
//! to hand them back seconds later: every session reconnecting twice.

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// The ordinal, as a string (the label value).
    pub id: String,
    pub draining: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    pub live: Vec<String>,
    pub draining: Vec<String>,
}

/// The shard id of a Lease named `<release>-gateway-<k>`, if the name has that form.
pub fn shard_of(release: &str, lease_name: &str) -> Option<String> {
    let ordinal = lease_name
        .strip_prefix(release)?
        .strip_prefix("-gateway-")?;
    (!ordinal.is_empty() && ordinal.chars().all(|c| c.is_ascii_digit()))
        .then(|| ordinal.to_string())
}

/// Live and draining shards at `now`; `blind_until`: when the operator last could not watch the
/// Leases (see the module docs), if ever.
pub fn membership(
    release: &str,
    leases: &[Lease],
    now: DateTime<Utc>,
    blind_until: Option<DateTime<Utc>>,
) -> Membership {
    let mut out = Membership::default();
    for lease in leases {
        let Some(name) = lease.metadata.name.as_deref() else {
            continue;
        };
        let Some(id) = shard_of(release, name) else {
            continue;
        };
        let Some(spec) = &lease.spec else { continue };
        let (Some(renewed), Some(duration)) =
            (spec.renew_time.as_ref(), spec.lease_duration_seconds)
        else {
            continue;
        };
        // Millisecond precision is plenty against a 15 s lease.
        let expires_ms = renewed.0.as_millisecond() + i64::from(duration) * 1000;
        let unseen = blind_until.is_some_and(|blind| {
            blind.timestamp_millis() + i64::from(duration) * 1000 > now.timestamp_millis()
        });
        if expires_ms <= now.timestamp_millis() && !unseen {
            continue;
        }
        let draining = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crds::DRAINING_ANNOTATION))
            .is_some_and(|v| v == "true");
        if draining {
            out.draining.push(id);
        } else {
            out.live.push(id);
        }
    }
    out.live
        .sort_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX));
    out.draining
        .sort_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(name: &str, renewed: DateTime<Utc>, duration: i32, draining: bool) -> Lease {
        let mut lease = Lease::default();
        lease.metadata.name = Some(name.into());
        if draining {
            lease.metadata.annotations =
                Some([(crds::DRAINING_ANNOTATION.to_string(), "true".to_string())].into());
        }
        lease.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            renew_time: Some(MicroTime(
                k8s_openapi::jiff::Timestamp::from_millisecond(renewed.timestamp_millis()).unwrap(),
            )),
            lease_duration_seconds: Some(duration),
            ..Default::default()
        });
        lease
    }

    #[test]
    fn fresh_leases_are_live_expired_ones_are_gone_and_draining_is_separate() {
        let now = Utc::now();
        let leases = [
            lease("wa-gateway-0", now, 15, false),
            lease(
                "wa-gateway-1",
                now - chrono::Duration::seconds(20),
                15,
                false,
            ),
            lease("wa-gateway-2", now, 15, true),
            lease(
                "wa-gateway-10",
                now - chrono::Duration::seconds(5),
                15,
                false,
            ),
            lease("other-gateway-3", now, 15, false),
            lease("wa-operator-leader", now, 15, false),
        ];
        let m = membership("wa", &leases, now, None);
        assert_eq!(m.live, ["0", "10"]);
        assert_eq!(m.draining, ["2"]);
    }

    #[test]
    fn a_lease_is_not_judged_expired_on_what_the_operator_could_not_see() {
        let now = Utc::now();
        // Both renewed 20 s ago, before the apiserver went away; shard 1 renewed since.
        let leases = [
            lease(
                "wa-gateway-0",
                now - chrono::Duration::seconds(20),
                15,
                false,
            ),
            lease("wa-gateway-1", now, 15, false),
        ];
        let watch_back = now - chrono::Duration::seconds(3);
        let m = membership("wa", &leases, now, Some(watch_back));
        assert_eq!(
            m.live,
            ["0", "1"],
            "one lease duration after the watch came back"
        );
        let later = now + chrono::Duration::seconds(13);
        let m = membership("wa", &leases, later, Some(watch_back));
        assert_eq!(
            m.live,
            ["1"],
            "past it, a Lease that was not renewed is gone"
        );
    }

    #[test]
    fn shard_ids_come_from_the_ordinal() {
        assert_eq!(shard_of("wa", "wa-gateway-7").as_deref(), Some("7"));
        assert_eq!(shard_of("wa", "wa-gateway-"), None);
        assert_eq!(shard_of("wa", "wa-gateway-x"), None);
        assert_eq!(shard_of("wa", "wab-gateway-1"), None);
    }
}
