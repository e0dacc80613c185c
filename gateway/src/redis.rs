//! The Redis connection (fred): reconnects forever in the background, and commands fail fast
//! while Redis is away so callers can degrade instead of hanging.

use std::time::Duration;

use fred::prelude::*;

use crate::Result;

/// Builds a client for `url` and starts connecting; does not wait for the first connection (a
/// gateway starts and serves while Redis is still unreachable).
pub async fn connect(url: &str) -> Result<fred::clients::Client> {
    let config = Config::from_url(url)?;
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
            c.max_command_attempts = 2;
        })
        .with_performance_config(|c| {
            c.default_command_timeout = Duration::from_secs(2);
        })
        // 0 = retry forever, 100 ms .. 2 s apart.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()?;
    client.init().await.map(|_| ()).or_else(|err| {
        tracing::warn!(%err, "Redis not reachable yet; continuing and reconnecting in the background");
        Ok::<(), fred::error::Error>(())
    })?;
    Ok(client)
}

/// True when Redis answers a PING now.
pub async fn is_up(client: &fred::clients::Client) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), client.ping::<String>(None)).await,
        Ok(Ok(_))
    )
}

/// Every Redis key a session can have (`wa:{id}:*`), known without a keyspace scan: ownership
/// (lock, fencing counter, hold), credentials, cache entries and the whatsapp driver's key store.
/// The store's index (a set naming its other keys) comes first; `None` without that driver.
pub fn session_keys(session_id: &str) -> (Option<String>, Vec<String>) {
    use crate::session::ownership::{fence_key, hold_key, owner_key};
    let mut keys = vec![
        owner_key(session_id),
        fence_key(session_id),
        hold_key(session_id),
        crate::session::credentials::creds_key(session_id),
    ];
    keys.extend(
        crate::cache::Kind::ALL
            .iter()
            .map(|kind| crate::cache::key(session_id, *kind)),
    );
    #[cfg(feature = "whatsapp")]
    {
        keys.extend(crate::session::wa_store::fixed_keys(session_id));
        (Some(crate::session::wa_store::index_key(session_id)), keys)
    }
    #[cfg(not(feature = "whatsapp"))]
    (None, keys)
}

/// KEYS[1] hold, KEYS[2] owner, KEYS[3] store index (or the hold again), KEYS[4..] the keys to
/// delete; ARGV[1] `1` to delete only while the session is held as deleted and unlocked (-1 /
/// -2 otherwise). Deletes the index's members too; returns how many keys existed.
const WIPE_LUA: &str = r"
if ARGV[1] == '1' then
  if redis.call('GET', KEYS[1]) ~= 'deleted' then return -1 end
  if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
end
local n = 0
if KEYS[3] ~= KEYS[1] then
  local members = redis.call('SMEMBERS', KEYS[3])
  for i = 1, #members, 256 do
    n = n + redis.call('DEL', unpack(members, i, math.min(i + 255, #members)))
  end
  n = n + redis.call('DEL', KEYS[3])
end
for i = 4, #KEYS do n = n + redis.call('DEL', KEYS[i]) end
return n
";

static WIPE: crate::session::ownership::LuaScript =
    crate::session::ownership::LuaScript::new(WIPE_LUA);

/// Deletes the session's keys but those in `keep`, in one script (one hash slot), without a
/// keyspace scan. With `only_if_deleted`, only while the session is held as deleted and nobody
/// holds its lock: then `-1` (not deleted) or `-2` (locked) when nothing was done.
pub async fn wipe_session_keys(
    client: &fred::clients::Client,
    session_id: &str,
    keep: &[String],
    only_if_deleted: bool,
) -> Result<i64> {
    use crate::session::ownership::{hold_key, owner_key};
    let (index, all) = session_keys(session_id);
    let hold = hold_key(session_id);
    let mut keys = vec![hold.clone(), owner_key(session_id), index.unwrap_or(hold)];
    keys.extend(all.into_iter().filter(|k| !keep.contains(k)));
    let flag = if only_if_deleted { "1" } else { "0" };
    Ok(WIPE.run(client, keys, vec![flag.to_owned()]).await?)
}

/// Deletes every Redis key of a session (credentials, ownership, cache entries, the driver's
/// store); returns how many existed. Used when a resource is deleted with `logoutOnDelete`.
pub async fn wipe_session(client: &fred::clients::Client, session_id: &str) -> Result<usize> {
    Ok(wipe_session_keys(client, session_id, &[], false)
        .await?
        .max(0) as usize)
}
