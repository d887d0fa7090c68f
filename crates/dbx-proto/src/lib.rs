//! # dbx-proto
//!
//! The wire protocol of PROTOCOL.md and nothing else: no sockets, no SQL.
//!
//! - `codec`: the 4-byte big-endian length-prefixed frame codec (tokio-util `Decoder`/`Encoder`).
//! - `message`: the client and server messages, decoded from and encoded to one MessagePack map.
//! - `point`: wire points (map or array form) → validated [`dbx_core::Point`].
//! - `encode`: encoders for every client message, for the loadgen, tests and Rust gateways.
