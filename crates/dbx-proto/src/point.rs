//! Wire points (map or array form) → validated [`dbx_core::Point`].
//!
//! This is the hot path of the daemon: a batch of up to 10 000 points is decoded
//! straight from the frame body into `Point`s with the token reader, checking every
//! rule of docs/protocol.md's point table on the way. Nothing is allocated but the `Point`s
//! themselves (their `rpm`/`cs` vectors and `extra` text).
//!
//! Choices stated in docs/protocol.md (mirrored in the crate docs):
//! - Integer fields (`ts` as microseconds, `seq`, `fix`, `sats`) take MessagePack
//!   integers only; a float there, even an integral one, is `invalid_point`.
//! - A float field whose value is finite but too large for a 32-bit `real` column is
//!   `invalid_point` (it would be stored as infinity).
//! - A known key that appears twice in one point map, or one `extra` key twice, is
//!   `invalid_point`.
//! - `nil` for `ts` or `seq` counts as missing (`invalid_point`); `nil` for `x` is as if
//!   `x` were absent; an unknown key whose value is `nil` is kept as JSON `null`.
//! - `extra` values: nil → null, bool, integers, finite floats (a float that is
//!   integral is written with `.0`), UTF-8 strings, binary → standard base64 string,
//!   arrays, maps with string keys (nested up to 32 levels), the timestamp extension →
//!   an RFC 3339 UTC string. NaN/infinity, any other extension type, a non-string map
//!   key, a string that is not UTF-8, and a NUL character in a string or key (PostgreSQL
//!   `jsonb` refuses `\u0000`) are `invalid_point`. Duplicate keys inside nested maps
//!   are kept as sent (`jsonb` keeps the last).
//! - `x` with no entries and no unknown keys stores NULL, like a point without `x`.
//! - At most [`Limits::max_extra_keys`] keys (unknown top-level keys plus entries of
//!   `x`) per point; one more is `invalid_point`. Duplicates among them are found
//!   through a hash index once there are more than a few, so a point costs time
//!   linear in its size whatever its keys.
//! - Every value from the wire that a message quotes (keys, strings) is cut to 40
//!   characters, so no rejection echoes more than that of what the gateway sent.
//! - A point whose timestamp is unrepresentable as `i64` microseconds is `invalid_point`;
//!   a representable one outside the window is `out_of_range`. Within one point,
//!   `invalid_point` wins over `out_of_range`; across points the first bad one is named.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;
use dbx_core::{Point, RejectCode, Rejection, POINT_FIELD_COUNT};

use crate::reader::{Malformed, Reader, Token};
use crate::Limits;

/// Wire names of the point fields, in array-form order.
pub const FIELD_NAMES: [&str; POINT_FIELD_COUNT] = [
    "ts", "seq", "lat", "lon", "alt", "gs", "vs", "hdg", "roll", "pitch", "yaw", "ias", "bv", "bi",
    "bp", "rpm", "cs", "fix", "sats", "temp", "x",
];

/// Most elements an `rpm` or `cs` array may hold.
pub const MAX_ARRAY_FIELD_LEN: u32 = 16;

/// Deepest nesting of arrays and maps accepted inside `extra` values.
pub const MAX_EXTRA_DEPTH: usize = 32;

/// Fewest bytes a valid point takes on the wire: a 1-byte array header, a 6-byte
/// timestamp extension (an integer timestamp inside the accepted window needs 9) and
/// a 1-byte `seq`. Bounds how many points a frame of a given size can hold.
pub const MIN_POINT_WIRE_BYTES: usize = 8;

/// Worst growth from wire bytes to `extra` JSON text: one control character (1 byte
/// inside a string) becomes `\u00XX` (6 bytes); `false` (1 byte) becomes `false,`.
/// Every other MessagePack value grows less.
pub const MAX_JSON_GROWTH: usize = 6;

/// Extra keys per point checked by a linear scan; past this many a hash index takes over.
const LINEAR_KEY_SCAN: usize = 16;

/// Heap bytes one allocation costs beyond its payload (malloc's header and rounding).
const ALLOC_OVERHEAD: usize = 16;

/// The most heap memory decoding a frame body of `body_len` bytes can hold at any
/// moment: the `Vec<Point>` (at most `min(max_points_per_batch, body_len /
/// MIN_POINT_WIRE_BYTES + 1)` points), each point's `rpm`/`cs` vectors, and the `extra`
/// text, which is at most [`MAX_JSON_GROWTH`] times the wire bytes it comes from,
/// counted twice: the text kept, and the slack of the scratch buffer it is built in
/// (which grows by doubling); and the duplicate-key index of the point being decoded
/// (at most `max_extra_keys` keys). The frame itself is not included. The listener charges
/// this against its byte budget, with the frame, before it reads the body, and keeps
/// only [`points_heap_bytes`] of the result once decoded.
pub fn decoded_bytes_bound(body_len: usize, limits: &Limits) -> usize {
    let points = limits
        .max_points_per_batch
        .min(body_len / MIN_POINT_WIRE_BYTES + 1);
    let per_point = std::mem::size_of::<Point>()
        + 2 * (MAX_ARRAY_FIELD_LEN as usize * 4 + ALLOC_OVERHEAD)
        + ALLOC_OVERHEAD
        + 2;
    // The duplicate-key index of the point being decoded: one hashed key per two bytes
    // at most, 48 bytes each with the table's slack.
    let index = limits.max_extra_keys.min(body_len / 2).saturating_mul(48);
    3 * ALLOC_OVERHEAD
        + points.saturating_mul(per_point)
        + body_len.saturating_mul(2 * MAX_JSON_GROWTH)
        + index
}

/// Heap bytes held by decoded points (the vector's capacity, the `rpm`/`cs` vectors,
/// the `extra` text), each allocation with its overhead: what a decoded batch costs
/// while it waits for its ack.
pub fn points_heap_bytes(points: &Vec<Point>) -> usize {
    let alloc = |bytes: usize| {
        if bytes == 0 {
            0
        } else {
            bytes + ALLOC_OVERHEAD
        }
    };
    let vec_f32 = |v: &Option<Vec<f32>>| v.as_ref().map_or(0, |v| alloc(v.capacity() * 4));
    alloc(points.capacity() * std::mem::size_of::<Point>())
        + points
            .iter()
            .map(|p| {
                vec_f32(&p.rpm)
                    + vec_f32(&p.cs)
                    + p.extra.as_ref().map_or(0, |e| alloc(e.capacity()))
            })
            .sum::<usize>()
}

const F_TS: usize = 0;
const F_SEQ: usize = 1;
const F_X: usize = 20;

/// Why a point (or the points array) could not be decoded.
#[derive(Debug)]
pub(crate) enum PointError {
    /// The bytes are not well-formed MessagePack: `bad_frame` for the whole frame.
    Malformed,
    /// The point breaks a rule: `invalid_point` or `out_of_range`, with its index.
    Reject(Rejection),
}

impl From<Malformed> for PointError {
    fn from(_: Malformed) -> Self {
        PointError::Malformed
    }
}

/// The accepted timestamp window, in microseconds since the epoch, both ends inclusive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    min: i64,
    max: i64,
}

impl Window {
    pub(crate) fn new(limits: &Limits, now_micros: i64) -> Self {
        Window {
            min: now_micros.saturating_sub(micros(limits.max_past)),
            max: now_micros.saturating_add(micros(limits.max_future)),
        }
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Decodes the value of a batch's `points` key: an array of 1..=`max_points_per_batch`
/// points. The outer error is a malformed frame; the inner one a nack-worthy rejection,
/// after which the reader has been moved past the whole array so that the rest of the
/// frame can still be checked.
pub(crate) fn decode_points(
    r: &mut Reader<'_>,
    limits: &Limits,
    now_micros: i64,
) -> Result<Result<Vec<Point>, Rejection>, Malformed> {
    let tok = r.next()?;
    let n = match tok {
        Token::Array(n) => n,
        other => {
            r.skip_children(other)?;
            return Ok(Err(Rejection::new(
                RejectCode::InvalidBatch,
                format!("batch: points = {other} is not an array of points"),
            )));
        }
    };
    if n == 0 {
        return Ok(Err(Rejection::new(
            RejectCode::InvalidBatch,
            format!(
                "batch: points is empty; a batch holds 1..={} points",
                limits.max_points_per_batch
            ),
        )));
    }
    if n as usize > limits.max_points_per_batch {
        r.skip_values(u64::from(n))?;
        return Ok(Err(Rejection::new(
            RejectCode::InvalidBatch,
            format!(
                "batch: points holds {n} points; at most {} are allowed per batch",
                limits.max_points_per_batch
            ),
        )));
    }
    let window = Window::new(limits, now_micros);
    // A valid point takes at least MIN_POINT_WIRE_BYTES, so the input bounds the
    // capacity too (decoded_bytes_bound relies on it).
    let mut points = Vec::with_capacity((n as usize).min(r.remaining() / MIN_POINT_WIRE_BYTES + 1));
    let mut extra = ExtraBuf::new(limits.max_extra_keys);
    for i in 0..n as usize {
        let start = r.pos();
        // Decoded in place: a Point is a couple of hundred bytes, not worth moving.
        points.push(Point::default());
        match decode_point(r, i, window, &mut points[i], &mut extra) {
            Ok(()) => {}
            Err(PointError::Malformed) => return Err(Malformed),
            Err(PointError::Reject(rej)) => {
                // Step over the rest of this point and the points after it, so that the
                // frame is still checked for well-formedness and trailing bytes.
                r.set_pos(start);
                r.skip_values(u64::from(n) - i as u64)?;
                return Ok(Err(rej));
            }
        }
    }
    Ok(Ok(points))
}

/// Decodes and validates the point at `index` (map or array form) into `p`, which
/// holds `Point::default()`. `extra` is the batch's scratch space for `extra` keys and
/// text, reset here.
///
/// One function on purpose (over 100 lines): it is the decoder's innermost loop, one
/// `match` over the point's keys that the benchmarks keep in a single frame; split, the
/// table of keys would be scattered over helpers that each need the same six arguments.
pub(crate) fn decode_point<'a>(
    r: &mut Reader<'a>,
    index: usize,
    window: Window,
    p: &mut Point,
    extra: &mut ExtraBuf<'a>,
) -> Result<(), PointError> {
    let mut seen: u32 = 0;
    extra.reset();
    match r.next()? {
        Token::Map(n) => {
            extra.announce(n, r.remaining());
            for _ in 0..n {
                let key = match r.next()? {
                    Token::Str(k) => k,
                    other => {
                        return Err(reject(
                            index,
                            format!("point {index}: key {other} is not a string"),
                        ))
                    }
                };
                let field = match key {
                    b"ts" => 0,
                    b"seq" => 1,
                    b"lat" => 2,
                    b"lon" => 3,
                    b"alt" => 4,
                    b"gs" => 5,
                    b"vs" => 6,
                    b"hdg" => 7,
                    b"roll" => 8,
                    b"pitch" => 9,
                    b"yaw" => 10,
                    b"ias" => 11,
                    b"bv" => 12,
                    b"bi" => 13,
                    b"bp" => 14,
                    b"rpm" => 15,
                    b"cs" => 16,
                    b"fix" => 17,
                    b"sats" => 18,
                    b"temp" => 19,
                    b"x" => 20,
                    _ => {
                        let key = extra_key(key, index, Place::Point)?;
                        extra.key(key, false, index)?;
                        let tok = r.next()?;
                        json_value(r, tok, &mut extra.json, 0, index, key)?;
                        continue;
                    }
                };
                let bit = 1u32 << field;
                if seen & bit != 0 {
                    return Err(reject(
                        index,
                        format!(
                            "point {index}: key {} appears twice in the point",
                            FIELD_NAMES[field]
                        ),
                    ));
                }
                seen |= bit;
                field_value(r, p, &mut seen, extra, field, index)?;
            }
        }
        Token::Array(n) => {
            if n as usize > POINT_FIELD_COUNT {
                return Err(reject(
                    index,
                    format!(
                        "point {index}: the array form holds {n} elements; at most {POINT_FIELD_COUNT} are allowed"
                    ),
                ));
            }
            for field in 0..n as usize {
                seen |= 1 << field;
                field_value(r, p, &mut seen, extra, field, index)?;
            }
        }
        other => {
            return Err(reject(
                index,
                format!("point {index} is {other}; a point is a map or an array"),
            ))
        }
    }
    for (bit, name) in [(F_TS, "ts"), (F_SEQ, "seq")] {
        if seen & (1 << bit) == 0 {
            return Err(reject(
                index,
                format!("point {index}: {name} is missing; it is required"),
            ));
        }
    }
    p.extra = extra.finish();
    if p.ts_micros < window.min || p.ts_micros > window.max {
        return Err(out_of_range(index, p.ts_micros, window));
    }
    Ok(())
}

#[cold]
#[inline(never)]
fn out_of_range(index: usize, ts: i64, window: Window) -> PointError {
    PointError::Reject(Rejection::at(
        RejectCode::OutOfRange,
        index,
        format!(
            "point {index}: ts = {} is outside the accepted window {}..={}",
            fmt_micros(ts),
            fmt_micros(window.min),
            fmt_micros(window.max)
        ),
    ))
}

#[cold]
fn reject(index: usize, msg: String) -> PointError {
    PointError::Reject(Rejection::at(RejectCode::InvalidPoint, index, msg))
}

/// A timestamp in microseconds, as RFC 3339 for messages (raw microseconds when
/// chrono cannot represent it).
pub(crate) fn fmt_micros(us: i64) -> String {
    match chrono::DateTime::from_timestamp_micros(us) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        None => format!("{us} µs since the epoch"),
    }
}

/// Reads the value of `field` into the point. `seen` has the field's bit set already;
/// a `nil` optional field clears nothing (it simply stays `None`), while a `nil`
/// required field clears its bit so that it is reported missing.
#[inline]
fn field_value<'a>(
    r: &mut Reader<'a>,
    p: &mut Point,
    seen: &mut u32,
    extra: &mut ExtraBuf<'a>,
    field: usize,
    index: usize,
) -> Result<(), PointError> {
    let tok = r.next()?;
    if matches!(tok, Token::Nil) {
        if field <= F_SEQ {
            *seen &= !(1 << field);
        }
        return Ok(());
    }
    let name = FIELD_NAMES[field];
    match field {
        0 => p.ts_micros = timestamp(tok, index)?,
        1 => {
            p.seq = match tok {
                Token::UInt(v) if v <= i64::MAX as u64 => v as i64,
                Token::UInt(_) => {
                    return Err(reject(
                        index,
                        format!(
                    "point {index}: seq = {tok} does not fit a signed 64-bit integer (at most {})",
                    i64::MAX
                ),
                    ))
                }
                Token::Int(_) => {
                    return Err(reject(
                        index,
                        format!(
                            "point {index}: seq = {tok} is negative; seq is an unsigned integer"
                        ),
                    ))
                }
                _ => {
                    return Err(reject(
                        index,
                        format!("point {index}: seq = {tok} is not an unsigned integer"),
                    ))
                }
            }
        }
        2 => p.lat = Some(ranged(tok, index, name, -90.0, 90.0)?),
        3 => p.lon = Some(ranged(tok, index, name, -180.0, 180.0)?),
        4 => p.alt = Some(finite_real(tok, index, name)?),
        5 => p.gs = Some(real(non_negative(tok, index, name)?, tok, index, name)?),
        6 => p.vs = Some(finite_real(tok, index, name)?),
        7 => p.hdg = Some(ranged(tok, index, name, 0.0, 360.0)? as f32),
        8 => p.roll = Some(finite_real(tok, index, name)?),
        9 => p.pitch = Some(finite_real(tok, index, name)?),
        10 => p.yaw = Some(finite_real(tok, index, name)?),
        11 => p.ias = Some(real(non_negative(tok, index, name)?, tok, index, name)?),
        12 => p.bv = Some(finite_real(tok, index, name)?),
        13 => p.bi = Some(finite_real(tok, index, name)?),
        14 => p.bp = Some(ranged(tok, index, name, 0.0, 100.0)? as f32),
        15 => p.rpm = Some(real_array(r, tok, index, name)?),
        16 => p.cs = Some(real_array(r, tok, index, name)?),
        17 => p.fix = Some(small_int(tok, index, name, 8)?),
        18 => p.sats = Some(small_int(tok, index, name, 255)?),
        19 => p.temp = Some(finite_real(tok, index, name)?),
        F_X => {
            let n = match tok {
                Token::Map(n) => n,
                _ => {
                    return Err(reject(
                        index,
                        format!("point {index}: x = {tok} is not a map"),
                    ))
                }
            };
            extra.announce(n, r.remaining());
            for _ in 0..n {
                let key = match r.next()? {
                    Token::Str(k) => extra_key(k, index, Place::X)?,
                    other => {
                        return Err(reject(
                            index,
                            format!("point {index}: x has key {other}, which is not a string"),
                        ))
                    }
                };
                extra.key(key, true, index)?;
                let v = r.next()?;
                json_value(r, v, &mut extra.json, 0, index, key)?;
            }
        }
        _ => unreachable!("field index is below POINT_FIELD_COUNT"),
    }
    Ok(())
}

/// The common rejection of one field: `point {index}: {name} = {value} {why}`.
/// Cold and out of line, so that the checks around it stay small enough to inline.
#[cold]
#[inline(never)]
fn bad_field(index: usize, name: &str, tok: Token<'_>, why: &str) -> PointError {
    reject(index, format!("point {index}: {name} = {tok} {why}"))
}

#[cold]
#[inline(never)]
fn outside(index: usize, name: &str, tok: Token<'_>, lo: f64, hi: f64) -> PointError {
    reject(
        index,
        format!("point {index}: {name} = {tok} is outside {lo}..{hi}"),
    )
}

#[inline(always)]
fn number(tok: Token<'_>, index: usize, name: &str) -> Result<f64, PointError> {
    match tok.as_f64() {
        Some(v) => Ok(v),
        None => Err(bad_field(index, name, tok, "is not a number")),
    }
}

#[inline(always)]
fn finite(tok: Token<'_>, index: usize, name: &str) -> Result<f64, PointError> {
    let v = number(tok, index, name)?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(bad_field(index, name, tok, "is not finite"))
    }
}

#[inline(always)]
fn non_negative(tok: Token<'_>, index: usize, name: &str) -> Result<f64, PointError> {
    let v = finite(tok, index, name)?;
    if v >= 0.0 {
        Ok(v)
    } else {
        Err(bad_field(index, name, tok, "is negative; it must be >= 0"))
    }
}

#[inline(always)]
fn ranged(tok: Token<'_>, index: usize, name: &str, lo: f64, hi: f64) -> Result<f64, PointError> {
    let v = number(tok, index, name)?;
    // Written so that NaN fails too; both ends are inclusive.
    if v >= lo && v <= hi {
        Ok(v)
    } else {
        Err(outside(index, name, tok, lo, hi))
    }
}

/// Narrows a finite value to the `real` column type, refusing what would overflow.
#[inline(always)]
fn real(v: f64, tok: Token<'_>, index: usize, name: &str) -> Result<f32, PointError> {
    let f = v as f32;
    if f.is_finite() {
        Ok(f)
    } else {
        Err(bad_field(
            index,
            name,
            tok,
            "does not fit a 32-bit float (real)",
        ))
    }
}

/// A finite float field stored as `real`.
#[inline(always)]
fn finite_real(tok: Token<'_>, index: usize, name: &str) -> Result<f32, PointError> {
    real(finite(tok, index, name)?, tok, index, name)
}

fn real_array(
    r: &mut Reader<'_>,
    tok: Token<'_>,
    index: usize,
    name: &str,
) -> Result<Vec<f32>, PointError> {
    let n = match tok {
        Token::Array(n) => n,
        _ => {
            return Err(reject(
                index,
                format!("point {index}: {name} = {tok} is not an array of numbers"),
            ))
        }
    };
    if n > MAX_ARRAY_FIELD_LEN {
        return Err(reject(
            index,
            format!(
                "point {index}: {name} holds {n} values; at most {MAX_ARRAY_FIELD_LEN} are allowed"
            ),
        ));
    }
    let mut out = Vec::with_capacity(n as usize);
    for j in 0..n {
        let el = r.next()?;
        let v = match el.as_f64() {
            Some(v) if v.is_finite() && (v as f32).is_finite() => v as f32,
            _ => return Err(bad_element(index, name, j, el)),
        };
        out.push(v);
    }
    Ok(out)
}

#[cold]
#[inline(never)]
fn bad_element(index: usize, name: &str, j: u32, el: Token<'_>) -> PointError {
    let why = match el.as_f64() {
        None => "is not a number",
        Some(v) if !v.is_finite() => "is not finite",
        Some(_) => "does not fit a 32-bit float (real)",
    };
    reject(index, format!("point {index}: {name}[{j}] = {el} {why}"))
}

#[inline(always)]
fn small_int(tok: Token<'_>, index: usize, name: &str, max: u64) -> Result<i16, PointError> {
    match tok {
        Token::UInt(v) if v <= max => Ok(v as i16),
        Token::UInt(_) | Token::Int(_) => Err(outside(index, name, tok, 0.0, max as f64)),
        _ => Err(bad_field(index, name, tok, "is not an integer")),
    }
}

/// Converts `ts` (timestamp extension of 4, 8 or 12 bytes, or integer microseconds)
/// to microseconds since the epoch, truncating nanoseconds.
fn timestamp(tok: Token<'_>, index: usize) -> Result<i64, PointError> {
    match tok {
        Token::UInt(v) => i64::try_from(v).map_err(|_| {
            reject(
                index,
                format!("point {index}: ts = {v} µs does not fit a signed 64-bit integer"),
            )
        }),
        Token::Int(v) => Ok(v),
        Token::Ext(-1, data) => {
            let (secs, nanos) = ext_timestamp(data).ok_or_else(|| {
                reject(
                    index,
                    format!(
                        "point {index}: ts is a timestamp extension of {} bytes that is not a valid timestamp (4, 8 or 12 bytes, nanoseconds below 10^9)",
                        data.len()
                    ),
                )
            })?;
            secs.checked_mul(1_000_000)
                .and_then(|us| us.checked_add(i64::from(nanos / 1000)))
                .ok_or_else(|| {
                    reject(
                        index,
                        format!(
                            "point {index}: ts = {secs} s cannot be represented in microseconds as a 64-bit integer"
                        ),
                    )
                })
        }
        _ => Err(reject(
            index,
            format!(
                "point {index}: ts = {tok} is neither a timestamp extension (type -1) nor integer microseconds"
            ),
        )),
    }
}

/// Seconds and nanoseconds of a MessagePack timestamp extension payload.
pub(crate) fn ext_timestamp(data: &[u8]) -> Option<(i64, u32)> {
    let (secs, nanos) = match data.len() {
        4 => (i64::from(u32::from_be_bytes(data.try_into().ok()?)), 0),
        8 => {
            let v = u64::from_be_bytes(data.try_into().ok()?);
            ((v & 0x3_ffff_ffff) as i64, (v >> 34) as u32)
        }
        12 => {
            let nanos = u32::from_be_bytes(data[..4].try_into().ok()?);
            let secs = i64::from_be_bytes(data[4..].try_into().ok()?);
            (secs, nanos)
        }
        _ => return None,
    };
    (nanos < 1_000_000_000).then_some((secs, nanos))
}

/// Validates an `extra` key (from `x`, or an unknown top-level key of the point).
fn extra_key<'a>(key: &'a [u8], index: usize, place: Place<'_>) -> Result<&'a str, PointError> {
    let s = std::str::from_utf8(key).map_err(|_| {
        reject(
            index,
            format!(
                "point {index}: a key{place} of {} bytes is not valid UTF-8",
                key.len()
            ),
        )
    })?;
    if s.contains('\0') {
        return Err(reject(
            index,
            format!(
                "point {index}: key {}{place} contains a NUL character (U+0000), which jsonb cannot store",
                quoted(s)
            ),
        ));
    }
    Ok(s)
}

/// A string from the wire as a message quotes it: at most 40 characters, then its size.
pub(crate) fn quoted(s: &str) -> Token<'_> {
    Token::Str(s.as_bytes())
}

/// Where an `extra` key was found, for messages.
#[derive(Clone, Copy)]
enum Place<'a> {
    /// A key of the point map itself.
    Point,
    /// A key of `x`.
    X,
    /// A key of a map nested under this `extra` key.
    Under(&'a str),
}

impl std::fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Point => Ok(()),
            Place::X => f.write_str(" in x"),
            Place::Under(k) => write!(f, " in a map under extra key {}", quoted(k)),
        }
    }
}

/// The `extra` JSON object of the point being decoded and the keys already in it:
/// scratch space reused by every point of a batch, so that a point allocates only its
/// final `extra` text.
pub(crate) struct ExtraBuf<'a> {
    json: String,
    /// Keys in this point so far.
    count: usize,
    /// The first [`LINEAR_KEY_SCAN`] keys, and whether each came from `x` (true) or the
    /// point itself (false): scanned linearly, cheaper than hashing for a few keys.
    first: Vec<(&'a str, bool)>,
    /// Every key, hashed, once there are more than that.
    index: HashMap<&'a str, bool>,
    /// Keys the point's maps announce (capped by their bytes): the index's capacity,
    /// so that it never grows (and rehashes) while a large point is decoded.
    announced: usize,
    max_keys: usize,
}

impl<'a> ExtraBuf<'a> {
    pub(crate) fn new(max_keys: usize) -> Self {
        ExtraBuf {
            json: String::new(),
            count: 0,
            first: Vec::with_capacity(LINEAR_KEY_SCAN),
            index: HashMap::new(),
            announced: 0,
            max_keys,
        }
    }

    fn reset(&mut self) {
        if self.count > LINEAR_KEY_SCAN {
            self.index.clear();
        }
        self.count = 0;
        self.announced = 0;
        self.first.clear();
        self.json.clear();
    }

    /// A map of the point (or its `x`) announces `entries`; each takes at least two of
    /// the `remaining` bytes, which caps what a hostile header can claim.
    fn announce(&mut self, entries: u32, remaining: usize) {
        let n = (entries as usize).min(remaining / 2);
        self.announced = self.announced.saturating_add(n);
    }

    /// Where `key` was seen before in this point (`Some(in_x)`), if it was.
    fn previous(&self, key: &str) -> Option<bool> {
        if self.count > LINEAR_KEY_SCAN {
            self.index.get(key).copied()
        } else {
            self.first.iter().find(|(k, _)| *k == key).map(|&(_, x)| x)
        }
    }

    /// Adds `key` and the `:` after it, refusing a key that is already there and one
    /// key more than `max_extra_keys`.
    fn key(&mut self, key: &'a str, in_x: bool, index: usize) -> Result<(), PointError> {
        if let Some(prev_in_x) = self.previous(key) {
            let key = quoted(key);
            let msg = if prev_in_x != in_x {
                format!(
                    "point {index}: key {key} appears both in x and as a key of the point; extra can hold it only once"
                )
            } else if in_x {
                format!("point {index}: key {key} appears twice in x")
            } else {
                format!("point {index}: key {key} appears twice in the point")
            };
            return Err(reject(index, msg));
        }
        if self.count >= self.max_keys {
            return Err(reject(
                index,
                format!(
                    "point {index}: more than {} extra keys (unknown keys of the point plus entries of x); max_extra_keys is {}",
                    self.max_keys, self.max_keys
                ),
            ));
        }
        self.json.push(if self.count == 0 { '{' } else { ',' });
        self.count += 1;
        if self.count <= LINEAR_KEY_SCAN {
            self.first.push((key, in_x));
        } else {
            if self.count == LINEAR_KEY_SCAN + 1 {
                let room = self.announced.clamp(LINEAR_KEY_SCAN + 1, self.max_keys);
                self.index.reserve(room);
                self.index.extend(self.first.iter().copied());
            }
            self.index.insert(key, in_x);
        }
        json_string(&mut self.json, key);
        self.json.push(':');
        Ok(())
    }

    /// The point's `extra` text at its exact size, or `None` when it has no keys.
    /// A small text is copied out of the scratch buffer (which the next point reuses);
    /// a large one takes the buffer, shrunk in place, rather than being copied.
    fn finish(&mut self) -> Option<String> {
        if self.count == 0 {
            return None;
        }
        self.json.push('}');
        if self.json.len() > 4096 {
            self.json.shrink_to_fit();
            return Some(std::mem::take(&mut self.json));
        }
        Some(self.json.as_str().to_owned())
    }
}

/// Appends `s` as a JSON string literal. The caller has refused NUL already.
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x08 => Some("\\b"),
            0x0c => Some("\\f"),
            0..=0x1f => None,
            _ => continue,
        };
        // Every byte escaped here is ASCII, so these slice bounds are char boundaries.
        out.push_str(&s[start..i]);
        match esc {
            Some(e) => out.push_str(e),
            None => {
                let _ = write!(out, "\\u{:04x}", b);
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Appends a float as a JSON number, keeping a `.0` on integral values so that the
/// value still reads back as a float.
fn json_float<T: std::fmt::Display + std::fmt::LowerExp + Into<f64> + Copy>(
    out: &mut String,
    v: T,
) {
    let start = out.len();
    let _ = crate::reader::fmt_float(out, v.into(), &v);
    if !out[start..].contains(['.', 'e', 'E']) {
        out.push_str(".0");
    }
}

/// Appends the value whose header is `tok` as JSON, reading its children from `r`.
///
/// One function on purpose (over 100 lines): one arm per MessagePack kind, each a few
/// lines, iterative for nesting (no recursion a hostile frame could deepen); the arms
/// share the output, the depth and the error context.
fn json_value(
    r: &mut Reader<'_>,
    tok: Token<'_>,
    out: &mut String,
    depth: usize,
    index: usize,
    key: &str,
) -> Result<(), PointError> {
    // The key as messages quote it (cut to 40 characters).
    let qk = quoted(key);
    match tok {
        Token::Nil => out.push_str("null"),
        Token::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        Token::UInt(v) => {
            let _ = write!(out, "{v}");
        }
        Token::Int(v) => {
            let _ = write!(out, "{v}");
        }
        Token::F32(v) if v.is_finite() => json_float(out, v),
        Token::F64(v) if v.is_finite() => json_float(out, v),
        Token::F32(_) | Token::F64(_) => {
            return Err(reject(
                index,
                format!("point {index}: extra key {qk} holds {tok}, which JSON cannot represent"),
            ))
        }
        Token::Str(b) => {
            let s = std::str::from_utf8(b).map_err(|_| {
                reject(
                    index,
                    format!("point {index}: extra key {qk} holds {tok}"),
                )
            })?;
            if s.contains('\0') {
                return Err(reject(
                    index,
                    format!(
                        "point {index}: extra key {qk} holds a string with a NUL character (U+0000), which jsonb cannot store"
                    ),
                ));
            }
            json_string(out, s);
        }
        Token::Bin(b) => {
            out.push('"');
            base64::engine::general_purpose::STANDARD.encode_string(b, out);
            out.push('"');
        }
        Token::Ext(-1, data) => {
            let ts = ext_timestamp(data)
                .and_then(|(s, n)| chrono::DateTime::from_timestamp(s, n))
                .ok_or_else(|| {
                    reject(
                        index,
                        format!(
                            "point {index}: extra key {qk} holds a timestamp extension of {} bytes that is not a valid timestamp",
                            data.len()
                        ),
                    )
                })?;
            out.push('"');
            out.push_str(&ts.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
            out.push('"');
        }
        Token::Ext(ty, _) => {
            return Err(reject(
                index,
                format!(
                    "point {index}: extra key {qk} holds {tok}; only the timestamp extension (type -1) has a JSON form (got type {ty})"
                ),
            ))
        }
        Token::Array(n) | Token::Map(n) => {
            if depth >= MAX_EXTRA_DEPTH {
                return Err(reject(
                    index,
                    format!(
                        "point {index}: extra key {qk} nests arrays/maps deeper than {MAX_EXTRA_DEPTH} levels"
                    ),
                ));
            }
            let is_map = matches!(tok, Token::Map(_));
            out.push(if is_map { '{' } else { '[' });
            for j in 0..n {
                if j > 0 {
                    out.push(',');
                }
                if is_map {
                    let k = match r.next()? {
                        Token::Str(k) => k,
                        other => {
                            return Err(reject(
                                index,
                                format!(
                                    "point {index}: extra key {qk} holds a map with key {other}, which is not a string"
                                ),
                            ))
                        }
                    };
                    let k = extra_key(k, index, Place::Under(key))?;
                    json_string(out, k);
                    out.push(':');
                }
                let v = r.next()?;
                json_value(r, v, out, depth + 1, index, key)?;
            }
            out.push(if is_map { '}' } else { ']' });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escaping() {
        let mut s = String::new();
        json_string(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v, "a\"b\\c\nd\u{1}é");
    }

    #[test]
    fn json_floats_stay_floats() {
        let mut s = String::new();
        json_float(&mut s, 2.0f64);
        s.push(' ');
        json_float(&mut s, 0.1f32);
        s.push(' ');
        json_float(&mut s, -1.5f64);
        s.push(' ');
        json_float(&mut s, 1e300f64);
        s.push(' ');
        json_float(&mut s, -2.5e-7f64);
        assert_eq!(s, "2.0 0.1 -1.5 1e300 -2.5e-7");
        for t in s.split(' ') {
            let _: f64 = serde_json::from_str(t).unwrap();
        }
    }

    #[test]
    fn timestamp_sizes() {
        assert_eq!(ext_timestamp(&10u32.to_be_bytes()), Some((10, 0)));
        let v64: u64 = (5u64 << 34) | 7;
        assert_eq!(ext_timestamp(&v64.to_be_bytes()), Some((7, 5)));
        let mut b = Vec::new();
        b.extend_from_slice(&9u32.to_be_bytes());
        b.extend_from_slice(&(-3i64).to_be_bytes());
        assert_eq!(ext_timestamp(&b), Some((-3, 9)));
        assert_eq!(ext_timestamp(&[0; 5]), None);
        let bad_nanos: u64 = (1_000_000_000u64 << 34) | 7;
        assert_eq!(ext_timestamp(&bad_nanos.to_be_bytes()), None);
    }

    #[test]
    fn window_is_inclusive() {
        let limits = Limits::default();
        let w = Window::new(&limits, 1_000_000_000_000_000);
        assert_eq!(w.max - 1_000_000_000_000_000, 300_000_000);
        assert_eq!(1_000_000_000_000_000 - w.min, 7 * 86_400 * 1_000_000);
    }
}
