//! Commit objects: an immutable record of one published change to a volume.
//!
//! Encoding (version 1, varints as in [`crate::node`]):
//! ```text
//! commit := 0x01 volume_id[16] flags parent[32]? base[32]? root[32] seq time_ms
//!           change_count message_len message
//! flags  := bit0 has parent, bit1 has base
//! ```
//! The commit id is BLAKE3 of these bytes; including the volume id makes ids unique per
//! volume, so a commit id found in a request can be checked against the volume it names.

use crate::codec::{DecodeError, Reader, Writer};
use crate::{CommitId, TreeId, VolumeId};

/// Encoding version written by this build.
pub const COMMIT_VERSION: u8 = 1;
/// Longest commit message, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// One commit of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// The volume this commit belongs to.
    pub volume: VolumeId,
    /// The head this commit was applied on (`None` for a volume's initial commit).
    pub parent: Option<CommitId>,
    /// The commit the client's changes were made against (may be older than `parent` when
    /// the commit was merged).
    pub base: Option<CommitId>,
    /// Root tree after the commit.
    pub root: TreeId,
    /// Position in the volume's history (0 = the initial empty commit).
    pub seq: u64,
    /// Server time of the commit, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Number of changes the request carried.
    pub change_count: u32,
    /// Free-form message.
    pub message: String,
}

impl Commit {
    /// Encodes the commit.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(COMMIT_VERSION);
        w.raw(&self.volume.0);
        w.u8(u8::from(self.parent.is_some()) | (u8::from(self.base.is_some()) << 1));
        if let Some(p) = &self.parent {
            w.raw(p.as_bytes());
        }
        if let Some(b) = &self.base {
            w.raw(b.as_bytes());
        }
        w.raw(self.root.as_bytes());
        w.varint(self.seq);
        w.varint(self.time_ms);
        w.varint(self.change_count as u64);
        w.bytes(self.message.as_bytes());
        w.buf
    }

    /// Encodes the commit and returns its id with the bytes.
    pub fn encode_with_id(&self) -> (CommitId, Vec<u8>) {
        let bytes = self.encode();
        (CommitId::of(&bytes), bytes)
    }

    /// Decodes and validates a commit.
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data, "commit");
        let version = r.u8()?;
        if version != COMMIT_VERSION {
            return Err(r.err(format!("unsupported version {version}")));
        }
        let mut vol = [0u8; 16];
        vol.copy_from_slice(r.raw(16)?);
        let flags = r.u8()?;
        if flags > 3 {
            return Err(r.err(format!("unknown flags {flags:#x}")));
        }
        let parent = if flags & 1 != 0 { Some(CommitId::from_bytes(r.id32()?)) } else { None };
        let base = if flags & 2 != 0 { Some(CommitId::from_bytes(r.id32()?)) } else { None };
        let root = TreeId::from_bytes(r.id32()?);
        let seq = r.varint()?;
        let time_ms = r.varint()?;
        let change_count = r.bounded(u32::MAX as u64, "change count")? as u32;
        let message = r.string(MAX_MESSAGE_BYTES, "message length")?.to_owned();
        r.finish()?;
        Ok(Self { volume: VolumeId(vol), parent, base, root, seq, time_ms, change_count, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_truncation() {
        let c = Commit {
            volume: VolumeId([7; 16]),
            parent: Some(CommitId::of(b"p")),
            base: None,
            root: TreeId::of(b"r"),
            seq: 42,
            time_ms: 1_700_000_000_000,
            change_count: 3,
            message: "hello".into(),
        };
        let bytes = c.encode();
        assert_eq!(Commit::decode(&bytes).unwrap(), c);
        for cut in 0..bytes.len() {
            assert!(Commit::decode(&bytes[..cut]).is_err());
        }
    }
}
