//! Arbitrary bytes on the UDP path: as a datagram, and as the `body` of a MAC-form
//! datagram signed with a known key. The MAC of the signed one must verify, a MAC
//! with one bit flipped must not, opening never decodes points (so it never fails with
//! a point's code), and a body that decodes satisfies every rule and memory bound.
#![no_main]

#[path = "common.rs"]
mod common;

use dbx_proto::mac::{body_mac, key_hash, key_id, key_id_hex, verify_body_mac};
use dbx_proto::{open_datagram, DatagramAuth, MAX_DATAGRAM_BYTES};
use libfuzzer_sys::fuzz_target;

/// `{kid, mac, body}` around `body`, MessagePack-encoded by hand.
fn mac_datagram(kid: &str, mac: &[u8; 16], body: &[u8]) -> Vec<u8> {
    let mut out = vec![0x83, 0xa3];
    out.extend_from_slice(b"kid");
    out.push(0xa0 | kid.len() as u8);
    out.extend_from_slice(kid.as_bytes());
    out.push(0xa3);
    out.extend_from_slice(b"mac");
    out.extend_from_slice(&[0xc4, 16]);
    out.extend_from_slice(mac);
    out.push(0xa4);
    out.extend_from_slice(b"body");
    out.push(0xc6);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fuzz_target!(|data: &[u8]| {
    let limits = common::limits();
    match open_datagram(data) {
        Ok(env) => match env.decode(&limits, common::NOW) {
            Ok(d) => common::check_batch(d.seq.unwrap_or(0), &d.aircraft, d.session, &d.points),
            Err(r) => common::check_message(&r.msg),
        },
        Err(r) => {
            assert!(!matches!(
                r.code,
                dbx_core::RejectCode::InvalidPoint | dbx_core::RejectCode::OutOfRange
            ));
            common::check_message(&r.msg);
        }
    }
    let hash = key_hash("fuzz-key");
    let mac = body_mac(&hash, data);
    let dg = mac_datagram(&key_id_hex(&hash), &mac, data);
    if dg.len() > MAX_DATAGRAM_BYTES {
        return;
    }
    let env = open_datagram(&dg).expect("a well-formed MAC datagram opens");
    match env.auth {
        DatagramAuth::Mac { kid, mac, body } => {
            assert_eq!(kid, key_id(&hash));
            assert_eq!(body, data);
            assert!(verify_body_mac(&hash, body, &mac));
            let mut bad = mac;
            bad[data.len() % 16] ^= 1 << (data.len() % 8);
            assert!(!verify_body_mac(&hash, body, &bad));
        }
        other => panic!("{other:?}"),
    }
    if let Ok(d) = env.decode(&limits, common::NOW) {
        common::check_memory(data.len(), &d.points, &limits);
        common::check_batch(d.seq.unwrap_or(0), &d.aircraft, d.session, &d.points);
    }
});
