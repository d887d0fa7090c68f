//! The batcher's internal events: flushes queued and completed, batches refused,
//! writes retried, sessions ended. Each is a small type whose [`InternalEvent::emit`]
//! writes its log line and moves its metrics together (see `dbx_core::metrics`); the
//! names, label keys and label values are those of [`crate::metrics`], which dashboards
//! and alerts depend on. The per-batch and per-flush figures of
//! [`crate::BatcherStats`] stay with the code that keeps them.

use std::fmt::Debug;
use std::time::Duration;

use ::metrics::{counter, histogram};
use dbx_core::{BatchOrigin, InternalEvent, RejectCode, Throttle};
use uuid::Uuid;

use crate::metrics as m;

/// A partition group closed and queued for a writer.
#[derive(Debug, Clone, Copy)]
pub struct FlushQueued {
    /// What closed it (the `trigger` label: rows, bytes, age, idle, shutdown).
    pub trigger: &'static str,
    /// Rows in it.
    pub rows: usize,
}

impl InternalEvent for FlushQueued {
    fn emit(self) {
        counter!(m::BATCHES_FLUSHED_TOTAL, "trigger" => self.trigger).increment(1);
        tracing::trace!(trigger = self.trigger, rows = self.rows, "flush queued");
    }
}

/// A flush committed: its size, how long COPY and commit took, and what became of its
/// points.
#[derive(Debug, Clone, Copy)]
pub struct FlushCompleted {
    /// Rows sent (fast path and staging).
    pub rows: u64,
    /// Bytes of COPY data sent.
    pub bytes: u64,
    /// COPY plus commit of the attempt that committed.
    pub duration: Duration,
    /// Rows inserted.
    pub inserted: u64,
    /// Points dropped as already stored.
    pub deduplicated: u64,
    /// Rows that went to the default partition (their child did not exist).
    pub via_parent: u64,
}

impl InternalEvent for FlushCompleted {
    fn emit(self) {
        histogram!(m::FLUSH_ROWS).record(self.rows as f64);
        histogram!(m::FLUSH_BYTES).record(self.bytes as f64);
        histogram!(m::COPY_DURATION_SECONDS).record(self.duration.as_secs_f64());
        counter!(m::POINTS_WRITTEN_TOTAL).increment(self.inserted);
        counter!(m::POINTS_DEDUPLICATED_TOTAL).increment(self.deduplicated);
        counter!(m::ROWS_TO_DEFAULT_PARTITION_TOTAL).increment(self.via_parent);
        tracing::debug!(
            rows = self.rows,
            bytes = self.bytes,
            took_ms = self.duration.as_millis() as u64,
            inserted = self.inserted,
            deduplicated = self.deduplicated,
            via_parent = self.via_parent,
            "flush committed"
        );
    }
}

/// A batch nacked by the writer: the database refused its data (`rejected`), its
/// aircraft (`unknown_aircraft`) or its session (`foreign_session`, `session_closed`).
/// A UDP datagram, which nobody answers, counts as dropped too.
#[derive(Debug, Clone, Copy)]
pub struct BatchRejected<'a> {
    /// The batch's organization.
    pub org: Uuid,
    /// Its session.
    pub session: Uuid,
    /// Its input.
    pub origin: BatchOrigin,
    /// How long since the listener received it.
    pub waited: Duration,
    /// The nack's code (the `reason` label).
    pub code: RejectCode,
    /// The nack's message.
    pub msg: &'a str,
}

impl InternalEvent for BatchRejected<'_> {
    fn emit(self) {
        let code = self.code.as_str();
        counter!(m::BATCHES_REJECTED_TOTAL, "reason" => code).increment(1);
        if self.origin == BatchOrigin::Udp {
            counter!(dbx_core::metrics::UDP_DROPPED_TOTAL, "reason" => code).increment(1);
        }
        let waited_ms = self.waited.as_millis() as u64;
        if self.code == RejectCode::Rejected {
            // The database refused data the listener accepted: worth an operator's look.
            tracing::warn!(org = %self.org, session = %self.session, waited_ms, code,
                "batch rejected by the database: {}", self.msg);
        } else {
            // A gateway's mistake (aircraft, session), which it can repeat at will.
            static LOG: Throttle = Throttle::new();
            if let Some(n) = LOG.allow() {
                tracing::debug!(org = %self.org, session = %self.session, waited_ms, code,
                    suppressed = n, "batch refused: {}", self.msg);
            }
        }
    }
}

/// A write that will be tried again (the `kind` label of `dbx_write_retries_total`).
#[derive(Clone, Copy)]
pub enum WriteRetried<'a> {
    /// A unique violation on the fast path: the flush goes again through staging.
    UniqueViolation,
    /// The partition vanished (dropped or detached): the partition cache is refreshed
    /// and the flush retried at once.
    PartitionMissing,
    /// Still missing after a refresh: the telemetry table itself is.
    TableMissing,
    /// A transient error (connection, serialization, ...): retried after a backoff.
    Transient {
        /// What failed.
        error: &'a str,
        /// The backoff before the next attempt.
        retry_in: Duration,
    },
    /// Writing gateways' session ends failed for a reason other than their data.
    Ends {
        /// The `kind` label (transient, unique_violation, missing_partition).
        kind: &'static str,
        /// What failed.
        error: &'a dyn Debug,
        /// The backoff before the next attempt.
        retry_in: Duration,
    },
}

impl WriteRetried<'_> {
    fn kind(&self) -> &'static str {
        match self {
            WriteRetried::UniqueViolation => "unique_violation",
            WriteRetried::PartitionMissing | WriteRetried::TableMissing => "missing_partition",
            WriteRetried::Transient { .. } => "transient",
            WriteRetried::Ends { kind, .. } => kind,
        }
    }
}

impl InternalEvent for WriteRetried<'_> {
    fn emit(self) {
        counter!(m::RETRIES_TOTAL, "kind" => self.kind()).increment(1);
        match self {
            WriteRetried::UniqueViolation => {
                tracing::debug!("unique violation on the fast path, retrying through staging")
            }
            WriteRetried::PartitionMissing => {
                tracing::debug!("partition missing; refreshing the partition cache and retrying")
            }
            WriteRetried::TableMissing => {
                tracing::warn!("telemetry table missing; retrying (are the migrations applied?)")
            }
            WriteRetried::Transient { error, retry_in } => {
                tracing::warn!(error = %error, retry_in_ms = retry_in.as_millis() as u64, "transient write error, retrying")
            }
            WriteRetried::Ends {
                error, retry_in, ..
            } => {
                tracing::warn!(error = ?error, retry_in_ms = retry_in.as_millis() as u64, "transient error ending sessions, retrying")
            }
        }
    }
}

/// Gateways' `end`s committed: `completed` sessions completed (the others were
/// completed already, or unknown).
#[derive(Debug, Clone, Copy)]
pub struct SessionsEnded {
    /// Sessions this commit completed.
    pub completed: u64,
    /// Ends in the transaction.
    pub ends: usize,
    /// Whether they rode with a flush of their sessions' batches.
    pub with_flush: bool,
}

impl InternalEvent for SessionsEnded {
    fn emit(self) {
        counter!(m::SESSIONS_COMPLETED_TOTAL, "reason" => "end").increment(self.completed);
        tracing::debug!(
            completed = self.completed,
            ends = self.ends,
            with_flush = self.with_flush,
            "session ends committed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbx_testkit::capture_events;

    #[test]
    fn a_datagram_the_database_rejects_is_counted_as_rejected_and_dropped_and_warned() {
        let (org, session) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let ((), got) = capture_events(|| {
            BatchRejected {
                org,
                session,
                origin: BatchOrigin::Udp,
                waited: Duration::from_millis(15),
                code: RejectCode::Rejected,
                msg: "the database rejected the batch: value too long",
            }
            .emit()
        });
        assert_eq!(
            got.counter(m::BATCHES_REJECTED_TOTAL, &[("reason", "rejected")]),
            1
        );
        assert_eq!(
            got.counter(
                dbx_core::metrics::UDP_DROPPED_TOTAL,
                &[("reason", "rejected")]
            ),
            1
        );
        let lines = got.lines_with("batch rejected by the database");
        assert_eq!(lines.len(), 1, "{}", got.log());
        assert!(lines[0].contains("WARN"), "{}", lines[0]);
        assert!(lines[0].contains("value too long"), "{}", lines[0]);
        assert!(lines[0].contains(&session.to_string()), "{}", lines[0]);
    }

    #[test]
    fn a_tcp_batch_refused_for_its_session_is_not_a_udp_drop() {
        let ((), got) = capture_events(|| {
            BatchRejected {
                org: Uuid::from_u128(1),
                session: Uuid::from_u128(2),
                origin: BatchOrigin::Tcp,
                waited: Duration::ZERO,
                code: RejectCode::ForeignSession,
                msg: "session belongs to another organization",
            }
            .emit()
        });
        assert_eq!(
            got.counter(m::BATCHES_REJECTED_TOTAL, &[("reason", "foreign_session")]),
            1
        );
        assert_eq!(got.names().len(), 1, "{got:?}");
        let lines = got.lines_with("batch refused: session belongs to another organization");
        assert_eq!(lines.len(), 1, "{}", got.log());
        assert!(lines[0].contains("DEBUG"), "{}", lines[0]);
    }

    #[test]
    fn a_transient_retry_counts_its_kind_and_warns_with_the_backoff() {
        let ((), got) = capture_events(|| {
            WriteRetried::Transient {
                error: "connection reset by peer",
                retry_in: Duration::from_millis(400),
            }
            .emit();
            WriteRetried::TableMissing.emit();
        });
        assert_eq!(got.counter(m::RETRIES_TOTAL, &[("kind", "transient")]), 1);
        assert_eq!(
            got.counter(m::RETRIES_TOTAL, &[("kind", "missing_partition")]),
            1
        );
        let lines = got.lines_with("transient write error, retrying");
        assert_eq!(lines.len(), 1, "{}", got.log());
        assert!(lines[0].contains("retry_in_ms=400") && lines[0].contains("connection reset"));
        assert_eq!(got.lines_with("telemetry table missing").len(), 1);
    }

    #[test]
    fn a_completed_flush_records_its_size_duration_and_points() {
        let ((), got) = capture_events(|| {
            FlushCompleted {
                rows: 500,
                bytes: 40_000,
                duration: Duration::from_millis(12),
                inserted: 500,
                deduplicated: 20,
                via_parent: 0,
            }
            .emit()
        });
        assert_eq!(got.histogram(m::FLUSH_ROWS, &[]), vec![500.0]);
        assert_eq!(got.histogram(m::FLUSH_BYTES, &[]), vec![40_000.0]);
        assert_eq!(got.histogram(m::COPY_DURATION_SECONDS, &[]), vec![0.012]);
        assert_eq!(got.counter(m::POINTS_WRITTEN_TOTAL, &[]), 500);
        assert_eq!(got.counter(m::POINTS_DEDUPLICATED_TOTAL, &[]), 20);
        assert_eq!(got.counter(m::ROWS_TO_DEFAULT_PARTITION_TOTAL, &[]), 0);
        assert_eq!(got.lines_with("flush committed").len(), 1, "{}", got.log());
    }
}
