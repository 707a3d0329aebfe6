//! Checkpoint records sealed with a host key, so a chunk a guest planted cannot pass for one.
//!
//! Why: a checkpoint record names the memory and disk manifests and the device state a
//! restore hands to the VMM, and a host that did not record the checkpoint itself (a fresh
//! data directory, another host sharing the chunk directory) finds it in the chunk store by
//! its id, `ck-<BLAKE3 of the stored bytes>`. Guest disk and memory regions are stored there
//! verbatim as chunks too, so without a seal a guest could write a record of its choosing
//! (and a device state to go with it) into a region, compute its hash, and have a restore of
//! `ck-<that hash>` load it into QEMU. A record stored as a chunk is therefore
//!
//! ```text
//! sail-checkpoint-v1\n<64 hex digits: keyed BLAKE3 of the JSON under the record key>\n<JSON>
//! ```
//!
//! and a record loaded from the chunk store is used only if its MAC checks out under this
//! host's record key. The key (32 random bytes, mode 0600) lives beside the chunk directory
//! (`<chunks>.record-key` unless configured), so hosts that share the directory share it,
//! and a guest never sees it. Records in the host's own state store are host-written and
//! need no seal; every record is validated field by field before use
//! ([`crate::model::CheckpointRecord::validate`]).

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::error::{Result, SailboxError};
use crate::gateway::constant_time_eq;

const MAGIC: &[u8] = b"sail-checkpoint-v1\n";
const MAC_HEX: usize = 64;

/// The key records are sealed with.
#[derive(Clone)]
pub struct RecordKey([u8; 32]);

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKey(..)")
    }
}

impl RecordKey {
    /// The key file's key, made (0600) if missing.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        sysutil::keyfile::load_or_create(path, rand::random)
            .map(Self)
            .map_err(|e| SailboxError::Setup(format!("the checkpoint record key {}: {e}", path.display())))
    }

    /// A key from its bytes (tests).
    pub fn from_bytes(key: [u8; 32]) -> Self {
        Self(key)
    }

    fn mac(&self, json: &[u8]) -> String {
        blake3::keyed_hash(&self.0, json).to_hex().to_string()
    }

    /// The bytes stored for a record's JSON.
    pub fn seal(&self, json: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(MAGIC.len() + MAC_HEX + 1 + json.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(self.mac(json).as_bytes());
        out.push(b'\n');
        out.extend_from_slice(json);
        Bytes::from(out)
    }

    /// The JSON of sealed bytes, if they were sealed under this key; None for anything else
    /// (plain JSON, another key, a changed byte).
    pub fn open<'a>(&self, sealed: &'a [u8]) -> Option<&'a [u8]> {
        let rest = sealed.strip_prefix(MAGIC)?;
        let (mac, rest) = rest.split_at_checked(MAC_HEX)?;
        let json = rest.strip_prefix(b"\n")?;
        let expected = self.mac(json);
        constant_time_eq(expected.as_bytes(), mac).then_some(json)
    }
}

/// Where the record key lives by default: beside the chunk directory.
pub fn default_key_path(chunks_dir: &Path) -> PathBuf {
    let name = chunks_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "chunks".into());
    chunks_dir.with_file_name(format!("{name}.record-key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_records_open_and_nothing_else_does() {
        let key = RecordKey::from_bytes([7; 32]);
        let json = br#"{"sailbox":"sb-1"}"#;
        let sealed = key.seal(json);
        assert_eq!(key.open(&sealed), Some(&json[..]));
        // What a guest can store: the JSON alone, or a seal it made up.
        assert_eq!(key.open(json), None);
        let mut forged = sealed.to_vec();
        let last = forged.len() - 2;
        forged[last] ^= 1;
        assert_eq!(key.open(&forged), None, "a changed byte of the JSON");
        let other = RecordKey::from_bytes([8; 32]);
        assert_eq!(other.open(&sealed), None, "another key");
        assert_eq!(key.open(&other.seal(json)), None);
        assert_eq!(key.open(&sealed[..MAGIC.len() + 10]), None, "cut short");
    }

    #[test]
    fn the_default_key_sits_beside_the_chunk_directory() {
        assert_eq!(default_key_path(Path::new("/d/vmm/chunks")), Path::new("/d/vmm/chunks.record-key"));
    }
}
