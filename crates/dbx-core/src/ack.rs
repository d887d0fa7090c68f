//! How the batcher tells a connection that a batch is durable.
//!
//! Each accepted batch carries an [`AckHandle`], a one-shot sender. The connection
//! keeps the matching [`AckReceiver`]s in a FIFO in `seq` order and awaits the front
//! one, which is what delivers acks in order and lets it coalesce every receiver
//! that has already resolved into one cumulative `ack`.
//!
//! A handle dropped without an answer (the daemon is dying) resolves its receiver
//! with an error: the connection then must not ack that batch, and the gateway
//! resends it — at-least-once on the wire, exactly-once in the table.
//!
//! The verdict travels with the instant it was given, so that the connection can
//! tell the time its batch waited for its verdict from the time the ack took to be
//! written (the `ack_written` stage of `dbx_batch_stage_seconds`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::reject::Rejection;

/// What became of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every row is committed (or fsynced to the spool).
    Durable,
    /// Rejected as a whole; nothing of it was or will be written.
    Rejected(Rejection),
}

/// The batcher's side: resolve once the batch's fate is known.
pub struct AckHandle {
    tx: Option<oneshot::Sender<(BatchOutcome, Instant)>>,
    /// Held until the handle is resolved or dropped (a UDP datagram's share of the
    /// listener's byte budget).
    _hold: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for AckHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckHandle")
            .field("tx", &self.tx)
            .field("holds", &self._hold.is_some())
            .finish()
    }
}

/// The connection's side: resolves to the outcome, or to an error when the handle
/// was dropped unanswered; once resolved, [`resolved_at`](Self::resolved_at) says when
/// the verdict was given.
#[derive(Debug)]
pub struct AckReceiver {
    rx: oneshot::Receiver<(BatchOutcome, Instant)>,
    resolved_at: Option<Instant>,
}

impl AckReceiver {
    fn new(rx: oneshot::Receiver<(BatchOutcome, Instant)>) -> Self {
        AckReceiver {
            rx,
            resolved_at: None,
        }
    }

    /// The outcome if it is in, without waiting (like [`oneshot::Receiver::try_recv`]).
    pub fn try_recv(&mut self) -> Result<BatchOutcome, oneshot::error::TryRecvError> {
        let (outcome, at) = self.rx.try_recv()?;
        self.resolved_at = Some(at);
        Ok(outcome)
    }

    /// When the verdict was given, once it has been received.
    pub fn resolved_at(&self) -> Option<Instant> {
        self.resolved_at
    }
}

impl Future for AckReceiver {
    type Output = Result<BatchOutcome, oneshot::error::RecvError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok((outcome, at))) => {
                self.resolved_at = Some(at);
                Poll::Ready(Ok(outcome))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AckHandle {
    /// A new handle and the receiver the connection keeps.
    pub fn channel() -> (AckHandle, AckReceiver) {
        let (tx, rx) = oneshot::channel();
        (
            AckHandle {
                tx: Some(tx),
                _hold: None,
            },
            AckReceiver::new(rx),
        )
    }

    /// A handle nobody waits for (UDP datagrams, tests).
    pub fn detached() -> AckHandle {
        AckHandle {
            tx: None,
            _hold: None,
        }
    }

    /// A handle nobody waits for that keeps `hold` alive until the batch is resolved
    /// (or dropped): how a UDP datagram keeps its memory charged while it is in flight.
    pub fn detached_holding(hold: impl Send + Sync + 'static) -> AckHandle {
        AckHandle {
            tx: None,
            _hold: Some(Box::new(hold)),
        }
    }

    /// The same handle, keeping `hold` alive until the batch is resolved (or dropped):
    /// how an MQTT message keeps its memory charged while the batcher has it.
    pub fn holding(mut self, hold: impl Send + Sync + 'static) -> AckHandle {
        self._hold = Some(Box::new(hold));
        self
    }

    /// A receiver of this handle's outcome, for a handle built detached (an MQTT
    /// message whose handle already holds its memory charge); replaces any earlier one.
    pub fn subscribe(&mut self) -> AckReceiver {
        let (tx, rx) = oneshot::channel();
        self.tx = Some(tx);
        AckReceiver::new(rx)
    }

    /// Reports the batch durable.
    pub fn durable(mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((BatchOutcome::Durable, Instant::now()));
        }
    }

    /// Reports the batch rejected.
    pub fn reject(mut self, rejection: Rejection) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((BatchOutcome::Rejected(rejection), Instant::now()));
        }
    }

    /// True when the connection that waits for this handle has gone away.
    pub fn is_abandoned(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.is_closed())
    }
}
