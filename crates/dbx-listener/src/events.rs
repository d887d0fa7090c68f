//! The listener's internal events: every refusal, drop, timeout and failure it reports,
//! each a small type whose [`InternalEvent::emit`] writes its log line and moves its
//! metrics together (see `dbx_core::metrics`). What a peer can cause at will (refused
//! connections and handshakes, write timeouts, dropped datagrams and handshake records)
//! logs through a [`Throttle`], at most one line a second per event type, while the
//! metric counts every one. Names, label keys and label values are those of
//! [`crate::metrics`]; dashboards and alerts depend on them.

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Duration;

use ::metrics::{counter, gauge};
use dbx_core::{InternalEvent, RejectCode, Throttle};
use uuid::Uuid;

use crate::metrics as m;
use crate::slots::Refusal;

/// A connection refused at accept, before its handshake, because a slot limit is
/// reached (`max_connections`, `max_pending_handshakes`, `max_pending_per_ip`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionRefused {
    /// Who connected.
    pub peer: SocketAddr,
    /// Which limit refused it.
    pub why: Refusal,
}

impl InternalEvent for ConnectionRefused {
    fn emit(self) {
        static LOG: Throttle = Throttle::new();
        let reason = self.why.as_str();
        counter!(m::CONNECTIONS_REFUSED_TOTAL, "reason" => reason).increment(1);
        if let Some(n) = LOG.allow() {
            tracing::warn!(peer = %self.peer, reason, suppressed = n, "refusing a connection: {}", self.why.message());
        }
    }
}

/// A TLS handshake that failed or did not finish within `handshake_timeout_ms`.
#[derive(Debug, Clone, Copy)]
pub struct TlsHandshakeFailed {
    /// Who connected.
    pub peer: SocketAddr,
    /// `tls` (the handshake failed) or `handshake_timeout`.
    pub reason: &'static str,
}

impl InternalEvent for TlsHandshakeFailed {
    fn emit(self) {
        static LOG: Throttle = Throttle::new();
        counter!(m::AUTH_FAILURES_TOTAL, "reason" => self.reason).increment(1);
        if let Some(n) = LOG.allow() {
            tracing::info!(peer = %self.peer, reason = self.reason, suppressed = n, "TLS handshake failed");
        }
    }
}

/// A `hello` refused (bad key, version, limits, timeout): the connection is closed
/// with `error {code}`.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeRefused<'a> {
    /// Who connected.
    pub peer: SocketAddr,
    /// `tcp` or `tls`.
    pub transport: &'static str,
    /// The protocol code sent (the `reason` label).
    pub code: RejectCode,
    /// The message sent with it.
    pub msg: &'a str,
}

impl InternalEvent for HandshakeRefused<'_> {
    fn emit(self) {
        static LOG: Throttle = Throttle::new();
        counter!(m::AUTH_FAILURES_TOTAL, "reason" => self.code.as_str()).increment(1);
        if let Some(n) = LOG.allow() {
            tracing::info!(peer = %self.peer, transport = self.transport, code = %self.code, suppressed = n, "handshake refused: {}", self.msg);
        }
    }
}

/// The key of an open connection was revoked, or its organization deactivated; the
/// connection is closed next ([`ConnectionFailed`]).
#[derive(Debug, Clone, Copy)]
pub struct KeyRevoked {
    /// The connection's peer.
    pub peer: SocketAddr,
    /// The key's organization.
    pub org: Uuid,
}

impl InternalEvent for KeyRevoked {
    fn emit(self) {
        counter!(m::AUTH_FAILURES_TOTAL, "reason" => "revoked").increment(1);
        tracing::debug!(peer = %self.peer, org = %self.org, "the API key of an open connection was revoked");
    }
}

/// An established connection closed with `error {code}` (a protocol violation, a
/// revoked key, an idle timeout ...).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFailed<'a> {
    /// The connection's peer.
    pub peer: SocketAddr,
    /// Its organization.
    pub org: Uuid,
    /// The protocol code sent (the `reason` label).
    pub code: RejectCode,
    /// The message sent with it.
    pub msg: &'a str,
}

impl InternalEvent for ConnectionFailed<'_> {
    fn emit(self) {
        counter!(m::REJECTIONS_TOTAL, "reason" => self.code.as_str()).increment(1);
        tracing::info!(peer = %self.peer, org = %self.org, code = %self.code, "closing connection: {}", self.msg);
    }
}

/// A batch nacked by the listener itself (it did not decode, or names an aircraft or
/// session the key may not write); the connection stays open.
#[derive(Debug, Clone, Copy)]
pub struct BatchRefused<'a> {
    /// The connection's peer.
    pub peer: SocketAddr,
    /// The batch's sequence number.
    pub seq: u64,
    /// The protocol code of the nack (the `reason` label).
    pub code: RejectCode,
    /// The nack's message.
    pub msg: &'a str,
}

impl InternalEvent for BatchRefused<'_> {
    fn emit(self) {
        counter!(m::REJECTIONS_TOTAL, "reason" => self.code.as_str()).increment(1);
        tracing::debug!(peer = %self.peer, seq = self.seq, code = %self.code, "batch refused: {}", self.msg);
    }
}

/// A connection closed because its peer did not read what the server wrote within
/// `write_timeout_ms`.
#[derive(Debug, Clone, Copy)]
pub struct WriteTimedOut {
    /// `tcp` or `tls`.
    pub transport: &'static str,
    /// `write_timeout_ms`.
    pub after: Duration,
}

impl InternalEvent for WriteTimedOut {
    fn emit(self) {
        static LOG: Throttle = Throttle::new();
        counter!(m::WRITE_TIMEOUTS_TOTAL, "transport" => self.transport).increment(1);
        if let Some(n) = LOG.allow() {
            tracing::info!(
                transport = self.transport,
                suppressed = n,
                "closing a connection whose peer has not read for {} ms (write_timeout_ms)",
                self.after.as_millis()
            );
        }
    }
}

/// A TCP connection stopped reading because `limits.max_buffered_bytes` is spent; it
/// resumes once other frames are released.
#[derive(Debug, Clone, Copy)]
pub struct BudgetExhausted {
    /// `tcp` or `tls`.
    pub transport: &'static str,
}

impl InternalEvent for BudgetExhausted {
    fn emit(self) {
        counter!(m::BUFFERED_BYTES_WAITS_TOTAL, "transport" => self.transport).increment(1);
        tracing::trace!(
            transport = self.transport,
            "byte budget spent; pausing reads"
        );
    }
}

/// A UDP datagram dropped, nobody being told (docs/protocol.md: UDP is never
/// answered).
#[derive(Debug, Clone, Copy)]
pub struct DatagramDropped<'a> {
    /// The sender.
    pub peer: SocketAddr,
    /// The `reason` label: a protocol code, or `too_large`, `plain_key_refused`,
    /// `budget`, `saturated`.
    pub reason: &'static str,
    /// What was wrong with it, when the decoder says.
    pub detail: Option<&'a str>,
}

impl InternalEvent for DatagramDropped<'_> {
    fn emit(self) {
        static LOG: Throttle = Throttle::new();
        counter!(m::UDP_DROPPED_TOTAL, "reason" => self.reason).increment(1);
        if let Some(n) = LOG.allow() {
            tracing::debug!(peer = %self.peer, reason = self.reason, detail = self.detail, suppressed = n, "udp datagram dropped");
        }
    }
}

/// A UDP datagram dropped over its organization's rate limit (its points are counted
/// in `dbx_rate_limit_drops_total`).
#[derive(Debug, Clone, Copy)]
pub struct DatagramRateLimited {
    /// The sender.
    pub peer: SocketAddr,
    /// Points it carried.
    pub points: usize,
}

impl InternalEvent for DatagramRateLimited {
    fn emit(self) {
        static LOG: Throttle = Throttle::new();
        counter!(m::RATE_LIMIT_DROPS_TOTAL).increment(self.points as u64);
        counter!(m::UDP_DROPPED_TOTAL, "reason" => "rate_limited").increment(1);
        if let Some(n) = LOG.allow() {
            tracing::debug!(peer = %self.peer, points = self.points, suppressed = n, "udp datagram dropped over its organization's rate limit");
        }
    }
}

/// The key and aircraft cache was reloaded.
#[derive(Debug, Clone, Copy)]
pub struct AuthReloaded {
    /// API keys it accepts now.
    pub keys: usize,
    /// Active aircraft it knows now.
    pub aircraft: usize,
    /// When (unix seconds).
    pub at_unix_secs: f64,
}

impl InternalEvent for AuthReloaded {
    fn emit(self) {
        counter!(m::AUTH_RELOADS_TOTAL).increment(1);
        gauge!(m::AUTH_LAST_RELOAD_TIMESTAMP_SECONDS).set(self.at_unix_secs);
        gauge!(m::AUTH_KEYS).set(self.keys as f64);
        gauge!(m::AUTH_AIRCRAFT).set(self.aircraft as f64);
        tracing::debug!(
            keys = self.keys,
            aircraft = self.aircraft,
            "key and aircraft cache reloaded"
        );
    }
}

/// The task keeping the key cache fresh lost its LISTEN connection or failed a
/// reload; it retries after `retry_in`, the previous snapshot staying in force.
#[derive(Clone, Copy)]
pub struct AuthRefreshFailed<'a> {
    /// What failed.
    pub error: &'a dyn Display,
    /// The backoff before the next attempt.
    pub retry_in: Duration,
}

impl InternalEvent for AuthRefreshFailed<'_> {
    fn emit(self) {
        counter!(m::AUTH_REFRESH_FAILURES_TOTAL).increment(1);
        tracing::warn!(error = %self.error, retry_in = ?self.retry_in, "auth change listener lost its connection; retrying");
    }
}

/// Handshake records not written to `api_requests`.
#[derive(Clone, Copy)]
pub enum HandshakeRecordsDropped<'a> {
    /// The writer's queue was full (one record).
    QueueFull,
    /// The rows awaiting the next flush were at their bound (one record).
    PendingFull {
        /// Rows waiting.
        rows: usize,
        /// Their bytes.
        bytes: usize,
    },
    /// The database refused the flush (every handshake in it).
    WriteFailed {
        /// Why.
        error: &'a dyn Display,
        /// Rows of the flush.
        rows: usize,
        /// Handshakes they counted.
        handshakes: u64,
    },
}

impl InternalEvent for HandshakeRecordsDropped<'_> {
    fn emit(self) {
        static LOG: Throttle = Throttle::new();
        let (reason, n) = match self {
            Self::QueueFull => ("queue_full", 1),
            Self::PendingFull { .. } => ("pending_full", 1),
            Self::WriteFailed { handshakes, .. } => ("write_failed", handshakes),
        };
        counter!(m::API_REQUESTS_DROPPED_TOTAL, "reason" => reason).increment(n);
        match self {
            // A handshake flood causes these: throttled.
            Self::QueueFull => {
                if let Some(n) = LOG.allow() {
                    tracing::debug!(
                        suppressed = n,
                        "handshake record dropped: the api_requests writer's queue is full"
                    );
                }
            }
            Self::PendingFull { rows, bytes } => {
                if let Some(n) = LOG.allow() {
                    tracing::debug!(
                        rows,
                        bytes,
                        suppressed = n,
                        "handshake record dropped: the api_requests window is full"
                    );
                }
            }
            Self::WriteFailed {
                error,
                rows,
                handshakes,
            } => {
                tracing::warn!(error = %error, rows, handshakes, "could not record handshakes in api_requests");
            }
        }
    }
}

/// A refused handshake folded into an existing `api_requests` row of the current
/// flush window.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeRecordCollapsed;

impl InternalEvent for HandshakeRecordCollapsed {
    fn emit(self) {
        counter!(m::API_REQUESTS_COLLAPSED_TOTAL).increment(1);
        tracing::trace!("handshake record folded into an earlier api_requests row");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dbx_testkit::capture_events;

    fn peer() -> SocketAddr {
        "192.0.2.7:40000".parse().unwrap()
    }

    #[test]
    fn a_refused_batch_is_counted_and_logged_by_one_emit() {
        let ((), got) = capture_events(|| {
            BatchRefused {
                peer: peer(),
                seq: 42,
                code: RejectCode::UnknownAircraft,
                msg: "aircraft N123 is not registered",
            }
            .emit()
        });
        assert_eq!(
            got.counter(m::REJECTIONS_TOTAL, &[("reason", "unknown_aircraft")]),
            1
        );
        assert_eq!(got.names().len(), 1, "only its own counter moves: {got:?}");
        let lines = got.lines_with("batch refused: aircraft N123 is not registered");
        assert_eq!(lines.len(), 1, "{}", got.log());
        assert!(lines[0].contains("DEBUG"), "{}", lines[0]);
        assert!(lines[0].contains("seq=42"), "{}", lines[0]);
        assert!(lines[0].contains("peer=192.0.2.7:40000"), "{}", lines[0]);
    }

    #[test]
    fn a_dropped_datagram_counts_every_time_and_logs_at_most_once_a_second() {
        let ((), got) = capture_events(|| {
            for _ in 0..50 {
                DatagramDropped {
                    peer: peer(),
                    reason: "too_large",
                    detail: None,
                }
                .emit();
            }
        });
        assert_eq!(
            got.counter(m::UDP_DROPPED_TOTAL, &[("reason", "too_large")]),
            50
        );
        // 50 emits take far less than a second, but may straddle one boundary.
        let lines = got.lines_with("udp datagram dropped");
        assert!(
            (1..=2).contains(&lines.len()),
            "one line a second, not one per datagram: {}",
            got.log()
        );
        assert!(lines[0].contains("reason=\"too_large\""), "{}", lines[0]);
    }

    #[test]
    fn a_rate_limited_datagram_counts_its_points_and_the_drop() {
        let ((), got) = capture_events(|| {
            DatagramRateLimited {
                peer: peer(),
                points: 7,
            }
            .emit()
        });
        assert_eq!(got.counter(m::RATE_LIMIT_DROPS_TOTAL, &[]), 7);
        assert_eq!(
            got.counter(m::UDP_DROPPED_TOTAL, &[("reason", "rate_limited")]),
            1
        );
        assert_eq!(got.lines_with("rate limit").len(), 1, "{}", got.log());
    }

    #[test]
    fn a_failed_api_requests_write_counts_each_handshake_and_warns() {
        let error = "connection refused";
        let ((), got) = capture_events(|| {
            HandshakeRecordsDropped::WriteFailed {
                error: &error,
                rows: 3,
                handshakes: 9,
            }
            .emit()
        });
        assert_eq!(
            got.counter(m::API_REQUESTS_DROPPED_TOTAL, &[("reason", "write_failed")]),
            9
        );
        let lines = got.lines_with("could not record handshakes in api_requests");
        assert_eq!(lines.len(), 1, "{}", got.log());
        assert!(lines[0].contains("WARN") && lines[0].contains("connection refused"));
    }

    #[test]
    fn a_reload_counts_and_sets_the_cache_gauges() {
        let ((), got) = capture_events(|| {
            AuthReloaded {
                keys: 4,
                aircraft: 12,
                at_unix_secs: 1_700_000_000.0,
            }
            .emit()
        });
        assert_eq!(got.counter(m::AUTH_RELOADS_TOTAL, &[]), 1);
        assert_eq!(got.gauge(m::AUTH_KEYS, &[]), Some(4.0));
        assert_eq!(got.gauge(m::AUTH_AIRCRAFT, &[]), Some(12.0));
        assert_eq!(
            got.gauge(m::AUTH_LAST_RELOAD_TIMESTAMP_SECONDS, &[]),
            Some(1_700_000_000.0)
        );
        assert_eq!(got.lines_with("cache reloaded").len(), 1, "{}", got.log());
    }
}
