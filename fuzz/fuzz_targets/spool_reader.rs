//! Fuzzes the spool's segment and record reader: any bytes as a segment file must
//! read without a panic, allocate no more than the record limit allows, never yield
//! a record whose CRC does not match, and every payload that decodes must encode
//! back to the same bytes.

#![no_main]

use dbx_spool::record::{decode_batch, encode_batch};
use dbx_spool::segment::{self, Next};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let scan = segment::scan(data, len).expect("in-memory reads cannot fail within bounds");
    for payload in &scan.records {
        assert!(payload.len() <= segment::MAX_RECORD_BYTES as usize);
        if let Ok(b) = decode_batch(payload) {
            let mut again = Vec::new();
            let accepted = b.accepted_micros.unwrap_or(0);
            encode_batch(b.org_id, b.aircraft_id, b.session_id, &b.points, accepted, &mut again);
            match b.accepted_micros {
                Some(_) => assert_eq!(&again, payload, "decode/encode is not a round trip"),
                // Version 1 is read, version 2 written: the same bytes without `accepted`.
                None => assert_eq!(&again[9..], &payload[1..], "version 1 round trip"),
            }
        }
    }
    // Reading from every offset (as after a skip) terminates and stays in bounds.
    let mut at = segment::HEADER_BYTES.min(len);
    let mut steps = 0;
    while let Ok(next) = segment::read_next(data, at, len) {
        steps += 1;
        match next {
            Next::Record { end, .. } | Next::Corrupt { end, .. } => {
                assert!(end > at && end <= len);
                at = end;
            }
            Next::Torn { .. } | Next::End => break,
        }
        assert!(steps <= data.len() + 1);
    }
    // The walker (resync after lost framing included) always moves forward.
    let mut walker = segment::Walker::new(segment::HEADER_BYTES.min(len));
    let mut steps = 0;
    loop {
        let before = walker.offset;
        match walker.next(data, len).expect("in-memory reads cannot fail within bounds") {
            segment::Step::Record { .. }
            | segment::Step::Corrupt { .. }
            | segment::Step::Resynced { .. } => {
                assert!(walker.offset > before && walker.offset <= len);
            }
            segment::Step::Torn { .. } | segment::Step::End => break,
        }
        steps += 1;
        assert!(steps <= data.len() + 1);
    }
    // The payload decoder on its own, on raw bytes.
    let _ = decode_batch(data);
});
