//! # dbx-core
//!
//! The domain types that every stage of the daemon shares, and nothing else: a
//! decoded telemetry [`Point`], a [`TelemetryBatch`] of points whose organization,
//! aircraft and session the listener has already resolved, the [`AckHandle`] the
//! batcher uses to tell the connection that a batch is durable (or rejected), the
//! protocol's [`RejectCode`]s, a cooperative [`Shutdown`] signal, an injectable
//! [`Clock`], the names of every metric the daemon exports, and the rules every stage
//! must apply alike: how telemetry is partitioned ([`partition`]), the configuration
//! error every section returns ([`ConfigError`]), the lock policy ([`sync`]), and the
//! shape every stage's internal events take ([`InternalEvent`], with the log
//! [`Throttle`] for what a peer can cause at will).
//!
//! This crate does no I/O. The listener (`dbx-listener`) and the batcher
//! (`dbx-batcher`) never import each other; they meet here.

pub mod ack;
pub mod apikey;
pub mod batch;
pub mod clock;
pub mod config;
pub mod metrics;
pub mod partition;
pub mod point;
pub mod reject;
pub mod shutdown;
pub mod sync;
pub mod throttle;

pub use ack::{AckHandle, AckReceiver, BatchOutcome};
pub use batch::{BatchOrigin, TelemetryBatch};
pub use clock::{now_micros, Clock, ManualClock, SharedClock, SystemClock};
pub use config::ConfigError;
pub use metrics::InternalEvent;
pub use point::{Point, POINT_FIELD_COUNT};
pub use reject::{RejectCode, Rejection};
pub use shutdown::{Shutdown, ShutdownTrigger};
pub use throttle::Throttle;
