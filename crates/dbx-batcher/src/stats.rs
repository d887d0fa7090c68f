//! Running totals of the batcher, kept beside the Prometheus metrics so that the
//! binary can log a summary at shutdown and tests can assert on what happened
//! without scraping a registry.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the batcher's totals since spawn.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatcherStats {
    /// Batches received from the channel.
    pub batches_received: u64,
    /// Points received from the channel.
    pub points_received: u64,
    /// Batches resolved as durable.
    pub batches_acked: u64,
    /// Batches nacked (data errors and foreign sessions).
    pub batches_rejected: u64,
    /// Rows committed.
    pub points_written: u64,
    /// Points dropped as already stored or repeated.
    pub points_deduplicated: u64,
    /// Rows written through the parent because their child partition was unknown.
    pub rows_default_partition: u64,
    /// Flushes started because a group reached `max_batch_rows`.
    pub flushes_rows: u64,
    /// Flushes started because a group reached `max_batch_bytes`.
    pub flushes_bytes: u64,
    /// Flushes started because a group reached `max_batch_age`.
    pub flushes_age: u64,
    /// Flushes started because a writer was idle.
    pub flushes_idle: u64,
    /// Flushes started at shutdown.
    pub flushes_shutdown: u64,
    /// Retried attempts (all kinds).
    pub retries: u64,
    /// Rows in the largest flush.
    pub largest_flush_rows: u64,
    /// Flight sessions completed by a gateway's `end`.
    pub sessions_ended: u64,
    /// Ends written in the flush transaction of their session's last batch (the rest had
    /// a transaction of their own).
    pub ends_with_flush: u64,
}

/// The live counters behind [`BatcherStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub batches_received: AtomicU64,
    pub points_received: AtomicU64,
    pub batches_acked: AtomicU64,
    pub batches_rejected: AtomicU64,
    pub points_written: AtomicU64,
    pub points_deduplicated: AtomicU64,
    pub rows_default_partition: AtomicU64,
    pub flushes_rows: AtomicU64,
    pub flushes_bytes: AtomicU64,
    pub flushes_age: AtomicU64,
    pub flushes_idle: AtomicU64,
    pub flushes_shutdown: AtomicU64,
    pub retries: AtomicU64,
    pub largest_flush_rows: AtomicU64,
    pub sessions_ended: AtomicU64,
    pub ends_with_flush: AtomicU64,
}

impl Counters {
    pub fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BatcherStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BatcherStats {
            batches_received: g(&self.batches_received),
            points_received: g(&self.points_received),
            batches_acked: g(&self.batches_acked),
            batches_rejected: g(&self.batches_rejected),
            points_written: g(&self.points_written),
            points_deduplicated: g(&self.points_deduplicated),
            rows_default_partition: g(&self.rows_default_partition),
            flushes_rows: g(&self.flushes_rows),
            flushes_bytes: g(&self.flushes_bytes),
            flushes_age: g(&self.flushes_age),
            flushes_idle: g(&self.flushes_idle),
            flushes_shutdown: g(&self.flushes_shutdown),
            retries: g(&self.retries),
            largest_flush_rows: g(&self.largest_flush_rows),
            sessions_ended: g(&self.sessions_ended),
            ends_with_flush: g(&self.ends_with_flush),
        }
    }
}
