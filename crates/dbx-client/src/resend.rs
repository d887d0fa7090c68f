//! Resending after a reconnect. The protocol's delivery rule for gateways: whatever a
//! lost connection left unanswered may or may not be stored, so it is sent again, on the
//! next connection, with fresh seqs; the daemon drops the points it already stored, so
//! every point ends up in the table exactly once. [`Resend`] is that queue.

use std::collections::VecDeque;

use crate::{Client, ClientError, Outgoing};

/// Messages to send before anything new, oldest first, each with the caller's tag.
#[derive(Debug)]
pub struct Resend<T> {
    queue: VecDeque<(Outgoing, T)>,
}

impl<T> Default for Resend<T> {
    fn default() -> Self {
        Resend {
            queue: VecDeque::new(),
        }
    }
}

impl<T> Resend<T> {
    /// The unanswered messages of a lost connection go to the front, in their order:
    /// they were sent before anything still queued. Returns how many.
    pub fn lost(&mut self, client: Client<T>) -> usize {
        let before = self.queue.len();
        for sent in client.into_unanswered().rev() {
            self.queue.push_front((sent.msg, sent.tag));
        }
        self.queue.len() - before
    }

    /// Queues a message at the back (a backlog to deliver).
    pub fn push(&mut self, msg: Outgoing, tag: T) {
        self.queue.push_back((msg, tag));
    }

    /// The next message to send.
    pub fn pop(&mut self) -> Option<(Outgoing, T)> {
        self.queue.pop_front()
    }

    /// Sends from the front while `client` has fewer than `window` messages in flight;
    /// returns how many it sent. A message whose write fails stays with the client (it
    /// comes back through [`Resend::lost`]).
    pub async fn send_some(
        &mut self,
        client: &mut Client<T>,
        window: usize,
    ) -> Result<usize, ClientError> {
        let mut sent = 0;
        while client.in_flight() < window {
            let Some((msg, tag)) = self.queue.pop_front() else {
                break;
            };
            client.send(msg, tag).await?;
            sent += 1;
        }
        Ok(sent)
    }

    /// Messages queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Nothing to resend.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}
