//! The UDP MAC form of docs/protocol.md, 1.1: the long-lived API key never travels.
//!
//! A datagram carries `kid` (the first 16 hex digits of hex(sha256(key))), `mac` (the
//! first 16 bytes of HMAC-SHA256 over `body`, keyed with the 32 raw bytes of
//! sha256(key)) and `body` (the MessagePack batch map). The daemon stores only
//! sha256(key), which is exactly what it needs to verify: the HMAC key is the hash.
//! Gateways use [`crate::encode_datagram_mac`]; the listener uses [`verify_body_mac`],
//! which compares in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the truncated MAC carried in `mac`.
pub const MAC_BYTES: usize = 16;

pub use dbx_core::apikey::key_hash;

/// The key id of a key hash: its first 8 bytes, i.e. the first 16 hex digits of
/// hex(sha256(key)) read as a number.
pub fn key_id(hash: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(b)
}

/// `kid` as it travels: the first 16 hex digits (lower case) of hex(sha256(key)).
pub fn key_id_hex(hash: &[u8; 32]) -> String {
    format!("{:016x}", key_id(hash))
}

fn hmac(hash: &[u8; 32], body: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(hash).expect("HMAC takes a key of any length");
    m.update(body);
    m
}

/// The `mac` of `body` for the key whose sha256 is `hash`.
pub fn body_mac(hash: &[u8; 32], body: &[u8]) -> [u8; MAC_BYTES] {
    let full = hmac(hash, body).finalize().into_bytes();
    let mut out = [0u8; MAC_BYTES];
    out.copy_from_slice(&full[..MAC_BYTES]);
    out
}

/// Whether `mac` is the MAC of `body` under the key whose sha256 is `hash`; the
/// comparison takes the same time wherever the bytes differ.
pub fn verify_body_mac(hash: &[u8; 32], body: &[u8], mac: &[u8; MAC_BYTES]) -> bool {
    hmac(hash, body).verify_truncated_left(mac).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn kid_is_the_hex_prefix_of_the_stored_hash() {
        let h = key_hash("dbx_secret");
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(key_id_hex(&h), hex[..16]);
        assert_eq!(key_id(&h), u64::from_str_radix(&hex[..16], 16).unwrap());
    }

    #[test]
    fn mac_verifies_only_the_same_key_and_body() {
        let h = key_hash("k1");
        let mac = body_mac(&h, b"body");
        assert!(verify_body_mac(&h, b"body", &mac));
        assert!(!verify_body_mac(&h, b"bodY", &mac));
        assert!(!verify_body_mac(&key_hash("k2"), b"body", &mac));
        let mut bad = mac;
        bad[15] ^= 1;
        assert!(!verify_body_mac(&h, b"body", &bad));
    }

    #[test]
    fn matches_an_independent_hmac_sha256() {
        // RFC 4231 test case 2 ("Jefe"), with a 32-byte key made of the hash of "Jefe":
        // computed here with the generic construction, to pin the keying (raw hash
        // bytes, not hex) and the truncation (leftmost 16 bytes).
        let h = key_hash("Jefe");
        let block = 64;
        let mut k = h.to_vec();
        k.resize(block, 0);
        let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
        let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
        let inner = Sha256::digest([ipad.as_slice(), b"what do ya want for nothing?"].concat());
        let outer = Sha256::digest([opad.as_slice(), inner.as_slice()].concat());
        assert_eq!(body_mac(&h, b"what do ya want for nothing?"), outer[..16]);
    }
}
