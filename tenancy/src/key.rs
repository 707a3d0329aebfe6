//! The API key format and the hash stored in its place.
//!
//! A key is `sail_<id>_<secret>`: `id` is 16 hex digits (64 random bits) that name the key
//! in listings, logs and the store; `secret` is 64 hex digits (256 random bits). The store
//! keeps only `BLAKE3-derive-key("sail api key v1", secret)`: a secret of 256 random bits
//! needs no slow password hash (nothing to brute-force), and the derived hash compares in
//! constant time (`blake3::Hash`'s `==`).

use std::fmt;
use std::str::FromStr;

const PREFIX: &str = "sail_";
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;
const HASH_CONTEXT: &str = "sail api key v1";

/// The stored form of a key's secret.
pub type KeyHash = blake3::Hash;

/// An API key (id and secret).
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    id: String,
    secret: String,
}

/// A string that is not an API key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a sail API key (expected sail_<16 hex digits>_<64 hex digits>)")]
pub struct KeyError;

impl ApiKey {
    /// A new random key.
    pub fn generate() -> Self {
        let id: u64 = rand::random();
        let secret: [u8; 32] = rand::random();
        Self { id: format!("{id:016x}"), secret: hex::encode(secret) }
    }

    /// The key's id (safe to show and log).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The hash the store keeps.
    pub fn hash(&self) -> KeyHash {
        blake3::Hasher::new_derive_key(HASH_CONTEXT).update(self.secret.as_bytes()).finalize()
    }
}

impl fmt::Display for ApiKey {
    /// The whole key, secret included: for the one time it is shown, and for sending.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}_{}", self.id, self.secret)
    }
}

impl fmt::Debug for ApiKey {
    /// Never the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({PREFIX}{}_…)", self.id)
    }
}

fn lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FromStr for ApiKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let rest = s.trim().strip_prefix(PREFIX).ok_or(KeyError)?;
        let (id, secret) = rest.split_once('_').ok_or(KeyError)?;
        if !lower_hex(id, ID_HEX) || !lower_hex(secret, SECRET_HEX) {
            return Err(KeyError);
        }
        Ok(Self { id: id.to_owned(), secret: secret.to_owned() })
    }
}

/// Whether `id` has the form of a key id (16 lowercase hex digits).
pub fn valid_id(id: &str) -> bool {
    lower_hex(id, ID_HEX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_hash_their_secret() {
        let k = ApiKey::generate();
        let s = k.to_string();
        assert!(s.starts_with("sail_") && s.len() == 5 + 16 + 1 + 64, "{s}");
        let p: ApiKey = s.parse().unwrap();
        assert_eq!(p, k);
        assert!(p.hash() == k.hash());
        assert!(ApiKey::generate().hash() != k.hash());
        assert!(!format!("{k:?}").contains(&k.secret), "Debug never shows the secret");
        assert!(valid_id(k.id()));
    }

    #[test]
    fn anything_else_is_not_a_key() {
        let k = ApiKey::generate().to_string();
        for bad in [
            "",
            "sail_",
            "Bearer x",
            &k[..k.len() - 1],
            &format!("{k}0"),
            &k.replace("sail_", "sale_"),
            &k.to_uppercase(),
            "sail_0123456789abcdef",
            "sail_0123456789abcdeg_0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert_eq!(bad.parse::<ApiKey>(), Err(KeyError), "{bad:?}");
        }
        // Surrounding whitespace (a key file's newline) is fine.
        assert!(format!(" {k}\n").parse::<ApiKey>().is_ok());
    }
}
