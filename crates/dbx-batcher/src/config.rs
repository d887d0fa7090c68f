//! The batcher's settings: flush thresholds, parallelism, retry policy, partition
//! granularity and cache bounds. Deserialized from the `[batcher]` section of the
//! daemon's TOML file (every key optional), then checked by [`BatcherConfig::validate`],
//! whose error names the offending key so that a bad file fails at start.

use std::time::Duration;

use serde::Deserialize;

pub use dbx_core::partition::PartitionInterval;
use dbx_core::ConfigError;

/// Settings of the batcher.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatcherConfig {
    /// A partition group is flushed when it holds this many rows (the flush then has exactly
    /// this many). 5000 amortizes the per-transaction cost (session upserts, commit fsync)
    /// while keeping a flush's COPY under a few milliseconds.
    pub max_batch_rows: usize,
    /// A group is flushed when its approximate COPY size reaches this many bytes.
    pub max_batch_bytes: usize,
    /// A group is flushed when its oldest row has waited this long (milliseconds): the
    /// bound on the latency the batcher adds to an ack under light load.
    pub max_batch_age_ms: u64,
    /// Parallel COPY transactions (each holds one pool connection while it runs).
    pub writers: usize,
    /// Flush a group as soon as a writer is idle instead of waiting for a threshold:
    /// under light load an ack then waits for one COPY, not for `max_batch_age_ms`;
    /// under heavy load writers are busy and groups still grow to `max_batch_rows`.
    pub flush_when_idle: bool,
    /// Capacity, in batches, of the listener → batcher channel (the binary creates it).
    pub queue_capacity: usize,
    /// First delay before retrying a flush after a transient error (milliseconds).
    pub retry_initial_ms: u64,
    /// Cap of the exponential retry delay (milliseconds).
    pub retry_max_ms: u64,
    /// Partition granularity.
    pub partition_interval: PartitionInterval,
    /// Sessions whose high-water mark is kept in memory (bounded; a miss costs nothing
    /// extra because the mark also comes back from the session upsert).
    pub session_cache_capacity: usize,
    /// After the channel closes, how long the batcher may keep writing and retrying what it
    /// holds before giving up (milliseconds). Unwritten batches are then left unacked.
    pub shutdown_deadline_ms: u64,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            max_batch_rows: 5000,
            max_batch_bytes: 4 * 1024 * 1024,
            max_batch_age_ms: 50,
            writers: 2,
            flush_when_idle: true,
            queue_capacity: 1024,
            retry_initial_ms: 100,
            retry_max_ms: 5000,
            partition_interval: PartitionInterval::Daily,
            session_cache_capacity: 100_000,
            shutdown_deadline_ms: 30_000,
        }
    }
}

impl BatcherConfig {
    /// Checks every value; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn positive(key: &'static str, v: u64) -> Result<(), ConfigError> {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
            Ok(())
        }
        positive("max_batch_rows", self.max_batch_rows as u64)?;
        if self.max_batch_rows > 1_000_000 {
            return Err(ConfigError::new(
                "max_batch_rows",
                format!("{} is above the limit of 1000000", self.max_batch_rows),
            ));
        }
        positive("max_batch_bytes", self.max_batch_bytes as u64)?;
        if self.max_batch_bytes > 512 * 1024 * 1024 {
            return Err(ConfigError::new(
                "max_batch_bytes",
                format!("{} is above the limit of 512 MiB", self.max_batch_bytes),
            ));
        }
        positive("max_batch_age_ms", self.max_batch_age_ms)?;
        positive("writers", self.writers as u64)?;
        if self.writers > 256 {
            return Err(ConfigError::new(
                "writers",
                format!("{} is above the limit of 256", self.writers),
            ));
        }
        positive("queue_capacity", self.queue_capacity as u64)?;
        positive("retry_initial_ms", self.retry_initial_ms)?;
        if self.retry_max_ms < self.retry_initial_ms {
            return Err(ConfigError::new(
                "retry_max_ms",
                format!(
                    "{} is below retry_initial_ms ({})",
                    self.retry_max_ms, self.retry_initial_ms
                ),
            ));
        }
        positive("session_cache_capacity", self.session_cache_capacity as u64)?;
        positive("shutdown_deadline_ms", self.shutdown_deadline_ms)?;
        Ok(())
    }

    /// `max_batch_age_ms` as a duration.
    pub fn max_batch_age(&self) -> Duration {
        Duration::from_millis(self.max_batch_age_ms)
    }

    /// `shutdown_deadline_ms` as a duration.
    pub fn shutdown_deadline(&self) -> Duration {
        Duration::from_millis(self.shutdown_deadline_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(BatcherConfig::default().validate(), Ok(()));
    }

    #[test]
    fn errors_name_the_key() {
        let c = BatcherConfig {
            writers: 0,
            ..BatcherConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "writers");
        assert_eq!(
            e.in_section("batcher").to_string(),
            "config key `batcher.writers`: must be greater than 0"
        );

        let c = BatcherConfig {
            retry_initial_ms: 500,
            retry_max_ms: 100,
            ..BatcherConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "retry_max_ms");
    }

    #[test]
    fn partial_sections_take_defaults() {
        let c: BatcherConfig =
            serde_json::from_str(r#"{"partition_interval": "hourly", "writers": 4}"#).unwrap();
        assert_eq!(c.partition_interval, PartitionInterval::Hourly);
        assert_eq!(c.writers, 4);
        assert_eq!(c.max_batch_rows, 5000);
        assert!(serde_json::from_str::<BatcherConfig>(r#"{"writer": 4}"#).is_err());
    }
}
