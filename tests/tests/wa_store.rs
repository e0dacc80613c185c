//! The `whatsapp-rust` storage contract: one suite of scenarios, written once against the
//! `Backend` traits and run against both the crate's reference `InMemoryBackend` and the gateway's
//! `RedisStore` (real redis-server). Each scenario asserts the values it expects and returns a
//! transcript of every answer; the two backends' transcripts must be equal.
//!
//! Redis-only: fencing (a store whose token is no longer the session's fence changes nothing), the
//! fenced wipe, concurrent `create`, and `Device` persistence.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fred::bytes::Bytes;
use fred::prelude::*;
use gateway::session::credentials::Fence;
use gateway::session::ownership::{Acquired, LockStore, RedisLockStore, fence_key, owner_key};
use gateway::session::wa_store::{self, RedisStore, WaStoreError, is_fenced, store_prefix};
use serde_json::Value as Json;
use test_support::RedisServer;
use wacore::appstate::hash::HashState;
use wacore::appstate::processor::AppStateMutationMAC;
use wacore::store::Device;
use wacore::store::InMemoryBackend;
use wacore::store::error::StoreError;
use wacore::store::traits::*;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Asserts `$got == $want` and records the answer in the transcript `$t`.
macro_rules! check {
    ($t:expr, $got:expr, $want:expr) => {{
        let got = $got;
        assert_eq!(got, $want, "{}", stringify!($got));
        $t.push(format!("{} = {:?}", stringify!($got), got));
    }};
}

fn j<T: serde::Serialize>(value: &T) -> Json {
    serde_json::to_value(value).expect("serializable")
}

fn b(bytes: &[u8]) -> Bytes {
    Bytes::copy_from_slice(bytes)
}

fn now() -> i64 {
    wacore::time::now_secs()
}

async fn redis_client(redis: &RedisServer) -> Client {
    gateway::redis::connect(&redis.url()).await.unwrap()
}

/// Takes the session's lock as `owner` (bumping its fence) and opens a store with that token.
async fn owned_store(client: &Client, session: &str, owner: &str) -> RedisStore {
    let locks = RedisLockStore::new(client.clone());
    match locks
        .acquire(session, owner, Duration::from_secs(600))
        .await
        .unwrap()
    {
        Acquired::Yes { token, value } => RedisStore::new(
            client.clone(),
            session,
            Fence {
                owner: value,
                token,
            },
        ),
        Acquired::HeldBy(holder) => panic!("{session} is held by {holder}"),
    }
}

/// Hands the session from `old`'s owner to `new_owner`: release, acquire (fence + 1).
async fn take_over(client: &Client, old: &RedisStore, new_owner: &str) -> RedisStore {
    let locks = RedisLockStore::new(client.clone());
    assert!(
        locks
            .release(old.session_id(), &old.fence().owner)
            .await
            .unwrap()
    );
    let new = owned_store(client, old.session_id(), new_owner).await;
    assert_eq!(new.fence().token, old.fence().token + 1);
    new
}

async fn scan_keys(client: &Client, pattern: &str) -> Vec<String> {
    use fred::types::scan::Scanner;
    use futures::TryStreamExt;
    let mut keys = Vec::new();
    let mut scan = client.scan(pattern, Some(100), None);
    while let Some(mut page) = scan.try_next().await.unwrap() {
        if let Some(found) = page.take_results() {
            keys.extend(found.into_iter().filter_map(|k| k.into_string()));
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Every store key of the session with its `DUMP` (type, content): equal snapshots = same data.
async fn snapshot(client: &Client, session: &str) -> BTreeMap<String, Bytes> {
    let mut out = BTreeMap::new();
    for key in scan_keys(client, &format!("{}*", store_prefix(session))).await {
        let dump: Bytes = client.dump(&key).await.unwrap();
        out.insert(key, dump);
    }
    out
}

fn mac(index: u8, value: u8) -> AppStateMutationMAC {
    AppStateMutationMAC {
        index_mac: vec![index; 32],
        value_mac: vec![value; 32],
    }
}

fn lid_entry(lid: &str, phone: &str, at: i64) -> LidPnMappingEntry {
    LidPnMappingEntry {
        lid: lid.into(),
        phone_number: phone.into(),
        created_at: at,
        updated_at: at + 1,
        learning_source: "usync".into(),
    }
}

fn device_list(user: &str, devices: &[u32], ts: i64) -> DeviceListRecord {
    DeviceListRecord {
        user: user.into(),
        devices: devices
            .iter()
            .map(|d| DeviceInfo::new(*d, Some(d + 10)).with_hosting(*d == 99))
            .collect(),
        timestamp: ts,
        phash: Some(format!("2:{ts}")),
        raw_id: (ts % 2 == 0).then_some(7),
    }
}

fn secret(chat: &str, sender: &str, id: &str, byte: u8, exp: i64, ts: i64) -> MsgSecretEntry {
    MsgSecretEntry {
        chat: chat.into(),
        sender: sender.into(),
        msg_id: id.into(),
        secret: [byte; 32],
        expires_at: exp,
        message_ts: ts,
    }
}

fn tc(token: &[u8], ts: i64, sender: Option<i64>) -> TcTokenEntry {
    TcTokenEntry {
        token: token.to_vec(),
        token_timestamp: ts,
        sender_timestamp: sender,
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios: every method of the five traits, each returning its transcript.

mod scenarios {
    use super::*;

    pub async fn identities<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let (a, c) = ("111@s.whatsapp.net", "333:2@s.whatsapp.net");
        check!(t, s.load_identity(a).await.unwrap(), None);
        s.put_identity(a, [1; 32]).await.unwrap();
        check!(t, s.load_identity(a).await.unwrap(), Some([1; 32]));
        s.put_identity(a, [2; 32]).await.unwrap();
        check!(t, s.load_identity(a).await.unwrap(), Some([2; 32]));
        s.put_identities_batch(&[
            (Arc::from("222@lid"), [3; 32]),
            (Arc::from(c), [4; 32]),
            (Arc::from(a), [5; 32]),
        ])
        .await
        .unwrap();
        s.put_identities_batch(&[]).await.unwrap();
        check!(t, s.load_identity(a).await.unwrap(), Some([5; 32]));
        check!(t, s.load_identity("222@lid").await.unwrap(), Some([3; 32]));
        check!(t, s.load_identity(c).await.unwrap(), Some([4; 32]));
        s.delete_identity(a).await.unwrap();
        s.delete_identity("nobody@s.whatsapp.net").await.unwrap();
        check!(t, s.load_identity(a).await.unwrap(), None);
        check!(t, s.load_identity(c).await.unwrap(), Some([4; 32]));
        t
    }

    pub async fn sessions<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let a = "111.0:3@s.whatsapp.net";
        check!(t, s.get_session(a).await.unwrap(), None);
        check!(t, s.has_session(a).await.unwrap(), false);
        s.put_session(a, b"\x00\xffrecord-1").await.unwrap();
        check!(
            t,
            s.get_session(a).await.unwrap(),
            Some(b(b"\x00\xffrecord-1"))
        );
        check!(t, s.has_session(a).await.unwrap(), true);
        s.put_session(a, b"record-2").await.unwrap();
        check!(t, s.get_session(a).await.unwrap(), Some(b(b"record-2")));
        s.put_sessions_batch(&[
            (Arc::from("b@lid"), b(b"rb")),
            (Arc::from(a), b(b"record-3")),
            (Arc::from("empty@lid"), Bytes::new()),
        ])
        .await
        .unwrap();
        s.put_sessions_batch(&[]).await.unwrap();
        check!(t, s.get_session(a).await.unwrap(), Some(b(b"record-3")));
        check!(t, s.get_session("b@lid").await.unwrap(), Some(b(b"rb")));
        check!(
            t,
            s.get_session("empty@lid").await.unwrap(),
            Some(Bytes::new())
        );
        check!(t, s.has_session("empty@lid").await.unwrap(), true);
        s.delete_session(a).await.unwrap();
        s.delete_session("nobody@lid").await.unwrap();
        check!(t, s.get_session(a).await.unwrap(), None);
        check!(t, s.has_session(a).await.unwrap(), false);
        check!(t, s.has_session("b@lid").await.unwrap(), true);
        t
    }

    pub async fn signal_state_for_user<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        check!(t, s.has_signal_state_for_user("123").await.unwrap(), false);
        s.put_session("123:5@s.whatsapp.net", b"r").await.unwrap();
        check!(t, s.has_signal_state_for_user("123").await.unwrap(), true);
        check!(t, s.has_signal_state_for_user("12").await.unwrap(), false);
        check!(t, s.has_signal_state_for_user("1234").await.unwrap(), false);
        s.put_identity("777@lid", [7; 32]).await.unwrap();
        check!(t, s.has_signal_state_for_user("777").await.unwrap(), true);
        check!(t, s.has_signal_state_for_user("77").await.unwrap(), false);
        s.delete_session("123:5@s.whatsapp.net").await.unwrap();
        s.delete_identity("777@lid").await.unwrap();
        check!(t, s.has_signal_state_for_user("123").await.unwrap(), false);
        check!(t, s.has_signal_state_for_user("777").await.unwrap(), false);
        s.put_session("12345@s.whatsapp.net", b"r").await.unwrap();
        check!(t, s.has_signal_state_for_user("1234").await.unwrap(), false);
        check!(t, s.has_signal_state_for_user("12345").await.unwrap(), true);
        // Glob metacharacters are plain characters.
        s.put_identity("a*b[1]@s.whatsapp.net", [1; 32])
            .await
            .unwrap();
        check!(
            t,
            s.has_signal_state_for_user("a*b[1]").await.unwrap(),
            true
        );
        check!(t, s.has_signal_state_for_user("a").await.unwrap(), false);
        check!(
            t,
            s.has_signal_state_for_user("a?b[1]").await.unwrap(),
            false
        );
        check!(t, s.has_signal_state_for_user("a*b1").await.unwrap(), false);
        t
    }

    pub async fn prekeys<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        check!(t, s.get_max_prekey_id().await.unwrap(), 0);
        check!(t, s.load_prekey(1).await.unwrap(), None);
        s.store_prekey(1, b"r1", false).await.unwrap();
        s.store_prekeys_batch(&[(2, b(b"r2")), (7, b(b"r7"))], true)
            .await
            .unwrap();
        s.store_prekeys_batch(&[], true).await.unwrap();
        check!(t, s.load_prekey(1).await.unwrap(), Some(b(b"r1")));
        check!(t, s.load_prekey(7).await.unwrap(), Some(b(b"r7")));
        check!(
            t,
            s.load_prekeys_batch(&[7, 3, 1, 7]).await.unwrap(),
            vec![(7, b(b"r7")), (1, b(b"r1")), (7, b(b"r7"))]
        );
        check!(
            t,
            s.load_prekeys_batch(&[]).await.unwrap(),
            Vec::<(u32, Bytes)>::new()
        );
        check!(t, s.get_max_prekey_id().await.unwrap(), 7);
        s.store_prekey(7, b"r7b", false).await.unwrap();
        check!(t, s.load_prekey(7).await.unwrap(), Some(b(b"r7b")));
        // UPDATE semantics: marking never inserts.
        s.mark_prekeys_uploaded(&[1, 99]).await.unwrap();
        s.mark_prekeys_uploaded(&[]).await.unwrap();
        check!(t, s.load_prekey(99).await.unwrap(), None);
        check!(t, s.load_prekey(1).await.unwrap(), Some(b(b"r1")));
        s.remove_prekey(7).await.unwrap();
        s.remove_prekey(42).await.unwrap();
        check!(t, s.load_prekey(7).await.unwrap(), None);
        check!(t, s.get_max_prekey_id().await.unwrap(), 2);
        s.remove_prekey(2).await.unwrap();
        s.mark_prekeys_uploaded(&[2]).await.unwrap();
        check!(t, s.load_prekey(2).await.unwrap(), None);
        check!(t, s.get_max_prekey_id().await.unwrap(), 1);
        t
    }

    pub async fn signed_prekeys<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let all = || async {
            let mut all = s.load_all_signed_prekeys().await.unwrap();
            all.sort();
            all
        };
        check!(t, s.load_signed_prekey(1).await.unwrap(), None);
        check!(t, all().await, Vec::<(u32, Vec<u8>)>::new());
        s.store_signed_prekey(1, b"s1").await.unwrap();
        s.store_signed_prekey(2, b"s2").await.unwrap();
        check!(
            t,
            s.load_signed_prekey(1).await.unwrap(),
            Some(b"s1".to_vec())
        );
        check!(
            t,
            all().await,
            vec![(1, b"s1".to_vec()), (2, b"s2".to_vec())]
        );
        s.store_signed_prekey(1, b"s1b").await.unwrap();
        check!(
            t,
            s.load_signed_prekey(1).await.unwrap(),
            Some(b"s1b".to_vec())
        );
        s.remove_signed_prekey(1).await.unwrap();
        s.remove_signed_prekey(9).await.unwrap();
        check!(t, s.load_signed_prekey(1).await.unwrap(), None);
        check!(t, all().await, vec![(2, b"s2".to_vec())]);
        t
    }

    pub async fn sender_keys<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let a = "120363@g.us::111@s.whatsapp.net";
        check!(t, s.get_sender_key(a).await.unwrap(), None);
        s.put_sender_key(a, b"k1").await.unwrap();
        check!(t, s.get_sender_key(a).await.unwrap(), Some(b"k1".to_vec()));
        s.put_sender_key(a, b"k2").await.unwrap();
        check!(t, s.get_sender_key(a).await.unwrap(), Some(b"k2".to_vec()));
        s.put_sender_keys_batch(&[(Arc::from(a), b(b"k3")), (Arc::from("other"), b(b"o"))])
            .await
            .unwrap();
        s.put_sender_keys_batch(&[]).await.unwrap();
        check!(t, s.get_sender_key(a).await.unwrap(), Some(b"k3".to_vec()));
        check!(
            t,
            s.get_sender_key("other").await.unwrap(),
            Some(b"o".to_vec())
        );
        s.delete_sender_key(a).await.unwrap();
        s.delete_sender_key("missing").await.unwrap();
        check!(t, s.get_sender_key(a).await.unwrap(), None);
        check!(
            t,
            s.get_sender_key("other").await.unwrap(),
            Some(b"o".to_vec())
        );
        t
    }

    pub async fn sync_keys<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let k = |n: u8| AppStateSyncKey {
            key_data: vec![n; 32],
            fingerprint: vec![n, 0xff],
            timestamp: 1_700_000_000 + i64::from(n),
        };
        let id1: &[u8] = &[0xff, 0x00, 0x01];
        let id2: &[u8] = &[0x02];
        check!(t, s.get_latest_sync_key_id().await.unwrap(), None);
        check!(t, j(&s.get_sync_key(id1).await.unwrap()), Json::Null);
        s.set_sync_key(id1, k(1)).await.unwrap();
        check!(t, j(&s.get_sync_key(id1).await.unwrap()), j(&k(1)));
        check!(
            t,
            s.get_latest_sync_key_id().await.unwrap(),
            Some(id1.to_vec())
        );
        s.set_sync_key(id2, k(2)).await.unwrap();
        check!(
            t,
            s.get_latest_sync_key_id().await.unwrap(),
            Some(id2.to_vec())
        );
        s.set_sync_key(id1, k(3)).await.unwrap();
        check!(t, j(&s.get_sync_key(id1).await.unwrap()), j(&k(3)));
        check!(t, j(&s.get_sync_key(id2).await.unwrap()), j(&k(2)));
        check!(
            t,
            s.get_latest_sync_key_id().await.unwrap(),
            Some(id1.to_vec())
        );
        check!(t, j(&s.get_sync_key(&[9]).await.unwrap()), Json::Null);
        t
    }

    pub async fn versions<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        check!(
            t,
            j(&s.get_version("regular").await.unwrap()),
            j(&HashState::default())
        );
        let mut state = HashState {
            version: 5,
            hash: [7; 128],
            ..HashState::default()
        };
        state.index_value_map.insert("idx-a".into(), vec![1, 2, 3]);
        state.index_value_map.insert("idx-b".into(), vec![]);
        s.set_version("regular", state.clone()).await.unwrap();
        check!(t, j(&s.get_version("regular").await.unwrap()), j(&state));
        state.version = 6;
        state.mac_mismatch_fatal = true;
        state.index_value_map.remove("idx-a");
        s.set_version("regular", state.clone()).await.unwrap();
        s.set_version("critical_block", HashState::default())
            .await
            .unwrap();
        check!(t, j(&s.get_version("regular").await.unwrap()), j(&state));
        check!(
            t,
            s.get_version("regular")
                .await
                .unwrap()
                .index_value_map
                .len(),
            1
        );
        check!(
            t,
            j(&s.get_version("critical_block").await.unwrap()),
            j(&HashState::default())
        );
        t
    }

    pub async fn mutation_macs<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let sorted = |m: std::collections::HashMap<[u8; 32], Vec<u8>>| {
            let mut v: Vec<_> = m.into_iter().collect();
            v.sort();
            v
        };
        check!(
            t,
            s.get_mutation_mac("regular", &[1; 32]).await.unwrap(),
            None
        );
        s.put_mutation_macs("regular", 1, &[mac(1, 11), mac(2, 12)])
            .await
            .unwrap();
        s.put_mutation_macs("critical", 1, &[mac(1, 91)])
            .await
            .unwrap();
        s.put_mutation_macs("regular", 2, &[]).await.unwrap();
        check!(
            t,
            s.get_mutation_mac("regular", &[1; 32]).await.unwrap(),
            Some(vec![11; 32])
        );
        check!(
            t,
            s.get_mutation_mac("critical", &[1; 32]).await.unwrap(),
            Some(vec![91; 32])
        );
        check!(
            t,
            sorted(
                s.get_mutation_macs("regular", &[[1; 32], [2; 32], [3; 32]])
                    .await
                    .unwrap()
            ),
            vec![([1; 32], vec![11; 32]), ([2; 32], vec![12; 32])]
        );
        check!(
            t,
            sorted(s.get_mutation_macs("regular", &[]).await.unwrap()),
            Vec::<([u8; 32], Vec<u8>)>::new()
        );
        s.put_mutation_macs("regular", 3, &[mac(2, 22)])
            .await
            .unwrap();
        check!(
            t,
            s.get_mutation_mac("regular", &[2; 32]).await.unwrap(),
            Some(vec![22; 32])
        );
        s.delete_mutation_macs("regular", &[vec![1; 32], vec![5; 32]])
            .await
            .unwrap();
        s.delete_mutation_macs("regular", &[]).await.unwrap();
        check!(
            t,
            s.get_mutation_mac("regular", &[1; 32]).await.unwrap(),
            None
        );
        check!(
            t,
            s.get_mutation_mac("regular", &[2; 32]).await.unwrap(),
            Some(vec![22; 32])
        );
        s.clear_mutation_macs("regular").await.unwrap();
        s.clear_mutation_macs("never-used").await.unwrap();
        check!(
            t,
            s.get_mutation_mac("regular", &[2; 32]).await.unwrap(),
            None
        );
        check!(
            t,
            s.get_mutation_mac("critical", &[1; 32]).await.unwrap(),
            Some(vec![91; 32])
        );
        t
    }

    pub async fn sender_key_devices<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let devices = |g: &'static str| async move {
            let mut v = s.get_sender_key_devices(g).await.unwrap();
            v.sort();
            v
        };
        let own = |v: &[(&str, bool)]| -> Vec<(String, bool)> {
            v.iter().map(|(d, k)| (d.to_string(), *k)).collect()
        };
        check!(t, devices("g1@g.us").await, Vec::<(String, bool)>::new());
        s.set_sender_key_status("g1@g.us", &[("d1:1@lid", true), ("d2@lid", false)])
            .await
            .unwrap();
        s.set_sender_key_status("g2@g.us", &[("d1:1@lid", true), ("d3@lid", true)])
            .await
            .unwrap();
        s.set_sender_key_status("g2@g.us", &[]).await.unwrap();
        check!(
            t,
            devices("g1@g.us").await,
            own(&[("d1:1@lid", true), ("d2@lid", false)])
        );
        s.set_sender_key_status("g1@g.us", &[("d2@lid", true)])
            .await
            .unwrap();
        check!(
            t,
            devices("g1@g.us").await,
            own(&[("d1:1@lid", true), ("d2@lid", true)])
        );
        s.delete_sender_key_device_rows(&["d1:1@lid", "nobody"])
            .await
            .unwrap();
        s.delete_sender_key_device_rows(&[]).await.unwrap();
        check!(t, devices("g1@g.us").await, own(&[("d2@lid", true)]));
        check!(t, devices("g2@g.us").await, own(&[("d3@lid", true)]));
        s.clear_sender_key_devices("g1@g.us").await.unwrap();
        check!(t, devices("g1@g.us").await, Vec::<(String, bool)>::new());
        check!(t, devices("g2@g.us").await, own(&[("d3@lid", true)]));
        s.set_sender_key_status("g3@g.us", &[("d4@lid", false)])
            .await
            .unwrap();
        s.clear_all_sender_key_devices().await.unwrap();
        check!(t, devices("g2@g.us").await, Vec::<(String, bool)>::new());
        check!(t, devices("g3@g.us").await, Vec::<(String, bool)>::new());
        s.set_sender_key_status("g2@g.us", &[("d5@lid", true)])
            .await
            .unwrap();
        check!(t, devices("g2@g.us").await, own(&[("d5@lid", true)]));
        t
    }

    pub async fn lid_mappings<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let all = || async {
            let mut v: Vec<Json> = s
                .get_all_lid_mappings()
                .await
                .unwrap()
                .iter()
                .map(j)
                .collect();
            v.sort_by_key(|e| e["lid"].as_str().unwrap().to_string());
            v
        };
        check!(t, j(&s.get_lid_mapping("l1").await.unwrap()), Json::Null);
        check!(t, j(&s.get_pn_mapping("p1").await.unwrap()), Json::Null);
        check!(t, all().await, Vec::<Json>::new());
        s.put_lid_mapping(&lid_entry("l1", "p1", 10)).await.unwrap();
        check!(
            t,
            j(&s.get_lid_mapping("l1").await.unwrap()),
            j(&lid_entry("l1", "p1", 10))
        );
        check!(
            t,
            j(&s.get_pn_mapping("p1").await.unwrap()),
            j(&lid_entry("l1", "p1", 10))
        );
        // The LID moves to another number: the old number no longer resolves.
        s.put_lid_mapping(&lid_entry("l1", "p2", 20)).await.unwrap();
        check!(t, j(&s.get_pn_mapping("p1").await.unwrap()), Json::Null);
        check!(
            t,
            j(&s.get_pn_mapping("p2").await.unwrap()),
            j(&lid_entry("l1", "p2", 20))
        );
        s.put_lid_mappings(&[lid_entry("l2", "p3", 30), lid_entry("l3", "p3", 31)])
            .await
            .unwrap();
        s.put_lid_mappings(&[]).await.unwrap();
        // The most recent LID of a number wins.
        check!(
            t,
            j(&s.get_pn_mapping("p3").await.unwrap()),
            j(&lid_entry("l3", "p3", 31))
        );
        // l2 leaves p3: the reference drops p3's reverse entry even though it named l3.
        s.put_lid_mapping(&lid_entry("l2", "p4", 40)).await.unwrap();
        check!(t, j(&s.get_pn_mapping("p3").await.unwrap()), Json::Null);
        check!(
            t,
            j(&s.get_lid_mapping("l3").await.unwrap()),
            j(&lid_entry("l3", "p3", 31))
        );
        check!(
            t,
            all().await,
            vec![
                j(&lid_entry("l1", "p2", 20)),
                j(&lid_entry("l2", "p4", 40)),
                j(&lid_entry("l3", "p3", 31))
            ]
        );
        t
    }

    pub async fn base_keys<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let a = "111:2@s.whatsapp.net";
        check!(t, s.has_same_base_key(a, "m1", b"k1").await.unwrap(), false);
        s.save_base_key(a, "m1", b"k1").await.unwrap();
        check!(t, s.has_same_base_key(a, "m1", b"k1").await.unwrap(), true);
        check!(t, s.has_same_base_key(a, "m1", b"k2").await.unwrap(), false);
        check!(t, s.has_same_base_key(a, "m2", b"k1").await.unwrap(), false);
        check!(
            t,
            s.has_same_base_key("other", "m1", b"k1").await.unwrap(),
            false
        );
        s.save_base_key(a, "m1", b"k2").await.unwrap();
        check!(t, s.has_same_base_key(a, "m1", b"k1").await.unwrap(), false);
        check!(t, s.has_same_base_key(a, "m1", b"k2").await.unwrap(), true);
        // (address, message id) is a pair, not a concatenation.
        s.save_base_key("ab", "c", b"k3").await.unwrap();
        check!(
            t,
            s.has_same_base_key("a", "bc", b"k3").await.unwrap(),
            false
        );
        check!(
            t,
            s.has_same_base_key("ab", "c", b"k3").await.unwrap(),
            true
        );
        s.delete_base_key(a, "m1").await.unwrap();
        s.delete_base_key(a, "never").await.unwrap();
        check!(t, s.has_same_base_key(a, "m1", b"k2").await.unwrap(), false);
        check!(
            t,
            s.has_same_base_key("ab", "c", b"k3").await.unwrap(),
            true
        );
        t
    }

    pub async fn device_lists<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        check!(t, j(&s.get_devices("u1").await.unwrap()), Json::Null);
        s.update_device_list(device_list("u1", &[0, 1], 100))
            .await
            .unwrap();
        check!(
            t,
            j(&s.get_devices("u1").await.unwrap()),
            j(&device_list("u1", &[0, 1], 100))
        );
        s.update_device_lists(vec![
            device_list("u2", &[0, 99], 201),
            device_list("u1", &[0, 5], 300),
        ])
        .await
        .unwrap();
        s.update_device_lists(Vec::new()).await.unwrap();
        check!(
            t,
            j(&s.get_devices("u1").await.unwrap()),
            j(&device_list("u1", &[0, 5], 300))
        );
        check!(
            t,
            j(&s.get_devices("u2").await.unwrap()),
            j(&device_list("u2", &[0, 99], 201))
        );
        s.delete_devices("u1").await.unwrap();
        s.delete_devices("nobody").await.unwrap();
        check!(t, j(&s.get_devices("u1").await.unwrap()), Json::Null);
        check!(
            t,
            j(&s.get_devices("u2").await.unwrap()),
            j(&device_list("u2", &[0, 99], 201))
        );
        t
    }

    pub async fn group_metadata<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let g = "120363@g.us";
        check!(t, s.get_group_metadata(g).await.unwrap(), None);
        s.put_group_metadata(g, b"\x01meta").await.unwrap();
        check!(
            t,
            s.get_group_metadata(g).await.unwrap(),
            Some(b"\x01meta".to_vec())
        );
        s.put_group_metadata(g, b"meta-2").await.unwrap();
        s.put_group_metadata("other@g.us", b"o").await.unwrap();
        check!(
            t,
            s.get_group_metadata(g).await.unwrap(),
            Some(b"meta-2".to_vec())
        );
        s.delete_group_metadata(g).await.unwrap();
        s.delete_group_metadata("missing@g.us").await.unwrap();
        check!(t, s.get_group_metadata(g).await.unwrap(), None);
        check!(
            t,
            s.get_group_metadata("other@g.us").await.unwrap(),
            Some(b"o".to_vec())
        );
        t
    }

    pub async fn tc_tokens<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let jids = || async {
            let mut v = s.get_all_tc_token_jids().await.unwrap();
            v.sort();
            v
        };
        let get = |jid: &'static str| async move { j(&s.get_tc_token(jid).await.unwrap()) };
        check!(t, get("j1").await, Json::Null);
        check!(t, jids().await, Vec::<String>::new());
        s.put_tc_token("j1", &tc(&[1, 2], 100, Some(50)))
            .await
            .unwrap();
        s.put_tc_token("j2", &tc(&[], 10, None)).await.unwrap();
        check!(t, get("j1").await, j(&tc(&[1, 2], 100, Some(50))));
        check!(t, get("j2").await, j(&tc(&[], 10, None)));
        check!(t, jids().await, vec!["j1".to_string(), "j2".to_string()]);
        // Overwrite, including back to no sender timestamp.
        s.put_tc_token("j5", &tc(&[5], 5, Some(5))).await.unwrap();
        s.put_tc_token("j5", &tc(&[6], 6, None)).await.unwrap();
        check!(t, get("j5").await, j(&tc(&[6], 6, None)));
        s.delete_tc_token("j5").await.unwrap();
        s.delete_tc_token("never").await.unwrap();
        check!(t, get("j5").await, Json::Null);

        // The sender timestamp only moves forward; a missing row gets a placeholder.
        s.touch_tc_token_sender_timestamp("j1", 40).await.unwrap();
        check!(t, get("j1").await, j(&tc(&[1, 2], 100, Some(50))));
        s.touch_tc_token_sender_timestamp("j1", 60).await.unwrap();
        check!(t, get("j1").await, j(&tc(&[1, 2], 100, Some(60))));
        s.touch_tc_token_sender_timestamp("j2", 5).await.unwrap();
        check!(t, get("j2").await, j(&tc(&[], 10, Some(5))));
        s.touch_tc_token_sender_timestamp("j3", 70).await.unwrap();
        check!(t, get("j3").await, j(&tc(&[], 70, Some(70))));

        // Newer-or-equal wins over a real token; the sender timestamp is kept.
        s.store_received_tc_token("j1", &[9], 90).await.unwrap();
        check!(t, get("j1").await, j(&tc(&[1, 2], 100, Some(60))));
        s.store_received_tc_token("j1", &[9], 100).await.unwrap();
        check!(t, get("j1").await, j(&tc(&[9], 100, Some(60))));
        s.store_received_tc_token("j1", &[8, 8], 150).await.unwrap();
        check!(t, get("j1").await, j(&tc(&[8, 8], 150, Some(60))));
        // Anything replaces a placeholder, even an older token.
        s.store_received_tc_token("j3", &[5], 10).await.unwrap();
        check!(t, get("j3").await, j(&tc(&[5], 10, Some(70))));
        s.store_received_tc_token("j4", &[4], 200).await.unwrap();
        check!(t, get("j4").await, j(&tc(&[4], 200, None)));

        // j2: no token, stale sender -> dropped; j3: stale token, live sender -> kept.
        check!(t, s.delete_expired_tc_tokens(100, 65).await.unwrap(), 1);
        check!(
            t,
            jids().await,
            vec!["j1".to_string(), "j3".to_string(), "j4".to_string()]
        );
        check!(t, s.delete_expired_tc_tokens(150, 1000).await.unwrap(), 1);
        check!(t, jids().await, vec!["j1".to_string(), "j4".to_string()]);
        check!(t, s.delete_expired_tc_tokens(1000, 1000).await.unwrap(), 2);
        check!(t, jids().await, Vec::<String>::new());
        check!(t, s.delete_expired_tc_tokens(1000, 1000).await.unwrap(), 0);
        t
    }

    pub async fn sent_messages<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let now = now();
        check!(t, s.take_sent_message("c1", "m1").await.unwrap(), None);
        s.store_sent_message("c1", "m1", b"p1").await.unwrap();
        s.store_sent_message("c1", "m2", b"p2").await.unwrap();
        s.store_sent_message("c2", "m1", b"p3").await.unwrap();
        s.store_sent_message("c1:", "m", b"p4").await.unwrap();
        check!(
            t,
            s.take_sent_message("c1", "m1").await.unwrap(),
            Some(b"p1".to_vec())
        );
        check!(t, s.take_sent_message("c1", "m1").await.unwrap(), None);
        check!(
            t,
            s.take_sent_message("c2", "m1").await.unwrap(),
            Some(b"p3".to_vec())
        );
        check!(t, s.take_sent_message("c1", ":m").await.unwrap(), None);
        s.store_sent_message("c1", "m2", b"p2b").await.unwrap();
        check!(
            t,
            s.take_sent_message("c1", "m2").await.unwrap(),
            Some(b"p2b".to_vec())
        );
        s.store_sent_message("c3", "m1", b"p5").await.unwrap();
        s.store_sent_message("c3", "m2", b"p6").await.unwrap();
        // Keeps messages stored at or after the cutoff.
        check!(
            t,
            s.delete_expired_sent_messages(now - 3600).await.unwrap(),
            0
        );
        check!(
            t,
            s.take_sent_message("c3", "m1").await.unwrap(),
            Some(b"p5".to_vec())
        );
        check!(
            t,
            s.delete_expired_sent_messages(now + 3600).await.unwrap(),
            2
        );
        check!(t, s.take_sent_message("c3", "m2").await.unwrap(), None);
        check!(t, s.take_sent_message("c1:", "m").await.unwrap(), None);
        t
    }

    pub async fn sent_message_cap<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let total = 4097;
        for i in 0..total {
            s.store_sent_message("chat", &format!("m{i}"), i.to_string().as_bytes())
                .await
                .unwrap();
        }
        // At the cap (4096) the store drops the oldest down to 3072, then inserts.
        check!(
            t,
            s.take_sent_message("chat", &format!("m{}", total - 1))
                .await
                .unwrap(),
            Some((total - 1).to_string().into_bytes())
        );
        let mut survivors = 1;
        for i in 0..total - 1 {
            if s.take_sent_message("chat", &format!("m{i}"))
                .await
                .unwrap()
                .is_some()
            {
                survivors += 1;
            }
        }
        check!(t, survivors, 3073);
        t
    }

    pub async fn pending_inbound<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let now = now();
        check!(
            t,
            s.get_pending_inbound("c", "s", "i1").await.unwrap(),
            None
        );
        s.store_pending_inbound("c", "s", "i1", b"m1")
            .await
            .unwrap();
        check!(
            t,
            s.get_pending_inbound("c", "s", "i1").await.unwrap(),
            Some(b"m1".to_vec())
        );
        // Scoped by (chat, sender, id).
        check!(
            t,
            s.get_pending_inbound("c", "s2", "i1").await.unwrap(),
            None
        );
        s.store_pending_inbound("c", "s", "i1", b"m1b")
            .await
            .unwrap();
        check!(
            t,
            s.get_pending_inbound("c", "s", "i1").await.unwrap(),
            Some(b"m1b".to_vec())
        );
        s.store_pending_inbound_batch(&[
            PendingInboundRow {
                chat: "c",
                sender: "s2",
                id: "i1",
                message: b"m2",
            },
            PendingInboundRow {
                chat: "c2",
                sender: "s",
                id: "i3",
                message: b"m3",
            },
        ])
        .await
        .unwrap();
        s.store_pending_inbound_batch(&[]).await.unwrap();
        check!(
            t,
            s.get_pending_inbound("c", "s2", "i1").await.unwrap(),
            Some(b"m2".to_vec())
        );
        check!(
            t,
            s.get_pending_inbound("c2", "s", "i3").await.unwrap(),
            Some(b"m3".to_vec())
        );
        s.delete_pending_inbound("c", "s", "i1").await.unwrap();
        s.delete_pending_inbound("c", "s", "never").await.unwrap();
        check!(
            t,
            s.get_pending_inbound("c", "s", "i1").await.unwrap(),
            None
        );
        s.delete_pending_inbound_batch(&[PendingInboundKey {
            chat: "c",
            sender: "s2",
            id: "i1",
        }])
        .await
        .unwrap();
        s.delete_pending_inbound_batch(&[]).await.unwrap();
        check!(
            t,
            s.get_pending_inbound("c", "s2", "i1").await.unwrap(),
            None
        );
        s.store_pending_inbound("c4", "s", "i4", b"m4")
            .await
            .unwrap();
        check!(
            t,
            s.delete_expired_pending_inbound(now - 3600).await.unwrap(),
            0
        );
        check!(
            t,
            s.delete_expired_pending_inbound(now + 3600).await.unwrap(),
            2
        );
        check!(
            t,
            s.get_pending_inbound("c2", "s", "i3").await.unwrap(),
            None
        );
        check!(
            t,
            s.get_pending_inbound("c4", "s", "i4").await.unwrap(),
            None
        );
        t
    }

    pub async fn msg_secrets<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        let (c, snd) = ("111@s.whatsapp.net", "222@s.whatsapp.net");
        check!(t, s.get_msg_secret(c, snd, "m1").await.unwrap(), None);
        check!(
            t,
            s.get_msg_secret_with_ts(c, snd, "m1").await.unwrap(),
            None
        );
        s.put_msg_secret(c, snd, "m1", &[1; 32]).await.unwrap();
        check!(
            t,
            s.get_msg_secret(c, snd, "m1").await.unwrap(),
            Some(vec![1; 32])
        );
        check!(
            t,
            s.get_msg_secret_with_ts(c, snd, "m1").await.unwrap(),
            Some((vec![1; 32], 0))
        );
        check!(t, s.get_msg_secret(snd, c, "m1").await.unwrap(), None);
        check!(
            t,
            s.put_msg_secrets(vec![
                secret(c, snd, "m2", 2, 100, 50),
                secret(c, snd, "m3", 3, 0, 0),
                secret(c, snd, "m4", 4, 200, 10),
            ])
            .await
            .unwrap(),
            3
        );
        check!(t, s.put_msg_secrets(Vec::new()).await.unwrap(), 0);
        // Conflicts: the later deadline and the later parent time win; the secret is replaced.
        s.put_msg_secrets(vec![secret(c, snd, "m2", 5, 80, 0)])
            .await
            .unwrap();
        check!(
            t,
            s.get_msg_secret_with_ts(c, snd, "m2").await.unwrap(),
            Some((vec![5; 32], 50))
        );
        // 0 = never expires, and it wins.
        s.put_msg_secrets(vec![secret(c, snd, "m4", 4, 0, 20)])
            .await
            .unwrap();
        check!(
            t,
            s.get_msg_secret_with_ts(c, snd, "m4").await.unwrap(),
            Some((vec![4; 32], 20))
        );
        // Duplicates within a batch merge in order.
        check!(
            t,
            s.put_msg_secrets(vec![
                secret(c, snd, "m5", 6, 300, 1),
                secret(c, snd, "m5", 7, 250, 2),
            ])
            .await
            .unwrap(),
            2
        );
        check!(
            t,
            s.get_msg_secret_with_ts(c, snd, "m5").await.unwrap(),
            Some((vec![7; 32], 2))
        );
        // Drops rows with a deadline at or before the cutoff; 0 = never.
        check!(t, s.delete_expired_msg_secrets(99).await.unwrap(), 0);
        check!(t, s.delete_expired_msg_secrets(100).await.unwrap(), 1);
        check!(t, s.get_msg_secret(c, snd, "m2").await.unwrap(), None);
        check!(t, s.delete_expired_msg_secrets(300).await.unwrap(), 1);
        check!(t, s.get_msg_secret(c, snd, "m5").await.unwrap(), None);
        check!(
            t,
            s.delete_expired_msg_secrets(i64::from(i32::MAX))
                .await
                .unwrap(),
            0
        );
        check!(
            t,
            s.get_msg_secret(c, snd, "m1").await.unwrap(),
            Some(vec![1; 32])
        );
        check!(
            t,
            s.get_msg_secret(c, snd, "m3").await.unwrap(),
            Some(vec![3; 32])
        );
        check!(
            t,
            s.get_msg_secret(c, snd, "m4").await.unwrap(),
            Some(vec![4; 32])
        );
        t
    }

    pub async fn device_store<B: Backend>(s: &B) -> Vec<String> {
        let mut t = Vec::new();
        check!(t, s.exists().await.unwrap(), false);
        check!(t, s.load().await.unwrap().is_none(), true);
        check!(t, s.create().await.unwrap(), 1);
        check!(t, s.exists().await.unwrap(), true);
        let created = s.load().await.unwrap().expect("create stores a device");
        check!(t, created.push_name.clone(), String::new());
        // A second create hands out a new id and keeps the stored device.
        check!(t, s.create().await.unwrap(), 2);
        // (Random keys: record only whether the stored device is still the created one.)
        check!(t, j(&s.load().await.unwrap().unwrap()) == j(&created), true);
        let mut device = Device::new();
        device.push_name = "Alice".into();
        device.registration_id = 4242;
        device.login_counter = 3;
        s.save(&device).await.unwrap();
        let loaded = s.load().await.unwrap().unwrap();
        check!(t, loaded.push_name.clone(), "Alice".to_string());
        check!(t, loaded.registration_id, 4242);
        assert_eq!(j(&loaded), j(&device));
        device.push_name = "Bob".into();
        s.save(&device).await.unwrap();
        check!(
            t,
            s.load().await.unwrap().unwrap().push_name,
            "Bob".to_string()
        );
        check!(t, s.exists().await.unwrap(), true);
        s.snapshot_db("contract", Some(b"x")).await.unwrap();
        t
    }
}

// ---------------------------------------------------------------------------------------------
// Contract: the same scenario against both backends.

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod contract {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let memory = scenarios::$name(&InMemoryBackend::new()).await;
                    let redis = RedisServer::start().await.unwrap();
                    let client = redis_client(&redis).await;
                    let store = owned_store(&client, "contract", "gw-a").await;
                    let in_redis = scenarios::$name(&store).await;
                    assert!(!memory.is_empty());
                    assert_eq!(memory, in_redis, "InMemoryBackend and RedisStore disagree");
                }
            )*
        }
    };
}

contract!(
    identities,
    sessions,
    signal_state_for_user,
    prekeys,
    signed_prekeys,
    sender_keys,
    sync_keys,
    versions,
    mutation_macs,
    sender_key_devices,
    lid_mappings,
    base_keys,
    device_lists,
    group_metadata,
    tc_tokens,
    sent_messages,
    sent_message_cap,
    pending_inbound,
    msg_secrets,
    device_store,
);

// ---------------------------------------------------------------------------------------------
// Redis only

/// Writes something of every kind, so that every store key exists.
async fn fill<B: Backend>(s: &B) {
    s.put_identity("111@s.whatsapp.net", [1; 32]).await.unwrap();
    s.put_session("111@s.whatsapp.net", b"sess").await.unwrap();
    s.store_prekey(1, b"pk1", true).await.unwrap();
    s.store_prekey(2, b"pk2", false).await.unwrap();
    s.store_signed_prekey(1, b"spk").await.unwrap();
    s.put_sender_key("g@g.us::111", b"sk").await.unwrap();
    s.set_sync_key(
        &[1, 2],
        AppStateSyncKey {
            key_data: vec![1],
            fingerprint: vec![2],
            timestamp: 3,
        },
    )
    .await
    .unwrap();
    s.set_version("regular", HashState::default())
        .await
        .unwrap();
    s.put_mutation_macs("regular", 1, &[mac(1, 2), mac(3, 4)])
        .await
        .unwrap();
    s.set_sender_key_status("g@g.us", &[("d1@lid", true), ("d2@lid", false)])
        .await
        .unwrap();
    s.put_lid_mapping(&lid_entry("l1", "p1", 1)).await.unwrap();
    s.save_base_key("111@s.whatsapp.net", "m1", b"bk")
        .await
        .unwrap();
    s.update_device_list(device_list("u1", &[0, 1], 1))
        .await
        .unwrap();
    s.put_group_metadata("g@g.us", b"meta").await.unwrap();
    s.put_tc_token("j1", &tc(&[1], 100, Some(100)))
        .await
        .unwrap();
    s.store_sent_message("c1", "m1", b"sent").await.unwrap();
    s.store_sent_message("c1", "m2", b"sent2").await.unwrap();
    s.store_pending_inbound("c1", "s1", "i1", b"pending")
        .await
        .unwrap();
    s.put_msg_secrets(vec![
        secret("c1", "s1", "m1", 1, 0, 5),
        secret("c1", "s1", "m2", 2, 100, 5),
    ])
    .await
    .unwrap();
    s.create().await.unwrap();
    s.save(&Device::new()).await.unwrap();
}

/// Calls every write method of the five traits (on rows `fill` wrote, where they take a key).
async fn every_write<B: Backend>(s: &B) -> Vec<(&'static str, Result<(), StoreError>)> {
    let mut out = Vec::new();
    macro_rules! write {
        ($name:literal, $call:expr) => {
            out.push(($name, $call.await.map(drop)))
        };
    }
    write!(
        "put_identity",
        s.put_identity("111@s.whatsapp.net", [9; 32])
    );
    write!(
        "put_identities_batch",
        s.put_identities_batch(&[(Arc::from("x@lid"), [9; 32])])
    );
    write!("delete_identity", s.delete_identity("111@s.whatsapp.net"));
    write!("put_session", s.put_session("111@s.whatsapp.net", b"x"));
    write!(
        "put_sessions_batch",
        s.put_sessions_batch(&[(Arc::from("x@lid"), b(b"x"))])
    );
    write!("delete_session", s.delete_session("111@s.whatsapp.net"));
    write!("store_prekey", s.store_prekey(1, b"x", false));
    write!(
        "store_prekeys_batch",
        s.store_prekeys_batch(&[(3, b(b"x"))], true)
    );
    write!("mark_prekeys_uploaded", s.mark_prekeys_uploaded(&[2]));
    write!("remove_prekey", s.remove_prekey(1));
    write!("store_signed_prekey", s.store_signed_prekey(1, b"x"));
    write!("remove_signed_prekey", s.remove_signed_prekey(1));
    write!("put_sender_key", s.put_sender_key("g@g.us::111", b"x"));
    write!(
        "put_sender_keys_batch",
        s.put_sender_keys_batch(&[(Arc::from("x"), b(b"x"))])
    );
    write!("delete_sender_key", s.delete_sender_key("g@g.us::111"));
    write!(
        "set_sync_key",
        s.set_sync_key(&[9], AppStateSyncKey::default())
    );
    write!(
        "set_version",
        s.set_version("regular", HashState::default())
    );
    write!(
        "put_mutation_macs",
        s.put_mutation_macs("regular", 2, &[mac(9, 9)])
    );
    write!(
        "delete_mutation_macs",
        s.delete_mutation_macs("regular", &[vec![1; 32]])
    );
    write!("clear_mutation_macs", s.clear_mutation_macs("regular"));
    write!(
        "set_sender_key_status",
        s.set_sender_key_status("g@g.us", &[("d1@lid", false)])
    );
    write!(
        "clear_sender_key_devices",
        s.clear_sender_key_devices("g@g.us")
    );
    write!(
        "delete_sender_key_device_rows",
        s.delete_sender_key_device_rows(&["d1@lid"])
    );
    write!(
        "clear_all_sender_key_devices",
        s.clear_all_sender_key_devices()
    );
    write!(
        "put_lid_mapping",
        s.put_lid_mapping(&lid_entry("l1", "p9", 9))
    );
    write!(
        "put_lid_mappings",
        s.put_lid_mappings(&[lid_entry("l9", "p9", 9)])
    );
    write!(
        "save_base_key",
        s.save_base_key("111@s.whatsapp.net", "m1", b"x")
    );
    write!(
        "delete_base_key",
        s.delete_base_key("111@s.whatsapp.net", "m1")
    );
    write!(
        "update_device_list",
        s.update_device_list(device_list("u1", &[3], 9))
    );
    write!(
        "update_device_lists",
        s.update_device_lists(vec![device_list("u9", &[3], 9)])
    );
    write!("delete_devices", s.delete_devices("u1"));
    write!("put_group_metadata", s.put_group_metadata("g@g.us", b"x"));
    write!("delete_group_metadata", s.delete_group_metadata("g@g.us"));
    write!("put_tc_token", s.put_tc_token("j1", &tc(&[9], 9, None)));
    write!("delete_tc_token", s.delete_tc_token("j1"));
    write!(
        "delete_expired_tc_tokens",
        s.delete_expired_tc_tokens(i64::from(i32::MAX), i64::from(i32::MAX))
    );
    write!(
        "touch_tc_token_sender_timestamp",
        s.touch_tc_token_sender_timestamp("j1", 1000)
    );
    write!(
        "store_received_tc_token",
        s.store_received_tc_token("j1", &[9], 1000)
    );
    write!("store_sent_message", s.store_sent_message("c1", "m1", b"x"));
    write!("take_sent_message", s.take_sent_message("c1", "m2"));
    write!(
        "delete_expired_sent_messages",
        s.delete_expired_sent_messages(now() + 3600)
    );
    write!(
        "store_pending_inbound",
        s.store_pending_inbound("c1", "s1", "i1", b"x")
    );
    write!(
        "delete_pending_inbound",
        s.delete_pending_inbound("c1", "s1", "i1")
    );
    write!(
        "delete_expired_pending_inbound",
        s.delete_expired_pending_inbound(now() + 3600)
    );
    write!(
        "store_pending_inbound_batch",
        s.store_pending_inbound_batch(&[PendingInboundRow {
            chat: "c9",
            sender: "s9",
            id: "i9",
            message: b"x",
        }])
    );
    write!(
        "delete_pending_inbound_batch",
        s.delete_pending_inbound_batch(&[PendingInboundKey {
            chat: "c1",
            sender: "s1",
            id: "i1",
        }])
    );
    write!(
        "put_msg_secret",
        s.put_msg_secret("c1", "s1", "m1", &[9; 32])
    );
    write!(
        "put_msg_secrets",
        s.put_msg_secrets(vec![secret("c1", "s1", "m2", 9, 1, 1)])
    );
    write!(
        "delete_expired_msg_secrets",
        s.delete_expired_msg_secrets(i64::from(i32::MAX))
    );
    write!("save", s.save(&Device::new()));
    write!("create", s.create());
    out
}

/// The store keys `fill` creates for a session.
fn filled_keys(session: &str) -> Vec<String> {
    let p = store_prefix(session);
    let mut keys: Vec<String> = [
        "identity",
        "session",
        "prekey",
        "prekey:uploaded",
        "signed_prekey",
        "sender_key",
        "sync_key",
        "sync_key:latest",
        "version",
        "mutation_mac:regular",
        "skd:g:g@g.us",
        "skd:groups",
        "lid",
        "pn",
        "base_key",
        "devices",
        "group_meta",
        "tc:token",
        "tc:ts",
        "tc:sender",
        "sent",
        "sent:ts",
        "pending",
        "pending:ts",
        "msg_secret",
        "msg_secret:exp",
        "device",
        "device:next_id",
        "index",
    ]
    .iter()
    .map(|k| format!("{p}{k}"))
    .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn a_stale_fence_refuses_every_write_and_changes_nothing() {
    let redis = RedisServer::start().await.unwrap();
    let client = redis_client(&redis).await;
    let old = owned_store(&client, "s1", "gw-a").await;
    fill(&old).await;
    let new = take_over(&client, &old, "gw-b").await;
    let before = snapshot(&client, "s1").await;
    assert_eq!(
        before.keys().cloned().collect::<Vec<_>>(),
        filled_keys("s1")
    );

    let results = every_write(&old).await;
    assert_eq!(results.len(), 51, "every write method of the traits");
    for (name, result) in &results {
        let err = result
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("{name} was not refused"));
        assert!(is_fenced(err), "{name}: {err:?}");
        let source = std::error::Error::source(err).map(|s| s.to_string());
        assert_eq!(
            source.as_deref(),
            Some("fenced: a newer owner holds session s1"),
            "{name}"
        );
    }
    assert_eq!(
        snapshot(&client, "s1").await,
        before,
        "a refused write changed data"
    );

    // Reads are not fenced; the new owner writes.
    assert_eq!(
        old.load_identity("111@s.whatsapp.net").await.unwrap(),
        Some([1; 32])
    );
    new.put_identity("111@s.whatsapp.net", [2; 32])
        .await
        .unwrap();
    assert_eq!(
        old.load_identity("111@s.whatsapp.net").await.unwrap(),
        Some([2; 32])
    );
    // The same calls succeed for the owner (the refusals above were the fence, not the calls).
    for (name, result) in every_write(&new).await {
        assert!(result.is_ok(), "{name}: {result:?}");
    }
    assert_ne!(snapshot(&client, "s1").await, before);
}

#[tokio::test]
async fn writes_without_a_fence_are_refused() {
    let redis = RedisServer::start().await.unwrap();
    let client = redis_client(&redis).await;
    // Nobody ever acquired "s9": its fence key does not exist.
    let store = RedisStore::new(
        client.clone(),
        "s9",
        Fence {
            owner: "gw-a:1".into(),
            token: 1,
        },
    );
    let err = store.put_session("a@lid", b"x").await.unwrap_err();
    assert!(is_fenced(&err), "{err:?}");
    assert_eq!(store.create().await.map_err(|e| is_fenced(&e)), Err(true));
    assert!(scan_keys(&client, "wa:{s9}:*").await.is_empty());
}

#[tokio::test]
async fn wipe_deletes_every_store_key_of_the_session_and_nothing_else() {
    let redis = RedisServer::start().await.unwrap();
    let client = redis_client(&redis).await;
    let s1 = owned_store(&client, "s1", "gw-a").await;
    let s2 = owned_store(&client, "s2", "gw-a").await;
    fill(&s1).await;
    fill(&s2).await;
    let s2_before = snapshot(&client, "s2").await;
    assert_eq!(scan_keys(&client, "wa:{s1}:wa:*").await, filled_keys("s1"));

    let deleted = wa_store::wipe(&client, "s1", s1.fence()).await.unwrap();
    assert_eq!(deleted, filled_keys("s1").len());
    // Only the ownership keys are left: the fence is never reset.
    assert_eq!(
        scan_keys(&client, "wa:{s1}:*").await,
        vec![fence_key("s1"), owner_key("s1")]
    );
    assert_eq!(snapshot(&client, "s2").await, s2_before);
    assert_eq!(s1.load_identity("111@s.whatsapp.net").await.unwrap(), None);
    assert!(!s1.exists().await.unwrap());
    assert_eq!(s1.get_max_prekey_id().await.unwrap(), 0);

    // The owner keeps writing after a wipe, and a second wipe finds the new keys.
    s1.put_group_metadata("g@g.us", b"again").await.unwrap();
    s1.set_sender_key_status("g2@g.us", &[("d@lid", true)])
        .await
        .unwrap();
    assert_eq!(
        s1.wipe().await.unwrap(),
        4,
        "group_meta, skd:g:g2, skd:groups, index"
    );
    assert!(scan_keys(&client, "wa:{s1}:wa:*").await.is_empty());
    assert_eq!(s1.wipe().await.unwrap(), 0);
    assert_eq!(snapshot(&client, "s2").await, s2_before);

    // The session wipe of the gateway (known keys, no scan) leaves nothing under `wa:{id}:*`.
    let pattern = crds::session_key_pattern("s2");
    assert_eq!(pattern, "wa:{s2}:*");
    let removed = gateway::redis::wipe_session(&client, "s2").await.unwrap();
    assert_eq!(removed, filled_keys("s2").len() + 2);
    assert!(scan_keys(&client, &pattern).await.is_empty());
}

#[tokio::test]
async fn a_stale_fence_cannot_wipe() {
    let redis = RedisServer::start().await.unwrap();
    let client = redis_client(&redis).await;
    let old = owned_store(&client, "s1", "gw-a").await;
    fill(&old).await;
    let new = take_over(&client, &old, "gw-b").await;
    let before = snapshot(&client, "s1").await;

    let err = wa_store::wipe(&client, "s1", old.fence())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WaStoreError::Fenced { session_id } if session_id == "s1"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "fenced: a newer owner holds session s1");
    assert!(matches!(old.wipe().await, Err(WaStoreError::Fenced { .. })));
    assert_eq!(snapshot(&client, "s1").await, before);

    assert_eq!(new.wipe().await.unwrap(), filled_keys("s1").len());
    assert!(snapshot(&client, "s1").await.is_empty());
}

#[tokio::test]
async fn concurrent_creates_hand_out_distinct_ids() {
    let redis = RedisServer::start().await.unwrap();
    let client = redis_client(&redis).await;
    let store = owned_store(&client, "s1", "gw-a").await;
    let stores: Vec<RedisStore> = (0..32).map(|_| store.clone()).collect();
    let ids = futures::future::join_all(stores.iter().map(|s| s.create())).await;
    let mut ids: Vec<i32> = ids.into_iter().map(Result::unwrap).collect();
    ids.sort();
    assert_eq!(ids, (1..=32).collect::<Vec<_>>());
    assert!(store.exists().await.unwrap());
}

#[tokio::test]
async fn a_device_round_trips_through_another_gateway() {
    let redis = RedisServer::start().await.unwrap();
    let client = redis_client(&redis).await;
    let old = owned_store(&client, "s1", "gw-a").await;

    let mut device = Device::new();
    device.pn = Some("5511999990000:3@s.whatsapp.net".parse().unwrap());
    device.lid = Some("100000012345678:3@lid".parse().unwrap());
    device.push_name = "Gateway test".into();
    device.registration_id = 12345;
    device.adv_secret_key = [7; 32];
    device.edge_routing_info = Some(vec![1, 2, 3]);
    device.props_hash = Some("hash".into());
    device.next_pre_key_id = 812;
    device.first_unupload_pre_key_id = 800;
    device.server_has_prekeys = true;
    device.nct_salt = Some(vec![9; 16]);
    device.login_counter = 7;
    device.lid_migrated = true;
    old.save(&device).await.unwrap();

    // Another gateway, its own connection, after a takeover.
    let other_client = redis_client(&redis).await;
    let new = take_over(&other_client, &old, "gw-b").await;
    let loaded = new.load().await.unwrap().expect("device stored");
    assert_eq!(j(&loaded), j(&device));
    assert_eq!(loaded.push_name, "Gateway test");
    assert_eq!(loaded.pn, device.pn);
    assert_eq!(loaded.lid, device.lid);
    assert_eq!(
        loaded.identity_key.public_key.public_key_bytes(),
        device.identity_key.public_key.public_key_bytes()
    );
    assert_eq!(
        loaded.identity_key.private_key.serialize(),
        device.identity_key.private_key.serialize()
    );
    assert_eq!(
        loaded.signed_pre_key_signature,
        device.signed_pre_key_signature
    );
    assert_eq!(loaded.next_pre_key_id, 812);
    assert!(new.exists().await.unwrap());
    // `create` on a stored device keeps it.
    assert_eq!(new.create().await.unwrap(), 1);
    assert_eq!(j(&new.load().await.unwrap().unwrap()), j(&device));
    // Remote storage: no process memory.
    assert_eq!(new.resource_report().await.memory_bytes, Some(0));
}
