//! Matching answers to what was sent. The server answers every `batch` and `end` in
//! `seq` order, with an `ack` that is cumulative (every seq up to it that was not
//! nacked is durable, and several may be coalesced into one) or a `nack` for one seq.
//! [`AckTracker`] keeps what is in flight, by seq, until its answer.

use std::collections::VecDeque;

/// The messages in flight on one connection, in seq order, each with what the caller
/// wants back with its answer.
#[derive(Debug)]
pub struct AckTracker<T> {
    in_flight: VecDeque<(u64, T)>,
}

impl<T> Default for AckTracker<T> {
    fn default() -> Self {
        AckTracker {
            in_flight: VecDeque::new(),
        }
    }
}

impl<T> AckTracker<T> {
    /// `item` was sent with `seq`, greater than every seq tracked before.
    pub fn sent(&mut self, seq: u64, item: T) {
        debug_assert!(self.in_flight.back().is_none_or(|(s, _)| *s < seq));
        self.in_flight.push_back((seq, item));
    }

    /// An `ack` for `seq`: every message in flight with a seq up to it, in seq order.
    pub fn ack(&mut self, seq: u64) -> impl Iterator<Item = (u64, T)> + '_ {
        let upto = self.in_flight.partition_point(|(s, _)| *s <= seq);
        self.in_flight.drain(..upto)
    }

    /// A `nack` for `seq`: that message, or `None` when `seq` is not in flight.
    pub fn nack(&mut self, seq: u64) -> Option<T> {
        let at = self
            .in_flight
            .binary_search_by_key(&seq, |(s, _)| *s)
            .ok()?;
        self.in_flight.remove(at).map(|(_, item)| item)
    }

    /// Messages awaiting an answer.
    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// Nothing awaits an answer.
    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// The seqs awaiting an answer, in order.
    pub fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.in_flight.iter().map(|(s, _)| *s)
    }

    /// Everything still unanswered, in seq order (the connection is lost: none of it is
    /// known to be stored).
    pub fn unanswered(self) -> impl DoubleEndedIterator<Item = (u64, T)> {
        self.in_flight.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(seqs: &[u64]) -> AckTracker<char> {
        let mut t = AckTracker::default();
        for &s in seqs {
            t.sent(s, char::from(b'a' + s as u8));
        }
        t
    }

    #[test]
    fn an_ack_is_cumulative_and_in_order() {
        let mut t = tracker(&[1, 2, 3, 5]);
        assert_eq!(t.ack(3).collect::<Vec<_>>(), [(1, 'b'), (2, 'c'), (3, 'd')]);
        assert_eq!(t.seqs().collect::<Vec<_>>(), [5]);
        // An ack for a seq between two in flight covers those below it only.
        let mut t = tracker(&[2, 4, 6]);
        assert_eq!(t.ack(5).map(|(s, _)| s).collect::<Vec<_>>(), [2, 4]);
        // An old ack (already covered) releases nothing.
        assert_eq!(t.ack(3).count(), 0);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_nack_takes_out_one_seq_and_the_next_ack_covers_the_rest() {
        let mut t = tracker(&[1, 2, 3]);
        assert_eq!(t.nack(2), Some('c'));
        assert_eq!(t.nack(2), None, "a seq is answered once");
        assert_eq!(t.nack(9), None);
        assert_eq!(t.ack(3).map(|(s, _)| s).collect::<Vec<_>>(), [1, 3]);
        assert!(t.is_empty());
    }

    #[test]
    fn what_is_unanswered_comes_back_in_seq_order() {
        let mut t = tracker(&[1, 2, 3, 4]);
        let _ = t.ack(1).count();
        assert_eq!(t.nack(3), Some('d'));
        let left: Vec<_> = t.unanswered().map(|(s, _)| s).collect();
        assert_eq!(left, [2, 4]);
    }
}
