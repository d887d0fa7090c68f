//! The disk spool's metrics: bytes, records and segments on disk, the age of the
//! oldest waiting record, records written, replayed, corrupt and rejected, and
//! whether the gate is spooling.
//!
//! Like every crate's `metrics.rs`: the names, with what they count, and their HELP
//! text, registered by [`describe`] (the binary calls it once, after installing the
//! exporter). Names never change: the dashboard and the alerts in deploy/ depend on
//! them (tests/ops checks every name they use against the `metrics.rs` files).
//!
//! Below the names: the setters of the gauges describing the spool's state. Everything
//! logged as well as counted (spooling, full, corrupt, replayed, refused) is an event of
//! [`crate::events`].

use std::time::Duration;

use ::metrics::{counter, describe_counter as c, describe_gauge as g, gauge, Unit};

/// Bytes in segment files (gauge).
pub const SPOOL_BYTES: &str = "dbx_spool_bytes";

/// Records in segment files, not yet deleted after commit (gauge).
pub const SPOOL_RECORDS: &str = "dbx_spool_records";

/// Segment files (gauge).
pub const SPOOL_SEGMENTS: &str = "dbx_spool_segments";

/// How long the oldest spooled batch not yet written to PostgreSQL has waited since the daemon accepted it; 0 when none waits (gauge, seconds).
pub const SPOOL_OLDEST_RECORD_AGE_SECONDS: &str = "dbx_spool_oldest_record_age_seconds";

/// Records written to the spool, fsynced (counter).
pub const SPOOL_WRITTEN_RECORDS_TOTAL: &str = "dbx_spool_written_records_total";

/// Replayed records resolved by the batcher (counter; its rate is the replay rate).
pub const SPOOL_REPLAYED_RECORDS_TOTAL: &str = "dbx_spool_replayed_records_total";

/// Torn or corrupt records detected and skipped (counter).
pub const SPOOL_CORRUPT_RECORDS_TOTAL: &str = "dbx_spool_corrupt_records_total";

/// Batches that found the spool full or unwritable (counter, label `kind` = block | drop | rejected).
pub const SPOOL_FULL_TOTAL: &str = "dbx_spool_full_total";

/// 1 while the gate spools, 0 while it forwards directly (gauge).
pub const SPOOL_ACTIVE: &str = "dbx_spool_active";

/// Acked batches the database refused on replay, kept as dead letters (counter).
pub const SPOOL_REJECTED_RECORDS_TOTAL: &str = "dbx_spool_rejected_records_total";

/// Bytes of the dead letters under `spool.dir/rejected/` (gauge).
pub const SPOOL_REJECTED_BYTES: &str = "dbx_spool_rejected_bytes";

/// Registers the HELP text of every metric above; call once, after installing the
/// recorder.
pub fn describe() {
    g!(
        SPOOL_BYTES,
        Unit::Bytes,
        "Bytes in disk spool segment files."
    );
    g!(
        SPOOL_RECORDS,
        "Batches in disk spool segment files (deleted once committed)."
    );
    g!(SPOOL_SEGMENTS, "Disk spool segment files.");
    g!(SPOOL_OLDEST_RECORD_AGE_SECONDS, Unit::Seconds, "How long the oldest spooled batch not yet in PostgreSQL has waited since it was accepted (0 when none waits).");
    c!(
        SPOOL_WRITTEN_RECORDS_TOTAL,
        "Batches written and fsynced to the disk spool."
    );
    c!(
        SPOOL_REPLAYED_RECORDS_TOTAL,
        "Spooled batches replayed into PostgreSQL (its rate is the replay rate)."
    );
    c!(
        SPOOL_CORRUPT_RECORDS_TOTAL,
        "Torn or corrupt disk spool records detected and skipped."
    );
    c!(SPOOL_FULL_TOTAL, "Batches that found the disk spool full or unwritable, by kind (block, drop; rejected: the dead-letter store was full).");
    g!(
        SPOOL_ACTIVE,
        "1 while batches are spooled to disk, 0 while they go to PostgreSQL directly."
    );
    c!(SPOOL_REJECTED_RECORDS_TOTAL, "Acked batches the database refused on replay, kept as dead letters under spool.dir/rejected/.");
    g!(
        SPOOL_REJECTED_BYTES,
        Unit::Bytes,
        "Bytes of the dead letters under spool.dir/rejected/."
    );
}

/// What is on disk, for the `dbx_spool_*` gauges.
#[derive(Debug, Clone, Copy)]
pub struct OnDisk {
    /// Segment files.
    pub segments: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Records in them.
    pub records: u64,
    /// How long the oldest batch not yet in PostgreSQL has waited.
    pub oldest_waiting: Duration,
    /// Bytes of the dead letters.
    pub rejected_bytes: u64,
}

/// Sets `dbx_spool_segments`, `_bytes`, `_records`, `_oldest_record_age_seconds` and
/// `_rejected_bytes`, and makes `dbx_spool_corrupt_records_total` exist (at 0 until a
/// corrupt record is found: the dashboard's panel and `increase()` need the series).
pub fn on_disk(d: OnDisk) {
    counter!(SPOOL_CORRUPT_RECORDS_TOTAL).increment(0);
    gauge!(SPOOL_SEGMENTS).set(d.segments as f64);
    gauge!(SPOOL_BYTES).set(d.bytes as f64);
    gauge!(SPOOL_RECORDS).set(d.records as f64);
    gauge!(SPOOL_OLDEST_RECORD_AGE_SECONDS).set(d.oldest_waiting.as_secs_f64());
    gauge!(SPOOL_REJECTED_BYTES).set(d.rejected_bytes as f64);
}

/// `dbx_spool_active`: 1 while the gate spools.
pub fn active(spooling: bool) {
    gauge!(SPOOL_ACTIVE).set(if spooling { 1.0 } else { 0.0 });
}
