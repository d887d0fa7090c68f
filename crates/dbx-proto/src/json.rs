//! JSON payloads: the keys of a `batch` map written as a JSON object, decoded into the
//! same validated points as MessagePack.
//!
//! The JSON text is transcoded, in one streaming pass, into the MessagePack the
//! decoder already reads, and then goes through [`decode_batch_map`]'s own code: the
//! rules, limits and rejection messages are one copy, whatever the payload's encoding.
//! The only JSON-specific rule is the point timestamp: `ts` (key `ts` of a map point,
//! element 0 of an array point) may be an RFC 3339 string, which becomes the
//! MessagePack timestamp extension; integer microseconds work as in MessagePack. A
//! string that is not RFC 3339 passes through and is refused by the point rules
//! (`invalid_point` with its index).
//!
//! Choices (mirrored in docs/mqtt.md):
//! - The text is limited to `max_frame_bytes` like a MessagePack payload; its nesting to
//!   serde_json's 128 levels (and `extra` to 32, as always).
//! - JSON integers are integers, numbers with a fraction or exponent are floats: `seq: 5.0`
//!   is refused like a MessagePack float would be.
//! - Duplicate keys stay duplicates (the transcoder keeps every entry in order), so they
//!   are refused by the same rules as in MessagePack.
//! - Text that is not exactly one JSON object is `bad_frame`.
//!
//! [`decode_batch_map`]: crate::decode_batch_map

use std::fmt;

use dbx_core::{RejectCode, Rejection};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::message::{check_payload_size, decode_batch_map_unbounded, BatchMap};
use crate::Limits;

/// Decodes a JSON `batch` object (see the module doc) into the same [`BatchMap`] as
/// [`crate::decode_batch_map`] gives for MessagePack.
pub fn decode_json_batch_map(
    text: &[u8],
    limits: &Limits,
    now_micros: i64,
) -> Result<BatchMap, Rejection> {
    check_payload_size(text.len(), limits)?;
    let packed = transcode(text)?;
    decode_batch_map_unbounded(&packed, limits, now_micros)
}

/// The JSON text as MessagePack, with point timestamps made extensions.
fn transcode(text: &[u8]) -> Result<Vec<u8>, Rejection> {
    let bad = |e: serde_json::Error| {
        Rejection::new(
            RejectCode::BadFrame,
            format!("the payload is not one valid JSON object: {e}"),
        )
    };
    let first = text.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(Rejection::new(
            RejectCode::BadFrame,
            "the JSON payload is not an object",
        ));
    }
    // MessagePack is rarely longer than the JSON it came from (see `container`).
    let mut out = Vec::with_capacity(text.len());
    let mut de = serde_json::Deserializer::from_slice(text);
    Transcode {
        out: &mut out,
        place: Place::Top,
    }
    .deserialize(&mut de)
    .map_err(bad)?;
    de.end().map_err(bad)?;
    Ok(out)
}

/// Where in the batch a value sits: only the point timestamps are treated specially.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The top-level object.
    Top,
    /// The value of the top-level `points` key.
    Points,
    /// One element of `points`.
    Point,
    /// A point's `ts`.
    Ts,
    /// Anything else.
    Other,
}

impl Place {
    /// The place of the value under `key` of a map at `self`.
    fn under_key(self, key: &str) -> Place {
        match (self, key) {
            (Place::Top, "points") => Place::Points,
            (Place::Point, "ts") => Place::Ts,
            _ => Place::Other,
        }
    }

    /// The place of element `i` of an array at `self`.
    fn at_index(self, i: u32) -> Place {
        match (self, i) {
            (Place::Points, _) => Place::Point,
            (Place::Point, 0) => Place::Ts,
            _ => Place::Other,
        }
    }
}

/// Writes the JSON value it is handed to `out` as MessagePack.
struct Transcode<'o> {
    out: &'o mut Vec<u8>,
    place: Place,
}

impl<'de> DeserializeSeed<'de> for Transcode<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// A map key: written as a MessagePack string; gives back the place of its value.
struct Key<'o> {
    out: &'o mut Vec<u8>,
    parent: Place,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = Place;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Place, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for Key<'_> {
    type Value = Place;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Place, E> {
        let _ = rmp::encode::write_str(self.out, key);
        Ok(self.parent.under_key(key))
    }
}

/// Container headers are written as map32/array32 with a placeholder count, patched
/// once the entries are counted: one pass, no buffering of children. (MessagePack
/// allows the wide header for any count; it costs at most 4 bytes per container.)
fn container(out: &mut Vec<u8>, marker: u8) -> usize {
    out.push(marker);
    out.extend_from_slice(&[0; 4]);
    out.len() - 4
}

fn patch(out: &mut [u8], at: usize, count: u32) {
    out[at..at + 4].copy_from_slice(&count.to_be_bytes());
}

impl<'de> Visitor<'de> for Transcode<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        let _ = rmp::encode::write_bool(self.out, v);
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        let _ = rmp::encode::write_sint(self.out, v);
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        let _ = rmp::encode::write_uint(self.out, v);
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        let _ = rmp::encode::write_f64(self.out, v);
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        let _ = rmp::encode::write_nil(self.out);
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        if self.place == Place::Ts {
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
                // The 96-bit timestamp extension: nanoseconds, then signed seconds.
                let _ = rmp::encode::write_ext_meta(self.out, 12, -1);
                self.out
                    .extend_from_slice(&t.timestamp_subsec_nanos().to_be_bytes());
                self.out.extend_from_slice(&t.timestamp().to_be_bytes());
                return Ok(());
            }
        }
        let _ = rmp::encode::write_str(self.out, v);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let at = container(self.out, 0xdd);
        let mut n: u32 = 0;
        while seq
            .next_element_seed(Transcode {
                out: &mut *self.out,
                place: self.place.at_index(n),
            })?
            .is_some()
        {
            n = n.saturating_add(1);
        }
        patch(self.out, at, n);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let at = container(self.out, 0xdf);
        let mut n: u32 = 0;
        while let Some(place) = map.next_key_seed(Key {
            out: &mut *self.out,
            parent: self.place,
        })? {
            map.next_value_seed(Transcode {
                out: &mut *self.out,
                place,
            })?;
            n = n.saturating_add(1);
        }
        patch(self.out, at, n);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    const NOW: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

    #[test]
    fn rfc3339_and_micros_timestamps_in_map_and_array_points() {
        let text = br#"{"session":"6f1c1c3e-8d55-4f43-9d7f-0a4f3e9a1b2c","seq":7,
            "points":[{"ts":"2026-01-01T00:00:00.123456789Z","seq":1,"lat":46.5,"x":{"k":[1,"a",null]}},
                      ["2025-12-31T23:59:59+01:00",2],
                      {"ts":1767225600000001,"seq":3,"fix":3}]}"#;
        let b = decode_json_batch_map(text, &limits(), NOW).unwrap();
        assert_eq!(b.seq, Some(7));
        assert_eq!(b.aircraft, None);
        assert_eq!(b.points.len(), 3);
        assert_eq!(b.points[0].ts_micros, NOW + 123_456);
        assert_eq!(b.points[0].lat, Some(46.5));
        assert_eq!(b.points[0].extra.as_deref(), Some(r#"{"k":[1,"a",null]}"#));
        assert_eq!(b.points[1].ts_micros, NOW - 3_600_000_000 - 1_000_000);
        assert_eq!(b.points[2].ts_micros, NOW + 1);
        assert_eq!(b.points[2].fix, Some(3));
    }

    #[test]
    fn the_messagepack_rules_apply_with_their_index() {
        let session = "6f1c1c3e-8d55-4f43-9d7f-0a4f3e9a1b2c";
        let cases: [(String, RejectCode, Option<u32>); 6] = [
            (
                format!(
                    r#"{{"session":"{session}","points":[{{"ts":1767225600000000,"seq":1}},{{"ts":1767225600000000,"seq":2,"lat":91}}]}}"#
                ),
                RejectCode::InvalidPoint,
                Some(1),
            ),
            (
                format!(r#"{{"session":"{session}","points":[{{"ts":"yesterday","seq":1}}]}}"#),
                RejectCode::InvalidPoint,
                Some(0),
            ),
            (
                format!(
                    r#"{{"session":"{session}","points":[{{"ts":1767225600000000,"seq":1.0}}]}}"#
                ),
                RejectCode::InvalidPoint,
                Some(0),
            ),
            (
                format!(
                    r#"{{"session":"{session}","points":[{{"ts":"2020-01-01T00:00:00Z","seq":1}}]}}"#
                ),
                RejectCode::OutOfRange,
                Some(0),
            ),
            (
                format!(r#"{{"session":"{session}","session":"{session}","points":[]}}"#),
                RejectCode::InvalidBatch,
                None,
            ),
            (r#"{"points":[1,2"#.to_string(), RejectCode::BadFrame, None),
        ];
        for (text, code, index) in cases {
            let r = decode_json_batch_map(text.as_bytes(), &limits(), NOW).unwrap_err();
            assert_eq!((r.code, r.index), (code, index), "{text}: {}", r.msg);
        }
    }

    #[test]
    fn not_an_object_and_trailing_text_are_bad_frames() {
        for text in [&b"[1]"[..], b"  ", b"{} {}", b"{\"a\":1} x"] {
            let r = decode_json_batch_map(text, &limits(), NOW).unwrap_err();
            assert_eq!(
                r.code,
                RejectCode::BadFrame,
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn size_limit_is_the_frame_limit() {
        let small = Limits {
            max_frame_bytes: 10,
            ..Limits::default()
        };
        let r = decode_json_batch_map(b"{\"points\":[]}", &small, NOW).unwrap_err();
        assert_eq!(r.code, RejectCode::FrameTooLarge);
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let mut text = String::from("{\"x\":");
        text.push_str(&"[".repeat(100_000));
        let r = decode_json_batch_map(text.as_bytes(), &limits(), NOW).unwrap_err();
        assert_eq!(r.code, RejectCode::BadFrame);
    }
}
