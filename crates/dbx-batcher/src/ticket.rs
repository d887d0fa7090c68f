//! A batch's ack handle shared by the pieces it was cut into.
//!
//! A batch may straddle two partitions, and a partition group is cut to exactly
//! `max_batch_rows`, so one batch can end up in several flushes that commit
//! independently. Each piece ([`Part`]) holds an `Arc<Ticket>`; the ticket counts
//! the pieces still unwritten and resolves the handle as durable when the last one
//! commits. A rejection resolves it at once; later pieces then find it resolved.
//! If every piece is dropped unresolved (shutdown deadline), the handle is dropped
//! unanswered and the connection does not ack: the gateway resends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dbx_core::{AckHandle, BatchOrigin, Point, Rejection};
use uuid::Uuid;

/// The shared fate of one batch.
#[derive(Debug)]
pub(crate) struct Ticket {
    /// Organization of every row.
    pub org: Uuid,
    /// Aircraft of every row.
    pub aircraft: Uuid,
    /// Flight session of every row.
    pub session: Uuid,
    /// When it arrived where, for logs and the stage histograms.
    pub arrival: Arrival,
    /// Where the batch came from: a spooled batch was acked before it is written,
    /// which changes what a completed session means for it (see `writer`).
    pub origin: BatchOrigin,
    ack: Mutex<Option<AckHandle>>,
    remaining: AtomicUsize,
}

/// When a batch was received, admitted, queued and taken by the dispatcher: the first
/// boundaries of its [`Timeline`](crate::metrics::Timeline).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrival {
    /// Frame received by the input.
    pub received: Instant,
    /// Decoded and admitted.
    pub admitted: Instant,
    /// Handed to the batcher's channel.
    pub queued: Instant,
    /// Taken from it by the dispatcher.
    pub taken: Instant,
}

/// What resolving a ticket did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolved {
    /// Other pieces are still unwritten, or the ticket was already resolved.
    Nothing,
    /// This call resolved the handle.
    Now,
}

impl Ticket {
    /// A ticket with no piece yet; [`add_piece`](Self::add_piece) for each one.
    pub fn new(
        org: Uuid,
        aircraft: Uuid,
        session: Uuid,
        ack: AckHandle,
        arrival: Arrival,
        origin: BatchOrigin,
    ) -> Self {
        Ticket {
            org,
            aircraft,
            session,
            arrival,
            origin,
            ack: Mutex::new(Some(ack)),
            remaining: AtomicUsize::new(0),
        }
    }

    /// One more piece must commit before the batch is durable. Called by the
    /// dispatcher before any piece is handed to a writer.
    pub fn add_piece(&self) {
        self.remaining.fetch_add(1, Ordering::AcqRel);
    }

    /// A piece committed; resolves the handle as durable when it was the last.
    pub fn piece_committed(&self) -> Resolved {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Resolved::Nothing;
        }
        match self.take() {
            Some(h) => {
                h.durable();
                Resolved::Now
            }
            None => Resolved::Nothing,
        }
    }

    /// Rejects the batch (once; later calls do nothing).
    pub fn reject(&self, r: Rejection) -> Resolved {
        match self.take() {
            Some(h) => {
                h.reject(r);
                Resolved::Now
            }
            None => Resolved::Nothing,
        }
    }

    fn take(&self) -> Option<AckHandle> {
        // A poisoned lock only means another thread panicked while holding it; the
        // Option inside is still meaningful.
        match self.ack.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }
    }
}

/// A piece of a batch: points of one batch that fall into one partition group.
#[derive(Debug)]
pub(crate) struct Part {
    /// The batch's ticket.
    pub ticket: Arc<Ticket>,
    /// The points, in the order the gateway sent them.
    pub points: Vec<Point>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbx_core::{BatchOutcome, RejectCode};

    fn ticket(h: AckHandle) -> Ticket {
        let nil = Uuid::nil();
        let now = Instant::now();
        let arrival = Arrival {
            received: now,
            admitted: now,
            queued: now,
            taken: now,
        };
        Ticket::new(nil, nil, nil, h, arrival, BatchOrigin::Tcp)
    }

    #[test]
    fn durable_after_last_piece() {
        let (h, mut rx) = AckHandle::channel();
        let t = ticket(h);
        t.add_piece();
        t.add_piece();
        assert_eq!(t.piece_committed(), Resolved::Nothing);
        assert!(rx.try_recv().is_err());
        assert_eq!(t.piece_committed(), Resolved::Now);
        assert_eq!(rx.try_recv().ok(), Some(BatchOutcome::Durable));
    }

    #[test]
    fn rejection_wins_once() {
        let (h, mut rx) = AckHandle::channel();
        let t = ticket(h);
        t.add_piece();
        t.add_piece();
        let r = Rejection::new(RejectCode::Rejected, "bad");
        assert_eq!(t.reject(r.clone()), Resolved::Now);
        assert_eq!(t.reject(r.clone()), Resolved::Nothing);
        assert_eq!(t.piece_committed(), Resolved::Nothing);
        assert_eq!(t.piece_committed(), Resolved::Nothing);
        assert_eq!(rx.try_recv().ok(), Some(BatchOutcome::Rejected(r)));
    }
}
