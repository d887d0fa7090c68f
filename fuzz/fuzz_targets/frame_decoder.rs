//! Arbitrary bytes as a TCP stream: split into chunks of fuzzer-chosen sizes, fed
//! through `FrameCodec`, every frame decoded with `decode_client` (and, for good
//! measure, `decode_server`). Successful decodes must satisfy every protocol rule
//! and re-encode to the same points.
#![no_main]

#[path = "common.rs"]
mod common;

use bytes::BytesMut;
use dbx_proto::{decode_client, decode_server, ClientMessage, FrameCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let limits = common::limits();
    let mut codec = FrameCodec::new(limits.max_frame_bytes);
    let mut buf = BytesMut::new();
    // Chunk sizes from a small LCG seeded by the first byte: 1..=64 bytes.
    let mut state = u32::from(seed) | 1;
    let mut rest = stream;
    'feed: while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((state >> 16) as usize % 64 + 1).min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(!frame.is_empty() && frame.len() <= limits.max_frame_bytes);
                    let _ = decode_server(&frame);
                    match decode_client(&frame, &limits, common::NOW) {
                        Ok(ClientMessage::Batch(b)) => {
                            common::check_memory(frame.len(), &b.points, &limits);
                            common::check_batch(b.seq, &b.aircraft, b.session, &b.points)
                        }
                        Ok(ClientMessage::Hello(h)) => {
                            assert!(h.gateway.is_none_or(|g| g.chars().count() <= 64))
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let r = e.rejection();
                            common::check_message(&r.msg);
                            if r.code.is_nack() {
                                assert!(matches!(e, dbx_proto::DecodeError::Batch { .. }));
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(e.rejection().is_some());
                    break 'feed;
                }
            }
        }
        // Never more buffered than one maximal frame and a chunk.
        assert!(buf.capacity() <= 2 * (4 + limits.max_frame_bytes + 64) + 8 * 1024);
    }
});
