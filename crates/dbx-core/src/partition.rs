//! How `dbx_aviation.flight_telemetry` is cut into child partitions: one per UTC day
//! (`flight_telemetry_pYYYYMMDD`) or per UTC hour (`flight_telemetry_pYYYYMMDDHH`).
//!
//! One rule for every stage: the batcher names the child it COPYs into, the control
//! plane computes the ranges it keeps ready and reads a range back from a name, and the
//! SQL function `dbx_aviation.ensure_telemetry_partition` (migration 0003) names the
//! children it creates the same way (the control plane's tests check that they agree).
//! Ranges are UTC, so daylight-saving changes never move a boundary.

use chrono::{DateTime, DurationRound, NaiveDateTime, TimeDelta, Utc};
use serde::Deserialize;

/// The prefix of every child partition's name.
pub const CHILD_PREFIX: &str = "flight_telemetry_p";

/// A POSIX regular expression matching exactly the children's names, for SQL's `~`.
pub const CHILD_NAME_PATTERN: &str = "^flight_telemetry_p[0-9]{8}([0-9]{2})?$";

/// The width of one partition (`batcher.partition_interval` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionInterval {
    /// One partition per UTC day, `flight_telemetry_pYYYYMMDD`.
    #[default]
    Daily,
    /// One partition per UTC hour, `flight_telemetry_pYYYYMMDDHH`.
    Hourly,
}

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

    /// The width as a duration (exact: partitions are UTC).
    pub fn step(self) -> TimeDelta {
        TimeDelta::microseconds(self.micros())
    }

    /// The start of the partition holding `t`.
    pub fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        t.duration_trunc(self.step()).unwrap_or(t)
    }

    /// The unit's name for SQL's `date_trunc` (`day` or `hour`).
    pub fn unit(self) -> &'static str {
        match self {
            PartitionInterval::Daily => "day",
            PartitionInterval::Hourly => "hour",
        }
    }

    /// The partition holding `ts_micros`.
    pub fn key(self, ts_micros: i64) -> PartitionKey {
        let len = self.micros();
        PartitionKey(ts_micros.div_euclid(len) * len)
    }

    /// The unqualified name of the child for `key`, or `None` for a timestamp chrono
    /// cannot represent.
    pub fn child_name(self, key: PartitionKey) -> Option<String> {
        let t = DateTime::from_timestamp_micros(key.0)?;
        let fmt = match self {
            PartitionInterval::Daily => "%Y%m%d",
            PartitionInterval::Hourly => "%Y%m%d%H",
        };
        Some(format!("{CHILD_PREFIX}{}", t.format(fmt)))
    }
}

/// The range `[from, to)` a child's name stands for, whichever the interval; `None` for
/// a name that is not a child's (the default partition, another table).
pub fn range_of_child(name: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let digits = name.strip_prefix(CHILD_PREFIX)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (full, step) = match digits.len() {
        8 => (format!("{digits}000000"), PartitionInterval::Daily.step()),
        10 => (format!("{digits}0000"), PartitionInterval::Hourly.step()),
        _ => return None,
    };
    let from = NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%S")
        .ok()?
        .and_utc();
    Some((from, from + step))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

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
        assert!(d.child_name(PartitionKey(i64::MAX)).is_none());
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
    fn names_parse_back_to_their_range() {
        for interval in [PartitionInterval::Daily, PartitionInterval::Hourly] {
            let t = Utc.with_ymd_and_hms(2026, 10, 25, 1, 17, 3).unwrap();
            let from = interval.floor(t);
            let name = interval
                .child_name(interval.key(t.timestamp_micros()))
                .unwrap();
            assert_eq!(range_of_child(&name), Some((from, from + interval.step())));
            assert_eq!(
                interval.key(t.timestamp_micros()).0,
                from.timestamp_micros()
            );
        }
        assert!(range_of_child("flight_telemetry_default").is_none());
        assert!(range_of_child("flight_telemetry_p2026").is_none());
        assert!(range_of_child("flight_telemetry_p20261399").is_none());
        assert!(range_of_child("flight_telemetry_p2026x329").is_none());
    }

    #[test]
    fn partition_names_parse_back_to_their_range() {
        let (f, t) = range_of_child("flight_telemetry_p20260329").unwrap();
        assert_eq!(f, Utc.with_ymd_and_hms(2026, 3, 29, 0, 0, 0).unwrap());
        assert_eq!(t - f, TimeDelta::days(1));
        let (f, t) = range_of_child("flight_telemetry_p2026102501").unwrap();
        assert_eq!(f, Utc.with_ymd_and_hms(2026, 10, 25, 1, 0, 0).unwrap());
        assert_eq!(t - f, TimeDelta::hours(1));
        assert!(range_of_child("flight_telemetry_default").is_none());
        assert!(range_of_child("flight_telemetry_p2026").is_none());
        assert!(range_of_child("flight_telemetry_p20261399").is_none());
    }

    #[test]
    fn the_sql_pattern_matches_exactly_the_names() {
        // The pattern is simple enough to check by its parts: the prefix, then 8 or 10
        // digits, nothing else.
        let core = CHILD_NAME_PATTERN
            .strip_prefix('^')
            .and_then(|p| p.strip_suffix('$'))
            .unwrap();
        assert_eq!(core, format!("{CHILD_PREFIX}[0-9]{{8}}([0-9]{{2}})?"));
    }
}
