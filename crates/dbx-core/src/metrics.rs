//! Metric names shared by stages that never import each other; they meet here, like
//! the rest of dbx-core. Each is counted by one stage and read or counted by another
//! too (the batcher counts the UDP and MQTT batches it refuses; a connection stalled
//! behind a full queue sets the queue depth; the control plane's status reads the
//! received and written totals), and re-exported by the crate whose
//! `describe` registers its HELP text. Every other metric is owned by its crate's
//! `metrics.rs` (`dbx_listener`, `dbx_batcher`, `dbx_spool`, `dbx_control`, `dbx_mqtt`).
//!
//! Every stage reports what happens to it the same way, after Vector's internal events:
//! a small named type per happening (a refused batch, a dropped datagram, a retried
//! write, a flush), built where it happens and [`InternalEvent::emit`]ted, which writes
//! its log line and moves its metrics together, in one place (the crate's
//! `events.rs`). A call site never pairs a bare metric macro with a log line of its own,
//! so the two cannot drift apart. Per-point and per-frame counters, which have no log
//! line, stay plain functions or pre-resolved handles in the crate's `metrics.rs`.

/// Flight sessions completed (counter, label `reason` = end | idle): by a gateway's
/// `end`, or by the control plane after `sessions.idle_timeout_secs` without a point.
pub const SESSIONS_COMPLETED_TOTAL: &str = "dbx_sessions_completed_total";

/// Points received and accepted into the pipeline (counter, label `transport`).
pub const POINTS_RECEIVED_TOTAL: &str = "dbx_points_received_total";

/// UDP datagrams dropped (counter, label `reason`).
pub const UDP_DROPPED_TOTAL: &str = "dbx_udp_dropped_total";

/// MQTT messages dropped without a verdict (counter, label `reason` = saturated |
/// rate_limited | spool_full | dead_letter_overflow); QoS 0 only, and dead-letter notices.
pub const MQTT_DROPPED_TOTAL: &str = "dbx_mqtt_dropped_total";

/// Points committed (counter).
pub const POINTS_WRITTEN_TOTAL: &str = "dbx_points_written_total";

/// Where an acknowledged batch's time went (histogram, seconds, label `stage`; one
/// observation per stage per batch, recorded when its verdict is given, except
/// `ack_written`, which the connection records when the ack frame is written). The
/// stages, in order, partition the time from frame received to ack written: see
/// [`STAGES`].
pub const BATCH_STAGE_SECONDS: &str = "dbx_batch_stage_seconds";

/// The values of the `stage` label of [`BATCH_STAGE_SECONDS`], in the order a batch
/// passes them: `read` (frame received → decoded and admitted), `send_wait` (admitted →
/// handed to the batcher's channel: backpressure, a parked `end`), `queued` (in the
/// channel, and in the spool gate when there is one, until the dispatcher takes it),
/// `grouped` (in a partition group until the group is closed), `writer_wait` (closed →
/// a writer starts on it), `begin` (encoding, a pool connection, `BEGIN`, and any
/// failed attempts with their backoff), `session_upsert`, `copy` (both paths),
/// `session_stats`, `commit`, `verdict` (commit → ack handle resolved) and
/// `ack_written` (verdict → the connection has written the ack frame, including the
/// wait for earlier batches' verdicts, since acks go in order).
pub const STAGES: [&str; 12] = [
    "read",
    "send_wait",
    "queued",
    "grouped",
    "writer_wait",
    "begin",
    "session_upsert",
    "copy",
    "session_stats",
    "commit",
    "verdict",
    "ack_written",
];

/// Batches waiting in the listener → batcher queue (gauge).
pub const QUEUE_DEPTH: &str = "dbx_queue_depth";

/// Something that happened inside a stage, reported once: [`emit`](Self::emit) logs it
/// at its level (rate-limited with a [`crate::Throttle`] when a peer can cause it at
/// will) and counts it under its metric names, with the same labels every time.
pub trait InternalEvent: Sized {
    /// Logs and counts the event.
    fn emit(self);
}
