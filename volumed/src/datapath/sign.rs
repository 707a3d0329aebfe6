//! HMAC-SHA256 signed, expiring chunk URLs for the local backend's HTTP data path.
//!
//! A URL is `{base}/v1/chunks/{id}?exp={unix_ms}&len={bytes}&sig={hex}` where `sig` is
//! HMAC-SHA256(key, "sail-chunk-v1\n{METHOD}\n{id}\n{len}\n{exp}"). Binding the method, the
//! chunk id, the length (uploads only; 0 for downloads) and the expiry means a URL cannot be
//! replayed for another chunk, another verb, a bigger body or after it expires. The key is 32
//! random bytes created once per data directory (`url-signing.key`, mode 0600).
//!
//! A batch upload URL is `{base}/v1/batches/{digest}?exp={unix_ms}&len={bytes}&n={chunks}&sig={hex}`
//! with `sig` = HMAC-SHA256(key, "sail-batch-v1\nPUT\n{digest}\n{n}\n{len}\n{exp}"), `digest`
//! being the [`volume_model::batch::BatchDigest`] of the chunk list: the chunks (ids, lengths, order),
//! their number, the body length and the expiry are all bound. The distinct prefix keeps chunk
//! and batch signatures from standing in for each other.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Result, VolumeError};
use sysutil::clock::now_ms;

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks chunk URLs with one secret key.
#[derive(Clone)]
pub struct UrlSigner {
    key: [u8; 32],
}

/// The signed parameters of a chunk URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedParams {
    /// Expiry, ms since the Unix epoch.
    pub exp: u64,
    /// Body length for uploads, 0 for downloads.
    pub len: u64,
    /// Hex HMAC.
    pub sig: String,
}

impl UrlSigner {
    /// A signer with this key.
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// Loads the key from `path`, creating it (random, mode 0600, fsynced) on first use.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        use sysutil::keyfile::{KeyFileError, load_or_create};
        match load_or_create(path, rand::random) {
            Ok(key) => Ok(Self::new(key)),
            Err(KeyFileError::BadLength(_)) => Err(VolumeError::BadSigningKey(path.to_owned())),
            Err(KeyFileError::Io { what, source, .. }) => Err(VolumeError::io(format!("{what} {}", path.display()), source)),
        }
    }

    fn mac(&self, method: &str, id_hex: &str, len: u64, exp: u64) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("sail-chunk-v1\n{method}\n{id_hex}\n{len}\n{exp}").as_bytes());
        mac
    }

    /// Signs a URL for `method` on chunk `id_hex` with body length `len`, valid until `exp`.
    pub fn sign(&self, base_url: &str, method: &str, id_hex: &str, len: u64, exp: u64) -> String {
        let sig = hex::encode(self.mac(method, id_hex, len, exp).finalize().into_bytes());
        format!("{}/v1/chunks/{id_hex}?exp={exp}&len={len}&sig={sig}", base_url.trim_end_matches('/'))
    }

    /// Checks a request's signature (constant time) and expiry.
    pub fn verify(&self, method: &str, id_hex: &str, params: &SignedParams) -> Result<()> {
        check_mac(self.mac(method, id_hex, params.len, params.exp), &params.sig, params.exp)
    }

    fn batch_mac(&self, digest_hex: &str, n: u64, len: u64, exp: u64) -> HmacSha256 {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("sail-batch-v1\nPUT\n{digest_hex}\n{n}\n{len}\n{exp}").as_bytes());
        mac
    }

    /// Signs a batch upload URL for the chunk list with digest `digest_hex` (`n` chunks, a body
    /// of `len` bytes), valid until `exp`.
    pub fn sign_batch(&self, base_url: &str, digest_hex: &str, n: u64, len: u64, exp: u64) -> String {
        let sig = hex::encode(self.batch_mac(digest_hex, n, len, exp).finalize().into_bytes());
        format!("{}/v1/batches/{digest_hex}?exp={exp}&len={len}&n={n}&sig={sig}", base_url.trim_end_matches('/'))
    }

    /// Checks a batch URL's signature (constant time) and expiry.
    pub fn verify_batch(&self, digest_hex: &str, n: u64, params: &SignedParams) -> Result<()> {
        check_mac(self.batch_mac(digest_hex, n, params.len, params.exp), &params.sig, params.exp)
    }
}

fn check_mac(mac: HmacSha256, sig_hex: &str, exp: u64) -> Result<()> {
    let sig = hex::decode(sig_hex).map_err(|_| VolumeError::BadSignature("signature is not hex".into()))?;
    mac.verify_slice(&sig).map_err(|_| VolumeError::BadSignature("signature does not match".into()))?;
    if now_ms() > exp {
        return Err(VolumeError::BadSignature("URL has expired".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(url: &str) -> SignedParams {
        let q = url.split_once('?').unwrap().1;
        let get = |k: &str| q.split('&').find_map(|kv| kv.strip_prefix(&format!("{k}="))).unwrap().to_owned();
        SignedParams { exp: get("exp").parse().unwrap(), len: get("len").parse().unwrap(), sig: get("sig") }
    }

    #[test]
    fn sign_verify_and_reject_tampering() {
        let s = UrlSigner::new([1; 32]);
        let id = "ab".repeat(32);
        let exp = now_ms() + 60_000;
        let p = params(&s.sign("http://x", "PUT", &id, 10, exp));
        s.verify("PUT", &id, &p).unwrap();
        assert!(s.verify("GET", &id, &p).is_err(), "method is bound");
        assert!(s.verify("PUT", &"cd".repeat(32), &p).is_err(), "id is bound");
        assert!(s.verify("PUT", &id, &SignedParams { len: 11, ..p.clone() }).is_err(), "len is bound");
        assert!(s.verify("PUT", &id, &SignedParams { exp: exp + 1, ..p.clone() }).is_err());
        assert!(UrlSigner::new([2; 32]).verify("PUT", &id, &p).is_err(), "key is bound");
        let old = params(&s.sign("http://x", "PUT", &id, 10, now_ms() - 1));
        assert!(matches!(s.verify("PUT", &id, &old), Err(VolumeError::BadSignature(m)) if m.contains("expired")));
    }

    #[test]
    fn batch_signatures_bind_list_count_length_and_expiry() {
        let s = UrlSigner::new([1; 32]);
        let digest = "cd".repeat(32);
        let exp = now_ms() + 60_000;
        let url = s.sign_batch("http://x", &digest, 3, 500, exp);
        assert!(url.starts_with(&format!("http://x/v1/batches/{digest}?")));
        let p = params(&url);
        s.verify_batch(&digest, 3, &p).unwrap();
        assert!(s.verify_batch(&"ab".repeat(32), 3, &p).is_err(), "list is bound");
        assert!(s.verify_batch(&digest, 4, &p).is_err(), "count is bound");
        assert!(s.verify_batch(&digest, 3, &SignedParams { len: 501, ..p.clone() }).is_err(), "length is bound");
        assert!(s.verify_batch(&digest, 3, &SignedParams { exp: exp + 1, ..p.clone() }).is_err());
        assert!(s.verify("PUT", &digest, &p).is_err(), "a batch signature is not a chunk signature");
        let chunk = params(&s.sign("http://x", "PUT", &digest, 500, exp));
        assert!(s.verify_batch(&digest, 0, &chunk).is_err(), "and the other way round");
    }
}
