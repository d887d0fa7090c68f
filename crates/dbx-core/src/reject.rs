//! The protocol's error and nack codes (docs/protocol.md, "Error and nack codes"), and a rejection that
//! carries one with its human-readable message.

use std::fmt;

/// Every `code` the server may put in an `error` or `nack` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// error: not a MessagePack map, trailing bytes, zero length.
    BadFrame,
    /// error: the length prefix is above `max_frame_bytes`.
    FrameTooLarge,
    /// error: no `hello` within `handshake_timeout`.
    HandshakeTimeout,
    /// error: missing, unknown or revoked key, or inactive organization.
    Unauthorized,
    /// error: `hello.v` is not a version this server speaks.
    UnsupportedVersion,
    /// error: nothing received for `idle_timeout`.
    IdleTimeout,
    /// error: a message out of order or malformed at the session level.
    Protocol,
    /// error: the daemon is shutting down.
    ServerShutdown,
    /// error: the connection limit is reached (a choice the contract left open; see docs/protocol.md).
    TooManyConnections,
    /// nack: a missing or mistyped key in the batch, empty or oversized `points`.
    InvalidBatch,
    /// nack: a point failing validation.
    InvalidPoint,
    /// nack: aircraft not registered to this organization.
    UnknownAircraft,
    /// nack: the session belongs to another organization or aircraft.
    ForeignSession,
    /// nack: a timestamp outside the accepted window.
    OutOfRange,
    /// nack: the database rejected the batch for a data reason (not transient).
    Rejected,
    /// nack (protocol 1.1): the flight session is completed (by the gateway's `end` or
    /// the idle timeout) and the batch carries points that are not stored yet.
    SessionClosed,
}

impl RejectCode {
    /// The code as it appears on the wire and in metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectCode::BadFrame => "bad_frame",
            RejectCode::FrameTooLarge => "frame_too_large",
            RejectCode::HandshakeTimeout => "handshake_timeout",
            RejectCode::Unauthorized => "unauthorized",
            RejectCode::UnsupportedVersion => "unsupported_version",
            RejectCode::IdleTimeout => "idle_timeout",
            RejectCode::Protocol => "protocol",
            RejectCode::ServerShutdown => "server_shutdown",
            RejectCode::TooManyConnections => "too_many_connections",
            RejectCode::InvalidBatch => "invalid_batch",
            RejectCode::InvalidPoint => "invalid_point",
            RejectCode::UnknownAircraft => "unknown_aircraft",
            RejectCode::ForeignSession => "foreign_session",
            RejectCode::OutOfRange => "out_of_range",
            RejectCode::Rejected => "rejected",
            RejectCode::SessionClosed => "session_closed",
        }
    }

    /// Parses a wire code; `None` for a code this version does not know.
    pub fn parse(s: &str) -> Option<Self> {
        const ALL: [RejectCode; 16] = [
            RejectCode::BadFrame,
            RejectCode::FrameTooLarge,
            RejectCode::HandshakeTimeout,
            RejectCode::Unauthorized,
            RejectCode::UnsupportedVersion,
            RejectCode::IdleTimeout,
            RejectCode::Protocol,
            RejectCode::ServerShutdown,
            RejectCode::TooManyConnections,
            RejectCode::InvalidBatch,
            RejectCode::InvalidPoint,
            RejectCode::UnknownAircraft,
            RejectCode::ForeignSession,
            RejectCode::OutOfRange,
            RejectCode::Rejected,
            RejectCode::SessionClosed,
        ];
        ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// True for codes answered with a `nack` (the connection stays open).
    pub const fn is_nack(self) -> bool {
        matches!(
            self,
            RejectCode::InvalidBatch
                | RejectCode::InvalidPoint
                | RejectCode::UnknownAircraft
                | RejectCode::ForeignSession
                | RejectCode::OutOfRange
                | RejectCode::Rejected
                | RejectCode::SessionClosed
        )
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejection: a code, a sentence naming what was wrong and where, and for
/// `invalid_point` / `out_of_range` the index of the first bad point.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {msg}")]
pub struct Rejection {
    /// The protocol code.
    pub code: RejectCode,
    /// Human-readable sentence for the `msg` key.
    pub msg: String,
    /// The first bad point, counted from 0, when one point is to blame.
    pub index: Option<u32>,
}

impl Rejection {
    /// A rejection that blames no particular point.
    pub fn new(code: RejectCode, msg: impl Into<String>) -> Self {
        Rejection {
            code,
            msg: msg.into(),
            index: None,
        }
    }

    /// A rejection that blames the point at `index`.
    pub fn at(code: RejectCode, index: usize, msg: impl Into<String>) -> Self {
        Rejection {
            code,
            msg: msg.into(),
            index: Some(index as u32),
        }
    }
}
