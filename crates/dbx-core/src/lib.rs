//! # dbx-core
//!
//! The domain types that every stage of the daemon shares, and nothing else: a
//! decoded telemetry [`Point`], a [`TelemetryBatch`] of points whose organization,
//! aircraft and session the listener has already resolved, the [`AckHandle`] the
//! batcher uses to tell the connection that a batch is durable (or rejected), the
//! protocol's [`RejectCode`]s, a cooperative [`Shutdown`] signal, an injectable
//! [`Clock`], and the names of every metric the daemon exports.
//!
//! This crate does no I/O. The listener (`dbx-listener`) and the batcher
//! (`dbx-batcher`) never import each other; they meet here.

pub mod ack;
pub mod batch;
pub mod clock;
pub mod metrics;
pub mod point;
pub mod reject;
pub mod shutdown;

pub use ack::{AckHandle, AckReceiver, BatchOutcome};
pub use batch::{BatchOrigin, TelemetryBatch};
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use point::{Point, POINT_FIELD_COUNT};
pub use reject::{RejectCode, Rejection};
pub use shutdown::{Shutdown, ShutdownTrigger};
