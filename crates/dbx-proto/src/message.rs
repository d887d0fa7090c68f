//! The protocol messages, and decoding them from one frame body (or one UDP datagram).
//!
//! [`decode_client`] turns a TCP frame body into a [`ClientMessage`] or a
//! [`DecodeError`] that says whether the answer is a connection-level `error` or a
//! `nack` of one batch. [`decode_hello`] decodes the first frame (before `welcome`),
//! reading only the hello keys. [`open_datagram`] and [`DatagramEnvelope::decode`] do
//! the same for UDP, where there is no answer. [`decode_server`] is the client side's
//! decoder of server frames.
//!
//! Precedence when a frame breaks several rules: `bad_frame` (not exactly one
//! well-formed map with string keys) first, then connection-level codes, then the
//! batch's own `invalid_batch` (in the order `aircraft`, `session`, `points`), then the
//! first bad point.
//!
//! Choices stated in docs/protocol.md (mirrored in the crate docs):
//! - A `batch` whose `seq` is missing or not an unsigned 64-bit integer cannot be
//!   nacked (a nack echoes `seq`, and `ack` is cumulative), so it is the
//!   connection-level `error protocol`.
//! - `hello`: `v` missing or not an unsigned integer is `unsupported_version` (the
//!   decoder does not compare `v` with [`PROTOCOL_VERSION`]: the listener does);
//!   `key` missing or not a UTF-8 string is `unauthorized`; `gateway` that is not a
//!   string (or `nil`), longer than 64 characters, or holding a NUL is `protocol`.
//! - A defined key that appears twice in one message is `protocol` (`t`, `seq`, and
//!   the `hello` keys) or `invalid_batch` (`aircraft`, `session`, `points`).
//! - `aircraft`: a string that parses as a UUID (any form `uuid` accepts) or 16-byte
//!   binary is an aircraft id; any other non-empty string without NUL is a
//!   registration number. `session`: a UUID string or 16-byte binary.
//! - UDP: a datagram over 65 507 bytes is `frame_too_large`; `seq` may be absent or
//!   `nil`; `t`, when present, must be the string `"batch"` (else `protocol`).
//!
//! Version 1.1 (docs/protocol.md, "Version 1.1 hardening"):
//! - Before `welcome` the listener calls [`decode_hello`], which reads only `t`, `v`,
//!   `key` and `gateway` and steps over every other value without interpreting it
//!   (the walk is iterative and linear in the bytes); any `t` but `hello` is
//!   `protocol` without looking further.
//! - `aircraft` as a registration number is at most [`MAX_REGISTRATION_CHARS`]
//!   characters, else `invalid_batch`; messages quote at most 40 characters of any
//!   value from the wire.
//! - UDP is read in two steps: [`open_datagram`] finds how the datagram authenticates
//!   (the clear `key`, or `kid`/`mac`/`body`) without decoding any point, and only once
//!   the listener has checked that does [`DatagramEnvelope::decode`] decode the batch.
//!   Anything wrong with the authentication keys themselves (`kid` not 16 hex digits,
//!   `mac` not 16 bytes of binary, `body` not binary, one of the three missing or
//!   twice) is `unauthorized`; `key` together with any of them is `protocol`. In the
//!   MAC form only `kid`, `mac`, `body` and `t` of the outer map are read; the batch
//!   keys come from `body` alone, where `key`, `kid`, `mac` and `body` are ignored.

use dbx_core::{Point, RejectCode, Rejection};
use uuid::Uuid;

use crate::point::decode_points;
use crate::reader::{Malformed, Reader, Token};
use crate::Limits;

/// The protocol version this crate speaks (`hello.v`, `welcome.v`).
pub const PROTOCOL_VERSION: u64 = 1;

/// Longest `gateway` text accepted in `hello`, in characters.
pub const MAX_GATEWAY_CHARS: usize = 64;

/// Largest UDP datagram accepted, in bytes.
pub const MAX_DATAGRAM_BYTES: usize = 65_507;

/// Longest `aircraft` registration number accepted, in characters (docs/protocol.md, 1.1).
pub const MAX_REGISTRATION_CHARS: usize = 20;

/// A message from a gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// `hello`: authenticate.
    Hello(Hello),
    /// `batch`: telemetry of one aircraft in one flight session.
    Batch(Batch),
    /// `ping`: keep-alive, answered with `pong`.
    Ping,
    /// `bye`: graceful end.
    Bye,
    /// `end` (protocol 1.1): the flight session is over.
    End(End),
}

/// The `hello` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the client speaks (the listener answers `unsupported_version`
    /// unless it is [`PROTOCOL_VERSION`]).
    pub v: u64,
    /// The API key, in clear; only its SHA-256 is ever compared or stored.
    pub key: String,
    /// Free text naming the gateway, at most 64 characters.
    pub gateway: Option<String>,
}

/// The `batch` message, with its points decoded and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Strictly increasing on the connection; echoed exactly in `ack`/`nack`.
    pub seq: u64,
    /// The aircraft, as the gateway named it.
    pub aircraft: AircraftRef,
    /// The flight session.
    pub session: Uuid,
    /// 1..=`max_points_per_batch` valid points.
    pub points: Vec<Point>,
}

/// The `end` message (protocol 1.1): the gateway ends a flight session. It is
/// acknowledged in the connection's `seq` order like a batch, and shares the batch
/// `seq` space (strictly increasing across both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    /// Strictly increasing on the connection, with the batches; echoed in `ack`/`nack`.
    pub seq: u64,
    /// The flight session that is over.
    pub session: Uuid,
}

/// How a batch names its aircraft.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AircraftRef {
    /// A registration number, resolved within the organization.
    Registration(String),
    /// An aircraft UUID (sent as a UUID string or 16-byte binary).
    Id(Uuid),
}

/// How a UDP datagram says which API key sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramAuth<'a> {
    /// Version 1: the API key itself, in clear (`key`).
    Key(&'a str),
    /// Version 1.1: `kid` (the first 16 hex digits of hex(sha256(key)), as a number),
    /// `mac` (the first 16 bytes of HMAC-SHA256 over `body`, keyed with sha256(key))
    /// and `body` (the MessagePack batch map). See [`crate::mac`].
    Mac {
        /// The key id.
        kid: u64,
        /// The truncated MAC.
        mac: [u8; 16],
        /// The bytes the MAC covers: the batch map.
        body: &'a [u8],
    },
}

/// A datagram whose authentication has been found but whose batch is not decoded yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramEnvelope<'a> {
    /// How it authenticates.
    pub auth: DatagramAuth<'a>,
    /// The map holding the batch keys: the datagram itself, or `body`.
    batch: &'a [u8],
}

/// One UDP datagram's batch, decoded once its sender was authenticated.
#[derive(Debug, Clone, PartialEq)]
pub struct Datagram {
    /// The batch sequence number, when the gateway sent one.
    pub seq: Option<u64>,
    /// The aircraft, as the gateway named it.
    pub aircraft: AircraftRef,
    /// The flight session.
    pub session: Uuid,
    /// 1..=`max_points_per_batch` valid points.
    pub points: Vec<Point>,
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// Handshake accepted.
    Welcome {
        /// Protocol version.
        v: u64,
        /// The organization the key belongs to.
        org: Uuid,
        /// The server's `max_frame_bytes`.
        max_frame: u32,
        /// The server's `max_points_per_batch`.
        max_points: u32,
    },
    /// Every batch with `seq` ≤ this on the connection that was not nacked is durable.
    Ack {
        /// Highest acknowledged batch sequence number.
        seq: u64,
    },
    /// This batch was rejected as a whole.
    Nack {
        /// The rejected batch.
        seq: u64,
        /// Why.
        code: RejectCode,
        /// A sentence naming what was wrong and where.
        msg: String,
        /// The first bad point, counted from 0.
        index: Option<u32>,
    },
    /// Connection-level error; the server closes right after.
    Error {
        /// Why.
        code: RejectCode,
        /// A sentence naming what was wrong.
        msg: String,
    },
    /// Answer to `ping`.
    Pong,
    /// Answer to `bye`.
    Bye,
}

impl ServerMessage {
    /// The `nack` answering a [`DecodeError::Batch`] or a later rejection.
    pub fn nack(seq: u64, rejection: Rejection) -> Self {
        ServerMessage::Nack {
            seq,
            code: rejection.code,
            msg: rejection.msg,
            index: rejection.index,
        }
    }

    /// The `error` frame for a connection-level rejection.
    pub fn error(rejection: Rejection) -> Self {
        ServerMessage::Error {
            code: rejection.code,
            msg: rejection.msg,
        }
    }
}

/// Why a client frame was refused, and so how to answer it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Answer with an `error` frame and close the connection.
    #[error("connection error {0}")]
    Connection(Rejection),
    /// Answer with a `nack` for `seq`; the connection stays open.
    #[error("nack of batch {seq}: {rejection}")]
    Batch {
        /// The batch's `seq`, echoed in the nack.
        seq: u64,
        /// Code, message and index of the first bad point.
        rejection: Rejection,
    },
}

impl DecodeError {
    /// The rejection, whichever kind of answer it calls for.
    pub fn rejection(&self) -> &Rejection {
        match self {
            DecodeError::Connection(r) => r,
            DecodeError::Batch { rejection, .. } => rejection,
        }
    }

    /// The server frame that answers this error.
    pub fn to_server_message(&self) -> ServerMessage {
        match self {
            DecodeError::Connection(r) => ServerMessage::error(r.clone()),
            DecodeError::Batch { seq, rejection } => ServerMessage::nack(*seq, rejection.clone()),
        }
    }
}

// Bits of the defined top-level keys, for duplicate detection.
const K_T: u16 = 1 << 0;
const K_V: u16 = 1 << 1;
const K_KEY: u16 = 1 << 2;
const K_GATEWAY: u16 = 1 << 3;
const K_SEQ: u16 = 1 << 4;
const K_AIRCRAFT: u16 = 1 << 5;
const K_SESSION: u16 = 1 << 6;
const K_POINTS: u16 = 1 << 7;
const K_KID: u16 = 1 << 8;
const K_MAC: u16 = 1 << 9;
const K_BODY: u16 = 1 << 10;

/// The top-level entries of a client frame: scalar values as tokens, `points`
/// decoded (when the message may be a batch).
#[derive(Default)]
struct Top<'a> {
    seen: u16,
    dup: u16,
    t: Option<Token<'a>>,
    v: Option<Token<'a>>,
    key: Option<Token<'a>>,
    gateway: Option<Token<'a>>,
    seq: Option<Token<'a>>,
    aircraft: Option<Token<'a>>,
    session: Option<Token<'a>>,
    kid: Option<Token<'a>>,
    mac: Option<Token<'a>>,
    body: Option<Token<'a>>,
    /// The decoded points (only when the scan was asked to decode them).
    points: Option<Result<Vec<Point>, Rejection>>,
}

fn bad_frame(msg: impl Into<String>) -> Rejection {
    Rejection::new(RejectCode::BadFrame, msg)
}

fn malformed(_: Malformed) -> Rejection {
    bad_frame(
        "the frame body is not well-formed MessagePack (it ends inside a value or holds the reserved byte 0xc1)",
    )
}

/// Walks the top-level map once: checks it is exactly one map with string keys and
/// nothing after it, and collects the defined keys. Errors are `bad_frame`.
/// `decode` = `Some((limits, now))` decodes `points` on the way (when the message may
/// be a batch); `None` steps over every value it does not keep, points included.
fn scan<'a>(body: &'a [u8], decode: Option<(&Limits, i64)>) -> Result<Top<'a>, Rejection> {
    if body.is_empty() {
        return Err(bad_frame("the frame body is empty"));
    }
    let mut r = Reader::new(body);
    let n = match r.next().map_err(malformed)? {
        Token::Map(n) => n,
        other => {
            return Err(bad_frame(format!(
                "the frame body is {other}, not a MessagePack map"
            )))
        }
    };
    let mut top = Top::default();
    for i in 0..n {
        let key = match r.next().map_err(malformed)? {
            Token::Str(k) => k,
            other => {
                return Err(bad_frame(format!(
                    "top-level key {i} is {other}; keys must be strings"
                )))
            }
        };
        let bit = match key {
            b"t" => K_T,
            b"v" => K_V,
            b"key" => K_KEY,
            b"gateway" => K_GATEWAY,
            b"seq" => K_SEQ,
            b"aircraft" => K_AIRCRAFT,
            b"session" => K_SESSION,
            b"points" => K_POINTS,
            b"kid" => K_KID,
            b"mac" => K_MAC,
            b"body" => K_BODY,
            _ => 0,
        };
        let first = bit != 0 && top.seen & bit == 0;
        top.seen |= bit;
        if bit != 0 && !first {
            top.dup |= bit;
        }
        if let Some((limits, now_micros)) = decode {
            if bit == K_POINTS && first && top.t.is_none_or(|t| t == Token::Str(b"batch")) {
                top.points = Some(decode_points(&mut r, limits, now_micros).map_err(malformed)?);
                continue;
            }
        }
        let value = r.value().map_err(malformed)?;
        if !first {
            continue;
        }
        let slot = match bit {
            K_T => &mut top.t,
            K_V => &mut top.v,
            K_KEY => &mut top.key,
            K_GATEWAY => &mut top.gateway,
            K_SEQ => &mut top.seq,
            K_AIRCRAFT => &mut top.aircraft,
            K_SESSION => &mut top.session,
            K_KID => &mut top.kid,
            K_MAC => &mut top.mac,
            K_BODY => &mut top.body,
            _ => continue,
        };
        *slot = Some(value);
    }
    if r.remaining() > 0 {
        return Err(bad_frame(format!(
            "the frame body has {} trailing bytes after the map",
            r.remaining()
        )));
    }
    Ok(top)
}

fn protocol(msg: impl Into<String>) -> Rejection {
    Rejection::new(RejectCode::Protocol, msg)
}

fn invalid_batch(msg: impl Into<String>) -> Rejection {
    Rejection::new(RejectCode::InvalidBatch, msg)
}

fn dup_name(dup: u16) -> &'static str {
    const NAMES: [(u16, &str); 11] = [
        (K_T, "t"),
        (K_V, "v"),
        (K_KEY, "key"),
        (K_GATEWAY, "gateway"),
        (K_SEQ, "seq"),
        (K_AIRCRAFT, "aircraft"),
        (K_SESSION, "session"),
        (K_POINTS, "points"),
        (K_KID, "kid"),
        (K_MAC, "mac"),
        (K_BODY, "body"),
    ];
    NAMES
        .iter()
        .find(|(b, _)| dup & b != 0)
        .map_or("?", |(_, n)| n)
}

/// Decodes one TCP frame body from a gateway.
///
/// `now_micros` is the server's clock (microseconds since the epoch), for the
/// timestamp window of [`Limits`].
pub fn decode_client(
    body: &[u8],
    limits: &Limits,
    now_micros: i64,
) -> Result<ClientMessage, DecodeError> {
    let top = scan(body, Some((limits, now_micros))).map_err(DecodeError::Connection)?;
    let conn = |r: Rejection| Err(DecodeError::Connection(r));
    let t = message_type(&top).map_err(DecodeError::Connection)?;
    match t {
        b"hello" => hello_keys(&top)
            .map(ClientMessage::Hello)
            .map_err(DecodeError::Connection),
        b"batch" => decode_batch(top),
        b"ping" => Ok(ClientMessage::Ping),
        b"bye" => Ok(ClientMessage::Bye),
        b"end" => decode_end(&top),
        _ => conn(protocol(format!(
            "t = {} is not a client message type (hello, batch, end, ping, bye)",
            Token::Str(t)
        ))),
    }
}

/// The message type `t` of a scanned frame: `protocol` when it is missing, twice or
/// not a string.
fn message_type<'a>(top: &Top<'a>) -> Result<&'a [u8], Rejection> {
    if top.dup & K_T != 0 {
        return Err(protocol("key t appears twice in the message"));
    }
    match top.t {
        None => Err(protocol("the message has no key t naming its type")),
        Some(Token::Str(t)) => Ok(t),
        Some(other) => Err(protocol(format!(
            "t = {other} is not a string naming a message type"
        ))),
    }
}

/// Decodes the first frame of a connection, before `welcome` (docs/protocol.md, 1.1): only
/// `t`, `v`, `key` and `gateway` are read; every other value is stepped over without
/// being interpreted (so `points` in a hello costs a linear walk, nothing more), and a
/// frame whose `t` is not `hello` is `protocol` without looking at anything else.
/// The frame must still be exactly one well-formed map (`bad_frame`).
pub fn decode_hello(body: &[u8]) -> Result<Hello, Rejection> {
    let top = scan(body, None)?;
    match message_type(&top)? {
        b"hello" => hello_keys(&top),
        t @ (b"batch" | b"ping" | b"bye") => Err(protocol(format!(
            "expected hello as the first frame, got {}",
            String::from_utf8_lossy(t)
        ))),
        t => Err(protocol(format!(
            "t = {} is not a client message type (hello, batch, ping, bye)",
            Token::Str(t)
        ))),
    }
}

/// The `hello` keys of a scanned frame.
fn hello_keys(top: &Top<'_>) -> Result<Hello, Rejection> {
    let dup = top.dup & (K_V | K_KEY | K_GATEWAY);
    if dup != 0 {
        return Err(protocol(format!(
            "hello: key {} appears twice",
            dup_name(dup)
        )));
    }
    let v = match top.v {
        Some(Token::UInt(v)) => v,
        Some(other) => {
            return Err(Rejection::new(
                RejectCode::UnsupportedVersion,
                format!(
                    "hello: v = {other} is not a protocol version; this server speaks version {PROTOCOL_VERSION}"
                ),
            ))
        }
        None => {
            return Err(Rejection::new(
                RejectCode::UnsupportedVersion,
                format!("hello: key v is missing; this server speaks version {PROTOCOL_VERSION}"),
            ))
        }
    };
    let gateway = match top.gateway {
        None | Some(Token::Nil) => None,
        Some(tok) => {
            let s = tok
                .as_str()
                .ok_or_else(|| protocol(format!("hello: gateway = {tok} is not a UTF-8 string")))?;
            let chars = s.chars().count();
            if chars > MAX_GATEWAY_CHARS {
                return Err(protocol(format!(
                    "hello: gateway is {chars} characters long; at most {MAX_GATEWAY_CHARS} are allowed"
                )));
            }
            if s.contains('\0') {
                return Err(protocol("hello: gateway contains a NUL character (U+0000)"));
            }
            Some(s.to_owned())
        }
    };
    let key = match top.key.as_ref().and_then(Token::as_str) {
        Some(k) => k.to_owned(),
        None => return Err(unauthorized("hello: key is missing or not a string")),
    };
    Ok(Hello { v, key, gateway })
}

/// The `seq` of a message that is acknowledged (`batch`, `end`): without a valid
/// one it cannot be nacked, so a bad `seq` is the connection-level `protocol`.
fn acked_seq(top: &Top<'_>, what: &str) -> Result<u64, DecodeError> {
    let conn = |r: Rejection| Err(DecodeError::Connection(r));
    if top.dup & K_SEQ != 0 {
        return conn(protocol(format!("{what}: key seq appears twice")));
    }
    match top.seq {
        Some(Token::UInt(s)) => Ok(s),
        Some(other) => conn(protocol(format!(
            "{what}: seq = {other} is not an unsigned 64-bit integer, so the {what} cannot be acknowledged"
        ))),
        None => conn(protocol(format!(
            "{what}: key seq is missing, so the {what} cannot be acknowledged"
        ))),
    }
}

fn decode_batch(top: Top<'_>) -> Result<ClientMessage, DecodeError> {
    let seq = acked_seq(&top, "batch")?;
    batch_body(top, "batch")
        .map(|(aircraft, session, points)| {
            ClientMessage::Batch(Batch {
                seq,
                aircraft,
                session,
                points,
            })
        })
        .map_err(|rejection| DecodeError::Batch { seq, rejection })
}

/// `end`: `seq` as for a batch; a missing, repeated or malformed `session` is
/// `invalid_batch` (nacked: the `seq` is known). Other keys are ignored.
fn decode_end(top: &Top<'_>) -> Result<ClientMessage, DecodeError> {
    let seq = acked_seq(top, "end")?;
    let nack = |msg: String| DecodeError::Batch {
        seq,
        rejection: invalid_batch(msg),
    };
    if top.dup & K_SESSION != 0 {
        return Err(nack("end: key session appears twice".into()));
    }
    let session = session_value(top.session, "end").map_err(|r| nack(r.msg))?;
    Ok(ClientMessage::End(End { seq, session }))
}

/// The `session` key of a batch, datagram or end: a UUID string or 16-byte binary.
fn session_value(tok: Option<Token<'_>>, what: &str) -> Result<Uuid, Rejection> {
    match tok {
        Some(tok) => uuid_value(tok).ok_or_else(|| {
            invalid_batch(format!(
                "{what}: session = {tok} is not a UUID (string or 16-byte binary)"
            ))
        }),
        None => Err(invalid_batch(format!("{what}: key session is missing"))),
    }
}

/// The nack-level part of a batch (or datagram): aircraft, session, points.
fn batch_body(top: Top<'_>, what: &str) -> Result<(AircraftRef, Uuid, Vec<Point>), Rejection> {
    let dup = top.dup & (K_AIRCRAFT | K_SESSION | K_POINTS);
    if dup != 0 {
        return Err(invalid_batch(format!(
            "{what}: key {} appears twice",
            dup_name(dup)
        )));
    }
    let aircraft = match top.aircraft {
        Some(tok) => aircraft_ref(tok, what)?,
        None => return Err(invalid_batch(format!("{what}: key aircraft is missing"))),
    };
    let session = session_value(top.session, what)?;
    let points = match top.points {
        Some(p) => p?,
        None => return Err(invalid_batch(format!("{what}: key points is missing"))),
    };
    Ok((aircraft, session, points))
}

fn uuid_value(tok: Token<'_>) -> Option<Uuid> {
    match tok {
        Token::Str(_) => Uuid::try_parse(tok.as_str()?).ok(),
        Token::Bin(b) => Uuid::from_slice(b).ok(),
        _ => None,
    }
}

fn aircraft_ref(tok: Token<'_>, what: &str) -> Result<AircraftRef, Rejection> {
    if let Some(id) = uuid_value(tok) {
        return Ok(AircraftRef::Id(id));
    }
    let bad = |why: &str| invalid_batch(format!("{what}: aircraft = {tok} {why}"));
    match tok {
        Token::Str(_) => {
            let s = tok.as_str().ok_or_else(|| bad("is not valid UTF-8"))?;
            let chars = s.chars().count();
            if s.is_empty() {
                Err(bad(
                    "is empty; it must be a registration number or an aircraft UUID",
                ))
            } else if chars > MAX_REGISTRATION_CHARS {
                Err(bad(&format!(
                    "is a registration number of {chars} characters; at most {MAX_REGISTRATION_CHARS} are allowed"
                )))
            } else if s.contains('\0') {
                Err(bad("contains a NUL character (U+0000)"))
            } else {
                Ok(AircraftRef::Registration(s.to_owned()))
            }
        }
        Token::Bin(_) => Err(bad("is not a 16-byte UUID")),
        _ => Err(bad("is neither a registration number nor an aircraft UUID")),
    }
}

/// Opens one UDP datagram: checks its size and that it is one well-formed map, and
/// finds how it authenticates, without decoding any point. The batch is decoded by
/// [`DatagramEnvelope::decode`] once the sender is known.
pub fn open_datagram(buf: &[u8]) -> Result<DatagramEnvelope<'_>, Rejection> {
    if buf.len() > MAX_DATAGRAM_BYTES {
        return Err(Rejection::new(
            RejectCode::FrameTooLarge,
            format!(
                "the datagram is {} bytes; at most {MAX_DATAGRAM_BYTES} are allowed",
                buf.len()
            ),
        ));
    }
    let top = scan(buf, None)?;
    standalone_type(&top, "datagram")?;
    let mac_keys = top.seen & (K_KID | K_MAC | K_BODY);
    if mac_keys != 0 && top.seen & K_KEY != 0 {
        return Err(protocol(
            "datagram: carries both key and kid/mac/body; use one form",
        ));
    }
    if mac_keys == 0 {
        if top.dup & K_KEY != 0 {
            return Err(invalid_batch("datagram: key key appears twice"));
        }
        return match top.key.as_ref().and_then(Token::as_str) {
            Some(k) => Ok(DatagramEnvelope {
                auth: DatagramAuth::Key(k),
                batch: buf,
            }),
            None => Err(unauthorized("datagram: key is missing or not a string")),
        };
    }
    let auth = mac_auth(&top)?;
    let body = match auth {
        DatagramAuth::Mac { body, .. } => body,
        DatagramAuth::Key(_) => unreachable!("mac_auth builds the MAC form"),
    };
    Ok(DatagramEnvelope { auth, batch: body })
}

fn unauthorized(msg: impl Into<String>) -> Rejection {
    Rejection::new(RejectCode::Unauthorized, msg)
}

/// The `kid`/`mac`/`body` form; anything wrong with them is `unauthorized`.
fn mac_auth<'a>(top: &Top<'a>) -> Result<DatagramAuth<'a>, Rejection> {
    if top.dup & (K_KID | K_MAC | K_BODY) != 0 {
        return Err(unauthorized(format!(
            "datagram: key {} appears twice",
            dup_name(top.dup & (K_KID | K_MAC | K_BODY))
        )));
    }
    let kid = top
        .kid
        .as_ref()
        .and_then(Token::as_str)
        .filter(|k| k.len() == 16)
        .and_then(|k| u64::from_str_radix(k, 16).ok())
        .ok_or_else(|| unauthorized("datagram: kid is missing or not 16 hex digits"))?;
    let mac = match top.mac {
        Some(Token::Bin(m)) => <[u8; 16]>::try_from(m).ok(),
        _ => None,
    }
    .ok_or_else(|| unauthorized("datagram: mac is missing or not 16 bytes of binary"))?;
    let body = match top.body {
        Some(Token::Bin(b)) => b,
        _ => return Err(unauthorized("datagram: body is missing or not binary")),
    };
    Ok(DatagramAuth::Mac { kid, mac, body })
}

impl DatagramEnvelope<'_> {
    /// Bytes of the map holding the batch (for the decoder's memory bound).
    pub fn batch_len(&self) -> usize {
        self.batch.len()
    }

    /// Decodes the batch: the `batch` keys, `seq` optional, validated like a TCP batch.
    pub fn decode(&self, limits: &Limits, now_micros: i64) -> Result<Datagram, Rejection> {
        let top = scan(self.batch, Some((limits, now_micros)))?;
        standalone_type(&top, "datagram")?;
        if top.dup & K_SEQ != 0 {
            return Err(invalid_batch("datagram: key seq appears twice"));
        }
        let seq = optional_seq(&top, "datagram")?;
        let (aircraft, session, points) = batch_body(top, "datagram")?;
        Ok(Datagram {
            seq,
            aircraft,
            session,
            points,
        })
    }
}

/// `t` of a map that carries one batch outside a TCP connection (UDP, MQTT): absent,
/// or the string `"batch"`.
fn standalone_type(top: &Top<'_>, what: &str) -> Result<(), Rejection> {
    if top.dup & K_T != 0 {
        return Err(protocol(format!("{what}: key t appears twice")));
    }
    match top.t {
        None | Some(Token::Str(b"batch")) => Ok(()),
        Some(other) => Err(protocol(format!(
            "{what}: t = {other}; a {what} can only carry a batch"
        ))),
    }
}

/// The optional `seq` of such a map: absent, `nil`, or an unsigned 64-bit integer.
fn optional_seq(top: &Top<'_>, what: &str) -> Result<Option<u64>, Rejection> {
    match top.seq {
        None | Some(Token::Nil) => Ok(None),
        Some(Token::UInt(s)) => Ok(Some(s)),
        Some(other) => Err(invalid_batch(format!(
            "{what}: seq = {other} is not an unsigned 64-bit integer"
        ))),
    }
}

/// A `batch` map that arrived without a connection around it (an MQTT message): the
/// organization and the aircraft come from where it arrived (the topic), not from a key.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchMap {
    /// The batch sequence number, when the map has one (informational: duplicates are
    /// dropped by the points' own `(session, seq)`).
    pub seq: Option<u64>,
    /// The aircraft, when the map names one (the input checks that it agrees with the
    /// aircraft it learnt elsewhere).
    pub aircraft: Option<AircraftRef>,
    /// The flight session.
    pub session: Uuid,
    /// 1..=`max_points_per_batch` valid points.
    pub points: Vec<Point>,
}

/// Decodes a MessagePack `batch` map carried as a message payload by an input without
/// connections (MQTT): the keys, limits and point rules of a TCP `batch`, with `t`
/// optional (when present it must be `"batch"`), `seq` optional and `aircraft`
/// optional. A payload over `limits.max_frame_bytes` is `frame_too_large`; one that is
/// not exactly one MessagePack map with string keys is `bad_frame`; the rest as for a
/// TCP batch (`invalid_batch`, `invalid_point` with its index, `out_of_range`).
pub fn decode_batch_map(
    buf: &[u8],
    limits: &Limits,
    now_micros: i64,
) -> Result<BatchMap, Rejection> {
    check_payload_size(buf.len(), limits)?;
    decode_batch_map_unbounded(buf, limits, now_micros)
}

/// A payload is at most `max_frame_bytes` long, like a TCP frame body.
pub(crate) fn check_payload_size(len: usize, limits: &Limits) -> Result<(), Rejection> {
    if len > limits.max_frame_bytes {
        return Err(Rejection::new(
            RejectCode::FrameTooLarge,
            format!(
                "the payload is {len} bytes; at most {} are allowed",
                limits.max_frame_bytes
            ),
        ));
    }
    Ok(())
}

/// [`decode_batch_map`] without the size check (the JSON path checks the size of the
/// JSON text, not of the MessagePack it becomes).
pub(crate) fn decode_batch_map_unbounded(
    buf: &[u8],
    limits: &Limits,
    now_micros: i64,
) -> Result<BatchMap, Rejection> {
    let mut top = scan(buf, Some((limits, now_micros)))?;
    standalone_type(&top, "payload")?;
    if top.dup & K_SEQ != 0 {
        return Err(invalid_batch("payload: key seq appears twice"));
    }
    let seq = optional_seq(&top, "payload")?;
    let named = top.aircraft.is_some();
    // batch_body wants an aircraft: a placeholder stands in for an absent one and is
    // dropped below, so that every other rule is checked by the same code as TCP's.
    top.aircraft.get_or_insert(Token::Str(b"-"));
    let (aircraft, session, points) = batch_body(top, "payload")?;
    Ok(BatchMap {
        seq,
        aircraft: named.then_some(aircraft),
        session,
        points,
    })
}

/// Parses an aircraft named outside a message (a level of an MQTT topic) with the
/// rules of the `aircraft` key: a UUID is an id, any other non-empty string without
/// NUL a registration number. `what` names the place in the rejection message.
pub fn parse_aircraft(s: &str, what: &str) -> Result<AircraftRef, Rejection> {
    aircraft_ref(Token::Str(s.as_bytes()), what)
}

/// Why a server frame could not be decoded (client side).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerDecodeError {
    /// Not exactly one well-formed MessagePack map with string keys.
    #[error("malformed server frame: {0}")]
    Malformed(String),
    /// A key the message type requires is missing or has the wrong type.
    #[error("server message {t}: key {key} is missing or mistyped")]
    BadKey {
        /// The message type.
        t: String,
        /// The key.
        key: &'static str,
    },
    /// `t` names no server message this crate knows.
    #[error("unknown server message type {0:?}")]
    UnknownType(String),
    /// `code` is not a code this crate knows.
    #[error("unknown code {0:?}")]
    UnknownCode(String),
}

/// Decodes one server frame body (for clients: the loadgen, tests, Rust gateways).
pub fn decode_server(body: &[u8]) -> Result<ServerMessage, ServerDecodeError> {
    let m = |s: &str| ServerDecodeError::Malformed(s.to_owned());
    let mut r = Reader::new(body);
    let n = match r.next() {
        Ok(Token::Map(n)) => n,
        Ok(_) => return Err(m("not a map")),
        Err(_) => return Err(m("not well-formed MessagePack")),
    };
    let mut fields: [Option<Token<'_>>; 9] = [None; 9];
    const KEYS: [&str; 9] = [
        "t",
        "v",
        "org",
        "max_frame",
        "max_points",
        "seq",
        "code",
        "msg",
        "index",
    ];
    for _ in 0..n {
        let key = match r.next() {
            Ok(Token::Str(k)) => k,
            Ok(_) => return Err(m("a key is not a string")),
            Err(_) => return Err(m("not well-formed MessagePack")),
        };
        let value = r.value().map_err(|_| m("not well-formed MessagePack"))?;
        if let Some(i) = KEYS.iter().position(|k| k.as_bytes() == key) {
            fields[i] = Some(value);
        }
    }
    if r.remaining() > 0 {
        return Err(m("trailing bytes after the map"));
    }
    let t = fields[0]
        .as_ref()
        .and_then(Token::as_str)
        .ok_or_else(|| m("no string key t"))?;
    let bad = |key: &'static str| ServerDecodeError::BadKey {
        t: t.to_owned(),
        key,
    };
    let uint = |i: usize| match fields[i] {
        Some(Token::UInt(v)) => Ok(v),
        _ => Err(bad(KEYS[i])),
    };
    let u32_at = |i: usize| uint(i).and_then(|v| u32::try_from(v).map_err(|_| bad(KEYS[i])));
    let string = |i: usize| {
        fields[i]
            .as_ref()
            .and_then(Token::as_str)
            .map(str::to_owned)
            .ok_or_else(|| bad(KEYS[i]))
    };
    let code = || {
        let c = string(6)?;
        RejectCode::parse(&c).ok_or(ServerDecodeError::UnknownCode(c))
    };
    Ok(match t {
        "welcome" => ServerMessage::Welcome {
            v: uint(1)?,
            org: fields[2].and_then(uuid_value).ok_or_else(|| bad("org"))?,
            max_frame: u32_at(3)?,
            max_points: u32_at(4)?,
        },
        "ack" => ServerMessage::Ack { seq: uint(5)? },
        "nack" => ServerMessage::Nack {
            seq: uint(5)?,
            code: code()?,
            msg: string(7)?,
            index: match fields[8] {
                None | Some(Token::Nil) => None,
                Some(_) => Some(u32_at(8)?),
            },
        },
        "error" => ServerMessage::Error {
            code: code()?,
            msg: string(7)?,
        },
        "pong" => ServerMessage::Pong,
        "bye" => ServerMessage::Bye,
        other => return Err(ServerDecodeError::UnknownType(other.to_owned())),
    })
}
