//! Every rule of docs/protocol.md's decoding side: each rejection code with its message and
//! index, each accepted form of each field, and the boundaries.

mod common;

use common::*;
use dbx_core::{RejectCode, Rejection};
use dbx_proto::{
    decode_client, decode_hello, open_datagram, AircraftRef, Batch, ClientMessage, Datagram,
    DatagramAuth, DecodeError, End,
};
use uuid::Uuid;

fn decode(v: &V) -> Result<ClientMessage, DecodeError> {
    decode_client(&enc(v), &limits(), NOW)
}

fn ok_batch(v: &V) -> Batch {
    match decode(v) {
        Ok(ClientMessage::Batch(b)) => b,
        other => panic!("expected a batch, got {other:?}"),
    }
}

fn nack(v: &V) -> (u64, Rejection) {
    match decode(v) {
        Err(DecodeError::Batch { seq, rejection }) => (seq, rejection),
        other => panic!("expected a nack, got {other:?}"),
    }
}

fn conn(v: &V) -> Rejection {
    conn_bytes(&enc(v))
}

fn conn_bytes(b: &[u8]) -> Rejection {
    match decode_client(b, &limits(), NOW) {
        Err(DecodeError::Connection(r)) => r,
        other => panic!("expected a connection error, got {other:?}"),
    }
}

/// The rejection of a one-point batch holding `point`.
fn point_rejection(point: V) -> Rejection {
    let (seq, r) = nack(&batch(7, vec![pt(1), point]));
    assert_eq!(seq, 7);
    r
}

fn assert_invalid_point(point: V, msg: &str) {
    let r = point_rejection(point);
    assert_eq!(r.code, RejectCode::InvalidPoint, "{r:?}");
    assert_eq!(r.index, Some(1), "{r:?}");
    assert_eq!(r.msg, msg);
}

fn one_point(point: V) -> dbx_core::Point {
    let b = ok_batch(&batch(1, vec![point]));
    assert_eq!(b.points.len(), 1);
    b.points.into_iter().next().unwrap()
}

// ---- bad_frame -------------------------------------------------------------------

#[test]
fn bad_frame_not_a_map() {
    let r = conn(&V::A(vec![V::U(1)]));
    assert_eq!(r.code, RejectCode::BadFrame);
    assert_eq!(
        r.msg,
        "the frame body is an array of 1 elements, not a MessagePack map"
    );
    assert_eq!(conn(&V::U(3)).code, RejectCode::BadFrame);
}

#[test]
fn bad_frame_empty_body() {
    let r = conn_bytes(&[]);
    assert_eq!(r.code, RejectCode::BadFrame);
    assert_eq!(r.msg, "the frame body is empty");
}

#[test]
fn bad_frame_trailing_bytes() {
    let mut b = enc(&m(vec![("t", s("ping"))]));
    b.extend_from_slice(&[0xc0, 0xc0]);
    let r = conn_bytes(&b);
    assert_eq!(r.code, RejectCode::BadFrame);
    assert_eq!(r.msg, "the frame body has 2 trailing bytes after the map");
}

#[test]
fn bad_frame_two_maps() {
    let mut b = enc(&m(vec![("t", s("ping"))]));
    b.extend(enc(&m(vec![("t", s("ping"))])));
    assert_eq!(conn_bytes(&b).code, RejectCode::BadFrame);
}

#[test]
fn bad_frame_non_string_top_level_key() {
    let v = V::M(vec![(s("t"), s("ping")), (V::U(1), V::U(2))]);
    let r = conn(&v);
    assert_eq!(r.code, RejectCode::BadFrame);
    assert_eq!(r.msg, "top-level key 1 is 1; keys must be strings");
}

#[test]
fn bad_frame_truncated_and_reserved() {
    let b = enc(&batch(1, vec![pt(1), pt(2)]));
    for cut in 1..b.len() {
        assert_eq!(
            conn_bytes(&b[..cut]).code,
            RejectCode::BadFrame,
            "cut at {cut}"
        );
    }
    assert_eq!(
        conn_bytes(&[0x81, 0xa1, b't', 0xc1]).code,
        RejectCode::BadFrame
    );
}

#[test]
fn bad_frame_wins_over_an_invalid_point() {
    let mut b = enc(&batch(1, vec![pt_with(1, vec![("lat", V::F64(95.0))])]));
    b.push(0x00);
    assert_eq!(conn_bytes(&b).code, RejectCode::BadFrame);
    // Malformed bytes after the bad point are still found.
    let mut v = enc(&m(vec![
        ("t", s("batch")),
        ("seq", V::U(1)),
        (
            "points",
            V::A(vec![pt_with(1, vec![("lat", V::F64(95.0))]), V::Nil]),
        ),
    ]));
    let last = v.len() - 1;
    v[last] = 0xc1;
    assert_eq!(conn_bytes(&v).code, RejectCode::BadFrame);
}

#[test]
fn huge_claimed_lengths_fail_fast() {
    // A 5-byte input claiming 2^32-1 elements.
    assert_eq!(
        conn_bytes(&[0xdd, 0xff, 0xff, 0xff, 0xff]).code,
        RejectCode::BadFrame
    );
    assert_eq!(
        conn_bytes(&[0xdf, 0xff, 0xff, 0xff, 0xff]).code,
        RejectCode::BadFrame
    );
    // A batch whose points array claims 2^32-1 points in a few bytes.
    let mut b = enc(&m(vec![("t", s("batch")), ("seq", V::U(1))]));
    b[0] = 0x83;
    b.extend(enc(&s("points")));
    b.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x80]);
    let started = std::time::Instant::now();
    assert_eq!(conn_bytes(&b).code, RejectCode::BadFrame);
    assert!(started.elapsed() < std::time::Duration::from_millis(100));
    // Within the limit count: still refused as malformed without allocating.
    let limits = dbx_proto::Limits {
        max_points_per_batch: usize::MAX,
        ..limits()
    };
    let started = std::time::Instant::now();
    assert!(matches!(
        decode_client(&b, &limits, NOW),
        Err(DecodeError::Connection(Rejection {
            code: RejectCode::BadFrame,
            ..
        }))
    ));
    assert!(started.elapsed() < std::time::Duration::from_millis(100));
}

// ---- protocol, unauthorized, unsupported_version ------------------------------------

#[test]
fn protocol_missing_or_unknown_t() {
    let r = conn(&m(vec![("seq", V::U(1))]));
    assert_eq!(r.code, RejectCode::Protocol);
    assert_eq!(r.msg, "the message has no key t naming its type");
    let r = conn(&m(vec![("t", s("welcome"))]));
    assert_eq!(r.code, RejectCode::Protocol);
    assert_eq!(
        r.msg,
        "t = \"welcome\" is not a client message type (hello, batch, end, ping, bye)"
    );
    let r = conn(&m(vec![("t", V::U(1))]));
    assert_eq!(r.code, RejectCode::Protocol);
    assert_eq!(r.msg, "t = 1 is not a string naming a message type");
    // Keys are case-sensitive.
    assert_eq!(conn(&m(vec![("T", s("ping"))])).code, RejectCode::Protocol);
    assert_eq!(conn(&m(vec![("t", s("PING"))])).code, RejectCode::Protocol);
    let r = conn(&m(vec![("t", s("ping")), ("t", s("ping"))]));
    assert_eq!(r.msg, "key t appears twice in the message");
}

#[test]
fn ping_bye_and_unknown_keys_ignored() {
    assert_eq!(decode(&m(vec![("t", s("ping"))])), Ok(ClientMessage::Ping));
    assert_eq!(
        decode(&m(vec![
            ("zz", V::A(vec![V::Nil])),
            ("t", s("bye")),
            ("seq", s("x"))
        ])),
        Ok(ClientMessage::Bye)
    );
}

fn hello(entries: Vec<(&str, V)>) -> V {
    let mut e = vec![("t", s("hello"))];
    e.extend(entries);
    m(e)
}

#[test]
fn hello_decodes() {
    let v = hello(vec![
        ("v", V::U(1)),
        ("key", s("k-123")),
        ("gateway", s("gw 1")),
        ("extra", V::U(5)),
    ]);
    assert_eq!(
        decode(&v),
        Ok(ClientMessage::Hello(dbx_proto::Hello {
            v: 1,
            key: "k-123".into(),
            gateway: Some("gw 1".into())
        }))
    );
    // Version 2 decodes; the listener answers unsupported_version.
    match decode(&hello(vec![("v", V::U(2)), ("key", s("k"))])) {
        Ok(ClientMessage::Hello(h)) => {
            assert_eq!(h.v, 2);
            assert_eq!(h.gateway, None);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn hello_gateway_of_64_chars_accepted_65_refused() {
    let g64 = "é".repeat(64);
    match decode(&hello(vec![
        ("v", V::U(1)),
        ("key", s("k")),
        ("gateway", s(&g64)),
    ])) {
        Ok(ClientMessage::Hello(h)) => assert_eq!(h.gateway.as_deref(), Some(g64.as_str())),
        other => panic!("{other:?}"),
    }
    let r = conn(&hello(vec![
        ("v", V::U(1)),
        ("key", s("k")),
        ("gateway", s(&"a".repeat(65))),
    ]));
    assert_eq!(r.code, RejectCode::Protocol);
    assert_eq!(
        r.msg,
        "hello: gateway is 65 characters long; at most 64 are allowed"
    );
    let r = conn(&hello(vec![
        ("v", V::U(1)),
        ("key", s("k")),
        ("gateway", V::U(3)),
    ]));
    assert_eq!(r.code, RejectCode::Protocol);
    assert_eq!(r.msg, "hello: gateway = 3 is not a UTF-8 string");
}

#[test]
fn hello_key_missing_or_not_a_string_is_unauthorized() {
    for v in [
        hello(vec![("v", V::U(1))]),
        hello(vec![("v", V::U(1)), ("key", V::U(12))]),
        hello(vec![("v", V::U(1)), ("key", V::Bin(b"k".to_vec()))]),
        hello(vec![("v", V::U(1)), ("key", V::Nil)]),
    ] {
        let r = conn(&v);
        assert_eq!(r.code, RejectCode::Unauthorized);
        assert_eq!(r.msg, "hello: key is missing or not a string");
    }
}

#[test]
fn hello_version_missing_or_mistyped() {
    let r = conn(&hello(vec![("key", s("k"))]));
    assert_eq!(r.code, RejectCode::UnsupportedVersion);
    assert_eq!(
        r.msg,
        "hello: key v is missing; this server speaks version 1"
    );
    let r = conn(&hello(vec![("v", s("1")), ("key", s("k"))]));
    assert_eq!(r.code, RejectCode::UnsupportedVersion);
    assert_eq!(
        r.msg,
        "hello: v = \"1\" is not a protocol version; this server speaks version 1"
    );
}

#[test]
fn batch_seq_missing_or_mistyped_is_protocol() {
    let v = m(vec![
        ("t", s("batch")),
        ("aircraft", s("N1")),
        ("session", s(SESSION)),
        ("points", V::A(vec![pt(1)])),
    ]);
    let r = conn(&v);
    assert_eq!(r.code, RejectCode::Protocol);
    assert_eq!(
        r.msg,
        "batch: key seq is missing, so the batch cannot be acknowledged"
    );
    let v = m(vec![
        ("t", s("batch")),
        ("seq", V::I(-1)),
        ("aircraft", s("N1")),
        ("session", s(SESSION)),
        ("points", V::A(vec![pt(1)])),
    ]);
    let r = conn(&v);
    assert_eq!(r.code, RejectCode::Protocol);
    assert_eq!(
        r.msg,
        "batch: seq = -1 is not an unsigned 64-bit integer, so the batch cannot be acknowledged"
    );
}

// ---- end (protocol 1.1) -----------------------------------------------------------

#[test]
fn end_carries_seq_and_session_in_every_accepted_form() {
    let id = Uuid::parse_str(SESSION).unwrap();
    let want = Ok(ClientMessage::End(End {
        seq: u64::MAX,
        session: id,
    }));
    let v = m(vec![
        ("t", s("end")),
        ("seq", V::U(u64::MAX)),
        ("session", s(SESSION)),
    ]);
    assert_eq!(decode(&v), want);
    // 16-byte binary, and keys `end` does not define (ignored), in any order.
    let v = m(vec![
        ("session", V::Bin(id.as_bytes().to_vec())),
        ("aircraft", s("N1")),
        ("seq", V::U(u64::MAX)),
        ("t", s("end")),
    ]);
    assert_eq!(decode(&v), want);
    // The encoder the Rust clients use says the same.
    let mut b = bytes::BytesMut::new();
    dbx_proto::encode_end(&mut b, 42, id);
    assert_eq!(
        decode_client(&b[4..], &limits(), NOW),
        Ok(ClientMessage::End(End {
            seq: 42,
            session: id
        }))
    );
}

#[test]
fn end_without_a_valid_seq_is_protocol() {
    let r = conn(&m(vec![("t", s("end")), ("session", s(SESSION))]));
    assert_eq!(r.code, RejectCode::Protocol);
    assert_eq!(
        r.msg,
        "end: key seq is missing, so the end cannot be acknowledged"
    );
    let r = conn(&m(vec![
        ("t", s("end")),
        ("seq", s("3")),
        ("session", s(SESSION)),
    ]));
    assert_eq!(r.code, RejectCode::Protocol);
    assert_eq!(
        r.msg,
        "end: seq = \"3\" is not an unsigned 64-bit integer, so the end cannot be acknowledged"
    );
    let r = conn(&m(vec![
        ("t", s("end")),
        ("seq", V::U(1)),
        ("seq", V::U(2)),
        ("session", s(SESSION)),
    ]));
    assert_eq!(r.msg, "end: key seq appears twice");
}

#[test]
fn end_with_a_bad_session_is_nacked_invalid_batch() {
    let (seq, r) = nack(&m(vec![("t", s("end")), ("seq", V::U(5))]));
    assert_eq!(seq, 5);
    assert_eq!(r.code, RejectCode::InvalidBatch);
    assert_eq!(r.msg, "end: key session is missing");
    let (_, r) = nack(&m(vec![
        ("t", s("end")),
        ("seq", V::U(5)),
        ("session", s("not-a-uuid")),
    ]));
    assert_eq!(
        r.msg,
        "end: session = \"not-a-uuid\" is not a UUID (string or 16-byte binary)"
    );
    let (_, r) = nack(&m(vec![
        ("t", s("end")),
        ("seq", V::U(5)),
        ("session", V::Bin(vec![1; 15])),
    ]));
    assert_eq!(r.code, RejectCode::InvalidBatch);
    let (_, r) = nack(&m(vec![
        ("t", s("end")),
        ("seq", V::U(5)),
        ("session", s(SESSION)),
        ("session", s(SESSION)),
    ]));
    assert_eq!(r.msg, "end: key session appears twice");
    assert_eq!(r.index, None);
}

// ---- invalid_batch -----------------------------------------------------------------

#[test]
fn batch_seq_uses_full_u64_range() {
    let b = ok_batch(&batch(u64::MAX, vec![pt(1)]));
    assert_eq!(b.seq, u64::MAX);
    assert_eq!(b.aircraft, AircraftRef::Registration("N123AB".into()));
    assert_eq!(b.session, Uuid::parse_str(SESSION).unwrap());
}

#[test]
fn invalid_batch_missing_keys() {
    for (drop, name) in [(2, "aircraft"), (3, "session"), (4, "points")] {
        let V::M(mut e) = batch(9, vec![pt(1)]) else {
            unreachable!()
        };
        e.remove(drop);
        let (seq, r) = nack(&V::M(e));
        assert_eq!(seq, 9);
        assert_eq!(r.code, RejectCode::InvalidBatch);
        assert_eq!(r.msg, format!("batch: key {name} is missing"));
        assert_eq!(r.index, None);
    }
}

#[test]
fn invalid_batch_points_empty_oversized_mistyped() {
    let (_, r) = nack(&batch(1, vec![]));
    assert_eq!(r.code, RejectCode::InvalidBatch);
    assert_eq!(
        r.msg,
        "batch: points is empty; a batch holds 1..=10000 points"
    );
    let small = dbx_proto::Limits {
        max_points_per_batch: 3,
        ..limits()
    };
    let body = enc(&batch(1, vec![pt(1), pt(2), pt(3), pt(4)]));
    match decode_client(&body, &small, NOW) {
        Err(DecodeError::Batch { rejection, .. }) => {
            assert_eq!(rejection.code, RejectCode::InvalidBatch);
            assert_eq!(
                rejection.msg,
                "batch: points holds 4 points; at most 3 are allowed per batch"
            );
        }
        other => panic!("{other:?}"),
    }
    let body = enc(&batch(1, vec![pt(1), pt(2), pt(3)]));
    assert!(decode_client(&body, &small, NOW).is_ok());
    let v = m(vec![
        ("t", s("batch")),
        ("seq", V::U(1)),
        ("aircraft", s("N1")),
        ("session", s(SESSION)),
        ("points", m(vec![("a", V::U(1))])),
    ]);
    let (_, r) = nack(&v);
    assert_eq!(r.code, RejectCode::InvalidBatch);
    assert_eq!(
        r.msg,
        "batch: points = a map of 1 entries is not an array of points"
    );
}

#[test]
fn aircraft_and_session_forms() {
    let id = Uuid::parse_str("0e7a2c1b-6d4f-4b8a-9c3e-5f1a2b3c4d5e").unwrap();
    let sess = Uuid::parse_str(SESSION).unwrap();
    let mk = |a: V, sn: V| {
        m(vec![
            ("t", s("batch")),
            ("seq", V::U(1)),
            ("aircraft", a),
            ("session", sn),
            ("points", V::A(vec![pt(1)])),
        ])
    };
    let b = ok_batch(&mk(s(&id.to_string()), V::Bin(sess.as_bytes().to_vec())));
    assert_eq!(b.aircraft, AircraftRef::Id(id));
    assert_eq!(b.session, sess);
    let b = ok_batch(&mk(
        V::Bin(id.as_bytes().to_vec()),
        s(&sess.simple().to_string()),
    ));
    assert_eq!(b.aircraft, AircraftRef::Id(id));
    assert_eq!(b.session, sess);
    let (_, r) = nack(&mk(V::Bin(vec![1; 15]), s(SESSION)));
    assert_eq!(r.code, RejectCode::InvalidBatch);
    assert_eq!(
        r.msg,
        "batch: aircraft = binary of 15 bytes is not a 16-byte UUID"
    );
    let (_, r) = nack(&mk(s(""), s(SESSION)));
    assert_eq!(r.code, RejectCode::InvalidBatch);
    let (_, r) = nack(&mk(V::U(5), s(SESSION)));
    assert_eq!(
        r.msg,
        "batch: aircraft = 5 is neither a registration number nor an aircraft UUID"
    );
    let (_, r) = nack(&mk(s("N1"), s("not-a-uuid")));
    assert_eq!(r.code, RejectCode::InvalidBatch);
    assert_eq!(
        r.msg,
        "batch: session = \"not-a-uuid\" is not a UUID (string or 16-byte binary)"
    );
}

#[test]
fn batch_keys_in_any_order() {
    let v = m(vec![
        (
            "points",
            V::A(vec![pt(1), pt_with(2, vec![("lat", V::F64(91.5))])]),
        ),
        ("session", s(SESSION)),
        ("aircraft", s("N1")),
        ("seq", V::U(44)),
        ("t", s("batch")),
    ]);
    let (seq, r) = nack(&v);
    assert_eq!(seq, 44);
    assert_eq!(r.code, RejectCode::InvalidPoint);
    assert_eq!(r.index, Some(1));
    assert_eq!(r.msg, "point 1: lat = 91.5 is outside -90..90");
}

// ---- points: accepted forms -----------------------------------------------------------

#[test]
fn timestamp_sizes_and_micros() {
    let secs = (NOW / 1_000_000) as u32;
    assert_eq!(
        one_point(m(vec![("ts", ts32(secs)), ("seq", V::U(1))])).ts_micros,
        i64::from(secs) * 1_000_000
    );
    let p = one_point(m(vec![
        ("ts", ts64(u64::from(secs), 123_456_789)),
        ("seq", V::U(1)),
    ]));
    assert_eq!(p.ts_micros, i64::from(secs) * 1_000_000 + 123_456); // 789 ns truncated
    let p = one_point(m(vec![
        ("ts", ts96(i64::from(secs), 999_999_999)),
        ("seq", V::U(1)),
    ]));
    assert_eq!(p.ts_micros, i64::from(secs) * 1_000_000 + 999_999);
    let p = one_point(m(vec![("ts", V::U(NOW as u64 - 5)), ("seq", V::U(1))]));
    assert_eq!(p.ts_micros, NOW - 5);
}

#[test]
fn bad_timestamps() {
    assert_invalid_point(
        m(vec![("ts", V::Ext(-1, vec![0; 5])), ("seq", V::U(1))]),
        "point 1: ts is a timestamp extension of 5 bytes that is not a valid timestamp (4, 8 or 12 bytes, nanoseconds below 10^9)",
    );
    assert_invalid_point(
        m(vec![("ts", ts96(1, 1_000_000_000)), ("seq", V::U(1))]),
        "point 1: ts is a timestamp extension of 12 bytes that is not a valid timestamp (4, 8 or 12 bytes, nanoseconds below 10^9)",
    );
    assert_invalid_point(
        m(vec![("ts", V::Ext(5, vec![0; 4])), ("seq", V::U(1))]),
        "point 1: ts = extension type 5 of 4 bytes is neither a timestamp extension (type -1) nor integer microseconds",
    );
    assert_invalid_point(
        m(vec![("ts", V::F64(1.5)), ("seq", V::U(1))]),
        "point 1: ts = 1.5 is neither a timestamp extension (type -1) nor integer microseconds",
    );
    assert_invalid_point(
        m(vec![("ts", ts96(i64::MAX / 2, 0)), ("seq", V::U(1))]),
        &format!(
            "point 1: ts = {} s cannot be represented in microseconds as a 64-bit integer",
            i64::MAX / 2
        ),
    );
    assert_invalid_point(
        m(vec![("ts", V::U(u64::MAX)), ("seq", V::U(1))]),
        "point 1: ts = 18446744073709551615 µs does not fit a signed 64-bit integer",
    );
    assert_invalid_point(
        m(vec![("seq", V::U(1))]),
        "point 1: ts is missing; it is required",
    );
    assert_invalid_point(
        m(vec![("ts", V::Nil), ("seq", V::U(1))]),
        "point 1: ts is missing; it is required",
    );
    assert_invalid_point(
        m(vec![("ts", V::I(NOW))]),
        "point 1: seq is missing; it is required",
    );
}

#[test]
fn out_of_range_window_inclusive() {
    let past = NOW - 7 * 86_400 * 1_000_000;
    let future = NOW + 300 * 1_000_000;
    let b = ok_batch(&batch(
        1,
        vec![
            m(vec![("ts", V::I(past)), ("seq", V::U(1))]),
            m(vec![("ts", V::I(future)), ("seq", V::U(2))]),
        ],
    ));
    assert_eq!(b.points[0].ts_micros, past);
    assert_eq!(b.points[1].ts_micros, future);
    let r = point_rejection(m(vec![("ts", V::I(past - 1)), ("seq", V::U(1))]));
    assert_eq!(r.code, RejectCode::OutOfRange);
    assert_eq!(r.index, Some(1));
    assert_eq!(
        r.msg,
        "point 1: ts = 2026-09-14T14:13:19.999999Z is outside the accepted window 2026-09-14T14:13:20Z..=2026-09-21T14:18:20Z"
    );
    let r = point_rejection(m(vec![("ts", V::I(future + 1)), ("seq", V::U(1))]));
    assert_eq!(r.code, RejectCode::OutOfRange);
    assert_eq!(r.index, Some(1));
}

#[test]
fn first_bad_point_is_named_and_invalid_wins_within_a_point() {
    let r = point_rejection(m(vec![
        ("ts", V::I(0)),
        ("seq", V::U(1)),
        ("lat", V::F64(99.0)),
    ]));
    assert_eq!(r.code, RejectCode::InvalidPoint);
    let (_, r) = nack(&batch(
        1,
        vec![
            pt(0),
            m(vec![("ts", V::I(0)), ("seq", V::U(1))]),
            pt_with(2, vec![("lat", V::F64(99.0))]),
        ],
    ));
    assert_eq!(r.code, RejectCode::OutOfRange);
    assert_eq!(r.index, Some(1));
}

#[test]
fn integers_accepted_for_floats_and_nil_is_none() {
    let p = one_point(pt_with(
        1,
        vec![
            ("lat", V::I(-45)),
            ("lon", V::U(100)),
            ("alt", V::U(1200)),
            ("gs", V::F64(12.5)),
            ("vs", V::Nil),
            ("hdg", V::U(360)),
            ("rpm", V::A(vec![V::U(5000), V::F32(5100.5), V::I(-1)])),
            ("cs", V::Nil),
            ("fix", V::U(3)),
            ("sats", V::Nil),
            ("temp", V::I(-40)),
            ("x", V::Nil),
        ],
    ));
    assert_eq!(p.lat, Some(-45.0));
    assert_eq!(p.lon, Some(100.0));
    assert_eq!(p.alt, Some(1200.0));
    assert_eq!(p.gs, Some(12.5));
    assert_eq!(p.vs, None);
    assert_eq!(p.hdg, Some(360.0));
    assert_eq!(p.rpm, Some(vec![5000.0, 5100.5, -1.0]));
    assert_eq!(p.cs, None);
    assert_eq!(p.fix, Some(3));
    assert_eq!(p.sats, None);
    assert_eq!(p.temp, Some(-40.0));
    assert_eq!(p.extra, None);
}

#[test]
fn array_form_points() {
    let arr = V::A(vec![
        V::I(NOW),
        V::U(9),
        V::F64(1.5),
        V::F64(2.5),
        V::Nil,
        V::F32(3.0),
    ]);
    let p = one_point(arr);
    assert_eq!(
        (p.ts_micros, p.seq, p.lat, p.lon, p.alt, p.gs),
        (NOW, 9, Some(1.5), Some(2.5), None, Some(3.0))
    );
    assert_eq!(p.hdg, None);
    let mut full = vec![V::I(NOW), V::U(9)];
    full.extend((2..20).map(|_| V::Nil));
    full.push(m(vec![("k", V::U(1))]));
    let p = one_point(V::A(full.clone()));
    assert_eq!(p.extra.as_deref(), Some(r#"{"k":1}"#));
    full.push(V::Nil);
    assert_invalid_point(
        V::A(full),
        "point 1: the array form holds 22 elements; at most 21 are allowed",
    );
    assert_invalid_point(
        V::A(vec![V::I(NOW)]),
        "point 1: seq is missing; it is required",
    );
    assert_invalid_point(V::U(5), "point 1 is 5; a point is a map or an array");
}

#[test]
fn boundary_values() {
    let accepted = [
        ("lat", V::F64(90.0)),
        ("lat", V::F64(-90.0)),
        ("lon", V::F64(180.0)),
        ("lon", V::F64(-180.0)),
        ("hdg", V::F64(360.0)),
        ("hdg", V::F64(0.0)),
        ("bp", V::F64(100.0)),
        ("bp", V::F64(0.0)),
        ("gs", V::F64(0.0)),
        ("ias", V::F64(0.0)),
        ("fix", V::U(0)),
        ("fix", V::U(8)),
        ("sats", V::U(0)),
        ("sats", V::U(255)),
    ];
    for (k, v) in accepted {
        one_point(pt_with(1, vec![(k, v.clone())]));
    }
    let refused = [
        (
            "lat",
            V::F64(90.000001),
            "point 1: lat = 90.000001 is outside -90..90",
        ),
        (
            "lat",
            V::F64(-90.000001),
            "point 1: lat = -90.000001 is outside -90..90",
        ),
        (
            "lon",
            V::F64(180.00001),
            "point 1: lon = 180.00001 is outside -180..180",
        ),
        (
            "lon",
            V::I(-181),
            "point 1: lon = -181 is outside -180..180",
        ),
        (
            "hdg",
            V::F64(360.0001),
            "point 1: hdg = 360.0001 is outside 0..360",
        ),
        ("hdg", V::F32(-0.5), "point 1: hdg = -0.5 is outside 0..360"),
        (
            "bp",
            V::F64(100.01),
            "point 1: bp = 100.01 is outside 0..100",
        ),
        ("bp", V::F64(-1.0), "point 1: bp = -1 is outside 0..100"),
        (
            "gs",
            V::F64(-0.1),
            "point 1: gs = -0.1 is negative; it must be >= 0",
        ),
        (
            "ias",
            V::I(-3),
            "point 1: ias = -3 is negative; it must be >= 0",
        ),
        ("fix", V::U(9), "point 1: fix = 9 is outside 0..8"),
        ("fix", V::I(-1), "point 1: fix = -1 is outside 0..8"),
        ("fix", V::F64(3.0), "point 1: fix = 3 is not an integer"),
        ("sats", V::U(256), "point 1: sats = 256 is outside 0..255"),
        (
            "lat",
            V::F64(f64::NAN),
            "point 1: lat = NaN is outside -90..90",
        ),
        (
            "hdg",
            V::F32(f32::NAN),
            "point 1: hdg = NaN is outside 0..360",
        ),
        (
            "alt",
            V::F64(f64::INFINITY),
            "point 1: alt = inf is not finite",
        ),
        ("gs", V::F32(f32::NAN), "point 1: gs = NaN is not finite"),
        (
            "vs",
            V::F64(f64::NEG_INFINITY),
            "point 1: vs = -inf is not finite",
        ),
        (
            "temp",
            V::F64(1e300),
            "point 1: temp = 1e300 does not fit a 32-bit float (real)",
        ),
        (
            "alt",
            V::F64(3.5e38),
            "point 1: alt = 3.5e38 does not fit a 32-bit float (real)",
        ),
        ("lat", s("1.0"), "point 1: lat = \"1.0\" is not a number"),
        ("roll", V::B(true), "point 1: roll = true is not a number"),
    ];
    for (k, v, msg) in refused {
        assert_invalid_point(pt_with(1, vec![(k, v)]), msg);
    }
}

#[test]
fn point_seq_rules() {
    assert_eq!(
        one_point(m(vec![("ts", V::I(NOW)), ("seq", V::U(i64::MAX as u64))])).seq,
        i64::MAX
    );
    assert_invalid_point(
        m(vec![("ts", V::I(NOW)), ("seq", V::U(i64::MAX as u64 + 1))]),
        "point 1: seq = 9223372036854775808 does not fit a signed 64-bit integer (at most 9223372036854775807)",
    );
    assert_invalid_point(
        m(vec![("ts", V::I(NOW)), ("seq", V::I(-2))]),
        "point 1: seq = -2 is negative; seq is an unsigned integer",
    );
    assert_invalid_point(
        m(vec![("ts", V::I(NOW)), ("seq", V::F64(2.0))]),
        "point 1: seq = 2 is not an unsigned integer",
    );
}

#[test]
fn rpm_and_cs_arrays() {
    let p = one_point(pt_with(
        1,
        vec![("cs", V::A((0..16).map(|i| V::F32(i as f32)).collect()))],
    ));
    assert_eq!(p.cs.unwrap().len(), 16);
    assert_invalid_point(
        pt_with(1, vec![("rpm", V::A((0..17).map(|_| V::U(1)).collect()))]),
        "point 1: rpm holds 17 values; at most 16 are allowed",
    );
    assert_invalid_point(
        pt_with(1, vec![("cs", V::A(vec![V::U(1), V::F64(f64::NAN)]))]),
        "point 1: cs[1] = NaN is not finite",
    );
    assert_invalid_point(
        pt_with(1, vec![("rpm", V::A(vec![V::Nil]))]),
        "point 1: rpm[0] = nil is not a number",
    );
    assert_invalid_point(
        pt_with(1, vec![("rpm", V::U(3))]),
        "point 1: rpm = 3 is not an array of numbers",
    );
}

#[test]
fn duplicate_known_key_in_point() {
    assert_invalid_point(
        pt_with(1, vec![("lat", V::U(1)), ("lat", V::U(2))]),
        "point 1: key lat appears twice in the point",
    );
}

// ---- extra ------------------------------------------------------------------------

#[test]
fn registration_of_20_chars_accepted_21_refused() {
    let mk = |reg: &str| {
        m(vec![
            ("t", s("batch")),
            ("seq", V::U(1)),
            ("aircraft", s(reg)),
            ("session", s(SESSION)),
            ("points", V::A(vec![pt(1)])),
        ])
    };
    let twenty = "ÉÉÉÉÉ-123456789012345"[..]
        .chars()
        .take(20)
        .collect::<String>();
    assert_eq!(
        ok_batch(&mk(&twenty)).aircraft,
        AircraftRef::Registration(twenty.clone())
    );
    let (_, r) = nack(&mk(&format!("{twenty}X")));
    assert_eq!(r.code, RejectCode::InvalidBatch);
    assert_eq!(
        r.msg,
        format!(
            "batch: aircraft = \"{twenty}X\" is a registration number of 21 characters; at most 20 are allowed"
        )
    );
    // Never echoed back whole: 40 characters of a 10 000-character value at most.
    let (_, r) = nack(&mk(&"N".repeat(10_000)));
    assert!(r.msg.len() < 200, "{}", r.msg);
    assert!(r.msg.contains("10000 characters"), "{}", r.msg);
}

/// `n` distinct extra keys, `in_x` of them inside `x`, the rest at the top of the point.
fn point_with_extra_keys(n: usize, in_x: usize) -> V {
    let mut top: Vec<(V, V)> = vec![(s("ts"), V::I(NOW)), (s("seq"), V::U(1))];
    let x: Vec<(V, V)> = (0..in_x).map(|i| (s(&format!("x{i}")), V::U(1))).collect();
    top.extend((in_x..n).map(|i| (s(&format!("k{i}")), V::Nil)));
    if in_x > 0 {
        top.push((s("x"), V::M(x)));
    }
    V::M(top)
}

#[test]
fn max_extra_keys_counts_top_level_and_x_together() {
    let p = one_point(point_with_extra_keys(256, 100));
    let v: serde_json::Value = serde_json::from_str(p.extra.as_deref().unwrap()).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 256);
    for in_x in [0, 100, 257] {
        assert_invalid_point(
            match point_with_extra_keys(257, in_x) {
                V::M(e) => V::M(e),
                _ => unreachable!(),
            },
            "point 1: more than 256 extra keys (unknown keys of the point plus entries of x); max_extra_keys is 256",
        );
    }
    // The limit is configurable.
    let small = dbx_proto::Limits {
        max_extra_keys: 2,
        ..limits()
    };
    let body = enc(&batch(1, vec![point_with_extra_keys(3, 1)]));
    match decode_client(&body, &small, NOW) {
        Err(DecodeError::Batch { rejection, .. }) => {
            assert_eq!(rejection.index, Some(0));
            assert!(
                rejection.msg.contains("max_extra_keys is 2"),
                "{rejection:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn duplicates_are_found_past_the_linear_scan_too() {
    // More keys than the linear scan covers, then a duplicate of an early one, at the
    // top and in x.
    let mut e: Vec<(&str, V)> = Vec::new();
    let names: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    for n in &names {
        e.push((n.as_str(), V::U(1)));
    }
    e.push(("k3", V::U(2)));
    assert_invalid_point(
        pt_with(1, e),
        "point 1: key \"k3\" appears twice in the point",
    );
    let x: Vec<(&str, V)> = names.iter().map(|n| (n.as_str(), V::U(1))).collect();
    assert_invalid_point(
        pt_with(1, vec![("x", m(x)), ("k39", V::Nil)]),
        "point 1: key \"k39\" appears both in x and as a key of the point; extra can hold it only once",
    );
    // ... and a point after such a one starts with no keys.
    let (_, r) = nack(&batch(
        1,
        vec![
            pt_with(1, names.iter().map(|n| (n.as_str(), V::U(1))).collect()),
            pt_with(2, vec![("k0", V::U(1)), ("k0", V::U(1))]),
        ],
    ));
    assert_eq!(
        (r.index, r.msg.as_str()),
        (Some(1), "point 1: key \"k0\" appears twice in the point")
    );
}

#[test]
fn long_keys_are_quoted_cut_short() {
    let long = "k".repeat(100_000);
    let r = point_rejection(pt_with(
        1,
        vec![(long.as_str(), V::U(1)), (long.as_str(), V::U(2))],
    ));
    assert_eq!(r.code, RejectCode::InvalidPoint);
    assert!(r.msg.len() < 200, "{}", r.msg);
    assert!(r.msg.contains("(100000 bytes)"), "{}", r.msg);
    let r = point_rejection(pt_with(1, vec![(long.as_str(), V::F64(f64::NAN))]));
    assert!(r.msg.len() < 200, "{}", r.msg);
}

// ---- the first frame, before welcome (docs/protocol.md, 1.1) -------------------------------

#[test]
fn decode_hello_reads_only_the_hello_keys() {
    let v = hello(vec![
        ("v", V::U(1)),
        ("key", s("k-1")),
        ("gateway", s("gw")),
        ("aircraft", s(&"N".repeat(50))),
        (
            "points",
            V::A(vec![pt_with(0, vec![("lat", V::F64(99.0))])]),
        ),
    ]);
    assert_eq!(
        decode_hello(&enc(&v)),
        Ok(dbx_proto::Hello {
            v: 1,
            key: "k-1".into(),
            gateway: Some("gw".into())
        })
    );
    // The same checks of the hello keys as decode_client.
    let r = decode_hello(&enc(&hello(vec![("v", V::U(1))]))).unwrap_err();
    assert_eq!(
        (r.code, r.msg.as_str()),
        (
            RejectCode::Unauthorized,
            "hello: key is missing or not a string"
        )
    );
    let r = decode_hello(&enc(&hello(vec![("key", s("k"))]))).unwrap_err();
    assert_eq!(r.code, RejectCode::UnsupportedVersion);
    // Anything else first is protocol, without its points being looked at.
    let r = decode_hello(&enc(&batch(
        1,
        vec![pt_with(0, vec![("lat", V::F64(99.0))])],
    )))
    .unwrap_err();
    assert_eq!(
        (r.code, r.msg.as_str()),
        (
            RejectCode::Protocol,
            "expected hello as the first frame, got batch"
        )
    );
    let r = decode_hello(&enc(&m(vec![("t", s("ping"))]))).unwrap_err();
    assert_eq!(r.msg, "expected hello as the first frame, got ping");
    let r = decode_hello(&enc(&m(vec![("t", s("nope"))]))).unwrap_err();
    assert_eq!(r.code, RejectCode::Protocol);
    let r = decode_hello(&enc(&m(vec![("v", V::U(1))]))).unwrap_err();
    assert_eq!(r.msg, "the message has no key t naming its type");
    // Still exactly one well-formed map.
    let mut b = enc(&hello(vec![("v", V::U(1)), ("key", s("k"))]));
    b.push(0xc0);
    assert_eq!(decode_hello(&b).unwrap_err().code, RejectCode::BadFrame);
    let b = enc(&hello(vec![
        ("v", V::U(1)),
        ("key", s("k")),
        ("points", V::A(vec![pt(1)])),
    ]));
    assert_eq!(
        decode_hello(&b[..b.len() - 2]).unwrap_err().code,
        RejectCode::BadFrame
    );
}

fn extra_of(point: V) -> serde_json::Value {
    let p = one_point(point);
    serde_json::from_str(p.extra.as_deref().expect("extra is set")).unwrap()
}

#[test]
fn unknown_keys_go_to_extra() {
    let p = one_point(pt_with(
        1,
        vec![
            ("mode", s("AUTO")),
            ("lat", V::U(1)),
            ("flags", V::A(vec![V::B(true), V::Nil, V::F64(2.0)])),
        ],
    ));
    assert_eq!(
        p.extra.as_deref(),
        Some(r#"{"mode":"AUTO","flags":[true,null,2.0]}"#)
    );
    assert_eq!(p.lat, Some(1.0));
}

#[test]
fn x_and_unknown_keys_are_merged() {
    let v = extra_of(pt_with(
        1,
        vec![
            ("a", V::U(1)),
            (
                "x",
                m(vec![("b", s("two")), ("c", m(vec![("d", V::I(-4))]))]),
            ),
            ("e", V::Nil),
        ],
    ));
    assert_eq!(
        v,
        serde_json::json!({"a": 1, "b": "two", "c": {"d": -4}, "e": null})
    );
}

#[test]
fn key_in_x_and_at_top_is_invalid() {
    assert_invalid_point(
        pt_with(1, vec![("x", m(vec![("mode", s("A"))])), ("mode", s("B"))]),
        "point 1: key \"mode\" appears both in x and as a key of the point; extra can hold it only once",
    );
    assert_invalid_point(
        pt_with(1, vec![("mode", s("B")), ("x", m(vec![("mode", s("A"))]))]),
        "point 1: key \"mode\" appears both in x and as a key of the point; extra can hold it only once",
    );
    assert_invalid_point(
        pt_with(1, vec![("x", m(vec![("k", V::U(1)), ("k", V::U(2))]))]),
        "point 1: key \"k\" appears twice in x",
    );
    assert_invalid_point(
        pt_with(1, vec![("k", V::U(1)), ("k", V::U(2))]),
        "point 1: key \"k\" appears twice in the point",
    );
}

#[test]
fn binary_becomes_base64() {
    let v = extra_of(pt_with(
        1,
        vec![("raw", V::Bin(vec![0, 1, 2, 253, 254, 255, 7]))],
    ));
    assert_eq!(v, serde_json::json!({"raw": "AAEC/f7/Bw=="}));
}

#[test]
fn timestamp_in_extra_becomes_rfc3339() {
    let v = extra_of(pt_with(
        1,
        vec![(
            "x",
            m(vec![("at", ts64(1_700_000_000, 5_000)), ("t0", ts32(0))]),
        )],
    ));
    assert_eq!(
        v,
        serde_json::json!({"at": "2023-11-14T22:13:20.000005Z", "t0": "1970-01-01T00:00:00Z"})
    );
}

#[test]
fn extra_strings_are_escaped_and_empty_x_is_null() {
    let p = one_point(pt_with(1, vec![("q", s("a\"b\\\n\u{7}é😀"))]));
    let v: serde_json::Value = serde_json::from_str(p.extra.as_deref().unwrap()).unwrap();
    assert_eq!(v["q"], "a\"b\\\n\u{7}é😀");
    assert_eq!(one_point(pt_with(1, vec![("x", m(vec![]))])).extra, None);
}

#[test]
fn extra_refusals() {
    assert_invalid_point(
        pt_with(1, vec![("x", m(vec![("k", s("a\0b"))]))]),
        "point 1: extra key \"k\" holds a string with a NUL character (U+0000), which jsonb cannot store",
    );
    assert_invalid_point(
        pt_with(1, vec![("x", m(vec![("k\0", V::U(1))]))]),
        "point 1: key \"k\\0\" in x contains a NUL character (U+0000), which jsonb cannot store",
    );
    assert_invalid_point(
        pt_with(1, vec![("bad\0", V::U(1))]),
        "point 1: key \"bad\\0\" contains a NUL character (U+0000), which jsonb cannot store",
    );
    assert_invalid_point(
        pt_with(1, vec![("k", m(vec![("in\0ner", V::U(1))]))]),
        "point 1: key \"in\\0ner\" in a map under extra key \"k\" contains a NUL character (U+0000), which jsonb cannot store",
    );
    assert_invalid_point(
        pt_with(1, vec![("k", V::Ext(7, vec![1, 2]))]),
        "point 1: extra key \"k\" holds extension type 7 of 2 bytes; only the timestamp extension (type -1) has a JSON form (got type 7)",
    );
    assert_invalid_point(
        pt_with(1, vec![("k", V::F64(f64::NAN))]),
        "point 1: extra key \"k\" holds NaN, which JSON cannot represent",
    );
    assert_invalid_point(
        pt_with(1, vec![("x", V::M(vec![(V::U(1), V::U(2))]))]),
        "point 1: x has key 1, which is not a string",
    );
    assert_invalid_point(
        pt_with(1, vec![("x", V::A(vec![]))]),
        "point 1: x = an array of 0 elements is not a map",
    );
    assert_invalid_point(
        pt_with(1, vec![("k", V::RawStr(vec![0xff, 0xfe]))]),
        "point 1: extra key \"k\" holds a string of 2 bytes that is not valid UTF-8",
    );
    assert_invalid_point(
        V::M(vec![
            (s("ts"), V::I(NOW)),
            (s("seq"), V::U(1)),
            (V::U(4), V::U(1)),
        ]),
        "point 1: key 4 is not a string",
    );
    let mut deep = V::U(1);
    for _ in 0..40 {
        deep = V::A(vec![deep]);
    }
    assert_invalid_point(
        pt_with(1, vec![("deep", deep)]),
        "point 1: extra key \"deep\" nests arrays/maps deeper than 32 levels",
    );
    let mut ok_deep = V::U(1);
    for _ in 0..32 {
        ok_deep = V::A(vec![ok_deep]);
    }
    one_point(pt_with(1, vec![("deep", ok_deep)]));
}

// ---- UDP ----------------------------------------------------------------------------

fn datagram(entries: Vec<(&str, V)>) -> Vec<u8> {
    enc(&m(entries))
}

/// Opens and decodes a plain-key datagram, checking the key it carries.
fn decode_datagram(buf: &[u8], key: &str) -> Result<Datagram, Rejection> {
    let env = open_datagram(buf)?;
    assert_eq!(env.auth, DatagramAuth::Key(key));
    env.decode(&limits(), NOW)
}

#[test]
fn datagram_decodes_with_or_without_t_and_seq() {
    let d = decode_datagram(
        &datagram(vec![
            ("key", s("k1")),
            ("aircraft", s("N1")),
            ("session", s(SESSION)),
            ("points", V::A(vec![pt(1)])),
        ]),
        "k1",
    )
    .unwrap();
    assert_eq!(d.seq, None);
    assert_eq!(d.points.len(), 1);
    let d = decode_datagram(
        &datagram(vec![
            ("t", s("batch")),
            ("seq", V::U(3)),
            ("key", s("k1")),
            ("aircraft", s("N1")),
            ("session", s(SESSION)),
            ("points", V::A(vec![pt(1)])),
        ]),
        "k1",
    )
    .unwrap();
    assert_eq!(d.seq, Some(3));
}

#[test]
fn datagram_rejections() {
    let base = || {
        vec![
            ("key", s("k1")),
            ("aircraft", s("N1")),
            ("session", s(SESSION)),
            ("points", V::A(vec![pt(1)])),
        ]
    };
    let mut e = base();
    e.push(("t", s("hello")));
    let r = open_datagram(&datagram(e)).unwrap_err();
    assert_eq!(r.code, RejectCode::Protocol);
    assert_eq!(
        r.msg,
        "datagram: t = \"hello\"; a datagram can only carry a batch"
    );
    let mut e = base();
    e.remove(0);
    let r = open_datagram(&datagram(e)).unwrap_err();
    assert_eq!(r.code, RejectCode::Unauthorized);
    let mut e = base();
    e.push(("seq", s("1")));
    let r = decode_datagram(&datagram(e), "k1").unwrap_err();
    assert_eq!(r.code, RejectCode::InvalidBatch);
    let mut e = base();
    e[3] = (
        "points",
        V::A(vec![pt(1), pt_with(2, vec![("sats", V::U(300))])]),
    );
    let r = decode_datagram(&datagram(e), "k1").unwrap_err();
    assert_eq!(r.code, RejectCode::InvalidPoint);
    assert_eq!(r.index, Some(1));
    assert_eq!(r.msg, "point 1: sats = 300 is outside 0..255");
    let r = open_datagram(&[0x93, 1, 2, 3]).unwrap_err();
    assert_eq!(r.code, RejectCode::BadFrame);
    let r = open_datagram(&vec![0u8; 65_508]).unwrap_err();
    assert_eq!(r.code, RejectCode::FrameTooLarge);
}

#[test]
fn datagram_is_opened_without_decoding_its_points() {
    // Points that would be invalid_point (and a registration over the limit): opening
    // only finds the key; the batch is judged by decode(), after authentication.
    let buf = datagram(vec![
        ("key", s("k1")),
        ("aircraft", s(&"N".repeat(21))),
        ("session", s(SESSION)),
        (
            "points",
            V::A(vec![pt_with(0, vec![("lat", V::F64(f64::NAN))])]),
        ),
    ]);
    let env = open_datagram(&buf).unwrap();
    assert_eq!(env.auth, DatagramAuth::Key("k1"));
    assert_eq!(env.batch_len(), buf.len());
    let r = env.decode(&limits(), NOW).unwrap_err();
    assert_eq!(r.code, RejectCode::InvalidBatch, "{r:?}");
}

fn mac_datagram(kid: V, mac: V, body: V) -> Vec<u8> {
    datagram(vec![("kid", kid), ("mac", mac), ("body", body)])
}

#[test]
fn mac_form_is_opened_and_its_body_decoded() {
    let body = enc(&m(vec![
        ("t", s("batch")),
        ("seq", V::U(4)),
        ("aircraft", s("N1")),
        ("session", s(SESSION)),
        ("points", V::A(vec![pt(1)])),
        ("key", s("ignored in a body")),
    ]));
    let buf = mac_datagram(
        s("00112233445566AA"),
        V::Bin(vec![7; 16]),
        V::Bin(body.clone()),
    );
    let env = open_datagram(&buf).unwrap();
    assert_eq!(
        env.auth,
        DatagramAuth::Mac {
            kid: 0x0011_2233_4455_66aa,
            mac: [7; 16],
            body: &body
        }
    );
    assert_eq!(env.batch_len(), body.len());
    let d = env.decode(&limits(), NOW).unwrap();
    assert_eq!((d.seq, d.points.len()), (Some(4), 1));
}

#[test]
fn mac_form_rejections() {
    let body = || V::Bin(enc(&m(vec![("aircraft", s("N1"))])));
    let kid = || s("0011223344556677");
    let mac = || V::Bin(vec![0; 16]);
    for (buf, msg) in [
        (
            mac_datagram(s("0011"), mac(), body()),
            "datagram: kid is missing or not 16 hex digits",
        ),
        (
            mac_datagram(s("001122334455667g"), mac(), body()),
            "datagram: kid is missing or not 16 hex digits",
        ),
        (
            mac_datagram(kid(), V::Bin(vec![0; 15]), body()),
            "datagram: mac is missing or not 16 bytes of binary",
        ),
        (
            mac_datagram(kid(), s("0123456789abcdef"), body()),
            "datagram: mac is missing or not 16 bytes of binary",
        ),
        (
            mac_datagram(kid(), mac(), s("a map in a string")),
            "datagram: body is missing or not binary",
        ),
        (
            datagram(vec![("kid", kid()), ("mac", mac())]),
            "datagram: body is missing or not binary",
        ),
        (
            datagram(vec![
                ("kid", kid()),
                ("kid", kid()),
                ("mac", mac()),
                ("body", body()),
            ]),
            "datagram: key kid appears twice",
        ),
    ] {
        let r = open_datagram(&buf).unwrap_err();
        assert_eq!((r.code, r.msg.as_str()), (RejectCode::Unauthorized, msg));
    }
    let both = datagram(vec![
        ("key", s("k")),
        ("kid", kid()),
        ("mac", mac()),
        ("body", body()),
    ]);
    let r = open_datagram(&both).unwrap_err();
    assert_eq!(r.code, RejectCode::Protocol);
    // A body that is not a map is a bad frame; one naming another type is protocol.
    let r = open_datagram(&mac_datagram(kid(), mac(), V::Bin(vec![0x93, 1, 2, 3])))
        .unwrap()
        .decode(&limits(), NOW)
        .unwrap_err();
    assert_eq!(r.code, RejectCode::BadFrame);
    let r = open_datagram(&mac_datagram(
        kid(),
        mac(),
        V::Bin(enc(&m(vec![("t", s("hello"))]))),
    ))
    .unwrap()
    .decode(&limits(), NOW)
    .unwrap_err();
    assert_eq!(r.code, RejectCode::Protocol);
}
