//! The `whatsapp-rust` client's storage ([`Backend`]: `SignalStore`, `AppSyncStore`,
//! `ProtocolStore`, `MsgSecretStore`, `DeviceStore`) in Redis, so a session's keys survive a restart
//! or a move to another gateway and the user does not have to scan a QR code again. It behaves as
//! the crate's reference `InMemoryBackend` does (`tests/tests/wa_store.rs` runs one contract suite
//! against both).
//!
//! # Key layout
//!
//! Every key of session `<id>` starts with `wa:{<id>}:wa:` (below: `P`). The hash tag puts all of
//! them, the session's fence and its credentials in one cluster slot, and the session wipe
//! (`crate::redis::wipe_session`: the fixed keys, the index and the keys it names, no keyspace
//! scan) removes them all (a test checks nothing under `wa:{<id>}:*` is left). Items of one kind share a key
//! (hash field = item key) instead of one key per item:
//!
//! | key | type | content |
//! |---|---|---|
//! | `P identity` | hash | address -> 32-byte identity key |
//! | `P session` | hash | address -> session record |
//! | `P prekey` | hash | decimal id -> pre-key record |
//! | `P prekey:uploaded` | set | decimal ids of pre-keys marked uploaded |
//! | `P signed_prekey` | hash | decimal id -> signed pre-key record |
//! | `P sender_key` | hash | address -> sender key record |
//! | `P sync_key` | hash | key id (bytes) -> JSON `AppStateSyncKey` |
//! | `P sync_key:latest` | string | the key id last set |
//! | `P version` | hash | collection -> JSON `HashState` |
//! | `P mutation_mac:<collection>` | hash | index MAC -> value MAC, one hash per collection |
//! | `P skd:g:<group>` | hash | device JID -> `1` (has sender key) / `0`, one hash per group |
//! | `P skd:groups` | set | groups that have a `skd:g:` hash |
//! | `P lid` | hash | LID -> JSON `LidPnMappingEntry` |
//! | `P pn` | hash | phone number -> LID (reverse index) |
//! | `P base_key` | hash | `F(address, message id)` -> base key |
//! | `P devices` | hash | user -> JSON `DeviceListRecord` |
//! | `P group_meta` | hash | group JID -> blob |
//! | `P tc:token`, `P tc:ts`, `P tc:sender` | hashes | JID -> token bytes / token timestamp / sender timestamp (absent = none); a row exists iff `tc:ts` has the JID |
//! | `P sent`, `P sent:ts` | hash, zset | `F(chat, id)` -> payload; member `F(..)` scored by store time (s) |
//! | `P pending`, `P pending:ts` | hash, zset | `F(chat, sender, id)` -> message; scored by store time (s) |
//! | `P msg_secret` | hash | `F(chat, sender, msg id)` -> 32-byte secret followed by decimal `message_ts` |
//! | `P msg_secret:exp` | zset | `F(..)` scored by `expires_at`, only rows with a deadline (non-zero) |
//! | `P device` | string | JSON `Device` (serde; `#[serde(skip)]` fields are not stored) |
//! | `P device:next_id` | string | counter behind `DeviceStore::create` (INCR) |
//! | `P index` | set | every key above that a write created |
//!
//! `F(a, b, ..)` = each part as `<byte length>:<part>`, concatenated (unambiguous whatever the
//! parts contain). Blobs are stored as raw bytes, structured records as JSON.
//!
//! # Fencing
//!
//! A [`RedisStore`] carries the [`Fence`] (token) under which its gateway acquired the session
//! (`super::ownership`). Every write, down to deletes, `take_sent_message` and the `delete_expired_*`
//! sweeps, is a Lua script (EVALSHA) that first checks that the session's fence key
//! (`wa:{<id>}:fence`) still holds that token, the rule of `super::credentials`, and otherwise
//! changes nothing and fails with [`WaStoreError::Fenced`] (inside `StoreError::Database`; see
//! [`is_fenced`]). The check and the write are one atomic script, so a gateway that lost the session
//! (even one that does not know it yet) cannot overwrite what the new owner wrote. Read-modify-write
//! methods (`create`'s counter, `touch_tc_token_sender_timestamp`, `store_received_tc_token`,
//! `put_lid_mapping`, `put_msg_secrets`' merge, `take_sent_message`) run entirely inside their
//! script, so they are atomic as well. A batch method called with nothing to write is a no-op
//! that does not reach Redis (it writes nothing, so there is nothing to fence). The scripts also
//! touch keys they compute (`skd:g:<group>` from `skd:groups`, the wipe's index members): all
//! carry the session's hash tag, so they are in the script's slot.
//!
//! Reads are not fenced: a stale reader can only see data, and the data it could act on is
//! protected by the fenced writes. Fencing reads would cost a check per read for no safety gain.
//!
//! # Wipe
//!
//! [`wipe`] deletes, fenced the same way and in one script, every key in `P index` (each write adds
//! the keys it writes) plus every fixed key name above, then the index itself: all of `P*`. It
//! does not delete the session's ownership keys (`wa:{<id>}:owner`, `wa:{<id>}:fence`: the fence is
//! never reset, so tokens stay monotonic) nor its credentials (`wa:{<id>}:creds`).
//!
//! # Differences from `InMemoryBackend`
//!
//! - `Device` fields marked `#[serde(skip)]` (`device_props`, `client_profile`,
//!   `nct_salt_sync_seen`) come back as their defaults from `load`, as from any persistent store.
//! - Timestamps are compared in Lua (doubles) and sorted-set scores are doubles: exact for values
//!   up to 2^53, far beyond unix seconds.
//! - `resource_report` says `memory_bytes: Some(0)` (the data is not in this process).
//! - `has_signal_state_for_user` is an `HSCAN ... MATCH` over the session and identity hashes,
//!   and `get_max_prekey_id` reads the pre-key ids (`HKEYS`): linear in those hashes, as the
//!   in-memory scans are. Both are rare (PN->LID migration, counter initialisation).

use std::collections::HashMap;
use std::sync::Arc;

use fred::prelude::*;
use fred::types::{Key, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;
use whatsapp_rust::async_trait;
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::error::{Result, StoreError};
use whatsapp_rust::wacore::store::traits::{
    AppStateSyncKey, AppSyncStore, DeviceListRecord, DeviceStore, LidPnMappingEntry,
    MsgSecretEntry, MsgSecretStore, PendingInboundKey, PendingInboundRow, ProtocolStore,
    SignalStore, TcTokenEntry,
};

use super::credentials::Fence;
use super::ownership::fence_key;

/// Size of a message secret (`wacore::reporting_token::MESSAGE_SECRET_SIZE`).
const SECRET_LEN: usize = 32;
/// Cap on stored sent messages, as `InMemoryBackend`'s `MAX_SENT_MESSAGES`: at the cap, a store
/// first drops the oldest down to three quarters of it.
pub const MAX_SENT_MESSAGES: usize = 4096;

/// Errors of the Redis store. The trait methods return them inside a `StoreError`.
#[derive(Debug, thiserror::Error)]
pub enum WaStoreError {
    #[error("fenced: a newer owner holds session {session_id}")]
    Fenced { session_id: String },
    #[error("redis {op} for session {session_id}: {source}")]
    Redis {
        op: &'static str,
        session_id: String,
        #[source]
        source: fred::error::Error,
    },
    #[error("{what} of session {session_id}: {reason}")]
    Codec {
        what: &'static str,
        session_id: String,
        reason: String,
    },
}

impl From<WaStoreError> for StoreError {
    fn from(err: WaStoreError) -> Self {
        match err {
            WaStoreError::Redis { ref source, .. }
                if matches!(
                    source.kind(),
                    ErrorKind::IO | ErrorKind::Timeout | ErrorKind::Canceled | ErrorKind::Routing
                ) =>
            {
                StoreError::Connection(Box::new(err))
            }
            WaStoreError::Codec { .. } => StoreError::Serialization(Box::new(err)),
            _ => StoreError::Database(Box::new(err)),
        }
    }
}

/// Whether a store error is a refused (fenced) write of [`RedisStore`].
pub fn is_fenced(err: &StoreError) -> bool {
    let mut layer: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = layer {
        if matches!(
            e.downcast_ref::<WaStoreError>(),
            Some(WaStoreError::Fenced { .. })
        ) {
            return true;
        }
        layer = e.source();
    }
    false
}

/// A Lua script run with EVALSHA; loaded on first use, and run with EVAL (which caches it on
/// that server) when a server answers `NOSCRIPT` (restarted, another node). Unlike
/// `ownership::LuaScript`, its arguments are binary values.
struct Script {
    src: &'static str,
    sha: OnceCell<String>,
}

impl Script {
    const fn new(src: &'static str) -> Self {
        Script {
            src,
            sha: OnceCell::const_new(),
        }
    }

    async fn run(
        &self,
        client: &Client,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> std::result::Result<Value, fred::error::Error> {
        let sha = self
            .sha
            .get_or_try_init(|| client.script_load::<String, _>(self.src))
            .await?;
        match client
            .evalsha::<Value, _, _, _>(sha.as_str(), keys.clone(), args.clone())
            .await
        {
            Err(err) if err.details().starts_with("NOSCRIPT") => {
                client.eval(self.src, keys, args).await
            }
            other => other,
        }
    }
}

/// A fenced write script: KEYS[1] = fence, KEYS[2] = index, KEYS[3..] = data keys;
/// ARGV[1] = the writer's token. `track()` records the data keys in the index.
macro_rules! fenced_lua {
    ($body:literal) => {
        concat!(
            "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('WAFENCED stale fencing token') end\n",
            "local function track() for i = 3, #KEYS do redis.call('SADD', KEYS[2], KEYS[i]) end end\n",
            $body
        )
    };
}

/// ARGV[2..]: field, value pairs for the hash KEYS[3].
static HSET_PAIRS: Script = Script::new(fenced_lua!(
    r"
track()
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
return 1
"
));

/// ARGV[2..]: fields to delete from the hash KEYS[3].
static HDEL_FIELDS: Script = Script::new(fenced_lua!(
    r"
for i = 2, #ARGV do redis.call('HDEL', KEYS[3], ARGV[i]) end
return 1
"
));

/// Deletes KEYS[3].
static DEL_KEY: Script = Script::new(fenced_lua!(
    r"
redis.call('DEL', KEYS[3])
return 1
"
));

/// KEYS[3] prekey hash, KEYS[4] uploaded set; ARGV[2] `1`|`0`, ARGV[3..] id, record pairs.
static PREKEY_STORE: Script = Script::new(fenced_lua!(
    r"
track()
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  if ARGV[2] == '1' then redis.call('SADD', KEYS[4], ARGV[i]) else redis.call('SREM', KEYS[4], ARGV[i]) end
end
return 1
"
));

/// KEYS[3] prekey hash, KEYS[4] uploaded set; ARGV[2..] ids. Never inserts a pre-key.
static PREKEY_MARK_UPLOADED: Script = Script::new(fenced_lua!(
    r"
for i = 2, #ARGV do
  if redis.call('HEXISTS', KEYS[3], ARGV[i]) == 1 then
    redis.call('SADD', KEYS[2], KEYS[4])
    redis.call('SADD', KEYS[4], ARGV[i])
  end
end
return 1
"
));

/// KEYS[3] prekey hash, KEYS[4] uploaded set; ARGV[2] id.
static PREKEY_REMOVE: Script = Script::new(fenced_lua!(
    r"
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('SREM', KEYS[4], ARGV[2])
return 1
"
));

/// KEYS[3] sync key hash, KEYS[4] latest id; ARGV[2] key id, ARGV[3] JSON key.
static SYNC_KEY_SET: Script = Script::new(fenced_lua!(
    r"
track()
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('SET', KEYS[4], ARGV[2])
return 1
"
));

/// KEYS[3] the group's hash, KEYS[4] groups set; ARGV[2] group, ARGV[3..] device, flag pairs.
static SKD_SET: Script = Script::new(fenced_lua!(
    r"
track()
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[4], ARGV[2])
return 1
"
));

/// KEYS[3] the group's hash, KEYS[4] groups set; ARGV[2] group.
static SKD_CLEAR: Script = Script::new(fenced_lua!(
    r"
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[4], ARGV[2])
return 1
"
));

/// KEYS[3] groups set; ARGV[2] group hash prefix, ARGV[3..] device JIDs to forget in every group.
static SKD_DELETE_ROWS: Script = Script::new(fenced_lua!(
    r"
for _, group in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local key = ARGV[2] .. group
  for i = 3, #ARGV do redis.call('HDEL', key, ARGV[i]) end
end
return 1
"
));

/// KEYS[3] groups set; ARGV[2] group hash prefix.
static SKD_CLEAR_ALL: Script = Script::new(fenced_lua!(
    r"
for _, group in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  redis.call('DEL', ARGV[2] .. group)
end
redis.call('DEL', KEYS[3])
return 1
"
));

/// KEYS[3] lid hash, KEYS[4] pn hash; ARGV[2..] lid, phone, JSON entry triples. A LID that moves
/// to another phone number drops the old number's reverse entry.
static LID_PUT: Script = Script::new(fenced_lua!(
    r"
track()
for i = 2, #ARGV, 3 do
  local lid, pn = ARGV[i], ARGV[i + 1]
  local old = redis.call('HGET', KEYS[3], lid)
  if old then
    local old_pn = cjson.decode(old).phone_number
    if old_pn ~= pn then redis.call('HDEL', KEYS[4], old_pn) end
  end
  redis.call('HSET', KEYS[4], pn, lid)
  redis.call('HSET', KEYS[3], lid, ARGV[i + 2])
end
return 1
"
));

/// KEYS[3] tc:token, KEYS[4] tc:ts, KEYS[5] tc:sender; ARGV[2] JID, ARGV[3] token,
/// ARGV[4] token timestamp, ARGV[5] sender timestamp or empty (none).
static TC_PUT: Script = Script::new(fenced_lua!(
    r"
track()
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[4])
if ARGV[5] == '' then redis.call('HDEL', KEYS[5], ARGV[2]) else redis.call('HSET', KEYS[5], ARGV[2], ARGV[5]) end
return 1
"
));

/// Same keys; ARGV[2] JID.
static TC_DELETE: Script = Script::new(fenced_lua!(
    r"
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
return 1
"
));

/// Same keys; ARGV[2] JID, ARGV[3] sender timestamp: moves it forward only, or inserts a
/// placeholder row (no token bytes).
static TC_TOUCH: Script = Script::new(fenced_lua!(
    r"
track()
local jid, ts = ARGV[2], ARGV[3]
if redis.call('HEXISTS', KEYS[4], jid) == 1 then
  local cur = redis.call('HGET', KEYS[5], jid)
  if (not cur) or tonumber(ts) > tonumber(cur) then redis.call('HSET', KEYS[5], jid, ts) end
else
  redis.call('HSET', KEYS[3], jid, '')
  redis.call('HSET', KEYS[4], jid, ts)
  redis.call('HSET', KEYS[5], jid, ts)
end
return 1
"
));

/// Same keys; ARGV[2] JID, ARGV[3] token, ARGV[4] token timestamp: newer (or equal) wins over a
/// real token, anything wins over a placeholder; the sender timestamp is kept.
static TC_RECEIVED: Script = Script::new(fenced_lua!(
    r"
track()
local jid, token, ts = ARGV[2], ARGV[3], ARGV[4]
if redis.call('HEXISTS', KEYS[4], jid) == 1 then
  local cur_token = redis.call('HGET', KEYS[3], jid)
  local cur_ts = redis.call('HGET', KEYS[4], jid)
  if (not cur_token) or cur_token == '' or tonumber(ts) >= tonumber(cur_ts) then
    redis.call('HSET', KEYS[3], jid, token)
    redis.call('HSET', KEYS[4], jid, ts)
  end
else
  redis.call('HSET', KEYS[3], jid, token)
  redis.call('HSET', KEYS[4], jid, ts)
  redis.call('HDEL', KEYS[5], jid)
end
return 1
"
));

/// Same keys; ARGV[2] token cutoff, ARGV[3] sender cutoff. Drops rows whose token is empty or
/// older than its cutoff and whose sender timestamp is absent or older than its cutoff.
static TC_EXPIRE: Script = Script::new(fenced_lua!(
    r"
local token_cutoff, sender_cutoff = tonumber(ARGV[2]), tonumber(ARGV[3])
local all = redis.call('HGETALL', KEYS[4])
local removed = 0
for i = 1, #all, 2 do
  local jid, ts = all[i], tonumber(all[i + 1])
  local token = redis.call('HGET', KEYS[3], jid)
  local sender = redis.call('HGET', KEYS[5], jid)
  local token_live = token and token ~= '' and ts >= token_cutoff
  local sender_live = sender and tonumber(sender) >= sender_cutoff
  if not (token_live or sender_live) then
    redis.call('HDEL', KEYS[3], jid)
    redis.call('HDEL', KEYS[4], jid)
    redis.call('HDEL', KEYS[5], jid)
    removed = removed + 1
  end
end
return removed
"
));

/// KEYS[3] sent hash, KEYS[4] sent:ts zset; ARGV[2] field, ARGV[3] payload, ARGV[4] now,
/// ARGV[5] cap, ARGV[6] target after eviction.
static SENT_STORE: Script = Script::new(fenced_lua!(
    r"
track()
local n = redis.call('HLEN', KEYS[3])
local cap, target = tonumber(ARGV[5]), tonumber(ARGV[6])
if n >= cap and n > target then
  local drop = n - target
  for _, f in ipairs(redis.call('ZRANGE', KEYS[4], 0, drop - 1)) do redis.call('HDEL', KEYS[3], f) end
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, drop - 1)
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
return 1
"
));

/// KEYS[3] hash, KEYS[4] zset; ARGV[2] field. Returns the value and deletes it.
static TAKE: Script = Script::new(fenced_lua!(
    r"
local v = redis.call('HGET', KEYS[3], ARGV[2])
if v then
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('ZREM', KEYS[4], ARGV[2])
end
return v
"
));

/// KEYS[3] hash, KEYS[4] zset scored by time; ARGV[2] now, ARGV[3..] field, value pairs.
static TIMED_PUT: Script = Script::new(fenced_lua!(
    r"
track()
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[i])
end
return 1
"
));

/// KEYS[3] hash, KEYS[4] zset; ARGV[2..] fields.
static TIMED_DELETE: Script = Script::new(fenced_lua!(
    r"
for i = 2, #ARGV do
  redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('ZREM', KEYS[4], ARGV[i])
end
return 1
"
));

/// KEYS[3] hash, KEYS[4] zset; ARGV[2] score range end (`(x` = below x, `x` = up to x).
/// Deletes the rows scored in `[-inf, end]`; returns how many.
static EXPIRE_BY_SCORE: Script = Script::new(fenced_lua!(
    r"
local victims = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[2])
for _, f in ipairs(victims) do redis.call('HDEL', KEYS[3], f) end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[2])
return #victims
"
));

/// KEYS[3] msg_secret hash, KEYS[4] msg_secret:exp zset; ARGV[2..] field, secret, expires_at,
/// message_ts quads. On conflict: 0 (never) or the later deadline wins, the later message_ts wins.
static MSG_SECRET_PUT: Script = Script::new(fenced_lua!(
    r"
track()
for i = 2, #ARGV, 4 do
  local f, secret, exp, ts = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local old = redis.call('HGET', KEYS[3], f)
  if old then
    local old_ts = string.sub(old, 33)
    if tonumber(old_ts) > tonumber(ts) then ts = old_ts end
    local old_exp = redis.call('ZSCORE', KEYS[4], f)
    if (not old_exp) or tonumber(exp) == 0 then
      exp = '0'
    elseif tonumber(old_exp) > tonumber(exp) then
      exp = old_exp
    end
  end
  redis.call('HSET', KEYS[3], f, secret .. ts)
  if tonumber(exp) == 0 then redis.call('ZREM', KEYS[4], f) else redis.call('ZADD', KEYS[4], exp, f) end
end
return 1
"
));

/// KEYS[3] device, KEYS[4] device:next_id; ARGV[2] JSON of a fresh device. Returns the new id.
static DEVICE_CREATE: Script = Script::new(fenced_lua!(
    r"
track()
local id = redis.call('INCR', KEYS[4])
redis.call('SET', KEYS[3], ARGV[2], 'NX')
return id
"
));

/// KEYS[3] device; ARGV[2] JSON device.
static DEVICE_SAVE: Script = Script::new(fenced_lua!(
    r"
track()
redis.call('SET', KEYS[3], ARGV[2])
return 1
"
));

/// KEYS[3..] fixed key names. Deletes the index's members, the fixed keys and the index.
static WIPE: Script = Script::new(fenced_lua!(
    r"
local deleted = 0
local members = redis.call('SMEMBERS', KEYS[2])
for i = 1, #members, 256 do
  deleted = deleted + redis.call('DEL', unpack(members, i, math.min(i + 255, #members)))
end
for i = 3, #KEYS do deleted = deleted + redis.call('DEL', KEYS[i]) end
return deleted + redis.call('DEL', KEYS[2])
"
));

/// Read (unfenced). KEYS[1] pn hash, KEYS[2] lid hash; ARGV[1] phone.
static PN_LOOKUP: Script = Script::new(
    r"
local lid = redis.call('HGET', KEYS[1], ARGV[1])
if not lid then return false end
return redis.call('HGET', KEYS[2], lid)
",
);

/// Read (unfenced). KEYS[1..3] tc:token, tc:ts, tc:sender; ARGV[1] JID.
/// Returns false or {token, token timestamp, sender timestamp or ''}.
static TC_GET: Script = Script::new(
    r"
local ts = redis.call('HGET', KEYS[2], ARGV[1])
if not ts then return false end
return {redis.call('HGET', KEYS[1], ARGV[1]) or '', ts, redis.call('HGET', KEYS[3], ARGV[1]) or ''}
",
);

/// Read (unfenced). KEYS: hashes keyed by address; ARGV[1] user, ARGV[2] glob of `user@*` and
/// `user:*`. 1 when a field starts with the user followed by `@` or `:`.
static USER_HAS_STATE: Script = Script::new(
    r"
local u = ARGV[1]
local n = #u
for _, key in ipairs(KEYS) do
  local cursor = '0'
  repeat
    local page = redis.call('HSCAN', key, cursor, 'MATCH', ARGV[2], 'COUNT', 1000)
    cursor = page[1]
    local items = page[2]
    for i = 1, #items, 2 do
      local f = items[i]
      local c = string.sub(f, n + 1, n + 1)
      if string.sub(f, 1, n) == u and (c == '@' or c == ':') then return 1 end
    end
  until cursor == '0'
end
return 0
",
);

/// Fixed key names (after the session prefix), deleted by the wipe even if the index lost them.
const FIXED_KEYS: &[&str] = &[
    "identity",
    "session",
    "prekey",
    "prekey:uploaded",
    "signed_prekey",
    "sender_key",
    "sync_key",
    "sync_key:latest",
    "version",
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
];

/// `wa:{<id>}:wa:`: the prefix of every store key of a session.
pub fn store_prefix(session_id: &str) -> String {
    format!("wa:{{{session_id}}}:wa:")
}

/// Every store key of a session that is known without reading Redis (the fixed keys); the
/// others are members of [`index_key`].
pub fn fixed_keys(session_id: &str) -> Vec<String> {
    let prefix = store_prefix(session_id);
    FIXED_KEYS.iter().map(|k| format!("{prefix}{k}")).collect()
}

/// The index of a session's store keys.
pub fn index_key(session_id: &str) -> String {
    format!("{}index", store_prefix(session_id))
}

/// `F(parts..)`: each part as `<byte length>:<part>`.
fn compound(parts: &[&str]) -> Bytes {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
    for part in parts {
        out.extend_from_slice(part.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(part.as_bytes());
    }
    Bytes::from(out)
}

/// Escapes glob metacharacters for `MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn v(bytes: impl Into<Bytes>) -> Value {
    Value::Bytes(bytes.into())
}

fn vs(s: &str) -> Value {
    Value::Bytes(Bytes::copy_from_slice(s.as_bytes()))
}

fn vn(n: impl ToString) -> Value {
    Value::Bytes(Bytes::from(n.to_string()))
}

/// Deletes every store key of the session (see the module docs), if `fence` is still the
/// session's newest; returns how many keys existed.
pub async fn wipe(
    client: &Client,
    session_id: &str,
    fence: &Fence,
) -> std::result::Result<usize, WaStoreError> {
    let prefix = store_prefix(session_id);
    let mut keys = vec![fence_key(session_id), index_key(session_id)];
    keys.extend(FIXED_KEYS.iter().map(|k| format!("{prefix}{k}")));
    let answer = WIPE
        .run(client, keys, vec![vn(fence.token)])
        .await
        .map_err(|source| redis_error("wipe", session_id, source))?;
    match answer {
        Value::Integer(n) => Ok(n.max(0) as usize),
        other => Err(WaStoreError::Codec {
            what: "wipe answer",
            session_id: session_id.to_string(),
            reason: format!("{other:?}"),
        }),
    }
}

fn redis_error(op: &'static str, session_id: &str, source: fred::error::Error) -> WaStoreError {
    if source.details().contains("WAFENCED") {
        WaStoreError::Fenced {
            session_id: session_id.to_string(),
        }
    } else {
        WaStoreError::Redis {
            op,
            session_id: session_id.to_string(),
            source,
        }
    }
}

/// One session's `whatsapp-rust` store in Redis; writes are fenced by `fence`.
#[derive(Clone)]
pub struct RedisStore {
    client: Client,
    session_id: Arc<str>,
    prefix: Arc<str>,
    fence: Fence,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("session_id", &self.session_id)
            .field("fence", &self.fence)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    pub fn new(client: Client, session_id: impl Into<String>, fence: Fence) -> Self {
        let session_id: String = session_id.into();
        RedisStore {
            client,
            prefix: store_prefix(&session_id).into(),
            session_id: session_id.into(),
            fence,
        }
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// [`wipe`] with this store's fence.
    pub async fn wipe(&self) -> std::result::Result<usize, WaStoreError> {
        wipe(&self.client, &self.session_id, &self.fence).await
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn err(&self, op: &'static str, source: fred::error::Error) -> StoreError {
        redis_error(op, &self.session_id, source).into()
    }

    fn codec(&self, what: &'static str, reason: impl ToString) -> StoreError {
        WaStoreError::Codec {
            what,
            session_id: self.session_id.to_string(),
            reason: reason.to_string(),
        }
        .into()
    }

    fn encode<T: Serialize>(&self, what: &'static str, value: &T) -> Result<Value> {
        serde_json::to_vec(value)
            .map(v)
            .map_err(|e| self.codec(what, e))
    }

    fn decode<T: DeserializeOwned>(&self, what: &'static str, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| self.codec(what, e))
    }

    /// Runs a fenced write script on `data_keys` (full key names) with `args` after the token.
    async fn write(
        &self,
        op: &'static str,
        script: &Script,
        data_keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value> {
        let mut keys = Vec::with_capacity(data_keys.len() + 2);
        keys.push(fence_key(&self.session_id));
        keys.push(self.key("index"));
        keys.extend(data_keys);
        let mut argv = Vec::with_capacity(args.len() + 1);
        argv.push(vn(self.fence.token));
        argv.extend(args);
        script
            .run(&self.client, keys, argv)
            .await
            .map_err(|e| self.err(op, e))
    }

    async fn read_script(
        &self,
        op: &'static str,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> Result<Value> {
        script
            .run(&self.client, keys, args)
            .await
            .map_err(|e| self.err(op, e))
    }

    async fn hset(&self, op: &'static str, hash: &str, pairs: Vec<Value>) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        self.write(op, &HSET_PAIRS, vec![self.key(hash)], pairs)
            .await
            .map(drop)
    }

    async fn hdel(&self, op: &'static str, hash: &str, fields: Vec<Value>) -> Result<()> {
        if fields.is_empty() {
            return Ok(());
        }
        self.write(op, &HDEL_FIELDS, vec![self.key(hash)], fields)
            .await
            .map(drop)
    }

    async fn hget(
        &self,
        op: &'static str,
        hash: &str,
        field: impl Into<Key>,
    ) -> Result<Option<Bytes>> {
        let value: Value = self
            .client
            .hget(self.key(hash), field.into())
            .await
            .map_err(|e| self.err(op, e))?;
        self.opt_bytes(op, value)
    }

    async fn hmget(
        &self,
        op: &'static str,
        hash: &str,
        fields: Vec<Key>,
    ) -> Result<Vec<Option<Bytes>>> {
        if fields.is_empty() {
            return Ok(Vec::new());
        }
        let value: Value = self
            .client
            .hmget(self.key(hash), fields)
            .await
            .map_err(|e| self.err(op, e))?;
        self.array(op, value)?
            .into_iter()
            .map(|v| self.opt_bytes(op, v))
            .collect()
    }

    async fn hgetall(&self, op: &'static str, hash: &str) -> Result<Vec<(Bytes, Bytes)>> {
        let value: Value = self
            .client
            .hgetall(self.key(hash))
            .await
            .map_err(|e| self.err(op, e))?;
        if value.is_null() {
            return Ok(Vec::new());
        }
        let map = value.into_map().map_err(|e| self.err(op, e))?;
        map.inner()
            .into_iter()
            .map(|(k, v)| Ok((k.into_bytes(), self.bytes(op, v)?)))
            .collect()
    }

    async fn hkeys(&self, op: &'static str, hash: &str) -> Result<Vec<Bytes>> {
        let value: Value = self
            .client
            .hkeys(self.key(hash))
            .await
            .map_err(|e| self.err(op, e))?;
        self.array(op, value)?
            .into_iter()
            .map(|v| self.bytes(op, v))
            .collect()
    }

    fn opt_bytes(&self, op: &'static str, value: Value) -> Result<Option<Bytes>> {
        match value {
            Value::Null => Ok(None),
            other => self.bytes(op, other).map(Some),
        }
    }

    fn bytes(&self, op: &'static str, value: Value) -> Result<Bytes> {
        match value {
            Value::Bytes(b) => Ok(b),
            Value::String(s) => Ok(s.into_inner()),
            Value::Integer(i) => Ok(Bytes::from(i.to_string())),
            other => Err(self.codec(op, format!("expected a string, got {other:?}"))),
        }
    }

    fn array(&self, op: &'static str, value: Value) -> Result<Vec<Value>> {
        match value {
            Value::Array(values) => Ok(values),
            Value::Null => Ok(Vec::new()),
            other => Err(self.codec(op, format!("expected an array, got {other:?}"))),
        }
    }

    fn integer(&self, op: &'static str, value: Value) -> Result<i64> {
        match value {
            Value::Integer(i) => Ok(i),
            other => Err(self.codec(op, format!("expected an integer, got {other:?}"))),
        }
    }

    fn text(&self, what: &'static str, bytes: &[u8]) -> Result<String> {
        String::from_utf8(bytes.to_vec()).map_err(|e| self.codec(what, e))
    }

    fn number<T: std::str::FromStr>(&self, what: &'static str, bytes: &[u8]) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        std::str::from_utf8(bytes)
            .map_err(|e| self.codec(what, e))?
            .parse()
            .map_err(|e: T::Err| self.codec(what, e))
    }

    fn tc_keys(&self) -> Vec<String> {
        vec![
            self.key("tc:token"),
            self.key("tc:ts"),
            self.key("tc:sender"),
        ]
    }

    fn skd_group_key(&self, group_jid: &str) -> String {
        self.key(&format!("skd:g:{group_jid}"))
    }

    fn mutation_key(&self, name: &str) -> String {
        format!("mutation_mac:{name}")
    }
}

#[async_trait]
impl SignalStore for RedisStore {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> Result<()> {
        self.hset(
            "put_identity",
            "identity",
            vec![vs(address), v(key.to_vec())],
        )
        .await
    }

    async fn put_identities_batch(&self, identities: &[(Arc<str>, [u8; 32])]) -> Result<()> {
        let pairs = identities
            .iter()
            .flat_map(|(address, key)| [vs(address), v(key.to_vec())])
            .collect();
        self.hset("put_identities_batch", "identity", pairs).await
    }

    async fn load_identity(&self, address: &str) -> Result<Option<[u8; 32]>> {
        match self.hget("load_identity", "identity", address).await? {
            None => Ok(None),
            Some(bytes) => <[u8; 32]>::try_from(bytes.as_ref())
                .map(Some)
                .map_err(|_| self.codec("identity key", format!("{} bytes, not 32", bytes.len()))),
        }
    }

    async fn delete_identity(&self, address: &str) -> Result<()> {
        self.hdel("delete_identity", "identity", vec![vs(address)])
            .await
    }

    async fn get_session(&self, address: &str) -> Result<Option<Bytes>> {
        self.hget("get_session", "session", address).await
    }

    async fn put_session(&self, address: &str, session: &[u8]) -> Result<()> {
        self.hset(
            "put_session",
            "session",
            vec![vs(address), v(Bytes::copy_from_slice(session))],
        )
        .await
    }

    async fn put_sessions_batch(&self, sessions: &[(Arc<str>, Bytes)]) -> Result<()> {
        let pairs = sessions
            .iter()
            .flat_map(|(address, session)| [vs(address), v(session.clone())])
            .collect();
        self.hset("put_sessions_batch", "session", pairs).await
    }

    async fn delete_session(&self, address: &str) -> Result<()> {
        self.hdel("delete_session", "session", vec![vs(address)])
            .await
    }

    async fn has_session(&self, address: &str) -> Result<bool> {
        self.client
            .hexists(self.key("session"), address)
            .await
            .map_err(|e| self.err("has_session", e))
    }

    async fn has_signal_state_for_user(&self, user: &str) -> Result<bool> {
        let pattern = format!("{}[@:]*", glob_escape(user));
        let found = self
            .read_script(
                "has_signal_state_for_user",
                &USER_HAS_STATE,
                vec![self.key("session"), self.key("identity")],
                vec![vs(user), vs(&pattern)],
            )
            .await?;
        Ok(self.integer("has_signal_state_for_user", found)? == 1)
    }

    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> Result<()> {
        self.write(
            "store_prekey",
            &PREKEY_STORE,
            vec![self.key("prekey"), self.key("prekey:uploaded")],
            vec![
                vs(if uploaded { "1" } else { "0" }),
                vn(id),
                v(Bytes::copy_from_slice(record)),
            ],
        )
        .await
        .map(drop)
    }

    async fn store_prekeys_batch(&self, keys: &[(u32, Bytes)], uploaded: bool) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut args = Vec::with_capacity(keys.len() * 2 + 1);
        args.push(vs(if uploaded { "1" } else { "0" }));
        for (id, record) in keys {
            args.push(vn(id));
            args.push(v(record.clone()));
        }
        self.write(
            "store_prekeys_batch",
            &PREKEY_STORE,
            vec![self.key("prekey"), self.key("prekey:uploaded")],
            args,
        )
        .await
        .map(drop)
    }

    async fn load_prekey(&self, id: u32) -> Result<Option<Bytes>> {
        self.hget("load_prekey", "prekey", id.to_string()).await
    }

    async fn load_prekeys_batch(&self, ids: &[u32]) -> Result<Vec<(u32, Bytes)>> {
        let fields = ids.iter().map(|id| Key::from(id.to_string())).collect();
        let records = self.hmget("load_prekeys_batch", "prekey", fields).await?;
        Ok(ids
            .iter()
            .zip(records)
            .filter_map(|(id, record)| record.map(|r| (*id, r)))
            .collect())
    }

    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.write(
            "mark_prekeys_uploaded",
            &PREKEY_MARK_UPLOADED,
            vec![self.key("prekey"), self.key("prekey:uploaded")],
            ids.iter().map(vn).collect(),
        )
        .await
        .map(drop)
    }

    async fn remove_prekey(&self, id: u32) -> Result<()> {
        self.write(
            "remove_prekey",
            &PREKEY_REMOVE,
            vec![self.key("prekey"), self.key("prekey:uploaded")],
            vec![vn(id)],
        )
        .await
        .map(drop)
    }

    async fn get_max_prekey_id(&self) -> Result<u32> {
        let mut max = 0;
        for id in self.hkeys("get_max_prekey_id", "prekey").await? {
            max = max.max(self.number::<u32>("pre-key id", &id)?);
        }
        Ok(max)
    }

    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> Result<()> {
        self.hset(
            "store_signed_prekey",
            "signed_prekey",
            vec![vn(id), v(Bytes::copy_from_slice(record))],
        )
        .await
    }

    async fn load_signed_prekey(&self, id: u32) -> Result<Option<Vec<u8>>> {
        Ok(self
            .hget("load_signed_prekey", "signed_prekey", id.to_string())
            .await?
            .map(|b| b.to_vec()))
    }

    async fn load_all_signed_prekeys(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        self.hgetall("load_all_signed_prekeys", "signed_prekey")
            .await?
            .into_iter()
            .map(|(id, record)| Ok((self.number("signed pre-key id", &id)?, record.to_vec())))
            .collect()
    }

    async fn remove_signed_prekey(&self, id: u32) -> Result<()> {
        self.hdel("remove_signed_prekey", "signed_prekey", vec![vn(id)])
            .await
    }

    async fn put_sender_key(&self, address: &str, record: &[u8]) -> Result<()> {
        self.hset(
            "put_sender_key",
            "sender_key",
            vec![vs(address), v(Bytes::copy_from_slice(record))],
        )
        .await
    }

    async fn put_sender_keys_batch(&self, sender_keys: &[(Arc<str>, Bytes)]) -> Result<()> {
        let pairs = sender_keys
            .iter()
            .flat_map(|(address, record)| [vs(address), v(record.clone())])
            .collect();
        self.hset("put_sender_keys_batch", "sender_key", pairs)
            .await
    }

    async fn get_sender_key(&self, address: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .hget("get_sender_key", "sender_key", address)
            .await?
            .map(|b| b.to_vec()))
    }

    async fn delete_sender_key(&self, address: &str) -> Result<()> {
        self.hdel("delete_sender_key", "sender_key", vec![vs(address)])
            .await
    }
}

#[async_trait]
impl AppSyncStore for RedisStore {
    async fn get_sync_key(&self, key_id: &[u8]) -> Result<Option<AppStateSyncKey>> {
        match self.hget("get_sync_key", "sync_key", key_id).await? {
            None => Ok(None),
            Some(json) => self.decode("app state sync key", &json).map(Some),
        }
    }

    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> Result<()> {
        let json = self.encode("app state sync key", &key)?;
        self.write(
            "set_sync_key",
            &SYNC_KEY_SET,
            vec![self.key("sync_key"), self.key("sync_key:latest")],
            vec![v(Bytes::copy_from_slice(key_id)), json],
        )
        .await
        .map(drop)
    }

    async fn get_version(&self, name: &str) -> Result<HashState> {
        match self.hget("get_version", "version", name).await? {
            None => Ok(HashState::default()),
            Some(json) => self.decode("app state version", &json),
        }
    }

    async fn set_version(&self, name: &str, state: HashState) -> Result<()> {
        let json = self.encode("app state version", &state)?;
        self.hset("set_version", "version", vec![vs(name), json])
            .await
    }

    async fn put_mutation_macs(
        &self,
        name: &str,
        _version: u64,
        mutations: &[AppStateMutationMAC],
    ) -> Result<()> {
        let pairs = mutations
            .iter()
            .flat_map(|m| [v(m.index_mac.clone()), v(m.value_mac.clone())])
            .collect();
        self.hset("put_mutation_macs", &self.mutation_key(name), pairs)
            .await
    }

    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .hget("get_mutation_mac", &self.mutation_key(name), index_mac)
            .await?
            .map(|b| b.to_vec()))
    }

    async fn get_mutation_macs(
        &self,
        name: &str,
        index_macs: &[[u8; 32]],
    ) -> Result<HashMap<[u8; 32], Vec<u8>>> {
        let fields = index_macs.iter().map(|m| Key::from(m.as_slice())).collect();
        let values = self
            .hmget("get_mutation_macs", &self.mutation_key(name), fields)
            .await?;
        Ok(index_macs
            .iter()
            .zip(values)
            .filter_map(|(index, value)| value.map(|v| (*index, v.to_vec())))
            .collect())
    }

    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> Result<()> {
        let fields = index_macs.iter().map(|m| v(m.clone())).collect();
        self.hdel("delete_mutation_macs", &self.mutation_key(name), fields)
            .await
    }

    async fn clear_mutation_macs(&self, name: &str) -> Result<()> {
        self.write(
            "clear_mutation_macs",
            &DEL_KEY,
            vec![self.key(&self.mutation_key(name))],
            Vec::new(),
        )
        .await
        .map(drop)
    }

    async fn get_latest_sync_key_id(&self) -> Result<Option<Vec<u8>>> {
        let value: Value = self
            .client
            .get(self.key("sync_key:latest"))
            .await
            .map_err(|e| self.err("get_latest_sync_key_id", e))?;
        Ok(self
            .opt_bytes("get_latest_sync_key_id", value)?
            .map(|b| b.to_vec()))
    }
}

#[async_trait]
impl ProtocolStore for RedisStore {
    async fn get_sender_key_devices(&self, group_jid: &str) -> Result<Vec<(String, bool)>> {
        let value: Value = self
            .client
            .hgetall(self.skd_group_key(group_jid))
            .await
            .map_err(|e| self.err("get_sender_key_devices", e))?;
        if value.is_null() {
            return Ok(Vec::new());
        }
        let map = value
            .into_map()
            .map_err(|e| self.err("get_sender_key_devices", e))?;
        map.inner()
            .into_iter()
            .map(|(device, flag)| {
                let device = self.text("sender key device", device.as_bytes())?;
                let flag = self.bytes("get_sender_key_devices", flag)?;
                Ok((device, flag.as_ref() == b"1"))
            })
            .collect()
    }

    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut args = Vec::with_capacity(entries.len() * 2 + 1);
        args.push(vs(group_jid));
        for (device, has_key) in entries {
            args.push(vs(device));
            args.push(vs(if *has_key { "1" } else { "0" }));
        }
        self.write(
            "set_sender_key_status",
            &SKD_SET,
            vec![self.skd_group_key(group_jid), self.key("skd:groups")],
            args,
        )
        .await
        .map(drop)
    }

    async fn clear_sender_key_devices(&self, group_jid: &str) -> Result<()> {
        self.write(
            "clear_sender_key_devices",
            &SKD_CLEAR,
            vec![self.skd_group_key(group_jid), self.key("skd:groups")],
            vec![vs(group_jid)],
        )
        .await
        .map(drop)
    }

    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> Result<()> {
        if device_jids.is_empty() {
            return Ok(());
        }
        let mut args = Vec::with_capacity(device_jids.len() + 1);
        args.push(vs(&self.key("skd:g:")));
        args.extend(device_jids.iter().map(|d| vs(d)));
        self.write(
            "delete_sender_key_device_rows",
            &SKD_DELETE_ROWS,
            vec![self.key("skd:groups")],
            args,
        )
        .await
        .map(drop)
    }

    async fn clear_all_sender_key_devices(&self) -> Result<()> {
        self.write(
            "clear_all_sender_key_devices",
            &SKD_CLEAR_ALL,
            vec![self.key("skd:groups")],
            vec![vs(&self.key("skd:g:"))],
        )
        .await
        .map(drop)
    }

    async fn get_lid_mapping(&self, lid: &str) -> Result<Option<LidPnMappingEntry>> {
        match self.hget("get_lid_mapping", "lid", lid).await? {
            None => Ok(None),
            Some(json) => self.decode("LID mapping", &json).map(Some),
        }
    }

    async fn get_pn_mapping(&self, phone: &str) -> Result<Option<LidPnMappingEntry>> {
        let value = self
            .read_script(
                "get_pn_mapping",
                &PN_LOOKUP,
                vec![self.key("pn"), self.key("lid")],
                vec![vs(phone)],
            )
            .await?;
        match self.opt_bytes("get_pn_mapping", value)? {
            None => Ok(None),
            Some(json) => self.decode("LID mapping", &json).map(Some),
        }
    }

    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> Result<()> {
        self.put_lid_mappings(std::slice::from_ref(entry)).await
    }

    async fn put_lid_mappings(&self, entries: &[LidPnMappingEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut args = Vec::with_capacity(entries.len() * 3);
        for entry in entries {
            args.push(vs(&entry.lid));
            args.push(vs(&entry.phone_number));
            args.push(self.encode("LID mapping", entry)?);
        }
        self.write(
            "put_lid_mappings",
            &LID_PUT,
            vec![self.key("lid"), self.key("pn")],
            args,
        )
        .await
        .map(drop)
    }

    async fn get_all_lid_mappings(&self) -> Result<Vec<LidPnMappingEntry>> {
        let value: Value = self
            .client
            .hvals(self.key("lid"))
            .await
            .map_err(|e| self.err("get_all_lid_mappings", e))?;
        self.array("get_all_lid_mappings", value)?
            .into_iter()
            .map(|json| {
                let json = self.bytes("get_all_lid_mappings", json)?;
                self.decode("LID mapping", &json)
            })
            .collect()
    }

    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> Result<()> {
        self.hset(
            "save_base_key",
            "base_key",
            vec![
                v(compound(&[address, message_id])),
                v(Bytes::copy_from_slice(base_key)),
            ],
        )
        .await
    }

    async fn has_same_base_key(
        &self,
        address: &str,
        message_id: &str,
        current_base_key: &[u8],
    ) -> Result<bool> {
        Ok(self
            .hget(
                "has_same_base_key",
                "base_key",
                compound(&[address, message_id]),
            )
            .await?
            .is_some_and(|stored| stored.as_ref() == current_base_key))
    }

    async fn delete_base_key(&self, address: &str, message_id: &str) -> Result<()> {
        self.hdel(
            "delete_base_key",
            "base_key",
            vec![v(compound(&[address, message_id]))],
        )
        .await
    }

    async fn update_device_list(&self, record: DeviceListRecord) -> Result<()> {
        self.update_device_lists(vec![record]).await
    }

    async fn update_device_lists(&self, records: Vec<DeviceListRecord>) -> Result<()> {
        let mut pairs = Vec::with_capacity(records.len() * 2);
        for record in &records {
            pairs.push(vs(&record.user));
            pairs.push(self.encode("device list", record)?);
        }
        self.hset("update_device_lists", "devices", pairs).await
    }

    async fn get_devices(&self, user: &str) -> Result<Option<DeviceListRecord>> {
        match self.hget("get_devices", "devices", user).await? {
            None => Ok(None),
            Some(json) => self.decode("device list", &json).map(Some),
        }
    }

    async fn delete_devices(&self, user: &str) -> Result<()> {
        self.hdel("delete_devices", "devices", vec![vs(user)]).await
    }

    async fn get_group_metadata(&self, group_jid: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .hget("get_group_metadata", "group_meta", group_jid)
            .await?
            .map(|b| b.to_vec()))
    }

    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> Result<()> {
        self.hset(
            "put_group_metadata",
            "group_meta",
            vec![vs(group_jid), v(Bytes::copy_from_slice(blob))],
        )
        .await
    }

    async fn delete_group_metadata(&self, group_jid: &str) -> Result<()> {
        self.hdel("delete_group_metadata", "group_meta", vec![vs(group_jid)])
            .await
    }

    async fn get_tc_token(&self, jid: &str) -> Result<Option<TcTokenEntry>> {
        let value = self
            .read_script("get_tc_token", &TC_GET, self.tc_keys(), vec![vs(jid)])
            .await?;
        if value.is_null() {
            return Ok(None);
        }
        let mut parts = self.array("get_tc_token", value)?.into_iter();
        let (Some(token), Some(ts), Some(sender)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(self.codec("tc token", "expected 3 parts"));
        };
        let token = self.bytes("get_tc_token", token)?;
        let ts = self.bytes("get_tc_token", ts)?;
        let sender = self.bytes("get_tc_token", sender)?;
        Ok(Some(TcTokenEntry {
            token: token.to_vec(),
            token_timestamp: self.number("tc token timestamp", &ts)?,
            sender_timestamp: if sender.is_empty() {
                None
            } else {
                Some(self.number("tc sender timestamp", &sender)?)
            },
        }))
    }

    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> Result<()> {
        self.write(
            "put_tc_token",
            &TC_PUT,
            self.tc_keys(),
            vec![
                vs(jid),
                v(entry.token.clone()),
                vn(entry.token_timestamp),
                entry.sender_timestamp.map_or_else(|| vs(""), vn),
            ],
        )
        .await
        .map(drop)
    }

    async fn delete_tc_token(&self, jid: &str) -> Result<()> {
        self.write("delete_tc_token", &TC_DELETE, self.tc_keys(), vec![vs(jid)])
            .await
            .map(drop)
    }

    async fn get_all_tc_token_jids(&self) -> Result<Vec<String>> {
        self.hkeys("get_all_tc_token_jids", "tc:ts")
            .await?
            .iter()
            .map(|jid| self.text("tc token JID", jid))
            .collect()
    }

    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> Result<u32> {
        let removed = self
            .write(
                "delete_expired_tc_tokens",
                &TC_EXPIRE,
                self.tc_keys(),
                vec![vn(token_cutoff), vn(sender_cutoff)],
            )
            .await?;
        Ok(self.integer("delete_expired_tc_tokens", removed)? as u32)
    }

    async fn touch_tc_token_sender_timestamp(
        &self,
        jid: &str,
        sender_timestamp: i64,
    ) -> Result<()> {
        self.write(
            "touch_tc_token_sender_timestamp",
            &TC_TOUCH,
            self.tc_keys(),
            vec![vs(jid), vn(sender_timestamp)],
        )
        .await
        .map(drop)
    }

    async fn store_received_tc_token(
        &self,
        jid: &str,
        token: &[u8],
        token_timestamp: i64,
    ) -> Result<()> {
        self.write(
            "store_received_tc_token",
            &TC_RECEIVED,
            self.tc_keys(),
            vec![
                vs(jid),
                v(Bytes::copy_from_slice(token)),
                vn(token_timestamp),
            ],
        )
        .await
        .map(drop)
    }

    async fn store_sent_message(
        &self,
        chat_jid: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<()> {
        let now = whatsapp_rust::wacore::time::now_secs();
        self.write(
            "store_sent_message",
            &SENT_STORE,
            vec![self.key("sent"), self.key("sent:ts")],
            vec![
                v(compound(&[chat_jid, message_id])),
                v(Bytes::copy_from_slice(payload)),
                vn(now),
                vn(MAX_SENT_MESSAGES),
                vn(MAX_SENT_MESSAGES * 3 / 4),
            ],
        )
        .await
        .map(drop)
    }

    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> Result<Option<Vec<u8>>> {
        let value = self
            .write(
                "take_sent_message",
                &TAKE,
                vec![self.key("sent"), self.key("sent:ts")],
                vec![v(compound(&[chat_jid, message_id]))],
            )
            .await?;
        Ok(self
            .opt_bytes("take_sent_message", value)?
            .map(|b| b.to_vec()))
    }

    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> Result<u32> {
        // Keeps `timestamp >= cutoff`.
        let removed = self
            .write(
                "delete_expired_sent_messages",
                &EXPIRE_BY_SCORE,
                vec![self.key("sent"), self.key("sent:ts")],
                vec![vs(&format!("({cutoff_timestamp}"))],
            )
            .await?;
        Ok(self.integer("delete_expired_sent_messages", removed)? as u32)
    }

    async fn store_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
        message: &[u8],
    ) -> Result<()> {
        self.store_pending_inbound_batch(&[PendingInboundRow {
            chat,
            sender,
            id,
            message,
        }])
        .await
    }

    async fn get_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>> {
        Ok(self
            .hget(
                "get_pending_inbound",
                "pending",
                compound(&[chat, sender, id]),
            )
            .await?
            .map(|b| b.to_vec()))
    }

    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> Result<()> {
        self.delete_pending_inbound_batch(&[PendingInboundKey { chat, sender, id }])
            .await
    }

    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> Result<u32> {
        // Keeps `inserted_at >= cutoff`.
        let removed = self
            .write(
                "delete_expired_pending_inbound",
                &EXPIRE_BY_SCORE,
                vec![self.key("pending"), self.key("pending:ts")],
                vec![vs(&format!("({cutoff_timestamp}"))],
            )
            .await?;
        Ok(self.integer("delete_expired_pending_inbound", removed)? as u32)
    }

    async fn store_pending_inbound_batch(&self, rows: &[PendingInboundRow<'_>]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let now = whatsapp_rust::wacore::time::now_secs();
        let mut args = Vec::with_capacity(rows.len() * 2 + 1);
        args.push(vn(now));
        for row in rows {
            args.push(v(compound(&[row.chat, row.sender, row.id])));
            args.push(v(Bytes::copy_from_slice(row.message)));
        }
        self.write(
            "store_pending_inbound",
            &TIMED_PUT,
            vec![self.key("pending"), self.key("pending:ts")],
            args,
        )
        .await
        .map(drop)
    }

    async fn delete_pending_inbound_batch(&self, keys: &[PendingInboundKey<'_>]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let fields = keys
            .iter()
            .map(|k| v(compound(&[k.chat, k.sender, k.id])))
            .collect();
        self.write(
            "delete_pending_inbound",
            &TIMED_DELETE,
            vec![self.key("pending"), self.key("pending:ts")],
            fields,
        )
        .await
        .map(drop)
    }
}

#[async_trait]
impl MsgSecretStore for RedisStore {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut args = Vec::with_capacity(entries.len() * 4);
        for entry in &entries {
            args.push(v(compound(&[&entry.chat, &entry.sender, &entry.msg_id])));
            args.push(v(entry.secret.to_vec()));
            args.push(vn(entry.expires_at));
            args.push(vn(entry.message_ts));
        }
        self.write(
            "put_msg_secrets",
            &MSG_SECRET_PUT,
            vec![self.key("msg_secret"), self.key("msg_secret:exp")],
            args,
        )
        .await?;
        Ok(entries.len())
    }

    async fn get_msg_secret(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        Ok(self
            .get_msg_secret_with_ts(chat, sender, msg_id)
            .await?
            .map(|(secret, _)| secret))
    }

    async fn get_msg_secret_with_ts(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<(Vec<u8>, i64)>> {
        let Some(row) = self
            .hget(
                "get_msg_secret",
                "msg_secret",
                compound(&[chat, sender, msg_id]),
            )
            .await?
        else {
            return Ok(None);
        };
        if row.len() < SECRET_LEN {
            return Err(self.codec("message secret", format!("{} bytes", row.len())));
        }
        let message_ts = self.number("message secret timestamp", &row[SECRET_LEN..])?;
        Ok(Some((row[..SECRET_LEN].to_vec(), message_ts)))
    }

    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> Result<u32> {
        // The zset holds only rows with a deadline; drops `expires_at <= cutoff`.
        let removed = self
            .write(
                "delete_expired_msg_secrets",
                &EXPIRE_BY_SCORE,
                vec![self.key("msg_secret"), self.key("msg_secret:exp")],
                vec![vn(cutoff_timestamp)],
            )
            .await?;
        Ok(self.integer("delete_expired_msg_secrets", removed)? as u32)
    }
}

#[async_trait]
impl DeviceStore for RedisStore {
    async fn save(&self, device: &Device) -> Result<()> {
        let json = self.encode("device", device)?;
        self.write("save", &DEVICE_SAVE, vec![self.key("device")], vec![json])
            .await
            .map(drop)
    }

    async fn load(&self) -> Result<Option<Device>> {
        let value: Value = self
            .client
            .get(self.key("device"))
            .await
            .map_err(|e| self.err("load", e))?;
        match self.opt_bytes("load", value)? {
            None => Ok(None),
            Some(json) => self.decode("device", &json).map(Some),
        }
    }

    async fn exists(&self) -> Result<bool> {
        let n: i64 = self
            .client
            .exists(self.key("device"))
            .await
            .map_err(|e| self.err("exists", e))?;
        Ok(n > 0)
    }

    async fn create(&self) -> Result<i32> {
        // A fresh device is stored only if none is (SET NX), as `InMemoryBackend` does.
        let json = self.encode("device", &Device::new())?;
        let id = self
            .write(
                "create",
                &DEVICE_CREATE,
                vec![self.key("device"), self.key("device:next_id")],
                vec![json],
            )
            .await?;
        i32::try_from(self.integer("create", id)?).map_err(|e| self.codec("device id", e))
    }

    async fn resource_report(&self) -> whatsapp_rust::wacore::stats::StorageResourceReport {
        whatsapp_rust::wacore::stats::StorageResourceReport {
            memory_bytes: Some(0),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_session_hash_tag() {
        assert_eq!(store_prefix("s1"), "wa:{s1}:wa:");
        assert_eq!(index_key("s1"), "wa:{s1}:wa:index");
        let pattern = crds::session_key_pattern("s1");
        assert!(store_prefix("s1").starts_with(pattern.trim_end_matches('*')));
    }

    #[test]
    fn compound_fields_are_unambiguous() {
        assert_eq!(compound(&["ab", "c"]).as_ref(), b"2:ab1:c");
        assert_ne!(compound(&["a", "bc"]), compound(&["ab", "c"]));
        assert_ne!(compound(&["1:a", ""]), compound(&["", "1:a"]));
    }

    #[test]
    fn globs_are_escaped() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn fenced_errors_are_recognised_through_store_error() {
        let err: StoreError = WaStoreError::Fenced {
            session_id: "s1".into(),
        }
        .into();
        assert!(is_fenced(&err));
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert_eq!(source, "fenced: a newer owner holds session s1");
        let other: StoreError = WaStoreError::Codec {
            what: "x",
            session_id: "s1".into(),
            reason: "y".into(),
        }
        .into();
        assert!(!is_fenced(&other));
    }
}
