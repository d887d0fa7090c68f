//! Arbitrary bytes as the first frame of a connection, before `welcome`: the hello
//! decoder must agree with the full decoder on every hello, refuse everything else
//! with a connection-level code, and never look into values it does not need.
#![no_main]

#[path = "common.rs"]
mod common;

use dbx_proto::{decode_client, decode_hello, ClientMessage, DecodeError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = common::limits();
    match decode_hello(data) {
        Ok(h) => {
            assert!(h.gateway.as_ref().is_none_or(|g| g.chars().count() <= 64));
            // The full decoder reads the same hello (it may look at more, never less).
            assert_eq!(
                decode_client(data, &limits, common::NOW),
                Ok(ClientMessage::Hello(h))
            );
        }
        Err(r) => {
            assert!(!r.code.is_nack(), "{r:?}");
            common::check_message(&r.msg);
            // A frame the full decoder reads as a hello is a hello here too, and one it
            // finds malformed is malformed here too.
            match decode_client(data, &limits, common::NOW) {
                Ok(ClientMessage::Hello(h)) => panic!("decode_hello refused {h:?}: {r:?}"),
                Err(DecodeError::Connection(c)) if c.code == dbx_core::RejectCode::BadFrame => {
                    assert_eq!(r.code, dbx_core::RejectCode::BadFrame)
                }
                _ => {}
            }
        }
    }
});
