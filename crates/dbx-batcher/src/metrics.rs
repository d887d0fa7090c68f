//! The batcher's and the disk spool's metrics: flushes, rows, retries, dedupe, queue depth,
//! session completion, and the spool's records, segments, replay and dead letters.
//!
//! Each crate owns its metrics in a `metrics.rs` like this one: the names, with what they
//! count, and their HELP text, registered by [`describe`] (the binary calls each crate's
//! once, after installing the exporter). Conventions: `dbx_` prefix, base units, `_total`
//! for counters, label sets bounded (`reason`, `transport`, `trigger`, `kind`, `schema`,
//! `table`, and `org` capped by `metrics.max_org_labels`). Names never change: the
//! dashboard and the alerts in deploy/ depend on them (tests/ops checks every name they
//! use against these files).

use ::metrics::{describe_counter as c, describe_gauge as g, describe_histogram as h, Unit};

pub use dbx_core::metrics::{POINTS_WRITTEN_TOTAL, QUEUE_DEPTH, SESSIONS_COMPLETED_TOTAL};

/// Points dropped as already stored (counter).
pub const POINTS_DEDUPLICATED_TOTAL: &str = "dbx_points_deduplicated_total";

/// COPY flushes (counter, label `trigger` = rows | bytes | age | shutdown).
pub const BATCHES_FLUSHED_TOTAL: &str = "dbx_batches_flushed_total";

/// Rows per flush (histogram).
pub const FLUSH_ROWS: &str = "dbx_flush_rows";

/// Bytes per flush (histogram).
pub const FLUSH_BYTES: &str = "dbx_flush_bytes";

/// COPY + commit duration (histogram, seconds).
pub const COPY_DURATION_SECONDS: &str = "dbx_copy_duration_seconds";

/// Capacity of that queue (gauge).
pub const QUEUE_CAPACITY: &str = "dbx_queue_capacity";

/// Retries (counter, label `kind` = transient | unique_violation).
pub const RETRIES_TOTAL: &str = "dbx_write_retries_total";

/// Pool connections in use (gauge).
pub const POOL_IN_USE: &str = "dbx_pool_connections_in_use";

/// Pool connections idle (gauge).
pub const POOL_IDLE: &str = "dbx_pool_connections_idle";

/// Rows written to the default partition (counter).
pub const ROWS_TO_DEFAULT_PARTITION_TOTAL: &str = "dbx_rows_default_partition_total";

/// Commit → ack handed to the connection (histogram, seconds).
pub const COMMIT_TO_ACK_SECONDS: &str = "dbx_commit_to_ack_seconds";

/// Batches nacked for a data error (counter).
pub const BATCHES_REJECTED_TOTAL: &str = "dbx_batches_rejected_total";

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
    c!(POINTS_WRITTEN_TOTAL, "Points committed to PostgreSQL.");
    c!(
        POINTS_DEDUPLICATED_TOTAL,
        "Points dropped because their (session, seq) was already stored."
    );
    c!(
        BATCHES_FLUSHED_TOTAL,
        "COPY flushes, by trigger (rows, bytes, age, shutdown)."
    );
    h!(FLUSH_ROWS, "Rows per COPY flush.");
    h!(FLUSH_BYTES, Unit::Bytes, "Bytes per COPY flush.");
    h!(
        COPY_DURATION_SECONDS,
        Unit::Seconds,
        "COPY plus commit duration per flush."
    );
    g!(
        QUEUE_DEPTH,
        "Batches waiting in the listener to batcher queue."
    );
    g!(QUEUE_CAPACITY, "Capacity of the listener to batcher queue.");
    c!(RETRIES_TOTAL, "Write retries, by kind.");
    g!(POOL_IN_USE, "Writer pool connections in use.");
    g!(POOL_IDLE, "Writer pool connections idle.");
    c!(
        ROWS_TO_DEFAULT_PARTITION_TOTAL,
        "Rows written while their partition did not exist (default partition)."
    );
    h!(
        COMMIT_TO_ACK_SECONDS,
        Unit::Seconds,
        "Commit to ack handed to the connection."
    );
    c!(
        BATCHES_REJECTED_TOTAL,
        "Batches nacked by the writer, by reason (rejected, foreign_session, session_closed)."
    );
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
