//! A cooperative shutdown signal, in the manner of mini-redis: the binary holds a
//! [`ShutdownTrigger`]; every task holds a [`Shutdown`] and selects on
//! [`Shutdown::recv`] beside its real work.
//!
//! Stages stop in order (docs/architecture.md): stop accepting → stop reading → the
//! batcher writes and acks what it accepted → control stops. The binary gives each
//! stage its own trigger so it can sequence them.

use tokio::sync::watch;

/// The sending side: fire once to ask every listener of this signal to stop.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// The receiving side, cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl ShutdownTrigger {
    /// A new trigger and its first receiver.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }

    /// Asks every receiver to stop. Idempotent.
    pub fn fire(&self) {
        self.tx.send_replace(true);
    }

    /// Another receiver of this trigger.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }

    /// True once fired.
    pub fn is_fired(&self) -> bool {
        *self.tx.borrow()
    }
}

impl Shutdown {
    /// True once shutdown was asked for.
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes when shutdown is asked for (at once if it already was). A trigger
    /// that was dropped unfired counts as fired: nobody is left to keep us running.
    pub async fn recv(&mut self) {
        let _ = self.rx.wait_for(|fired| *fired).await;
    }
}
