//! Arbitrary bytes as one frame body and as one UDP datagram. Successful decodes must
//! satisfy every protocol rule, re-encode to the same points, and hold no more memory
//! than the bound the listener charges for them.
#![no_main]

#[path = "common.rs"]
mod common;

use dbx_proto::{decode_client, open_datagram, ClientMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = common::limits();
    if let Ok(ClientMessage::Batch(b)) = decode_client(data, &limits, common::NOW) {
        common::check_memory(data.len(), &b.points, &limits);
        common::check_batch(b.seq, &b.aircraft, b.session, &b.points);
    }
    match open_datagram(data).and_then(|env| env.decode(&limits, common::NOW)) {
        Ok(d) => common::check_batch(d.seq.unwrap_or(0), &d.aircraft, d.session, &d.points),
        Err(r) => assert!(!r.msg.is_empty()),
    }
});
