//! Completing idle flight sessions (protocol 1.1). A session that has had no point
//! stored for `sessions.idle_timeout_secs` (default 30 minutes) is completed by the
//! control plane, as if its gateway had sent `end`: `flight_status = 'completed'`,
//! `completion_reason = 'idle_timeout'`, and from then on it takes no new point, so its
//! arrival and duration are final.
//!
//! Each pass calls `dbx_aviation.complete_idle_sessions(now − idle_timeout, CHUNK)`
//! (migration 0040) until a call completes fewer than `CHUNK`: the function walks the
//! partial index of active sessions by `last_point_at`, oldest first, never the
//! telemetry, and skips rows a writer holds locked (its batch is activity). It is
//! SECURITY DEFINER, so the control plane's user may be the maintenance or the ingest
//! user. Daemons sharing a database may run passes at once: the row locks split the
//! work and complete each session once.
//!
//! Idleness is measured from when the daemon last stored a point (`last_point_at`),
//! which an outage of the daemon or of the database also stops. So after starting, and
//! after a pass found the database unreachable, the completer waits a whole
//! `idle_timeout` of reachable database before it completes anything: gateways that
//! buffered through the outage get the full timeout to deliver. Time comes from the
//! injected [`Clock`](dbx_core::Clock): tests move it instead of waiting half an hour.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use deadpool_postgres::Pool;
use serde::Deserialize;

use crate::events::{IdleSessionsCompleted, IdleSweepRan, MaintenanceFailed};
use dbx_core::{ConfigError, InternalEvent, SharedClock, Shutdown};

/// Sessions completed per call of the database function (one short transaction each).
const CHUNK: i32 = 1000;

/// `[sessions]` of the configuration: when flight sessions end without an `end`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// A session without a stored point for this long is completed (seconds; 0 = never).
    pub idle_timeout_secs: u64,
    /// How often the completer looks for idle sessions (seconds).
    pub check_interval_secs: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            idle_timeout_secs: 1800,
            check_interval_secs: 60,
        }
    }
}

impl SessionsConfig {
    /// Checks what serde cannot; the error names the bad key within `[sessions]`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.check_interval_secs == 0 {
            return Err(ConfigError::new(
                "check_interval_secs",
                "must be at least 1",
            ));
        }
        if self.idle_timeout_secs > i32::MAX as u64 {
            return Err(ConfigError::new(
                "idle_timeout_secs",
                format!("must be at most {} (0 turns completion off)", i32::MAX),
            ));
        }
        Ok(())
    }

    /// The idle timeout; `None` when completion is off.
    pub fn idle_timeout(&self) -> Option<TimeDelta> {
        (self.idle_timeout_secs > 0).then(|| TimeDelta::seconds(self.idle_timeout_secs as i64))
    }
}

/// Why a pass did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum CompleterError {
    /// No connection from the pool.
    #[error("completing idle sessions: no database connection: {0}")]
    Connect(String),
    /// The function call failed.
    #[error("completing idle sessions: {0}")]
    Db(String),
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Sessions idle since before `idle_before` were completed (possibly none).
    Completed {
        /// How many.
        sessions: u64,
        /// The cutoff used: `now − idle_timeout`.
        idle_before: DateTime<Utc>,
    },
    /// The database has not been reachable for a whole `idle_timeout` yet (since start
    /// or since the last failure); nothing was completed until `until`.
    Waiting {
        /// When completion may start.
        until: DateTime<Utc>,
    },
    /// `idle_timeout_secs = 0`.
    Off,
}

/// Completes idle flight sessions; see the module docs.
#[derive(Debug)]
pub struct SessionCompleter {
    pool: Pool,
    cfg: SessionsConfig,
    clock: SharedClock,
    /// Since when the database has answered every pass (`None`: not since the last failure).
    reachable_since: Mutex<Option<DateTime<Utc>>>,
}

impl SessionCompleter {
    /// A completer using connections of `pool`.
    pub fn new(pool: Pool, cfg: SessionsConfig, clock: SharedClock) -> Self {
        SessionCompleter {
            pool,
            cfg,
            clock,
            reachable_since: Mutex::new(None),
        }
    }

    fn reachable_since(&self) -> std::sync::MutexGuard<'_, Option<DateTime<Utc>>> {
        dbx_core::sync::lock(&self.reachable_since)
    }

    /// One pass at the clock's now.
    pub async fn run_once(&self) -> Result<Pass, CompleterError> {
        let Some(idle) = self.cfg.idle_timeout() else {
            return Ok(Pass::Off);
        };
        let result = self.pass(idle).await;
        if result.is_err() {
            *self.reachable_since() = None;
        }
        result
    }

    async fn pass(&self, idle: TimeDelta) -> Result<Pass, CompleterError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| CompleterError::Connect(e.to_string()))?;
        // A pooled connection may have died since its last use: only an answer counts as
        // the database being reachable.
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| CompleterError::Db(dbx_pg::describe(&e)))?;
        let now = self.clock.now();
        let since = *self.reachable_since().get_or_insert(now);
        if now - since < idle {
            return Ok(Pass::Waiting {
                until: since + idle,
            });
        }
        let idle_before = now - idle;
        let stmt = client
            .prepare_cached("SELECT dbx_aviation.complete_idle_sessions($1, $2)")
            .await
            .map_err(|e| CompleterError::Db(dbx_pg::describe(&e)))?;
        let mut sessions = 0u64;
        loop {
            let done: i32 = client
                .query_one(&stmt, &[&idle_before, &CHUNK])
                .await
                .map_err(|e| CompleterError::Db(dbx_pg::describe(&e)))?
                .get(0);
            sessions += done.max(0) as u64;
            IdleSessionsCompleted {
                sessions: done.max(0) as u64,
            }
            .emit();
            if done < CHUNK {
                break;
            }
        }
        Ok(Pass::Completed {
            sessions,
            idle_before,
        })
    }

    /// Runs a pass every `check_interval_secs` until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        if self.cfg.idle_timeout().is_none() {
            tracing::info!(
                "sessions.idle_timeout_secs = 0: idle flight sessions are never completed"
            );
            shutdown.recv().await;
            return;
        }
        let every = Duration::from_secs(self.cfg.check_interval_secs.max(1));
        loop {
            let pass = tokio::select! {
                _ = shutdown.recv() => return,
                r = self.run_once() => r,
            };
            match pass {
                Ok(Pass::Completed {
                    sessions,
                    idle_before,
                }) => IdleSweepRan {
                    sessions,
                    idle_before,
                }
                .emit(),
                Ok(_) => {}
                Err(e) => MaintenanceFailed {
                    kind: "sessions",
                    error: &e,
                }
                .emit(),
            }
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}
