//! Property tests: any valid point, encoded in either form with either timestamp
//! encoding, decodes back to itself; batch and datagram envelopes too.

mod common;

use bytes::BytesMut;
use common::*;
use dbx_core::Point;
use dbx_proto::{
    decode_client, encode_batch_with, encode_datagram, encode_datagram_mac, open_datagram,
    AircraftRef, ClientMessage, DatagramAuth, EncodeOptions, FrameCodec, PointForm, TimestampForm,
};
use proptest::prelude::*;
use tokio_util::codec::Decoder;
use uuid::Uuid;

const PAST: i64 = 7 * 86_400 * 1_000_000;
const FUTURE: i64 = 300 * 1_000_000;

fn finite_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        -1e6f32..1e6f32,
        any::<f32>().prop_filter("finite", |f| f.is_finite()),
        Just(0.0f32),
        Just(-0.0f32),
    ]
}

fn opt<T: std::fmt::Debug + Clone>(
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<T>> {
    prop::option::of(s)
}

fn json_leaf() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        // Floats with few digits, so that JSON text round-trips exactly.
        (-1_000_000i32..1_000_000).prop_map(|i| serde_json::Value::from(f64::from(i) / 8.0)),
        "[^\u{0}]{0,12}".prop_map(serde_json::Value::from),
    ]
}

fn json_object() -> impl Strategy<Value = serde_json::Value> {
    let value = json_leaf().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    prop::collection::btree_map("[^\u{0}]{1,8}", value, 1..5)
        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect()))
}

prop_compose! {
    fn point()(
        ts in (NOW - PAST)..=(NOW + FUTURE),
        seq in 0..=i64::MAX,
        lat in opt(-90.0f64..=90.0),
        lon in opt(prop_oneof![-180.0f64..=180.0, Just(180.0), Just(-180.0)]),
        alt in opt(finite_f32()),
        gs in opt(0.0f32..1e4),
        vs in opt(finite_f32()),
        hdg in opt(prop_oneof![0.0f32..=360.0, Just(360.0)]),
        rpy in (opt(finite_f32()), opt(finite_f32()), opt(finite_f32())),
        ias in opt(0.0f32..500.0),
        bv in opt(finite_f32()),
        bi in opt(finite_f32()),
        bp in opt(prop_oneof![0.0f32..=100.0, Just(100.0)]),
        rpm in opt(prop::collection::vec(finite_f32(), 0..=16)),
        cs in opt(prop::collection::vec(finite_f32(), 0..=16)),
        fix in opt(0i16..=8),
        sats in opt(0i16..=255),
        temp in opt(finite_f32()),
        extra in opt(json_object()),
    ) -> Point {
        Point {
            ts_micros: ts, seq, lat, lon, alt, gs, vs, hdg,
            roll: rpy.0, pitch: rpy.1, yaw: rpy.2,
            ias, bv, bi, bp, rpm, cs, fix, sats, temp,
            extra: extra.map(|v| v.to_string()),
        }
    }
}

fn options() -> impl Strategy<Value = EncodeOptions> {
    (
        prop_oneof![Just(PointForm::Map), Just(PointForm::Array)],
        prop_oneof![Just(TimestampForm::Ext), Just(TimestampForm::Micros)],
        any::<bool>(),
    )
        .prop_map(|(form, timestamps, uuid_as_bin)| EncodeOptions {
            form,
            timestamps,
            uuid_as_bin,
        })
}

fn aircraft() -> impl Strategy<Value = AircraftRef> {
    prop_oneof![
        "[A-Z][A-Z0-9-]{1,8}".prop_map(AircraftRef::Registration),
        any::<u128>().prop_map(|u| AircraftRef::Id(Uuid::from_u128(u))),
    ]
}

/// Compares points, `extra` as JSON values rather than text.
fn assert_same(got: &[Point], want: &[Point]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        let json = |p: &Point| {
            p.extra
                .as_deref()
                .map(|e| serde_json::from_str::<serde_json::Value>(e).unwrap())
        };
        assert_eq!(json(g), json(w));
        let strip = |p: &Point| Point {
            extra: None,
            ..p.clone()
        };
        assert_eq!(strip(g), strip(w));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn batch_round_trips(
        points in prop::collection::vec(point(), 1..20),
        seq in any::<u64>(),
        aircraft in aircraft(),
        session in any::<u128>(),
        opts in options(),
    ) {
        let session = Uuid::from_u128(session);
        let mut buf = BytesMut::new();
        encode_batch_with(&mut buf, seq, &aircraft, session, &points, opts).unwrap();
        let body = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        match decode_client(&body, &limits(), NOW) {
            Ok(ClientMessage::Batch(b)) => {
                prop_assert_eq!(b.seq, seq);
                prop_assert_eq!(&b.aircraft, &aircraft);
                prop_assert_eq!(b.session, session);
                assert_same(&b.points, &points);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    /// Both datagram forms: the plain one carries the key; the MAC form does not, its
    /// MAC verifies with the key's hash only, and its body carries the same batch.
    #[test]
    fn datagram_round_trips(
        points in prop::collection::vec(point(), 1..5),
        seq in opt(any::<u64>()),
        key in "[ -~]{1,40}",
        opts in options(),
        mac_form in any::<bool>(),
    ) {
        let session = Uuid::from_u128(42);
        let aircraft = AircraftRef::Registration("N1".into());
        let mut buf = BytesMut::new();
        let encode = if mac_form { encode_datagram_mac } else { encode_datagram };
        encode(&mut buf, &key, seq, &aircraft, session, &points, opts).unwrap();
        let env = open_datagram(&buf).unwrap();
        let hash = dbx_proto::mac::key_hash(&key);
        match env.auth {
            DatagramAuth::Key(k) => prop_assert!(!mac_form && k == key),
            DatagramAuth::Mac { kid, mac, body } => {
                prop_assert!(mac_form);
                prop_assert!(key.len() < 8 || !buf.windows(key.len()).any(|w| w == key.as_bytes()));
                prop_assert_eq!(kid, dbx_proto::mac::key_id(&hash));
                prop_assert!(dbx_proto::mac::verify_body_mac(&hash, body, &mac));
                prop_assert!(!dbx_proto::mac::verify_body_mac(&dbx_proto::mac::key_hash("other"), body, &mac));
            }
        }
        let d = env.decode(&limits(), NOW).unwrap();
        prop_assert_eq!(d.seq, seq);
        prop_assert_eq!(d.session, session);
        assert_same(&d.points, &points);
    }

    /// Any timestamp in range survives both encodings; ext picks 32/64/96 bits.
    #[test]
    fn timestamps_round_trip(ts in (i64::MIN + 1)..=i64::MAX, micros in any::<bool>()) {
        let p = Point::new(ts, 1);
        let opts = EncodeOptions {
            timestamps: if micros { TimestampForm::Micros } else { TimestampForm::Ext },
            ..EncodeOptions::default()
        };
        let mut buf = BytesMut::new();
        encode_datagram(&mut buf, "k", None, &AircraftRef::Registration("N1".into()), Uuid::nil(), &[p], opts).unwrap();
        let wide = dbx_proto::Limits {
            max_past: std::time::Duration::from_micros(u64::MAX / 2),
            max_future: std::time::Duration::from_micros(u64::MAX / 2),
            ..limits()
        };
        let d = open_datagram(&buf).unwrap().decode(&wide, 0).unwrap();
        prop_assert_eq!(d.points[0].ts_micros, ts);
    }
}
