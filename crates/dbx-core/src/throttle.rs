//! Log throttling for what a peer can make happen at will (refused connections,
//! failed handshakes, write timeouts, dropped datagrams and messages): at most one line
//! a second per event type, with the number of lines suppressed since. The metrics
//! count every event; the log only says that it is happening, so a flood of peers
//! cannot flood the log too. Each stage's internal events (see
//! [`crate::InternalEvent`]) hold one `static` throttle per rate-limited type.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// One call site's throttle.
#[derive(Debug)]
pub struct Throttle {
    /// The second (since the process's first throttle) of the last line written, plus 1.
    last: AtomicU64,
    suppressed: AtomicU64,
}

fn now_secs() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs() + 1
}

impl Throttle {
    /// A throttle that lets the first line through.
    pub const fn new() -> Self {
        Throttle {
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one)` when a line may be written now.
    pub fn allow(&self) -> Option<u64> {
        let now = now_secs();
        let last = self.last.load(Ordering::Relaxed);
        if last != now
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_counting_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(t.allow(), None);
        }
        // Pretend a second passed.
        t.last.store(0, Ordering::Relaxed);
        assert_eq!(t.allow(), Some(5));
    }
}
