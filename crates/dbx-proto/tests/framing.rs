//! The frame codec against the wire: pieces, batches of frames, limits; and every
//! message through its encoder and back through the matching decoder.

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use dbx_core::RejectCode;
use dbx_proto::{
    decode_client, decode_server, encode_bye, encode_hello, encode_ping, encode_server,
    ClientMessage, FrameCodec, FrameError, Hello, ServerMessage,
};
use tokio_util::codec::{Decoder, Encoder};
use uuid::Uuid;

fn three_frames() -> BytesMut {
    let mut b = BytesMut::new();
    encode_hello(&mut b, "key-1", Some("gw"));
    encode_ping(&mut b);
    encode_bye(&mut b);
    b
}

fn decode_all(frames: Vec<BytesMut>) -> Vec<ClientMessage> {
    frames
        .iter()
        .map(|f| decode_client(f, &limits(), NOW).unwrap())
        .collect()
}

fn expected() -> Vec<ClientMessage> {
    vec![
        ClientMessage::Hello(Hello {
            v: 1,
            key: "key-1".into(),
            gateway: Some("gw".into()),
        }),
        ClientMessage::Ping,
        ClientMessage::Bye,
    ]
}

#[test]
fn three_frames_in_one_buffer() {
    let mut codec = FrameCodec::new(1024);
    let mut buf = three_frames();
    let mut frames = Vec::new();
    while let Some(f) = codec.decode(&mut buf).unwrap() {
        frames.push(f);
    }
    assert!(buf.is_empty());
    assert_eq!(decode_all(frames), expected());
}

#[test]
fn frames_fed_byte_by_byte() {
    let mut codec = FrameCodec::new(1024);
    let all = three_frames();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for &byte in all.iter() {
        buf.put_u8(byte);
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            frames.push(f);
        }
    }
    assert_eq!(decode_all(frames), expected());
}

#[test]
fn oversized_prefix_refused_before_the_body() {
    let mut codec = FrameCodec::new(100);
    let mut buf = BytesMut::from(&101u32.to_be_bytes()[..]);
    match codec.decode(&mut buf) {
        Err(
            e @ FrameError::TooLarge {
                len: 101, max: 100, ..
            },
        ) => {
            let r = e.rejection().unwrap();
            assert_eq!(r.code, RejectCode::FrameTooLarge);
            assert_eq!(
                r.msg,
                "the frame announces 101 bytes; max_frame_bytes is 100"
            );
        }
        other => panic!("{other:?}"),
    }
    // A body of exactly the limit is accepted.
    let mut buf = BytesMut::new();
    buf.put_u32(100);
    assert!(codec.decode(&mut buf).unwrap().is_none());
    buf.put_slice(&[0u8; 100]);
    assert_eq!(codec.decode(&mut buf).unwrap().unwrap().len(), 100);
    // u32::MAX with the default limit: refused without reserving anything.
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
    assert!(matches!(
        codec.decode(&mut buf),
        Err(FrameError::TooLarge {
            len: u32::MAX,
            max: 1_048_576,
            ..
        })
    ));
    assert!(buf.capacity() < 1024);
}

#[test]
fn zero_length_frame() {
    let mut codec = FrameCodec::new(100);
    let mut buf = BytesMut::from(&[0u8, 0, 0, 0, 0x80][..]);
    let e = codec.decode(&mut buf).unwrap_err();
    assert!(matches!(e, FrameError::ZeroLength));
    assert_eq!(e.rejection().unwrap().code, RejectCode::BadFrame);
}

#[test]
fn trailing_bytes_inside_a_frame() {
    let mut body = enc(&m(vec![("t", s("ping"))]));
    body.push(0x01);
    let mut buf = frame(&body);
    let f = FrameCodec::new(100).decode(&mut buf).unwrap().unwrap();
    match decode_client(&f, &limits(), NOW) {
        Err(dbx_proto::DecodeError::Connection(r)) => {
            assert_eq!(r.code, RejectCode::BadFrame);
            assert_eq!(r.msg, "the frame body has 1 trailing bytes after the map");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn server_messages_round_trip() {
    let msgs = vec![
        ServerMessage::Welcome {
            v: 1,
            org: Uuid::parse_str("11111111-2222-4333-8444-555555555555").unwrap(),
            max_frame: 1 << 20,
            max_points: 10_000,
        },
        ServerMessage::Ack { seq: u64::MAX },
        ServerMessage::Nack {
            seq: 5,
            code: RejectCode::InvalidPoint,
            msg: "point 3: lat = 91.5 is outside -90..90".into(),
            index: Some(3),
        },
        ServerMessage::Nack {
            seq: 6,
            code: RejectCode::InvalidBatch,
            msg: "x".into(),
            index: None,
        },
        ServerMessage::Error {
            code: RejectCode::ServerShutdown,
            msg: "shutting down".into(),
        },
        ServerMessage::Pong,
        ServerMessage::Bye,
    ];
    let mut codec = FrameCodec::new(1024);
    let mut buf = BytesMut::new();
    for m in &msgs {
        codec.encode(m, &mut buf).unwrap();
    }
    let mut back = Vec::new();
    while let Some(f) = codec.decode(&mut buf).unwrap() {
        back.push(decode_server(&f).unwrap());
    }
    assert_eq!(back, msgs);
}

#[test]
fn welcome_wire_shape() {
    let org = Uuid::parse_str("11111111-2222-4333-8444-555555555555").unwrap();
    let mut buf = BytesMut::new();
    encode_server(
        &ServerMessage::Welcome {
            v: 1,
            org,
            max_frame: 1024,
            max_points: 10,
        },
        &mut buf,
    );
    let expected = enc(&m(vec![
        ("t", s("welcome")),
        ("v", V::U(1)),
        ("org", s("11111111-2222-4333-8444-555555555555")),
        ("max_frame", V::U(1024)),
        ("max_points", V::U(10)),
    ]));
    assert_eq!(&buf[..4], &(expected.len() as u32).to_be_bytes());
    assert_eq!(&buf[4..], &expected[..]);
    // A nack without index carries no index key.
    let mut buf = BytesMut::new();
    encode_server(
        &ServerMessage::Nack {
            seq: 2,
            code: RejectCode::OutOfRange,
            msg: "m".into(),
            index: None,
        },
        &mut buf,
    );
    let expected = enc(&m(vec![
        ("t", s("nack")),
        ("seq", V::U(2)),
        ("code", s("out_of_range")),
        ("msg", s("m")),
    ]));
    assert_eq!(&buf[4..], &expected[..]);
}

#[test]
fn decode_server_refuses_garbage() {
    assert!(decode_server(&[0x91, 1]).is_err());
    assert!(decode_server(&enc(&m(vec![("t", s("ack"))]))).is_err());
    assert!(decode_server(&enc(&m(vec![
        ("t", s("error")),
        ("code", s("nope")),
        ("msg", s(""))
    ])))
    .is_err());
    assert!(decode_server(&enc(&m(vec![("t", s("zzz"))]))).is_err());
}
