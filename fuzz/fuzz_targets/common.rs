//! Invariants every successful decode must hold, shared by the fuzz targets.
#![allow(dead_code)] // each target uses some of these

use bytes::BytesMut;
use dbx_core::Point;
use dbx_proto::{
    decode_client, encode_batch_with, AircraftRef, ClientMessage, EncodeOptions, Limits, PointForm,
    TimestampForm,
};
use uuid::Uuid;

pub const NOW: i64 = 1_790_000_000_000_000;

pub fn limits() -> Limits {
    Limits {
        max_points_per_batch: 10_000,
        max_frame_bytes: 256 * 1024,
        ..Limits::default()
    }
}

/// Checks a decoded point against every rule, and that its `extra` is a JSON object
/// jsonb accepts.
pub fn check_point(p: &Point, limits: &Limits) {
    let past = limits.max_past.as_micros() as i64;
    let future = limits.max_future.as_micros() as i64;
    assert!(p.ts_micros >= NOW - past && p.ts_micros <= NOW + future);
    assert!(p.seq >= 0);
    if let Some(v) = p.lat {
        assert!((-90.0..=90.0).contains(&v));
    }
    if let Some(v) = p.lon {
        assert!((-180.0..=180.0).contains(&v));
    }
    for v in [p.alt, p.vs, p.roll, p.pitch, p.yaw, p.bv, p.bi, p.temp]
        .into_iter()
        .flatten()
    {
        assert!(v.is_finite());
    }
    for v in [p.gs, p.ias].into_iter().flatten() {
        assert!(v.is_finite() && v >= 0.0);
    }
    if let Some(v) = p.hdg {
        assert!((0.0..=360.0).contains(&v));
    }
    if let Some(v) = p.bp {
        assert!((0.0..=100.0).contains(&v));
    }
    for a in [&p.rpm, &p.cs].into_iter().flatten() {
        assert!(a.len() <= 16 && a.iter().all(|v| v.is_finite()));
    }
    if let Some(v) = p.fix {
        assert!((0..=8).contains(&v));
    }
    if let Some(v) = p.sats {
        assert!((0..=255).contains(&v));
    }
    if let Some(e) = &p.extra {
        let v: serde_json::Value = serde_json::from_str(e).expect("extra is valid JSON");
        assert!(v.as_object().is_some_and(|o| !o.is_empty()));
        assert!(!e.contains("\\u0000"));
    }
}

/// What a frame body decoded to holds no more than the bound charged for it, and
/// messages never quote much of the input.
pub fn check_memory(body_len: usize, points: &Vec<Point>, limits: &Limits) {
    let held = dbx_proto::points_heap_bytes(points);
    let bound = dbx_proto::decoded_bytes_bound(body_len, limits);
    assert!(held <= bound, "{held} > {bound} for a body of {body_len} bytes");
}

/// A rejection's message is a sentence, not an echo of the input.
pub fn check_message(msg: &str) {
    assert!(!msg.is_empty());
    assert!(msg.chars().count() <= 600, "a {}-character message", msg.chars().count());
}

/// A decoded batch re-encodes (both forms, both timestamp encodings) to the same points.
pub fn check_batch(seq: u64, aircraft: &AircraftRef, session: Uuid, points: &[Point]) {
    let limits = limits();
    assert!(!points.is_empty() && points.len() <= limits.max_points_per_batch);
    for p in points {
        check_point(p, &limits);
    }
    for form in [PointForm::Map, PointForm::Array] {
        for timestamps in [TimestampForm::Ext, TimestampForm::Micros] {
            let mut buf = BytesMut::new();
            let opts = EncodeOptions {
                form,
                timestamps,
                uuid_as_bin: false,
            };
            encode_batch_with(&mut buf, seq, aircraft, session, points, opts).expect("re-encodes");
            match decode_client(&buf[4..], &limits, NOW) {
                Ok(ClientMessage::Batch(b)) => {
                    assert_eq!(b.seq, seq);
                    assert_eq!(&b.aircraft, aircraft);
                    assert_eq!(b.points.len(), points.len());
                    for (x, y) in b.points.iter().zip(points) {
                        let strip = |p: &Point| Point {
                            extra: None,
                            ..p.clone()
                        };
                        assert_eq!(strip(x), strip(y));
                        assert_eq!(x.extra.is_some(), y.extra.is_some());
                    }
                }
                other => panic!("re-encoded batch does not decode: {other:?}"),
            }
        }
    }
}
