//! Writes the seed corpus of the cargo-fuzz targets in /fuzz (valid frames of every
//! kind) and checks each seed decodes. Ignored by default because it writes files:
//! `cargo test -p dbx-proto --test fuzz_corpus -- --ignored`.

mod common;

use std::path::PathBuf;

use bytes::BytesMut;
use common::*;
use dbx_core::Point;
use dbx_proto::{
    decode_client, encode_batch_with, encode_bye, encode_datagram, encode_datagram_mac,
    encode_hello, encode_ping, open_datagram, AircraftRef, EncodeOptions, PointForm, TimestampForm,
};
use uuid::Uuid;

/// The signature both datagram encoders share.
type EncodeDatagram = fn(
    &mut BytesMut,
    &str,
    Option<u64>,
    &AircraftRef,
    Uuid,
    &[Point],
    EncodeOptions,
) -> Result<(), dbx_proto::EncodeError>;

fn points() -> Vec<Point> {
    let mut a = Point::new(NOW - 1_000_001, 1);
    a.lat = Some(47.5);
    a.lon = Some(-122.25);
    a.alt = Some(120.0);
    a.hdg = Some(360.0);
    a.rpm = Some(vec![5000.0, 5100.0]);
    a.fix = Some(3);
    a.sats = Some(12);
    let mut b = Point::new(NOW, 2);
    b.bp = Some(99.5);
    b.extra = Some(r#"{"mode":"AUTO","n":[1,2.5,null,true],"o":{"k":"v"}}"#.into());
    vec![a, b]
}

fn batch_frame(
    seq: u64,
    form: PointForm,
    timestamps: TimestampForm,
    uuid_as_bin: bool,
) -> BytesMut {
    let mut buf = BytesMut::new();
    let aircraft = if uuid_as_bin {
        AircraftRef::Id(Uuid::from_u128(0x1234))
    } else {
        AircraftRef::Registration("N123AB".into())
    };
    let opts = EncodeOptions {
        form,
        timestamps,
        uuid_as_bin,
    };
    encode_batch_with(
        &mut buf,
        seq,
        &aircraft,
        Uuid::parse_str(SESSION).unwrap(),
        &points(),
        opts,
    )
    .unwrap();
    buf
}

#[test]
#[ignore = "writes the fuzz seed corpus into /fuzz/corpus"]
fn write_fuzz_corpus() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let frames_dir = root.join("frame_decoder");
    let points_dir = root.join("point_decoder");
    std::fs::create_dir_all(&frames_dir).unwrap();
    std::fs::create_dir_all(&points_dir).unwrap();

    let batches = [
        batch_frame(1, PointForm::Map, TimestampForm::Ext, false),
        batch_frame(2, PointForm::Array, TimestampForm::Micros, true),
        batch_frame(u64::MAX, PointForm::Map, TimestampForm::Micros, true),
    ];
    // frame_decoder: a seed byte (chunk sizes), then a whole session's frames.
    let mut session = BytesMut::from(&[7u8][..]);
    encode_hello(&mut session, "secret-key", Some("gateway-1"));
    for b in &batches {
        session.extend_from_slice(b);
    }
    encode_ping(&mut session);
    encode_bye(&mut session);
    std::fs::write(frames_dir.join("session"), &session).unwrap();
    for (i, b) in batches.iter().enumerate() {
        let mut one = BytesMut::from(&[i as u8][..]);
        one.extend_from_slice(b);
        std::fs::write(frames_dir.join(format!("batch{i}")), &one).unwrap();
    }

    // point_decoder: bare bodies and datagrams.
    for (i, b) in batches.iter().enumerate() {
        let body = &b[4..];
        assert!(matches!(
            decode_client(body, &limits(), NOW),
            Ok(dbx_proto::ClientMessage::Batch(_))
        ));
        std::fs::write(points_dir.join(format!("batch{i}")), body).unwrap();
    }
    for (i, form) in [PointForm::Map, PointForm::Array].into_iter().enumerate() {
        let opts = EncodeOptions {
            form,
            ..EncodeOptions::default()
        };
        let seq = (i == 0).then_some(9);
        for (name, encode) in [
            ("datagram", encode_datagram as EncodeDatagram),
            ("datagram_mac", encode_datagram_mac),
        ] {
            let mut d = BytesMut::new();
            encode(
                &mut d,
                "secret-key",
                seq,
                &AircraftRef::Registration("N1".into()),
                Uuid::from_u128(5),
                &points(),
                opts,
            )
            .unwrap();
            let dg = open_datagram(&d).unwrap().decode(&limits(), NOW).unwrap();
            assert_eq!(dg.points, points());
            std::fs::write(points_dir.join(format!("{name}{i}")), &d).unwrap();
        }
    }
    assert!(std::fs::read_dir(&frames_dir).unwrap().count() >= 4);

    // hello_decoder: first frames, a hello with points before its t among them.
    let hello_dir = root.join("hello_decoder");
    std::fs::create_dir_all(&hello_dir).unwrap();
    let mut h = BytesMut::new();
    encode_hello(&mut h, "secret-key", Some("gateway-1"));
    std::fs::write(hello_dir.join("hello"), &h[4..]).unwrap();
    let with_points = enc(&m(vec![
        ("points", V::A(vec![pt(1), pt_with(2, vec![("k", V::Nil)])])),
        ("t", s("hello")),
        ("v", V::U(1)),
        ("key", s("k")),
    ]));
    assert!(dbx_proto::decode_hello(&with_points).is_ok());
    std::fs::write(hello_dir.join("hello_with_points"), &with_points).unwrap();
    std::fs::write(hello_dir.join("batch"), &batches[0][4..]).unwrap();

    // udp_datagram: datagrams of both forms, and bare batch bodies (the MAC body).
    let udp_dir = root.join("udp_datagram");
    std::fs::create_dir_all(&udp_dir).unwrap();
    for entry in std::fs::read_dir(&points_dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), udp_dir.join(entry.file_name())).unwrap();
    }
}
