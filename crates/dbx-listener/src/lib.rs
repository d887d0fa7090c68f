//! # dbx-listener
//!
//! Accepts gateways and turns their frames into [`dbx_core::TelemetryBatch`]es on a
//! bounded channel, then delivers the batcher's verdicts back as `ack`/`nack`.
//!
//! - `config`: listener settings (binds, limits, timeouts, TLS paths).
//! - `auth`: the key → organization cache (SHA-256 hashes), refreshed by LISTEN/NOTIFY.
//! - `connection`: one TCP/TLS connection: framing, handshake, batches, acks in order.
//! - `tcp` / `udp`: the servers, the connection semaphore, graceful shutdown.
//! - `ratelimit`: per-organization token buckets.
//! - `audit`: batched `api_requests` rows for every handshake, off the hot path.
