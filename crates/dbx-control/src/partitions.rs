//! Partition upkeep for `flight_telemetry`: keep partitions ready for the next
//! `premake` intervals and the past `lookback` ones, created at start-up before
//! the listener opens and then on a timer.
//!
//! Each partition is made by `dbx_aviation.ensure_telemetry_partition`, which builds
//! the table and its indexes standalone and only then attaches it, so the brief
//! lock on the parent is all ingest ever waits for; every statement runs under
//! `lock_timeout` and is retried, so maintenance never stalls COPY.

use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use deadpool_postgres::Pool;
use tokio_postgres::error::SqlState;

use dbx_core::metrics as m;
use dbx_core::{SharedClock, Shutdown};

/// Width of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    /// One partition per UTC day (`flight_telemetry_pYYYYMMDD`).
    Daily,
    /// One partition per UTC hour (`flight_telemetry_pYYYYMMDDHH`).
    Hourly,
}

impl Interval {
    fn step(self) -> TimeDelta {
        match self {
            Interval::Daily => TimeDelta::days(1),
            Interval::Hourly => TimeDelta::hours(1),
        }
    }

    /// The start of the interval holding `t`.
    pub fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        t.duration_trunc(self.step()).unwrap_or(t)
    }
}

/// Premake settings.
#[derive(Debug, Clone)]
pub struct PremakePolicy {
    /// Partition width.
    pub interval: Interval,
    /// Intervals ahead of the current one.
    pub premake: u32,
    /// Intervals before the current one.
    pub lookback: u32,
    /// `lock_timeout` per statement.
    pub lock_timeout: Duration,
    /// Attempts per partition before giving up until the next run.
    pub attempts: u32,
}

/// Failures of partition upkeep.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// No connection.
    #[error("partition upkeep: no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed for good.
    #[error("partition upkeep: creating the partition for {from}: {reason}")]
    Ddl {
        /// The interval's start.
        from: DateTime<Utc>,
        /// The server's message.
        reason: String,
    },
}

/// The `[from, to)` ranges the policy wants to exist at `now`.
pub fn wanted_ranges(
    policy: &PremakePolicy,
    now: DateTime<Utc>,
) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let step = policy.interval.step();
    let current = policy.interval.floor(now);
    (-(policy.lookback as i64)..=policy.premake as i64)
        .map(|i| {
            let from = current + step * i as i32;
            (from, from + step)
        })
        .collect()
}

/// Creates every missing partition the policy wants; returns the names ensured.
pub async fn premake(
    pool: &Pool,
    policy: &PremakePolicy,
    now: DateTime<Utc>,
) -> Result<Vec<String>, PartitionError> {
    let client = pool.get().await?;
    client
        .batch_execute(&format!(
            "SET lock_timeout = {}",
            policy.lock_timeout.as_millis().max(1)
        ))
        .await
        .map_err(|e| PartitionError::Ddl {
            from: now,
            reason: crate::setup::describe_pg_error(&e),
        })?;
    let mut names = Vec::new();
    for (from, to) in wanted_ranges(policy, now) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match client
                .query_one(
                    "SELECT dbx_aviation.ensure_telemetry_partition($1, $2)",
                    &[&from, &to],
                )
                .await
            {
                Ok(row) => {
                    names.push(row.get::<_, String>(0));
                    break;
                }
                Err(e)
                    if attempt < policy.attempts
                        && matches!(
                            e.code(),
                            Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE
                                || *c == SqlState::T_R_DEADLOCK_DETECTED
                                || *c == SqlState::UNIQUE_VIOLATION
                                || *c == SqlState::DUPLICATE_TABLE
                        ) =>
                {
                    // Someone holds a conflicting lock (or made it at the same time): back off, retry.
                    tracing::debug!(%from, attempt, "partition DDL waited too long for a lock; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
                }
                Err(e) => {
                    metrics::counter!(m::MAINTENANCE_FAILURES_TOTAL, "kind" => "premake")
                        .increment(1);
                    return Err(PartitionError::Ddl {
                        from,
                        reason: crate::setup::describe_pg_error(&e),
                    });
                }
            }
        }
    }
    metrics::counter!(m::MAINTENANCE_RUNS_TOTAL, "kind" => "premake").increment(1);
    Ok(names)
}

/// Runs [`premake`] every `every` until shutdown; failures are logged and retried next time.
pub async fn run_premake(
    pool: Pool,
    policy: PremakePolicy,
    clock: SharedClock,
    every: Duration,
    mut shutdown: Shutdown,
) {
    let mut timer = tokio::time::interval(every.max(Duration::from_secs(1)));
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = timer.tick() => {
                match premake(&pool, &policy, clock.now()).await {
                    Ok(names) => tracing::debug!(partitions = names.len(), "premake done"),
                    Err(e) => tracing::warn!(error = %e, "premake failed; will retry"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn wanted_ranges_span_lookback_to_premake_in_utc() {
        let policy = PremakePolicy {
            interval: Interval::Daily,
            premake: 4,
            lookback: 1,
            lock_timeout: Duration::from_secs(1),
            attempts: 3,
        };
        let now = Utc.with_ymd_and_hms(2026, 1, 30, 23, 59, 0).unwrap();
        let r = wanted_ranges(&policy, now);
        assert_eq!(r.len(), 6);
        assert_eq!(r[0].0, Utc.with_ymd_and_hms(2026, 1, 29, 0, 0, 0).unwrap());
        // Across the month boundary.
        assert_eq!(r[5].0, Utc.with_ymd_and_hms(2026, 2, 3, 0, 0, 0).unwrap());
        assert_eq!(r[5].1, Utc.with_ymd_and_hms(2026, 2, 4, 0, 0, 0).unwrap());
    }
}
