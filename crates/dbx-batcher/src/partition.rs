//! Which child partition of `dbx_aviation.flight_telemetry` a timestamp belongs to,
//! and a small cache of the children that exist.
//!
//! The batcher COPYs straight into the child (`flight_telemetry_pYYYYMMDD`, or
//! `…_pYYYYMMDDHH` when hourly) because that skips tuple routing. A child it does
//! not know to exist is written through the parent instead, where routing sends the
//! rows to the default partition (or to a child created meanwhile): rows are never
//! refused for lack of a partition. The cache is refreshed from the schema's partition
//! listing (`dbx_aviation.telemetry_partitions()`) when a
//! flush needs a child it does not know (at most every [`REFRESH_INTERVAL`]) and at
//! once after a "relation does not exist" error.

use std::collections::HashSet;
use std::time::{Duration, Instant};

pub use dbx_core::partition::{PartitionInterval, PartitionKey};

/// The parent table, schema-qualified.
pub const PARENT: &str = "dbx_aviation.flight_telemetry";

/// Minimum time between two refreshes prompted by an unknown child.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// The children of the parent, by name: the partition listing of the schema
/// (`dbx_aviation.telemetry_partitions()`), which the control plane reads too.
pub const LIST_CHILDREN_SQL: &str =
    "SELECT partition_name FROM dbx_aviation.telemetry_partitions() \
WHERE parent = 'dbx_aviation.flight_telemetry'";

/// Known child partitions.
#[derive(Debug, Default)]
pub struct PartitionCache {
    known: HashSet<String>,
    refreshed_at: Option<Instant>,
}

impl PartitionCache {
    /// True when `name` was a child at the last refresh.
    pub fn contains(&self, name: &str) -> bool {
        self.known.contains(name)
    }

    /// True when a lookup miss should trigger a refresh now.
    pub fn stale(&self, now: Instant) -> bool {
        self.refreshed_at
            .is_none_or(|t| now.duration_since(t) >= REFRESH_INTERVAL)
    }

    /// Forces the next lookup miss to refresh.
    pub fn invalidate(&mut self) {
        self.refreshed_at = None;
    }

    /// Replaces the set of known children.
    pub fn replace(&mut self, names: impl IntoIterator<Item = String>, now: Instant) {
        self.known = names.into_iter().collect();
        self.refreshed_at = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_staleness() {
        let mut c = PartitionCache::default();
        let now = Instant::now();
        assert!(c.stale(now));
        c.replace(["flight_telemetry_p20250101".to_string()], now);
        assert!(!c.stale(now));
        assert!(c.contains("flight_telemetry_p20250101"));
        c.invalidate();
        assert!(c.stale(now));
    }
}
