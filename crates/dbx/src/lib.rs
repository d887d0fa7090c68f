//! Client-side tools that ship with the `dbx` binary and are shared with its
//! benchmarks: the simulated gateway fleet (`dbx loadgen`, `dbx demo`, the
//! throughput harness). The daemon's own logic lives in the library crates
//! (`dbx-listener`, `dbx-batcher`, `dbx-control`); nothing here runs inside it.
//!
//! - [`sim`]: plausible flights (take-off, cruise, landing; battery, motors, surfaces).
//! - [`loadgen`]: N gateways × M aircraft over TCP, TLS or UDP, windowed, resending
//!   unacked batches after a reconnect, with live progress and a summary.

pub mod loadgen;
pub mod sim;
