//! Which child partition of `dbx_aviation.flight_telemetry` a timestamp belongs to,
//! and a small cache of the children that exist.
//!
//! The batcher COPYs straight into the child (`flight_telemetry_pYYYYMMDD`, or
//! `…_pYYYYMMDDHH` when hourly) because that skips tuple routing. A child it does
//! not know to exist is written through the parent instead, where routing sends the
//! rows to the default partition (or to a child created meanwhile): rows are never
//! refused for lack of a partition. The cache is refreshed from `pg_inherits` when a
//! flush needs a child it does not know (at most every [`REFRESH_INTERVAL`]) and at
//! once after a "relation does not exist" error.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::DateTime;

use crate::config::PartitionInterval;

/// The parent table, schema-qualified.
pub const PARENT: &str = "dbx_aviation.flight_telemetry";

/// Minimum time between two refreshes prompted by an unknown child.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// The children of the parent, by name.
pub const LIST_CHILDREN_SQL: &str = "SELECT c.relname::text FROM pg_catalog.pg_inherits i \
JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid \
JOIN pg_catalog.pg_class p ON p.oid = i.inhparent \
JOIN pg_catalog.pg_namespace n ON n.oid = p.relnamespace \
JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace \
WHERE n.nspname = 'dbx_aviation' AND p.relname = 'flight_telemetry' AND cn.nspname = 'dbx_aviation'";

/// The start of a partition's range, in microseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey(pub i64);

impl PartitionInterval {
    /// Length of one partition in microseconds.
    pub const fn micros(self) -> i64 {
        match self {
            PartitionInterval::Daily => 86_400_000_000,
            PartitionInterval::Hourly => 3_600_000_000,
        }
    }

    /// The partition holding `ts_micros`.
    pub fn key(self, ts_micros: i64) -> PartitionKey {
        let len = self.micros();
        PartitionKey(ts_micros.div_euclid(len) * len)
    }

    /// The unqualified name of the child for `key`, or `None` for a timestamp chrono
    /// cannot represent (such rows go through the parent).
    pub fn child_name(self, key: PartitionKey) -> Option<String> {
        let t = DateTime::from_timestamp_micros(key.0)?;
        let fmt = match self {
            PartitionInterval::Daily => "flight_telemetry_p%Y%m%d",
            PartitionInterval::Hourly => "flight_telemetry_p%Y%m%d%H",
        };
        Some(t.format(fmt).to_string())
    }
}

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
    use chrono::{TimeZone, Utc};

    fn micros(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .map(|t| t.timestamp_micros())
            .unwrap_or_default()
    }

    #[test]
    fn daily_and_hourly_names() {
        let ts = micros(2025, 3, 9, 23, 59) + 59_999_999;
        let d = PartitionInterval::Daily;
        assert_eq!(
            d.child_name(d.key(ts)).as_deref(),
            Some("flight_telemetry_p20250309")
        );
        assert_eq!(
            d.child_name(d.key(ts + 1)).as_deref(),
            Some("flight_telemetry_p20250310")
        );
        let h = PartitionInterval::Hourly;
        assert_eq!(
            h.child_name(h.key(ts)).as_deref(),
            Some("flight_telemetry_p2025030923")
        );
        assert_eq!(h.key(ts).0, micros(2025, 3, 9, 23, 0));
    }

    #[test]
    fn before_the_epoch_rounds_down() {
        let d = PartitionInterval::Daily;
        assert_eq!(
            d.child_name(d.key(-1)).as_deref(),
            Some("flight_telemetry_p19691231")
        );
    }

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
