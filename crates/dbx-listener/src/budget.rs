//! The byte budget (`limits.max_buffered_bytes`): one pool of bytes that every frame
//! and every decoded batch is charged against, from the moment its length is known
//! until its verdict has been delivered (TCP) or the batcher has resolved it (UDP).
//!
//! A TCP connection charges [`dbx_proto::decoded_bytes_bound`] of a frame (the body
//! plus the most its points can decode to) when it has read the 4-byte prefix and
//! before it buffers the body, waiting if the budget is spent: it then simply stops
//! reading, which is TCP backpressure like a slow database. Once decoded, the charge
//! shrinks to what the batch really holds ([`dbx_proto::points_heap_bytes`]). Every
//! frame is charged once, before anything of it is held, so connections never hold
//! part of a charge while waiting for the rest (which could deadlock). UDP never
//! waits: a datagram that finds the budget spent is dropped and counted.
//!
//! A single charge is capped at the whole budget, so a frame larger than the budget
//! still passes when it is alone.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics as m;

/// The shared budget; cheap to clone.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    sem: Arc<Semaphore>,
    limit: usize,
}

/// Bytes held against the budget; given back when dropped.
#[derive(Debug)]
pub struct Charge {
    permit: OwnedSemaphorePermit,
    budget: ByteBudget,
}

/// The most bytes one `acquire` can ask tokio's semaphore for.
const MAX_ONE_CHARGE: usize = u32::MAX as usize;

impl ByteBudget {
    /// A budget of `limit` bytes (capped at what the semaphore can count).
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        m::buffered_bytes_limit().set(limit as f64);
        m::buffered_bytes().set(0.0);
        ByteBudget {
            sem: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// The configured size.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes charged right now.
    pub fn in_use(&self) -> usize {
        self.limit - self.sem.available_permits()
    }

    fn clamp(&self, bytes: usize) -> u32 {
        bytes.clamp(1, self.limit.min(MAX_ONE_CHARGE)) as u32
    }

    fn publish(&self) {
        m::buffered_bytes().set(self.in_use() as f64);
    }

    /// Charges `bytes`, waiting for them. Cancel-safe (a cancelled wait holds nothing).
    pub async fn acquire(&self, bytes: usize) -> Charge {
        let permit = self
            .sem
            .clone()
            .acquire_many_owned(self.clamp(bytes))
            .await
            .expect("the budget's semaphore is never closed");
        self.publish();
        Charge {
            permit,
            budget: self.clone(),
        }
    }

    /// Charges `bytes` if they are free now.
    pub fn try_acquire(&self, bytes: usize) -> Option<Charge> {
        let permit = self
            .sem
            .clone()
            .try_acquire_many_owned(self.clamp(bytes))
            .ok()?;
        self.publish();
        Some(Charge {
            permit,
            budget: self.clone(),
        })
    }
}

impl Charge {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.permit.num_permits()
    }

    /// Gives back everything above `bytes` (never grows: growing would mean waiting
    /// while holding, see the module docs).
    pub fn shrink_to(&mut self, bytes: usize) {
        let keep = bytes.max(1);
        if keep < self.bytes() {
            drop(self.permit.split(self.bytes() - keep));
            self.budget.publish();
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        // The permit is released right after this body; publish the figure it leaves.
        let after = self.budget.in_use().saturating_sub(self.bytes());
        m::buffered_bytes().set(after as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn charges_shrink_and_return() {
        let b = ByteBudget::new(1000);
        let mut c = b.acquire(600).await;
        assert_eq!((c.bytes(), b.in_use()), (600, 600));
        assert!(b.try_acquire(500).is_none());
        c.shrink_to(100);
        assert_eq!(b.in_use(), 100);
        let d = b.try_acquire(500).expect("room after the shrink");
        drop(c);
        assert_eq!(b.in_use(), 500);
        drop(d);
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test]
    async fn a_charge_larger_than_the_budget_takes_all_of_it() {
        let b = ByteBudget::new(100);
        let c = b.acquire(10_000).await;
        assert_eq!(c.bytes(), 100);
        assert!(b.try_acquire(1).is_none());
    }

    #[tokio::test]
    async fn a_waiting_charge_proceeds_once_bytes_come_back() {
        let b = ByteBudget::new(100);
        let first = b.acquire(80).await;
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.acquire(50).await.bytes() });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        assert_eq!(waiter.await.unwrap(), 50);
    }
}
