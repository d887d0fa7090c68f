//! Which keys are used: a counter of open connections per key, and the keys seen since
//! the last flush, written to `api_keys.last_used_at` in one UPDATE every couple of
//! seconds by a task of their own, never on the hot path.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dbx_core::sync::lock;
use dbx_core::Shutdown;

use super::{AuthCache, AuthError};

/// How often used keys are stamped in `api_keys.last_used_at`.
const USAGE_FLUSH_EVERY: Duration = Duration::from_secs(2);

/// How often keys held by open connections are stamped again (they stay "in use").
const LIVE_RESTAMP_EVERY: Duration = Duration::from_secs(60);

/// Which keys are in use: open connections per key hash, and hashes used since the
/// last flush to `api_keys.last_used_at`.
#[derive(Debug, Default)]
pub(super) struct Usage {
    live: HashMap<String, u32>,
    used: HashSet<String>,
}

/// Marks a key as in use by one open connection until dropped (see [`AuthCache::track_use`]).
#[derive(Debug)]
pub struct KeyInUse {
    cache: Arc<AuthCache>,
    hash: String,
}

impl Drop for KeyInUse {
    fn drop(&mut self) {
        let mut u = lock(&self.cache.usage);
        if let Some(n) = u.live.get_mut(&self.hash) {
            *n -= 1;
            if *n == 0 {
                u.live.remove(&self.hash);
            }
        }
    }
}

impl AuthCache {
    /// Notes that the key with this hash was used (a UDP datagram, a handshake), for
    /// `api_keys.last_used_at`; written by the refresher within a few seconds.
    pub fn note_used(&self, hash: &str) {
        let mut u = lock(&self.usage);
        if !u.used.contains(hash) {
            u.used.insert(hash.to_string());
        }
    }

    /// Marks the key as used now and in use for as long as the guard lives (one open
    /// connection): its `last_used_at` keeps being refreshed while it stays connected.
    pub fn track_use(self: &Arc<Self>, hash: &str) -> KeyInUse {
        {
            let mut u = lock(&self.usage);
            *u.live.entry(hash.to_string()).or_insert(0) += 1;
            u.used.insert(hash.to_string());
        }
        KeyInUse {
            cache: self.clone(),
            hash: hash.to_string(),
        }
    }

    /// Number of open connections holding the key with this hash.
    pub fn connections_using(&self, hash: &str) -> u32 {
        let u = lock(&self.usage);
        u.live.get(hash).copied().unwrap_or(0)
    }

    /// Writes `last_used_at` for the keys used since the last call (and, when
    /// `include_live`, for every key held by an open connection). Keys the key table
    /// does not hold are simply not matched.
    pub async fn flush_usage(&self, include_live: bool) -> Result<usize, AuthError> {
        let hashes: Vec<String> = {
            let mut u = lock(&self.usage);
            let mut all = std::mem::take(&mut u.used);
            if include_live {
                all.extend(u.live.keys().cloned());
            }
            all.into_iter().collect()
        };
        if hashes.is_empty() {
            return Ok(0);
        }
        let result = async {
            let client = self.pool.get().await?;
            let n = client
                .execute(
                    "UPDATE dbx_aviation.api_keys SET last_used_at = now() \
                     WHERE key_hash = ANY($1) AND (last_used_at IS NULL OR last_used_at < now())",
                    &[&hashes],
                )
                .await?;
            Ok::<_, AuthError>(n as usize)
        }
        .await;
        match result {
            Err(e) => {
                // Kept for the next attempt: the stamp is late, not lost.
                let mut u = lock(&self.usage);
                u.used.extend(hashes);
                Err(e)
            }
            ok => ok,
        }
    }

    /// Stamps `last_used_at` every couple of seconds until shutdown, then once more.
    pub(super) async fn run_usage_flusher(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(USAGE_FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_live = tokio::time::Instant::now();
        loop {
            let stop = tokio::select! {
                _ = shutdown.recv() => true,
                _ = tick.tick() => false,
            };
            let include_live = stop || last_live.elapsed() >= LIVE_RESTAMP_EVERY;
            if include_live {
                last_live = tokio::time::Instant::now();
            }
            if let Err(e) = self.flush_usage(include_live).await {
                tracing::debug!(error = %e, "could not stamp api_keys.last_used_at; will retry");
            }
            if stop {
                return;
            }
        }
    }
}
