//! # dbx-batcher
//!
//! Turns [`dbx_core::TelemetryBatch`]es into committed rows and resolves their ack
//! handles. Parses no wire bytes.
//!
//! - [`config`]: flush thresholds, pool size, retry policy.
//! - [`copy`]: [`CopyEncoder`], the binary COPY writer (PGCOPY header, rows, trailer) into a reused `BytesMut`.
//! - [`partition`]: which child partition a timestamp belongs to, and which children exist.
//! - `writer`: one flush: session upserts, COPY into the partition, staging path, statistics, commit.
//! - `txn`: the transaction of a flush, `BEGIN` and `COMMIT` pipelined with their neighbours.
//! - [`dedupe`]: per-session high-water marks and the staging path for possible duplicates.
//! - [`sessions`]: flight session statistics (departure, arrival, count, distance).
//! - `ends`: a gateway's `end` of a flight session (protocol 1.1): completes it.
//! - [`metrics`] / [`events`]: metric names and HELP; the events that log and count together.
//! - `batcher`: the task that groups batches by partition, applies the flush policy and retries.
//!
//! The binary wires it: it creates the channel with `queue_capacity`, gives the
//! receiver to [`Batcher::spawn`] and the senders to the listener, and at shutdown
//! drops the senders and awaits [`BatcherHandle::join`].

mod batcher;
pub mod config;
pub mod copy;
pub mod dedupe;
mod ends;
mod error;
pub mod events;
pub mod metrics;
pub mod partition;
pub mod sessions;
mod stats;
mod ticket;
mod txn;
mod writer;

pub(crate) use dbx_core::Point;

pub use batcher::{Batcher, BatcherHandle};
pub use config::{BatcherConfig, PartitionInterval};
pub use copy::CopyEncoder;
pub use dbx_core::ConfigError;
pub use error::BatcherError;
pub use stats::BatcherStats;
