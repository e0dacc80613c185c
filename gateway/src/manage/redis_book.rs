//! The standalone session book in Redis: one hash of specs (JSON by session id) and a version
//! counter, changed together by Lua scripts so a reader never sees one without the other. Both keys
//! share a hash tag, so this works on Redis Cluster. They live outside the `wa:{<session id>}:*`
//! space, so wiping a session's keys can never touch them, whatever the id.

use fred::clients::Client;
use fred::interfaces::KeysInterface;
use fred::prelude::HashesInterface;
use fred::types::Expiration;
use futures::future::BoxFuture;

use super::{
    BookEntry, BookSnapshot, DELETED_HOLD, Hold, ManageError, ManageResult, SessionBook,
    SessionSpec, Wipe,
};
use crate::session::ownership::{LuaScript, fence_key, hold_key, owner_key};

const SPECS_KEY: &str = "wa:book:{book}:specs";
const VERSION_KEY: &str = "wa:book:{book}:version";

/// HSETNX + INCR; returns the existing spec, or nil when stored.
const INSERT_NEW_LUA: &str = r"
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return existing end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[2])
return false
";

/// HSET + INCR when the field still holds ARGV[3] (compare and set); 1 if replaced, 0 if not.
const REPLACE_LUA: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[2])
return 1
";

/// HDEL + INCR; returns the removed spec, or nil.
const REMOVE_LUA: &str = r"
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if not existing then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[2])
return existing
";

/// Sets (ARGV[1] = value) or clears (ARGV[1] = '') a session's hold, leaving a `deleted` hold
/// alone: a pause or resume racing a delete must not cut the delete's hold short.
const SET_HOLD_LUA: &str = r"
if redis.call('GET', KEYS[1]) == 'deleted' then return 0 end
if ARGV[1] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
return 1
";

static SET_HOLD: LuaScript = LuaScript::new(SET_HOLD_LUA);
static INSERT_NEW: LuaScript = LuaScript::new(INSERT_NEW_LUA);
static REPLACE: LuaScript = LuaScript::new(REPLACE_LUA);
static REMOVE: LuaScript = LuaScript::new(REMOVE_LUA);

pub struct RedisBook {
    client: Client,
}

impl RedisBook {
    pub fn new(client: Client) -> Self {
        RedisBook { client }
    }

    fn keys() -> Vec<String> {
        vec![SPECS_KEY.to_owned(), VERSION_KEY.to_owned()]
    }
}

fn unavailable(err: fred::error::Error) -> ManageError {
    ManageError::Unavailable(format!("redis: {err}"))
}

fn encode(spec: &SessionSpec) -> ManageResult<String> {
    serde_json::to_string(spec).map_err(|e| ManageError::Unavailable(e.to_string()))
}

/// A stored spec; one that does not parse (written by a newer version) is reported as unreadable
/// and left alone (see [`BookSnapshot::unreadable`]); deleting it through the API still works.
fn decode(session_id: &str, json: &str) -> Option<SessionSpec> {
    match serde_json::from_str(json) {
        Ok(spec) => Some(spec),
        Err(err) => {
            tracing::warn!(session_id, %err, "unreadable session spec in Redis; skipped");
            None
        }
    }
}

impl SessionBook for RedisBook {
    fn insert_new(&self, spec: &SessionSpec) -> BoxFuture<'_, ManageResult<Option<SessionSpec>>> {
        let (id, json) = (spec.session_id.clone(), encode(spec));
        Box::pin(async move {
            let found: Option<String> = INSERT_NEW
                .run(&self.client, Self::keys(), vec![id.clone(), json?])
                .await
                .map_err(unavailable)?;
            match found {
                None => Ok(None),
                // An unreadable entry still takes the id: a conflict, never a success.
                Some(json) => decode(&id, &json).map(Some).ok_or(ManageError::Conflict),
            }
        })
    }

    fn replace<'a>(
        &'a self,
        old: &'a SessionSpec,
        new: &'a SessionSpec,
    ) -> BoxFuture<'a, ManageResult<bool>> {
        Box::pin(async move {
            let args = vec![new.session_id.clone(), encode(new)?, encode(old)?];
            let replaced: i64 = REPLACE
                .run(&self.client, Self::keys(), args)
                .await
                .map_err(unavailable)?;
            Ok(replaced == 1)
        })
    }

    fn remove<'a>(
        &'a self,
        session_id: &'a str,
    ) -> BoxFuture<'a, ManageResult<Option<SessionSpec>>> {
        Box::pin(async move {
            let found: Option<String> = REMOVE
                .run(&self.client, Self::keys(), vec![session_id.to_owned()])
                .await
                .map_err(unavailable)?;
            Ok(found.map(|json| {
                decode(session_id, &json).unwrap_or_else(|| SessionSpec::qr(session_id))
            }))
        })
    }

    fn all(&self) -> BoxFuture<'_, ManageResult<BookSnapshot>> {
        Box::pin(async move {
            let entries: std::collections::HashMap<String, String> =
                self.client.hgetall(SPECS_KEY).await.map_err(unavailable)?;
            let mut snapshot = BookSnapshot::default();
            for (id, json) in entries {
                match decode(&id, &json) {
                    Some(spec) => snapshot.specs.push(spec),
                    None => snapshot.unreadable.push(id),
                }
            }
            Ok(snapshot)
        })
    }

    fn get<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<Option<BookEntry>>> {
        Box::pin(async move {
            let json: Option<String> = self
                .client
                .hget(SPECS_KEY, session_id)
                .await
                .map_err(unavailable)?;
            Ok(json.map(|json| match decode(session_id, &json) {
                Some(spec) => BookEntry::Spec(spec),
                None => BookEntry::Unreadable,
            }))
        })
    }

    fn version(&self) -> BoxFuture<'_, ManageResult<u64>> {
        Box::pin(async move {
            let version: Option<u64> = self.client.get(VERSION_KEY).await.map_err(unavailable)?;
            Ok(version.unwrap_or(0))
        })
    }

    fn set_hold<'a>(&'a self, session_id: &'a str, hold: Hold) -> BoxFuture<'a, ManageResult<()>> {
        Box::pin(async move {
            let key = hold_key(session_id);
            match hold {
                Hold::Clear | Hold::Paused => {
                    let value = if hold == Hold::Paused {
                        Hold::Paused.as_str()
                    } else {
                        ""
                    };
                    let _: i64 = SET_HOLD
                        .run(&self.client, vec![key], vec![value.to_owned()])
                        .await
                        .map_err(unavailable)?;
                }
                Hold::Deleted => {
                    let expire = Expiration::EX(DELETED_HOLD.as_secs() as i64);
                    let _: () = self
                        .client
                        .set(key, Hold::Deleted.as_str(), Some(expire), None, false)
                        .await
                        .map_err(unavailable)?;
                }
            }
            Ok(())
        })
    }

    fn hold<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<Option<Hold>>> {
        Box::pin(async move {
            let value: Option<String> = self
                .client
                .get(hold_key(session_id))
                .await
                .map_err(unavailable)?;
            Ok(value.as_deref().and_then(Hold::parse))
        })
    }

    fn wipe_deleted<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ManageResult<Wipe>> {
        Box::pin(async move {
            // The lock, the fencing counter and the hold stay; the script checks the first and
            // the last before deleting anything.
            let keep = [
                owner_key(session_id),
                fence_key(session_id),
                hold_key(session_id),
            ];
            let wiped = crate::redis::wipe_session_keys(&self.client, session_id, &keep, true)
                .await
                .map_err(|e| ManageError::Unavailable(e.to_string()))?;
            Ok(match wiped {
                -1 => Wipe::NotDeleted,
                -2 => Wipe::Locked,
                n => Wipe::Wiped(n.max(0) as usize),
            })
        })
    }
}
