//! The disk spool's internal events: spooling started and stopped, records appended
//! and replayed, batches that found the spool full, corrupt records skipped, refused
//! records kept as dead letters. Each is a small type whose [`InternalEvent::emit`]
//! writes its log line and moves its metrics together (see `dbx_core::metrics`), under
//! the names and labels of [`crate::metrics`]. The figures of `SpoolStats` stay with
//! the code that keeps them.

use std::fmt::Display;
use std::path::Path;

use ::metrics::{counter, gauge};
use dbx_core::{BatchOrigin, InternalEvent, RejectCode, Throttle};

use crate::metrics as m;

/// The database stopped committing for `spool.after_ms`: batches go to disk.
#[derive(Debug, Clone, Copy)]
pub struct SpoolingStarted {
    /// `spool.after_ms`.
    pub after_ms: u64,
    /// Batches forwarded and still waiting for their verdict.
    pub in_flight: usize,
}

impl InternalEvent for SpoolingStarted {
    fn emit(self) {
        gauge!(m::SPOOL_ACTIVE).set(1.0);
        tracing::warn!(
            after_ms = self.after_ms,
            in_flight = self.in_flight,
            "the database has not committed a batch for after_ms; spooling to disk"
        );
    }
}

/// The database keeps up again: batches go to it directly while the spool drains.
#[derive(Debug, Clone, Copy)]
pub struct SpoolingStopped;

impl InternalEvent for SpoolingStopped {
    fn emit(self) {
        gauge!(m::SPOOL_ACTIVE).set(0.0);
        tracing::info!("the database keeps up again; forwarding directly while the spool drains");
    }
}

/// Records appended to the open segment and fsynced.
#[derive(Debug, Clone, Copy)]
pub struct SpoolAppended {
    /// How many.
    pub records: u64,
}

impl InternalEvent for SpoolAppended {
    fn emit(self) {
        counter!(m::SPOOL_WRITTEN_RECORDS_TOTAL).increment(self.records);
        tracing::trace!(records = self.records, "spool records appended");
    }
}

/// A replayed record resolved by the batcher (written, or refused).
#[derive(Debug, Clone, Copy)]
pub struct RecordReplayed {
    /// Its segment.
    pub segment: u64,
    /// Whether the database refused it.
    pub refused: bool,
}

impl InternalEvent for RecordReplayed {
    fn emit(self) {
        counter!(m::SPOOL_REPLAYED_RECORDS_TOTAL).increment(1);
        tracing::trace!(
            segment = self.segment,
            refused = self.refused,
            "spool record replayed"
        );
    }
}

/// What the gate did with a batch that found the spool full or unwritable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolFull {
    /// A best-effort batch (UDP, MQTT QoS 0) dropped, nobody being told.
    BestEffortDropped {
        /// Its input (the drop counts under `dbx_udp_dropped_total` or
        /// `dbx_mqtt_dropped_total`, reason `spool_full`).
        origin: BatchOrigin,
    },
    /// `spool.when_full = "block"`: the batch waits (counted once per batch).
    Blocked,
    /// `spool.when_full = "drop_newest"`: the batch is nacked `rejected`.
    Refused {
        /// `spool.max_bytes`.
        max_bytes: u64,
    },
}

impl InternalEvent for SpoolFull {
    fn emit(self) {
        static LOG: Throttle = Throttle::new();
        let kind = match self {
            SpoolFull::Blocked => "block",
            _ => "drop",
        };
        counter!(m::SPOOL_FULL_TOTAL, "kind" => kind).increment(1);
        if let SpoolFull::BestEffortDropped { origin } = self {
            let dropped = match origin {
                BatchOrigin::Udp => dbx_core::metrics::UDP_DROPPED_TOTAL,
                _ => dbx_core::metrics::MQTT_DROPPED_TOTAL,
            };
            counter!(dropped, "reason" => "spool_full").increment(1);
        }
        // Every batch of an outage finds it full: one line a second says so.
        if let Some(n) = LOG.allow() {
            match self {
                SpoolFull::BestEffortDropped { origin } => tracing::warn!(
                    ?origin,
                    suppressed = n,
                    "the disk spool is full; dropping best-effort batches"
                ),
                SpoolFull::Blocked => tracing::warn!(
                    suppressed = n,
                    "the disk spool is full; holding batches until it has room (spool.when_full = block)"
                ),
                SpoolFull::Refused { max_bytes } => tracing::warn!(
                    max_bytes,
                    suppressed = n,
                    "the disk spool is full; refusing batches (spool.when_full = drop_newest)"
                ),
            }
        }
    }
}

/// A torn or corrupt record skipped on replay.
#[derive(Clone, Copy)]
pub struct CorruptRecordSkipped<'a> {
    /// Its segment.
    pub segment: u64,
    /// Its offset in the segment.
    pub offset: u64,
    /// What is wrong with it.
    pub reason: &'a dyn Display,
}

impl InternalEvent for CorruptRecordSkipped<'_> {
    fn emit(self) {
        counter!(m::SPOOL_CORRUPT_RECORDS_TOTAL).increment(1);
        tracing::warn!(
            segment = self.segment,
            offset = self.offset,
            reason = %self.reason,
            "skipping a corrupt spool record"
        );
    }
}

/// A segment file whose header is not a dbx spool header, renamed `*.bad` at start.
#[derive(Debug, Clone, Copy)]
pub struct SegmentHeaderCorrupt<'a> {
    /// The file (before its rename).
    pub path: &'a Path,
}

impl InternalEvent for SegmentHeaderCorrupt<'_> {
    fn emit(self) {
        counter!(m::SPOOL_CORRUPT_RECORDS_TOTAL).increment(1);
        tracing::error!(path = %self.path.display(), "segment header is not a dbx spool header; renamed to .bad and skipped");
    }
}

/// The database refused a batch the spool had acked on replay.
#[derive(Debug, Clone, Copy)]
pub enum ReplayRefused<'a> {
    /// Kept as a dead letter under `spool.dir/rejected/`.
    Kept {
        /// Its segment.
        segment: u64,
        /// The refusal's code.
        code: RejectCode,
        /// Its message.
        msg: &'a str,
    },
    /// `spool.rejected_max_bytes` is reached: its segment stays in the spool.
    StoreFull {
        /// Its segment.
        segment: u64,
        /// The refusal's code.
        code: RejectCode,
        /// Its message.
        msg: &'a str,
    },
}

impl InternalEvent for ReplayRefused<'_> {
    fn emit(self) {
        match self {
            ReplayRefused::Kept { segment, code, msg } => {
                counter!(m::SPOOL_REJECTED_RECORDS_TOTAL).increment(1);
                tracing::warn!(
                    segment, code = %code, msg,
                    "the database refused a batch the spool had acked; kept under rejected/ \
                     in the spool directory (`dbx spool rejected` lists it, `dbx spool requeue` replays it)"
                );
            }
            ReplayRefused::StoreFull { segment, code, msg } => {
                counter!(m::SPOOL_FULL_TOTAL, "kind" => "rejected").increment(1);
                tracing::error!(
                    segment, code = %code, msg,
                    "the database refused a batch the spool had acked and spool.rejected_max_bytes is reached; \
                     its segment stays in the spool (replayed at the next start)"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbx_testkit::capture_events;

    #[test]
    fn a_full_spool_drops_a_datagram_counting_it_twice_and_saying_so() {
        let ((), got) = capture_events(|| {
            for _ in 0..20 {
                SpoolFull::BestEffortDropped {
                    origin: BatchOrigin::Udp,
                }
                .emit();
            }
        });
        assert_eq!(got.counter(m::SPOOL_FULL_TOTAL, &[("kind", "drop")]), 20);
        assert_eq!(
            got.counter(
                dbx_core::metrics::UDP_DROPPED_TOTAL,
                &[("reason", "spool_full")]
            ),
            20
        );
        let lines = got.lines_with("the disk spool is full; dropping best-effort batches");
        assert!((1..=2).contains(&lines.len()), "throttled: {}", got.log());
        assert!(lines[0].contains("WARN"), "{}", lines[0]);
    }

    #[test]
    fn a_refused_replay_kept_as_a_dead_letter_counts_and_warns() {
        let ((), got) = capture_events(|| {
            ReplayRefused::Kept {
                segment: 7,
                code: RejectCode::Rejected,
                msg: "value out of range",
            }
            .emit()
        });
        assert_eq!(got.counter(m::SPOOL_REJECTED_RECORDS_TOTAL, &[]), 1);
        let lines = got.lines_with("kept under rejected/");
        assert_eq!(lines.len(), 1, "{}", got.log());
        assert!(lines[0].contains("segment=7") && lines[0].contains("value out of range"));
    }

    #[test]
    fn spooling_sets_the_gauge_and_warns_then_clears_it_and_says_so() {
        let ((), got) = capture_events(|| {
            SpoolingStarted {
                after_ms: 2000,
                in_flight: 3,
            }
            .emit();
        });
        assert_eq!(got.gauge(m::SPOOL_ACTIVE, &[]), Some(1.0));
        assert_eq!(got.lines_with("spooling to disk").len(), 1, "{}", got.log());
        let ((), got) = capture_events(|| SpoolingStopped.emit());
        assert_eq!(got.gauge(m::SPOOL_ACTIVE, &[]), Some(0.0));
        assert_eq!(got.lines_with("keeps up again").len(), 1, "{}", got.log());
    }
}
