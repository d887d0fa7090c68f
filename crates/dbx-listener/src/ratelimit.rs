//! Per-organization ingest rate limits (`organizations.ingest_points_per_sec`):
//! one token bucket per organization, shared by all its connections, refilled at
//! the organization's rate with one second of burst.
//!
//! TCP is never dropped for rate: a connection over the limit takes its points
//! anyway, runs the bucket into debt, and pauses its reads for as long as the debt
//! takes to repay — the gateway feels TCP backpressure. UDP has no backpressure:
//! a datagram that does not fit the bucket is dropped and counted.

use dbx_core::sync::lock;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    rate: f64,
    updated: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: f64, now: Instant) {
        self.rate = rate;
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.updated = now;
    }
}

/// The buckets of every organization that has a limit. Bounded by the number of
/// organizations with a limit (entries idle for a minute are pruned).
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<Uuid, Bucket>>,
}

impl RateLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        RateLimiter::default()
    }

    fn with_bucket<R>(&self, org: Uuid, rate: u32, f: impl FnOnce(&mut Bucket) -> R) -> R {
        let now = Instant::now();
        let rate = rate.max(1) as f64;
        let mut buckets = lock(&self.buckets);
        if buckets.len() > 1024 {
            buckets
                .retain(|_, b| now.saturating_duration_since(b.updated) < Duration::from_secs(60));
        }
        let bucket = buckets.entry(org).or_insert(Bucket {
            tokens: rate,
            rate,
            updated: now,
        });
        bucket.refill(rate, now);
        f(bucket)
    }

    /// Takes `points` tokens for a TCP batch; returns how long the connection must
    /// pause its reads (zero when within the limit).
    pub fn acquire(&self, org: Uuid, rate: Option<u32>, points: usize) -> Duration {
        let Some(rate) = rate else {
            return Duration::ZERO;
        };
        self.with_bucket(org, rate, |b| {
            b.tokens -= points as f64;
            if b.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-b.tokens / b.rate)
            }
        })
    }

    /// Takes `points` tokens for a UDP datagram if they are there; false = drop it.
    pub fn try_acquire(&self, org: Uuid, rate: Option<u32>, points: usize) -> bool {
        let Some(rate) = rate else {
            return true;
        };
        self.with_bucket(org, rate, |b| {
            if b.tokens >= points as f64 {
                b.tokens -= points as f64;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let rl = RateLimiter::new();
        assert_eq!(rl.acquire(Uuid::nil(), None, 1_000_000), Duration::ZERO);
        assert!(rl.try_acquire(Uuid::nil(), None, 1_000_000));
    }

    #[test]
    fn debt_turns_into_a_pause_proportional_to_the_excess() {
        let rl = RateLimiter::new();
        let org = Uuid::from_u128(7);
        // One second of burst is free…
        assert_eq!(rl.acquire(org, Some(1000), 1000), Duration::ZERO);
        // …the next 500 points cost half a second.
        let wait = rl.acquire(org, Some(1000), 500);
        assert!(
            wait > Duration::from_millis(450) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
    }

    #[test]
    fn udp_is_dropped_not_indebted() {
        let rl = RateLimiter::new();
        let org = Uuid::from_u128(8);
        assert!(rl.try_acquire(org, Some(100), 100));
        assert!(!rl.try_acquire(org, Some(100), 50));
        // A refused datagram did not consume tokens, and other orgs are unaffected.
        assert!(rl.try_acquire(Uuid::from_u128(9), Some(100), 100));
    }
}
