//! API keys are stored, compared and logged only as their SHA-256 hash: one rule for
//! every place that meets a key (the listener's authentication, the UDP MAC form, setup
//! and the tenant commands that mint keys, the tests). The database computes the same
//! hash in `dbx_aviation.generate_api_key_hash` for keys created in SQL.
//!
//! It also holds the one way dbx makes a secret: [`random_token`], the alphabet of new
//! API keys ([`new_api_key`]), of the passwords `dbx setup` gives its users, and of the
//! local servers' passwords (`dbx-localpg`, the tests).

use sha2::{Digest, Sha256};

/// Label of an organization's own key (`organizations.api_key_hash`), beside the
/// labels of its additional keys (`api_keys.label`).
pub const PRIMARY_LABEL: &str = "primary";

/// sha256(key), raw: the HMAC key of the UDP MAC form.
pub fn key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Lower-case hex of sha256(key): what `organizations.api_key_hash` and
/// `api_keys.key_hash` hold.
pub fn key_hash_hex(key: &str) -> String {
    hex::encode(key_hash(key))
}

/// A random alphanumeric token of `len` characters (about 5.95 bits each) from the
/// thread-local CSPRNG: passwords, API keys, unique names.
pub fn random_token(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A new API key: `dbx_` and 40 random alphanumerics (≈238 bits).
pub fn new_api_key() -> String {
    format!("dbx_{}", random_token(40))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_form_is_lower_case_hex_of_sha256() {
        assert_eq!(
            key_hash_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hex::encode(key_hash("abc")), key_hash_hex("abc"));
    }

    #[test]
    fn new_keys_are_dbx_and_forty_alphanumerics_and_differ() {
        let (a, b) = (new_api_key(), new_api_key());
        assert_ne!(a, b);
        let body = a.strip_prefix("dbx_").expect("dbx_ prefix");
        assert_eq!(body.len(), 40);
        assert!(body.bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
    }
}
