//! # dbx-proto
//!
//! The wire protocol of docs/protocol.md and nothing else: no sockets, no SQL.
//!
//! - [`codec`]: the 4-byte big-endian length-prefixed frame codec (tokio-util `Decoder`/`Encoder`).
//! - [`message`]: the client and server messages; [`decode_hello`] for the first TCP
//!   frame (before `welcome`), [`decode_client`] for TCP frame bodies after it,
//!   [`open_datagram`] then [`DatagramEnvelope::decode`] for UDP, [`decode_server`] for
//!   clients.
//! - [`mac`]: the UDP MAC form (docs/protocol.md, 1.1): key id, HMAC, constant-time check.
//! - [`point`]: wire points (map or array form) → validated [`dbx_core::Point`].
//! - [`encode`]: encoders for every message, for the daemon, the loadgen, tests and
//!   Rust gateways.
//! - [`decode_batch_map`] / [`decode_json_batch_map`]: one `batch` map carried as the
//!   payload of an input without connections (MQTT), in MessagePack or JSON, through
//!   the same decoder, limits and point rules.
//!
//! ## Choices stated in docs/protocol.md
//! docs/protocol.md states each of these for gateway authors; each is also stated where it is coded.
//! - A `batch` whose `seq` is missing or not a u64 is `error protocol` (a nack must
//!   echo a `seq`).
//! - `hello`: `v` missing or not an unsigned integer → `unsupported_version` (the
//!   listener compares `v` with [`PROTOCOL_VERSION`]); `key` missing or not a string →
//!   `unauthorized`; `gateway` not a string, over 64 characters or holding NUL →
//!   `protocol`. Precedence: duplicate keys, `v`, `gateway`, `key`.
//! - A defined key twice in one message: `protocol` for `t`, `seq` and hello keys,
//!   `invalid_batch` for `aircraft`, `session`, `points`. In a point, a known key twice
//!   or an `extra` key twice (including once in `x` and once at the top) is
//!   `invalid_point`.
//! - `aircraft`: a string parsing as a UUID, or 16-byte binary, is an id; any other
//!   non-empty NUL-free string a registration number.
//! - Integer point fields (`seq`, `fix`, `sats`, `ts` as microseconds) take integers
//!   only. Float fields take any number; a value that overflows `real` is
//!   `invalid_point`. `nil` for `ts`/`seq` is "missing".
//! - `extra`: see [`point`] for the JSON mapping; the timestamp extension becomes an RFC
//!   3339 string, other extension types, NaN/infinity, non-UTF-8 strings and NUL are
//!   `invalid_point`; nesting is limited to 32 levels; no entries at all → NULL.
//! - Within a point `invalid_point` wins over `out_of_range`; across points the first
//!   bad point is named; `bad_frame` wins over everything, then connection errors,
//!   then `invalid_batch`, then point errors.
//! - UDP: over 65 507 bytes → `frame_too_large`; `seq` may be absent or `nil`.
//! - `end` (1.1): `seq` follows the batch rules (a bad one is `error protocol`); a
//!   missing, repeated or malformed `session` is `nack invalid_batch`.
//!
//! ## Version 1.1 (docs/protocol.md, "Version 1.1 hardening")
//! - The first frame is decoded by [`decode_hello`] only (its hello keys; other values
//!   are stepped over without being interpreted); the listener refuses one over
//!   [`Limits::max_hello_bytes`] at its prefix ([`FrameCodec::for_hello`]).
//! - Decoding is linear in the input: duplicate `extra` keys are found through a hash
//!   index, at most [`Limits::max_extra_keys`] per point (else `invalid_point`),
//!   skipping is iterative, `extra` nesting stops at 32 levels.
//! - `aircraft` registrations are at most [`MAX_REGISTRATION_CHARS`] characters
//!   (`invalid_batch`); messages quote at most 40 characters of any wire value.
//! - UDP: [`open_datagram`] authenticates-first (`key`, or `kid`/`mac`/`body`: see
//!   [`mac`]); the batch is decoded after.
//! - Memory: [`decoded_bytes_bound`] bounds what decoding a body can hold;
//!   [`points_heap_bytes`] is what the result holds.

use std::time::Duration;

pub mod codec;
pub mod encode;
pub mod json;
pub mod mac;
pub mod message;
pub mod point;
mod reader;

pub use codec::{write_frame, FrameCodec, FrameError};
pub use encode::{
    encode_batch, encode_batch_payload, encode_batch_with, encode_bye, encode_datagram,
    encode_datagram_mac, encode_end, encode_hello, encode_hello_v, encode_ping, encode_server,
    EncodeError, EncodeOptions, PointForm, TimestampForm,
};
pub use json::decode_json_batch_map;
pub use message::{
    decode_batch_map, decode_client, decode_hello, decode_server, open_datagram, parse_aircraft,
    AircraftRef, Batch, BatchMap, ClientMessage, Datagram, DatagramAuth, DatagramEnvelope,
    DecodeError, End, Hello, ServerDecodeError, ServerMessage, MAX_DATAGRAM_BYTES,
    MAX_GATEWAY_CHARS, MAX_REGISTRATION_CHARS, PROTOCOL_VERSION,
};
pub use point::{decoded_bytes_bound, points_heap_bytes};

/// The limits a decoder enforces, from the daemon's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most points in one batch (default 10 000).
    pub max_points_per_batch: usize,
    /// Oldest accepted timestamp, relative to now (default 7 days).
    pub max_past: Duration,
    /// Newest accepted timestamp, relative to now (default 5 minutes).
    pub max_future: Duration,
    /// Largest frame body, the 4-byte prefix not counted (default 1 MiB).
    pub max_frame_bytes: usize,
    /// Most keys per point that go to `extra`: unknown top-level keys plus entries of
    /// `x` (default 256, docs/protocol.md, 1.1).
    pub max_extra_keys: usize,
    /// Largest first frame (the `hello`) before `welcome`, the prefix not counted
    /// (default 4 KiB, docs/protocol.md, 1.1).
    pub max_hello_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_points_per_batch: 10_000,
            max_past: Duration::from_secs(7 * 24 * 3600),
            max_future: Duration::from_secs(5 * 60),
            max_frame_bytes: 1 << 20,
            max_extra_keys: 256,
            max_hello_bytes: 4096,
        }
    }
}
