//! Encoders for every message: server frames for the daemon, client frames and
//! datagrams for the loadgen, tests and Rust gateways.
//!
//! Encoders write straight into a `BytesMut` and do not validate: a test may encode
//! `lat = 91.5` on purpose to see it refused. TCP encoders write a whole frame (length
//! prefix and body); [`encode_datagram`] writes a bare map. Maps put `t` first, which
//! lets the decoder work in one pass. Timestamps go out as the MessagePack timestamp
//! extension in its smallest exact size (32-bit for whole seconds in 0..2^32, 64-bit for
//! seconds in 0..2^34, 96-bit otherwise) unless [`TimestampForm::Micros`] is asked for.

use bytes::{BufMut, BytesMut};
use dbx_core::Point;
use uuid::Uuid;

pub use crate::message::decode_server;
use crate::message::{AircraftRef, ServerMessage, PROTOCOL_VERSION};

/// How points are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PointForm {
    /// A map with the short keys, present fields only.
    #[default]
    Map,
    /// An array in table order, interior absent fields as `nil`, trailing ones left off.
    Array,
}

/// How point timestamps are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimestampForm {
    /// The MessagePack timestamp extension (type −1), smallest exact size.
    #[default]
    Ext,
    /// An integer: microseconds since the Unix epoch.
    Micros,
}

/// Everything an encoder may vary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EncodeOptions {
    /// Map or array points.
    pub form: PointForm,
    /// Timestamp representation.
    pub timestamps: TimestampForm,
    /// Send `aircraft` ids and `session` as 16-byte binary instead of UUID strings.
    pub uuid_as_bin: bool,
}

impl From<PointForm> for EncodeOptions {
    fn from(form: PointForm) -> Self {
        EncodeOptions {
            form,
            ..EncodeOptions::default()
        }
    }
}

/// Why a batch could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A point's `extra` is not the text of a JSON object.
    #[error("point {index}: extra is not a JSON object: {reason}")]
    InvalidExtra {
        /// The point.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// More points than a MessagePack array can hold.
    #[error("{0} points do not fit one MessagePack array")]
    TooManyPoints(usize),
}

// ---- MessagePack primitives -------------------------------------------------------

fn put_map_len(b: &mut BytesMut, n: u32) {
    if n < 16 {
        b.put_u8(0x80 | n as u8);
    } else if n <= u32::from(u16::MAX) {
        b.put_u8(0xde);
        b.put_u16(n as u16);
    } else {
        b.put_u8(0xdf);
        b.put_u32(n);
    }
}

fn put_array_len(b: &mut BytesMut, n: u32) {
    if n < 16 {
        b.put_u8(0x90 | n as u8);
    } else if n <= u32::from(u16::MAX) {
        b.put_u8(0xdc);
        b.put_u16(n as u16);
    } else {
        b.put_u8(0xdd);
        b.put_u32(n);
    }
}

fn put_str(b: &mut BytesMut, s: &str) {
    let n = s.len();
    if n < 32 {
        b.put_u8(0xa0 | n as u8);
    } else if n <= usize::from(u8::MAX) {
        b.put_u8(0xd9);
        b.put_u8(n as u8);
    } else if n <= usize::from(u16::MAX) {
        b.put_u8(0xda);
        b.put_u16(n as u16);
    } else {
        b.put_u8(0xdb);
        b.put_u32(n as u32);
    }
    b.put_slice(s.as_bytes());
}

fn put_bin(b: &mut BytesMut, data: &[u8]) {
    let n = data.len();
    if n <= usize::from(u8::MAX) {
        b.put_u8(0xc4);
        b.put_u8(n as u8);
    } else if n <= usize::from(u16::MAX) {
        b.put_u8(0xc5);
        b.put_u16(n as u16);
    } else {
        b.put_u8(0xc6);
        b.put_u32(n as u32);
    }
    b.put_slice(data);
}

fn put_uint(b: &mut BytesMut, v: u64) {
    if v < 128 {
        b.put_u8(v as u8);
    } else if v <= u64::from(u8::MAX) {
        b.put_u8(0xcc);
        b.put_u8(v as u8);
    } else if v <= u64::from(u16::MAX) {
        b.put_u8(0xcd);
        b.put_u16(v as u16);
    } else if v <= u64::from(u32::MAX) {
        b.put_u8(0xce);
        b.put_u32(v as u32);
    } else {
        b.put_u8(0xcf);
        b.put_u64(v);
    }
}

fn put_int(b: &mut BytesMut, v: i64) {
    if v >= 0 {
        put_uint(b, v as u64);
    } else if v >= -32 {
        b.put_i8(v as i8);
    } else if v >= i64::from(i8::MIN) {
        b.put_u8(0xd0);
        b.put_i8(v as i8);
    } else if v >= i64::from(i16::MIN) {
        b.put_u8(0xd1);
        b.put_i16(v as i16);
    } else if v >= i64::from(i32::MIN) {
        b.put_u8(0xd2);
        b.put_i32(v as i32);
    } else {
        b.put_u8(0xd3);
        b.put_i64(v);
    }
}

fn put_f64(b: &mut BytesMut, v: f64) {
    b.put_u8(0xcb);
    b.put_f64(v);
}

fn put_f32(b: &mut BytesMut, v: f32) {
    b.put_u8(0xca);
    b.put_f32(v);
}

fn put_nil(b: &mut BytesMut) {
    b.put_u8(0xc0);
}

/// Writes a timestamp extension (type −1) for `micros`, in its smallest exact size.
fn put_ts_ext(b: &mut BytesMut, micros: i64) {
    let secs = micros.div_euclid(1_000_000);
    let nanos = (micros.rem_euclid(1_000_000) * 1000) as u32;
    if nanos == 0 && (0..1 << 32).contains(&secs) {
        b.put_u8(0xd6);
        b.put_i8(-1);
        b.put_u32(secs as u32);
    } else if (0..1 << 34).contains(&secs) {
        b.put_u8(0xd7);
        b.put_i8(-1);
        b.put_u64((u64::from(nanos) << 34) | secs as u64);
    } else {
        b.put_u8(0xc7);
        b.put_u8(12);
        b.put_i8(-1);
        b.put_u32(nanos);
        b.put_i64(secs);
    }
}

fn put_ts(b: &mut BytesMut, micros: i64, form: TimestampForm) {
    match form {
        TimestampForm::Ext => put_ts_ext(b, micros),
        TimestampForm::Micros => put_int(b, micros),
    }
}

fn put_uuid(b: &mut BytesMut, id: &Uuid, as_bin: bool) {
    if as_bin {
        put_bin(b, id.as_bytes());
    } else {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        put_str(b, id.hyphenated().encode_lower(&mut buf));
    }
}

fn put_json(b: &mut BytesMut, v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Null => put_nil(b),
        Value::Bool(x) => b.put_u8(if *x { 0xc3 } else { 0xc2 }),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                put_uint(b, u);
            } else if let Some(i) = n.as_i64() {
                put_int(b, i);
            } else {
                put_f64(b, n.as_f64().unwrap_or(f64::NAN));
            }
        }
        Value::String(s) => put_str(b, s),
        Value::Array(a) => {
            put_array_len(b, a.len() as u32);
            a.iter().for_each(|x| put_json(b, x));
        }
        Value::Object(m) => {
            put_map_len(b, m.len() as u32);
            for (k, x) in m {
                put_str(b, k);
                put_json(b, x);
            }
        }
    }
}

/// Runs `body`, and on error takes back what it appended: an encoder either appends a
/// whole message or nothing.
fn all_or_nothing<T, E>(
    b: &mut BytesMut,
    body: impl FnOnce(&mut BytesMut) -> Result<T, E>,
) -> Result<T, E> {
    let start = b.len();
    let out = body(b);
    if out.is_err() {
        b.truncate(start);
    }
    out
}

/// Runs `body` between a placeholder length prefix and its patch-up.
fn framed<R>(b: &mut BytesMut, body: impl FnOnce(&mut BytesMut) -> R) -> R {
    let start = b.len();
    b.put_u32(0);
    let out = body(b);
    let len = (b.len() - start - 4) as u32;
    b[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out
}

// ---- server messages ----------------------------------------------------------------

/// Appends `msg` as one frame (prefix and map).
pub fn encode_server(msg: &ServerMessage, b: &mut BytesMut) {
    framed(b, |b| match msg {
        ServerMessage::Welcome {
            v,
            org,
            max_frame,
            max_points,
        } => {
            put_map_len(b, 5);
            put_str(b, "t");
            put_str(b, "welcome");
            put_str(b, "v");
            put_uint(b, *v);
            put_str(b, "org");
            put_uuid(b, org, false);
            put_str(b, "max_frame");
            put_uint(b, u64::from(*max_frame));
            put_str(b, "max_points");
            put_uint(b, u64::from(*max_points));
        }
        ServerMessage::Ack { seq } => {
            put_map_len(b, 2);
            put_str(b, "t");
            put_str(b, "ack");
            put_str(b, "seq");
            put_uint(b, *seq);
        }
        ServerMessage::Nack {
            seq,
            code,
            msg,
            index,
        } => {
            put_map_len(b, if index.is_some() { 5 } else { 4 });
            put_str(b, "t");
            put_str(b, "nack");
            put_str(b, "seq");
            put_uint(b, *seq);
            put_str(b, "code");
            put_str(b, code.as_str());
            put_str(b, "msg");
            put_str(b, msg);
            if let Some(i) = index {
                put_str(b, "index");
                put_uint(b, u64::from(*i));
            }
        }
        ServerMessage::Error { code, msg } => {
            put_map_len(b, 3);
            put_str(b, "t");
            put_str(b, "error");
            put_str(b, "code");
            put_str(b, code.as_str());
            put_str(b, "msg");
            put_str(b, msg);
        }
        ServerMessage::Pong => {
            put_map_len(b, 1);
            put_str(b, "t");
            put_str(b, "pong");
        }
        ServerMessage::Bye => {
            put_map_len(b, 1);
            put_str(b, "t");
            put_str(b, "bye");
        }
    })
}

// ---- client messages ----------------------------------------------------------------

/// Appends a `hello` frame for protocol version 1.
pub fn encode_hello(b: &mut BytesMut, key: &str, gateway: Option<&str>) {
    encode_hello_v(b, PROTOCOL_VERSION, key, gateway);
}

/// Appends a `hello` frame claiming version `v` (tests of `unsupported_version`).
pub fn encode_hello_v(b: &mut BytesMut, v: u64, key: &str, gateway: Option<&str>) {
    framed(b, |b| {
        put_map_len(b, if gateway.is_some() { 4 } else { 3 });
        put_str(b, "t");
        put_str(b, "hello");
        put_str(b, "v");
        put_uint(b, v);
        put_str(b, "key");
        put_str(b, key);
        if let Some(g) = gateway {
            put_str(b, "gateway");
            put_str(b, g);
        }
    })
}

/// Appends a `ping` frame.
pub fn encode_ping(b: &mut BytesMut) {
    framed(b, |b| {
        put_map_len(b, 1);
        put_str(b, "t");
        put_str(b, "ping");
    })
}

/// Appends a `bye` frame.
pub fn encode_bye(b: &mut BytesMut) {
    framed(b, |b| {
        put_map_len(b, 1);
        put_str(b, "t");
        put_str(b, "bye");
    })
}

/// Appends an `end` frame (protocol 1.1): the flight session `session` is over.
/// `seq` shares the connection's batch sequence (strictly increasing across both).
pub fn encode_end(b: &mut BytesMut, seq: u64, session: Uuid) {
    framed(b, |b| {
        put_map_len(b, 3);
        put_str(b, "t");
        put_str(b, "end");
        put_str(b, "seq");
        put_uint(b, seq);
        put_str(b, "session");
        put_uuid(b, &session, false);
    })
}

/// Appends a `batch` frame with points in `form` and timestamps as extensions.
/// On error nothing is appended.
pub fn encode_batch(
    b: &mut BytesMut,
    seq: u64,
    aircraft: &AircraftRef,
    session: Uuid,
    points: &[Point],
    form: PointForm,
) -> Result<(), EncodeError> {
    encode_batch_with(b, seq, aircraft, session, points, form.into())
}

/// Appends a `batch` frame with every encoding choice spelled out.
/// On error nothing is appended.
pub fn encode_batch_with(
    b: &mut BytesMut,
    seq: u64,
    aircraft: &AircraftRef,
    session: Uuid,
    points: &[Point],
    opts: EncodeOptions,
) -> Result<(), EncodeError> {
    all_or_nothing(b, |b| {
        framed(b, |b| {
            put_map_len(b, 5);
            put_str(b, "t");
            put_str(b, "batch");
            put_str(b, "seq");
            put_uint(b, seq);
            batch_tail(b, aircraft, session, points, opts)
        })
    })
}

/// Appends one UDP datagram (no length prefix): `t = "batch"`, `key`, the optional
/// `seq` and the batch keys. On error nothing is appended.
#[allow(clippy::too_many_arguments)]
pub fn encode_datagram(
    b: &mut BytesMut,
    key: &str,
    seq: Option<u64>,
    aircraft: &AircraftRef,
    session: Uuid,
    points: &[Point],
    opts: EncodeOptions,
) -> Result<(), EncodeError> {
    all_or_nothing(b, |b| {
        datagram_batch(b, Some(key), seq, aircraft, session, points, opts)
    })
}

/// Appends one UDP datagram in the MAC form of docs/protocol.md, 1.1 (no length prefix):
/// `{kid, mac, body}`, where `body` is the batch map (`t = "batch"`, the optional
/// `seq`, the batch keys; no `key`) and `mac` authenticates it with `key` — which never
/// travels. On error nothing is appended.
#[allow(clippy::too_many_arguments)]
pub fn encode_datagram_mac(
    b: &mut BytesMut,
    key: &str,
    seq: Option<u64>,
    aircraft: &AircraftRef,
    session: Uuid,
    points: &[Point],
    opts: EncodeOptions,
) -> Result<(), EncodeError> {
    let mut body = BytesMut::with_capacity(points.len() * 64 + 128);
    datagram_batch(&mut body, None, seq, aircraft, session, points, opts)?;
    let hash = crate::mac::key_hash(key);
    put_map_len(b, 3);
    put_str(b, "kid");
    put_str(b, &crate::mac::key_id_hex(&hash));
    put_str(b, "mac");
    put_bin(b, &crate::mac::body_mac(&hash, &body));
    put_str(b, "body");
    put_bin(b, &body);
    Ok(())
}

/// The batch map of a datagram: `t = "batch"`, `key` when given, `seq` when given,
/// then the batch keys.
#[allow(clippy::too_many_arguments)]
fn datagram_batch(
    b: &mut BytesMut,
    key: Option<&str>,
    seq: Option<u64>,
    aircraft: &AircraftRef,
    session: Uuid,
    points: &[Point],
    opts: EncodeOptions,
) -> Result<(), EncodeError> {
    put_map_len(b, 4 + u32::from(key.is_some()) + u32::from(seq.is_some()));
    put_str(b, "t");
    put_str(b, "batch");
    if let Some(k) = key {
        put_str(b, "key");
        put_str(b, k);
    }
    if let Some(s) = seq {
        put_str(b, "seq");
        put_uint(b, s);
    }
    batch_tail(b, aircraft, session, points, opts)
}

/// `aircraft`, `session` and `points` entries.
fn batch_tail(
    b: &mut BytesMut,
    aircraft: &AircraftRef,
    session: Uuid,
    points: &[Point],
    opts: EncodeOptions,
) -> Result<(), EncodeError> {
    put_str(b, "aircraft");
    match aircraft {
        AircraftRef::Registration(r) => put_str(b, r),
        AircraftRef::Id(id) => put_uuid(b, id, opts.uuid_as_bin),
    }
    session_and_points(b, session, points, opts)
}

/// Appends one batch map as an MQTT message payload (no length prefix, no `t`, no
/// `aircraft`: the topic names the organization and the aircraft): the optional `seq`,
/// `session` and `points`. On error nothing is appended.
pub fn encode_batch_payload(
    b: &mut BytesMut,
    seq: Option<u64>,
    session: Uuid,
    points: &[Point],
    opts: EncodeOptions,
) -> Result<(), EncodeError> {
    all_or_nothing(b, |b| {
        put_map_len(b, if seq.is_some() { 3 } else { 2 });
        if let Some(s) = seq {
            put_str(b, "seq");
            put_uint(b, s);
        }
        session_and_points(b, session, points, opts)
    })
}

/// `session` and `points` entries.
fn session_and_points(
    b: &mut BytesMut,
    session: Uuid,
    points: &[Point],
    opts: EncodeOptions,
) -> Result<(), EncodeError> {
    put_str(b, "session");
    put_uuid(b, &session, opts.uuid_as_bin);
    put_str(b, "points");
    let n = u32::try_from(points.len()).map_err(|_| EncodeError::TooManyPoints(points.len()))?;
    put_array_len(b, n);
    b.reserve(points.len() * 64);
    for (i, p) in points.iter().enumerate() {
        encode_point(b, p, opts, i)?;
    }
    Ok(())
}

fn parse_extra(p: &Point, index: usize) -> Result<Option<serde_json::Value>, EncodeError> {
    let Some(text) = &p.extra else {
        return Ok(None);
    };
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| EncodeError::InvalidExtra {
            index,
            reason: e.to_string(),
        })?;
    if !v.is_object() {
        return Err(EncodeError::InvalidExtra {
            index,
            reason: "not an object".to_owned(),
        });
    }
    Ok(Some(v))
}

fn encode_point(
    b: &mut BytesMut,
    p: &Point,
    opts: EncodeOptions,
    index: usize,
) -> Result<(), EncodeError> {
    let extra = parse_extra(p, index)?;
    let f32s = [
        p.alt, p.gs, p.vs, p.hdg, p.roll, p.pitch, p.yaw, p.ias, p.bv, p.bi, p.bp,
    ];
    let small = [p.fix, p.sats];
    // Presence of fields 2..=20 in table order.
    let present: [bool; 19] = [
        p.lat.is_some(),
        p.lon.is_some(),
        p.alt.is_some(),
        p.gs.is_some(),
        p.vs.is_some(),
        p.hdg.is_some(),
        p.roll.is_some(),
        p.pitch.is_some(),
        p.yaw.is_some(),
        p.ias.is_some(),
        p.bv.is_some(),
        p.bi.is_some(),
        p.bp.is_some(),
        p.rpm.is_some(),
        p.cs.is_some(),
        p.fix.is_some(),
        p.sats.is_some(),
        p.temp.is_some(),
        extra.is_some(),
    ];
    let names = &crate::point::FIELD_NAMES;
    let map = opts.form == PointForm::Map;
    if map {
        put_map_len(b, 2 + present.iter().filter(|x| **x).count() as u32);
        put_str(b, "ts");
    } else {
        let last = present.iter().rposition(|x| *x).map_or(0, |i| i + 1);
        put_array_len(b, 2 + last as u32);
    }
    put_ts(b, p.ts_micros, opts.timestamps);
    if map {
        put_str(b, "seq");
    }
    put_int(b, p.seq);
    let array_len = if map {
        19
    } else {
        present.iter().rposition(|x| *x).map_or(0, |i| i + 1)
    };
    for (j, &is_present) in present.iter().enumerate().take(array_len) {
        let field = j + 2;
        if !is_present {
            if !map {
                put_nil(b);
            }
            continue;
        }
        if map {
            put_str(b, names[field]);
        }
        match field {
            2 => put_f64(b, p.lat.unwrap_or_default()),
            3 => put_f64(b, p.lon.unwrap_or_default()),
            4..=14 => put_f32(b, f32s[field - 4].unwrap_or_default()),
            15 | 16 => {
                let arr = if field == 15 { &p.rpm } else { &p.cs };
                let arr = arr.as_deref().unwrap_or_default();
                put_array_len(b, arr.len() as u32);
                arr.iter().for_each(|v| put_f32(b, *v));
            }
            17 | 18 => put_int(b, i64::from(small[field - 17].unwrap_or_default())),
            19 => put_f32(b, p.temp.unwrap_or_default()),
            _ => {
                if let Some(x) = &extra {
                    put_json(b, x);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_ext_sizes() {
        let mut b = BytesMut::new();
        put_ts_ext(&mut b, 5_000_000);
        assert_eq!(&b[..], &[0xd6, 0xff, 0, 0, 0, 5]);
        b.clear();
        put_ts_ext(&mut b, 5_000_001);
        assert_eq!(b.len(), 10);
        assert_eq!(b[0], 0xd7);
        b.clear();
        put_ts_ext(&mut b, -1);
        assert_eq!(b.len(), 15);
        assert_eq!(&b[..3], &[0xc7, 12, 0xff]);
    }

    #[test]
    fn array_form_trims_trailing_absent_fields() {
        let mut b = BytesMut::new();
        let mut p = Point::new(1, 2);
        p.lon = Some(3.0);
        encode_point(
            &mut b,
            &p,
            EncodeOptions {
                form: PointForm::Array,
                timestamps: TimestampForm::Micros,
                uuid_as_bin: false,
            },
            0,
        )
        .unwrap();
        // [1, 2, nil, 3.0f64]
        assert_eq!(b[0], 0x94);
        assert_eq!(&b[1..4], &[1, 2, 0xc0]);
        assert_eq!(b[4], 0xcb);
    }

    #[test]
    fn bad_extra_appends_nothing() {
        let mut b = BytesMut::new();
        let mut p = Point::new(1, 2);
        p.extra = Some("[1]".into());
        let err = encode_batch(
            &mut b,
            1,
            &AircraftRef::Registration("N1".into()),
            Uuid::nil(),
            &[p],
            PointForm::Map,
        );
        assert!(matches!(
            err,
            Err(EncodeError::InvalidExtra { index: 0, .. })
        ));
        assert!(b.is_empty());
    }
}
