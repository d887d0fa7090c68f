//! The inputs of issue 13 ("safe on a hostile network") against the decoders: an
//! 80 000-key hello, a point with 80 000 extra keys, frames built to expand in memory.
//! What must hold: a first frame is refused at its length prefix, the hello decoder
//! never interprets what is not a hello key, extra keys stop at `max_extra_keys`, and
//! what a frame decodes to never exceeds the bound the listener charges for it.

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use dbx_core::RejectCode;
use dbx_proto::{
    decode_client, decode_hello, decoded_bytes_bound, points_heap_bytes, ClientMessage,
    DecodeError, FrameCodec, FrameError, Limits,
};
use tokio_util::codec::Decoder;

/// A point holding `n` unknown keys (`k0000001`, …; all the same key when `same`),
/// each with a `nil` value: 10 bytes a key on the wire.
fn point_with_keys(n: usize, same: bool) -> V {
    let mut e = vec![(s("ts"), V::I(NOW)), (s("seq"), V::U(1))];
    e.extend((0..n).map(|i| {
        let k = if same { 0 } else { i };
        (s(&format!("k{k:07}")), V::Nil)
    }));
    V::M(e)
}

/// The hello of the issue: `points` first (so that a decoder reading in one pass meets
/// them before it knows the type), holding one point with 80 000 unknown keys.
fn eighty_thousand_key_hello(point: V) -> Vec<u8> {
    enc(&m(vec![
        ("points", V::A(vec![point])),
        ("t", s("hello")),
        ("v", V::U(1)),
        ("key", s("dbx_not_a_key")),
    ]))
}

#[test]
fn the_80000_key_hello_is_refused_at_its_length_prefix() {
    let body = eighty_thousand_key_hello(point_with_keys(80_000, false));
    assert!(body.len() > 700_000, "{} bytes", body.len());
    let codec = FrameCodec::for_hello(Limits::default().max_hello_bytes);
    // The prefix alone decides: nothing of the body is needed, read or reserved.
    let prefix = (body.len() as u32).to_be_bytes();
    match codec.announced(&prefix) {
        Err(e @ FrameError::TooLarge { .. }) => {
            let r = e.rejection().unwrap();
            assert_eq!(r.code, RejectCode::FrameTooLarge);
            assert!(r.msg.contains("max_hello_bytes is 4096"), "{}", r.msg);
        }
        other => panic!("{other:?}"),
    }
    let mut buf = BytesMut::with_capacity(64);
    buf.put_slice(&prefix);
    buf.put_slice(&body[..32]);
    let mut codec = codec;
    assert!(matches!(
        codec.decode(&mut buf),
        Err(FrameError::TooLarge { .. })
    ));
    assert!(buf.capacity() < 1024, "reserved {}", buf.capacity());
}

#[test]
fn the_hello_decoder_steps_over_points_without_interpreting_them() {
    // Points no point decoder would accept: 80 000 copies of one key, NaN, an unknown
    // extension type, a non-string key, nesting 10 000 deep. Had decode_hello read them,
    // it would have had to refuse them (decode_client does, below); it answers with the
    // hello, which shows it only stepped over their bytes.
    let mut deep = vec![0x91u8; 10_000];
    deep.push(0xc0);
    let deep = V::Raw(deep);
    let garbage = V::M(vec![
        (s("ts"), V::F64(f64::NAN)),
        (V::U(7), V::Ext(42, vec![1, 2, 3])),
        (s("deep"), deep),
    ]);
    let hello_of = |point: V| eighty_thousand_key_hello(point);
    for point in [point_with_keys(80_000, true), garbage] {
        let body = hello_of(point.clone());
        let h = decode_hello(&body).expect("a hello");
        assert_eq!((h.v, h.key.as_str()), (1, "dbx_not_a_key"));
        // The same points in a batch are refused by the point decoder.
        let as_batch = enc(&m(vec![
            ("t", s("batch")),
            ("seq", V::U(1)),
            ("aircraft", s("N1")),
            ("session", s(SESSION)),
            ("points", V::A(vec![point])),
        ]));
        match decode_client(&as_batch, &limits(), NOW) {
            Err(DecodeError::Batch { rejection, .. }) => {
                assert_eq!(rejection.code, RejectCode::InvalidPoint, "{rejection:?}")
            }
            other => panic!("{other:?}"),
        }
        // And a batch as the first frame is refused without its points being read.
        let r = decode_hello(&as_batch).unwrap_err();
        assert_eq!(
            (r.code, r.msg.as_str()),
            (
                RejectCode::Protocol,
                "expected hello as the first frame, got batch"
            )
        );
    }
}

#[test]
fn eighty_thousand_extra_keys_after_welcome_stop_at_max_extra_keys() {
    let body = enc(&batch(1, vec![point_with_keys(80_000, false)]));
    match decode_client(&body, &limits(), NOW) {
        Err(DecodeError::Batch { rejection, .. }) => {
            assert_eq!(rejection.code, RejectCode::InvalidPoint);
            assert_eq!(rejection.index, Some(0));
            assert!(
                rejection.msg.contains("max_extra_keys is 256"),
                "{}",
                rejection.msg
            );
        }
        other => panic!("{other:?}"),
    }
    // With the limit lifted the same point decodes whole (duplicate detection by hash:
    // the quadratic scan of issue 13 took 7.7 s here), and with one key repeated at the
    // end the duplicate is still found.
    let wide = Limits {
        max_extra_keys: 100_000,
        ..limits()
    };
    match decode_client(&body, &wide, NOW) {
        Ok(ClientMessage::Batch(b)) => {
            let v: serde_json::Value =
                serde_json::from_str(b.points[0].extra.as_deref().unwrap()).unwrap();
            assert_eq!(v.as_object().unwrap().len(), 80_000);
        }
        other => panic!("{other:?}"),
    }
    let mut e = match point_with_keys(80_000, false) {
        V::M(e) => e,
        _ => unreachable!(),
    };
    e.push((s("k0000000"), V::Nil));
    let dup = enc(&batch(1, vec![V::M(e)]));
    match decode_client(&dup, &wide, NOW) {
        Err(DecodeError::Batch { rejection, .. }) => assert_eq!(
            rejection.msg,
            "point 0: key \"k0000000\" appears twice in the point"
        ),
        other => panic!("{other:?}"),
    }
}

fn check_bound(body: &[u8], limits: &Limits) -> usize {
    match decode_client(body, limits, NOW) {
        Ok(ClientMessage::Batch(b)) => {
            let held = points_heap_bytes(&b.points);
            let bound = decoded_bytes_bound(body.len(), limits);
            assert!(held <= bound, "{held} > {bound} for {} bytes", body.len());
            held
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn what_a_frame_decodes_to_stays_within_the_charged_bound() {
    let limits = limits();
    // 1 MiB of control characters in extra: the worst growth, 6 bytes of JSON a byte.
    let ctl: String = (0..(1 << 20) - 200)
        .map(|i| char::from(0x0e + (i % 17) as u8))
        .collect();
    let body = enc(&batch(1, vec![pt_with(1, vec![("c", s(&ctl))])]));
    let held = check_bound(&body, &limits);
    assert!(held > 6 * ctl.len(), "{held}");
    // Many short keys whose values are `false`: the other 6× case.
    let body = enc(&batch(
        1,
        vec![V::M(
            [(s("ts"), V::I(NOW)), (s("seq"), V::U(1))]
                .into_iter()
                .chain((0..256).map(|i| (s(&i.to_string()), V::B(false))))
                .collect(),
        )],
    ));
    check_bound(&body, &limits);
    // The smallest valid points (array form, 32-bit timestamps): the most Points a byte.
    let min_point = V::A(vec![ts32((NOW / 1_000_000) as u32), V::U(1)]);
    let body = enc(&batch(1, vec![min_point; 10_000]));
    assert_eq!(enc(&V::A(vec![ts32(1), V::U(1)])).len(), 8);
    check_bound(&body, &limits);
    // Full rpm and cs arrays of fixints.
    let arrays = pt_with(
        1,
        vec![
            ("rpm", V::A(vec![V::U(1); 16])),
            ("cs", V::A(vec![V::U(1); 16])),
        ],
    );
    check_bound(&enc(&batch(1, vec![arrays; 1000])), &limits);
}
