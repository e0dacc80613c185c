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

/// Deletes every Redis key of a session (`wa:{id}:*`: credentials, ownership, cache entries);
/// returns how many. Used when a session is deleted with `logoutOnDelete`.
pub async fn wipe_session(client: &fred::clients::Client, session_id: &str) -> Result<usize> {
    wipe_session_except(client, session_id, &[]).await
}

/// [`wipe_session`] but for the keys in `keep`.
pub async fn wipe_session_except(
    client: &fred::clients::Client,
    session_id: &str,
    keep: &[String],
) -> Result<usize> {
    use fred::types::scan::Scanner;
    use futures::TryStreamExt;
    let mut keys: Vec<String> = Vec::new();
    let mut scan = client.scan(crds::session_key_pattern(session_id), Some(100), None);
    while let Some(mut page) = scan.try_next().await? {
        if let Some(found) = page.take_results() {
            keys.extend(
                found
                    .into_iter()
                    .filter_map(|k| k.into_string())
                    .filter(|k| !keep.contains(k)),
            );
        }
    }
    if !keys.is_empty() {
        let _: i64 = client.del(keys.clone()).await?;
    }
    Ok(keys.len())
}
