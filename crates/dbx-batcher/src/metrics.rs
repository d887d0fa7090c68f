//! The batcher's metrics: flushes, rows, retries, dedupe, queue depth and session
//! completion. (The disk spool's are in `dbx_spool::metrics`.)
//!
//! Each crate owns its metrics in a `metrics.rs` like this one: the names, with what they
//! count, and their HELP text, registered by [`describe`] (the binary calls each crate's
//! once, after installing the exporter). Conventions: `dbx_` prefix, base units, `_total`
//! for counters, label sets bounded (`reason`, `transport`, `trigger`, `kind`, `schema`,
//! `table`, and `org` capped by `metrics.max_org_labels`). Names never change: the
//! dashboard and the alerts in deploy/ depend on them (tests/ops checks every name they
//! use against these files).
//!
//! Below the names: the setters of the gauges describing state and the per-batch
//! latency. Everything logged as well as counted (flushes, refusals, retries, ends) is
//! an event of [`crate::events`].

use std::time::{Duration, Instant};

use ::metrics::{
    describe_counter as c, describe_gauge as g, describe_histogram as h, gauge, histogram,
    Histogram, Unit,
};

pub use dbx_core::metrics::{
    BATCH_STAGE_SECONDS, POINTS_WRITTEN_TOTAL, QUEUE_DEPTH, SESSIONS_COMPLETED_TOTAL, STAGES,
};

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
    h!(
        BATCH_STAGE_SECONDS,
        Unit::Seconds,
        "Where each acknowledged batch's time went, by stage: read, send_wait, queued, \
         grouped, writer_wait, begin, session_upsert, copy, session_stats, commit, verdict, \
         ack_written (in that order; their sum is the ack latency)."
    );
    c!(
        BATCHES_REJECTED_TOTAL,
        "Batches nacked by the writer, by reason (rejected, foreign_session, session_closed)."
    );
}

/// `dbx_queue_capacity`.
pub fn queue_capacity(batches: usize) {
    gauge!(QUEUE_CAPACITY).set(batches as f64);
}

/// `dbx_queue_depth`, as the batcher sees it when it receives.
pub fn queue_depth(batches: usize) {
    gauge!(QUEUE_DEPTH).set(batches as f64);
}

/// `dbx_pool_connections_in_use` and `dbx_pool_connections_idle`.
pub fn pool(in_use: usize, idle: usize) {
    gauge!(POOL_IN_USE).set(in_use as f64);
    gauge!(POOL_IDLE).set(idle as f64);
}

/// Commit to ack handed to the connection, in `dbx_commit_to_ack_seconds`.
pub fn commit_to_ack(latency: Duration) {
    histogram!(COMMIT_TO_ACK_SECONDS).record(latency.as_secs_f64());
}

/// The instants one acknowledged batch passed, from frame received to verdict: the
/// boundaries of every stage of [`BATCH_STAGE_SECONDS`] but the last (`ack_written`,
/// which the connection records).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeline {
    /// Frame received.
    pub received: Instant,
    /// Decoded and admitted by the input.
    pub admitted: Instant,
    /// Handed to the batcher's channel.
    pub queued: Instant,
    /// Taken from the channel by the dispatcher.
    pub taken: Instant,
    /// Its partition group closed.
    pub closed: Instant,
    /// The writer's first attempt started.
    pub started: Instant,
    /// The attempt that committed has its connection and COPY target (`BEGIN` is next).
    pub begun: Instant,
    /// `BEGIN` and the sessions' upsert answered.
    pub claimed: Instant,
    /// Both COPY paths done.
    pub copied: Instant,
    /// Session statistics computed; their update goes with `COMMIT`.
    pub stats: Instant,
    /// Committed.
    pub committed: Instant,
    /// Ack handle resolved.
    pub resolved: Instant,
}

/// Pre-resolved handles of [`BATCH_STAGE_SECONDS`], one per stage the batcher records
/// (every stage but `ack_written`): eleven observations per acknowledged batch, none per
/// point. Built once, after the recorder is installed.
#[derive(Debug, Clone)]
pub(crate) struct StageHistograms {
    stages: Vec<Histogram>,
}

impl StageHistograms {
    pub(crate) fn new() -> Self {
        StageHistograms {
            stages: STAGES[..STAGES.len() - 1]
                .iter()
                .map(|s| histogram!(BATCH_STAGE_SECONDS, "stage" => *s))
                .collect(),
        }
    }

    /// Records each stage of `t` (a stage whose boundaries are out of order counts 0).
    pub(crate) fn record(&self, t: &Timeline) {
        let bounds = [
            t.received,
            t.admitted,
            t.queued,
            t.taken,
            t.closed,
            t.started,
            t.begun,
            t.claimed,
            t.copied,
            t.stats,
            t.committed,
            t.resolved,
        ];
        for (h, w) in self.stages.iter().zip(bounds.windows(2)) {
            h.record(w[1].saturating_duration_since(w[0]).as_secs_f64());
        }
    }
}
