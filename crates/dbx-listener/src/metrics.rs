//! The listener's metrics: connections, frames, handshakes, refusals, the byte budget, the
//! rate limits, the key cache, `api_requests` records and the per-organization series
//! (labelled by org code, see [`crate::orgmetrics`]). Other inputs (MQTT) count their points,
//! frames and rate-limit waits under these same names.
//!
//! Each crate owns its metrics in a `metrics.rs` like this one: the names, with what they
//! count, and their HELP text, registered by [`describe`] (the binary calls each crate's
//! once, after installing the exporter). Conventions: `dbx_` prefix, base units, `_total`
//! for counters, label sets bounded (`reason`, `transport`, `trigger`, `kind`, `schema`,
//! `table`, and `org` capped by `metrics.max_org_labels`). Names never change: the
//! dashboard and the alerts in deploy/ depend on them (tests/ops checks every name they
//! use against these files).
//!
//! Below the names: the handles of the hot-path series (per frame, per point, per
//! ack, which log nothing) and the setters of the gauges describing state. Everything
//! that is logged as well as counted (refusals, drops, timeouts, reloads) is an event of
//! [`crate::events`] instead.

use std::time::Duration;

use ::metrics::{
    counter, describe_counter as c, describe_gauge as g, describe_histogram as h, gauge, histogram,
    Counter, Gauge, Histogram, Unit,
};

pub use dbx_core::metrics::{POINTS_RECEIVED_TOTAL, UDP_DROPPED_TOTAL};

/// Open connections (gauge, label `transport`).
pub const CONNECTIONS_OPEN: &str = "dbx_connections_open";

/// Connections accepted (counter, label `transport`).
pub const CONNECTIONS_TOTAL: &str = "dbx_connections_total";

/// Connections refused before their handshake (counter, label `reason` =
/// max_connections | max_pending_handshakes | max_pending_per_ip).
pub const CONNECTIONS_REFUSED_TOTAL: &str = "dbx_connections_refused_total";

/// Connections accepted that have not completed their handshake (TLS and
/// `hello`) yet (gauge).
pub const PENDING_HANDSHAKES: &str = "dbx_pending_handshakes";

/// Connections closed because their peer did not read what the server wrote
/// within `write_timeout_ms` (counter, label `transport`).
pub const WRITE_TIMEOUTS_TOTAL: &str = "dbx_write_timeouts_total";

/// Bytes of frames and decoded batches charged against `limits.max_buffered_bytes`
/// right now (gauge).
pub const BUFFERED_BYTES: &str = "dbx_buffered_bytes";

/// Listener: `limits.max_buffered_bytes` (gauge).
pub const BUFFERED_BYTES_LIMIT: &str = "dbx_buffered_bytes_limit";

/// Times a TCP connection stopped reading because the byte budget was spent
/// (counter, label `transport`).
pub const BUFFERED_BYTES_WAITS_TOTAL: &str = "dbx_buffered_bytes_waits_total";

/// Frames received (counter, label `transport`).
pub const FRAMES_RECEIVED_TOTAL: &str = "dbx_frames_received_total";

/// Batches or connections rejected (counter, label `reason` = protocol code).
pub const REJECTIONS_TOTAL: &str = "dbx_rejections_total";

/// Failed handshakes (counter, label `reason`).
pub const AUTH_FAILURES_TOTAL: &str = "dbx_auth_failures_total";

/// Each pause of TCP reads by the per-organization rate limit (histogram, seconds;
/// its `_sum` is the total time paused, its `_count` the number of pauses).
pub const RATE_LIMIT_WAIT_SECONDS: &str = "dbx_rate_limit_wait_seconds";

/// UDP points dropped over the rate limit (counter).
pub const RATE_LIMIT_DROPS_TOTAL: &str = "dbx_rate_limit_dropped_points_total";

/// Frame received → ack sent (histogram, seconds).
pub const ACK_LATENCY_SECONDS: &str = "dbx_ack_latency_seconds";

/// Reloads of the key and aircraft cache that succeeded (counter).
pub const AUTH_RELOADS_TOTAL: &str = "dbx_auth_reloads_total";

/// Failures of the task keeping that cache fresh (lost LISTEN connection, failed
/// reload; it retries with backoff, the previous snapshot stays in force) (counter).
pub const AUTH_REFRESH_FAILURES_TOTAL: &str = "dbx_auth_refresh_failures_total";

/// When the cache was last reloaded successfully (gauge, unix seconds; alert when it
/// falls behind, as revocations and new aircraft then do not take effect).
pub const AUTH_LAST_RELOAD_TIMESTAMP_SECONDS: &str = "dbx_auth_last_reload_timestamp_seconds";

/// API keys the cache accepts (gauge).
pub const AUTH_KEYS: &str = "dbx_auth_keys";

/// Active aircraft the cache knows (gauge).
pub const AUTH_AIRCRAFT: &str = "dbx_auth_aircraft";

/// Per organization (label `org` = its org code; past `metrics.max_org_labels`
/// organizations, `other`): points accepted into the pipeline, all inputs (counter).
pub const ORG_POINTS_RECEIVED_TOTAL: &str = "dbx_org_points_received_total";

/// Batches accepted into the pipeline (counter, label `org`).
pub const ORG_BATCHES_RECEIVED_TOTAL: &str = "dbx_org_batches_received_total";

/// Bytes received from its gateways — frames, datagrams, MQTT payloads —
/// whatever became of them (counter, label `org`).
pub const ORG_RECEIVED_BYTES_TOTAL: &str = "dbx_org_received_bytes_total";

/// Batches refused — nacked, or datagrams dropped for a reason of its own
/// (counter, label `org`).
pub const ORG_REJECTIONS_TOTAL: &str = "dbx_org_rejections_total";

/// Each pause of its input for its rate limit (histogram, seconds, label
/// `org`, two buckets; its `_sum` is the time paused).
pub const ORG_RATE_LIMIT_WAIT_SECONDS: &str = "dbx_org_rate_limit_wait_seconds";

/// Organizations with a label of their own in the per-organization metrics (gauge; at
/// `metrics.max_org_labels` further ones count under `other`).
pub const ORG_LABELS: &str = "dbx_org_labels";

/// Api_requests Records dropped, by `reason`: `queue_full` (the writer's queue), `pending_full` (the
/// rows awaiting the next flush are at their bound), `write_failed` (the database
/// refused the flush) (counter).
pub const API_REQUESTS_DROPPED_TOTAL: &str = "dbx_api_requests_dropped_total";

/// Api_requests Refused handshakes folded into an existing row of the current flush window instead of
/// a row of their own (counter).
pub const API_REQUESTS_COLLAPSED_TOTAL: &str = "dbx_api_requests_collapsed_total";

/// Registers the HELP text of every metric above; call once, after installing the
/// recorder.
pub fn describe() {
    g!(CONNECTIONS_OPEN, "Open gateway connections, by transport.");
    c!(
        CONNECTIONS_TOTAL,
        "Gateway connections accepted, by transport."
    );
    c!(CONNECTIONS_REFUSED_TOTAL, "Connections refused before their handshake, by reason (max_connections, max_pending_handshakes, max_pending_per_ip).");
    g!(
        PENDING_HANDSHAKES,
        "Connections whose TLS handshake or hello is not complete yet."
    );
    c!(
        WRITE_TIMEOUTS_TOTAL,
        "Connections closed because the peer did not read for write_timeout_ms, by transport."
    );
    g!(
        BUFFERED_BYTES,
        Unit::Bytes,
        "Bytes of frames and decoded batches held against limits.max_buffered_bytes."
    );
    g!(
        BUFFERED_BYTES_LIMIT,
        Unit::Bytes,
        "limits.max_buffered_bytes."
    );
    c!(BUFFERED_BYTES_WAITS_TOTAL, "Times a TCP connection stopped reading because limits.max_buffered_bytes was spent, by transport.");
    c!(
        FRAMES_RECEIVED_TOTAL,
        "Frames (or datagrams) received, by transport."
    );
    c!(
        POINTS_RECEIVED_TOTAL,
        "Points accepted into the pipeline, by transport."
    );
    c!(
        REJECTIONS_TOTAL,
        "Batches nacked or connections closed with an error, by protocol code."
    );
    c!(AUTH_FAILURES_TOTAL, "Failed or revoked handshakes, by reason (the protocol code: unauthorized, frame_too_large for a hello over max_hello_bytes, handshake_timeout, ...; tls; revoked).");
    h!(
        RATE_LIMIT_WAIT_SECONDS,
        Unit::Seconds,
        "Pauses of TCP reads imposed by per-organization rate limits."
    );
    c!(
        RATE_LIMIT_DROPS_TOTAL,
        "UDP points dropped over an organization's rate limit."
    );
    c!(UDP_DROPPED_TOTAL, "UDP datagrams dropped, by reason (a protocol code such as unauthorized for a bad key or MAC; plain_key_refused, budget, rate_limited, saturated, too_large).");
    h!(
        ACK_LATENCY_SECONDS,
        Unit::Seconds,
        "Frame received to ack written."
    );
    c!(
        AUTH_RELOADS_TOTAL,
        "Successful reloads of the key and aircraft cache."
    );
    c!(AUTH_REFRESH_FAILURES_TOTAL, "Failures of the key and aircraft cache refresher (it retries; the previous cache stays in force).");
    g!(
        AUTH_LAST_RELOAD_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Unix time of the last successful key and aircraft cache reload."
    );
    g!(AUTH_KEYS, "API keys the daemon accepts.");
    g!(AUTH_AIRCRAFT, "Active aircraft the daemon knows.");
    c!(ORG_POINTS_RECEIVED_TOTAL, "Points accepted into the pipeline, by organization (org code; past metrics.max_org_labels organizations, other).");
    c!(
        ORG_BATCHES_RECEIVED_TOTAL,
        "Batches accepted into the pipeline, by organization."
    );
    c!(ORG_RECEIVED_BYTES_TOTAL, Unit::Bytes, "Bytes received from an organization's gateways (frames, datagrams, MQTT payloads), by organization.");
    c!(ORG_REJECTIONS_TOTAL, "Batches refused (nacked, or datagrams dropped for a reason of the organization's own), by organization.");
    h!(
        ORG_RATE_LIMIT_WAIT_SECONDS,
        Unit::Seconds,
        "Pauses of an organization's input for its rate limit, by organization."
    );
    g!(ORG_LABELS, "Organizations with a label of their own in the per-organization metrics (at metrics.max_org_labels, others count as other).");
    c!(API_REQUESTS_DROPPED_TOTAL, "Handshake records not written to api_requests, by reason (queue_full, pending_full, write_failed).");
    c!(API_REQUESTS_COLLAPSED_TOTAL, "Refused handshakes counted in an earlier api_requests row of the same flush window (same client IP, status, transport).");
}

/// `dbx_frames_received_total{transport}` (a frame, datagram or MQTT message).
pub fn frames_received(transport: &'static str) -> Counter {
    counter!(FRAMES_RECEIVED_TOTAL, "transport" => transport)
}

/// `dbx_points_received_total{transport}`.
pub fn points_received(transport: &'static str) -> Counter {
    counter!(POINTS_RECEIVED_TOTAL, "transport" => transport)
}

/// `dbx_connections_total{transport}`: a connection accepted.
pub fn connections_accepted(transport: &'static str) -> Counter {
    counter!(CONNECTIONS_TOTAL, "transport" => transport)
}

/// `dbx_connections_open{transport}`.
pub fn connections_open(transport: &'static str) -> Gauge {
    gauge!(CONNECTIONS_OPEN, "transport" => transport)
}

/// `dbx_pending_handshakes`.
pub fn pending_handshakes() -> Gauge {
    gauge!(PENDING_HANDSHAKES)
}

/// `dbx_buffered_bytes`.
pub fn buffered_bytes() -> Gauge {
    gauge!(BUFFERED_BYTES)
}

/// `dbx_buffered_bytes_limit`.
pub fn buffered_bytes_limit() -> Gauge {
    gauge!(BUFFERED_BYTES_LIMIT)
}

/// `dbx_queue_depth` as a connection sees it while it waits for room (the batcher
/// sets it when it receives).
pub fn queue_depth(batches: usize) {
    gauge!(dbx_core::metrics::QUEUE_DEPTH).set(batches as f64);
}

/// One pause of reads for a rate limit, in `dbx_rate_limit_wait_seconds` (every input).
pub fn rate_limit_wait(wait: Duration) {
    histogram!(RATE_LIMIT_WAIT_SECONDS).record(wait.as_secs_f64());
}

/// `dbx_ack_latency_seconds`: frame received to ack written, per acknowledged batch.
pub fn ack_latency() -> Histogram {
    histogram!(ACK_LATENCY_SECONDS)
}

/// `dbx_batch_stage_seconds{stage="ack_written"}`: verdict given to ack written, the
/// last stage of an acknowledged batch (the batcher records the others; HELP text in
/// `dbx_batcher::metrics`).
pub fn ack_written_stage() -> Histogram {
    histogram!(dbx_core::metrics::BATCH_STAGE_SECONDS, "stage" => "ack_written")
}

/// Starts `dbx_write_timeouts_total{transport}` at 0, so that a dashboard shows
/// "none" rather than "no data" until the first one.
pub fn zero_write_timeouts(transport: &'static str) {
    counter!(WRITE_TIMEOUTS_TOTAL, "transport" => transport).increment(0);
}

/// A per-organization counter (`name{org}`), resolved once per label.
pub(crate) fn org_counter(name: &'static str, org: &str) -> Counter {
    counter!(name, "org" => org.to_string())
}

/// `dbx_org_rate_limit_wait_seconds{org}`, resolved once per label.
pub(crate) fn org_rate_limit_wait(org: &str) -> Histogram {
    histogram!(ORG_RATE_LIMIT_WAIT_SECONDS, "org" => org.to_string())
}

/// `dbx_org_labels`.
pub(crate) fn org_labels(labelled: usize) {
    gauge!(ORG_LABELS).set(labelled as f64);
}
