//! Commit objects: an immutable record of one published change to a volume.
//!
//! Encoding (version 1, varints as in [`crate::node`]):
//! ```text
//! commit := 0x01 volume_id[16] flags parent[32]? base[32]? root[32] seq time_ms
//!           change_count message_len message (author_len author)?
//! flags  := bit0 has parent, bit1 has base, bit2 has author
//! ```
//! The commit id is BLAKE3 of these bytes; including the volume id makes ids unique per
//! volume, so a commit id found in a request can be checked against the volume it names.
//!
//! The author came later: it is written only when it is not empty (flag bit 2, then the
//! author after the message), so records written before it existed decode unchanged (author
//! `""`) and keep their ids, and a commit without an author still encodes to exactly those
//! bytes. A set bit 2 with an empty author is rejected: one commit, one encoding. Builds from
//! before the author reject a record that has one (unknown flag), rather than misread it.

use crate::codec::{DecodeError, Reader, Writer};
use crate::{CommitId, TreeId, VolumeId};

/// Encoding version written by this build.
pub const COMMIT_VERSION: u8 = 1;
/// Longest commit message, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Longest commit author, in bytes.
pub const MAX_AUTHOR_BYTES: usize = 256;

const FLAG_PARENT: u8 = 1;
const FLAG_BASE: u8 = 1 << 1;
const FLAG_AUTHOR: u8 = 1 << 2;
const KNOWN_FLAGS: u8 = FLAG_PARENT | FLAG_BASE | FLAG_AUTHOR;

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
    /// Who made the commit: free-form, at most [`MAX_AUTHOR_BYTES`]; `sailbox/<id>` for a
    /// sailbox's commits, `""` when unknown (commits from before authors were recorded).
    pub author: String,
}

impl Commit {
    /// Encodes the commit.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(COMMIT_VERSION);
        w.raw(&self.volume.0);
        let flag = |on: bool, bit: u8| if on { bit } else { 0 };
        w.u8(flag(self.parent.is_some(), FLAG_PARENT)
            | flag(self.base.is_some(), FLAG_BASE)
            | flag(!self.author.is_empty(), FLAG_AUTHOR));
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
        if !self.author.is_empty() {
            w.bytes(self.author.as_bytes());
        }
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
        if flags & !KNOWN_FLAGS != 0 {
            return Err(r.err(format!("unknown flags {flags:#x}")));
        }
        let parent = if flags & FLAG_PARENT != 0 { Some(CommitId::from_bytes(r.id32()?)) } else { None };
        let base = if flags & FLAG_BASE != 0 { Some(CommitId::from_bytes(r.id32()?)) } else { None };
        let root = TreeId::from_bytes(r.id32()?);
        let seq = r.varint()?;
        let time_ms = r.varint()?;
        let change_count = r.bounded(u32::MAX as u64, "change count")? as u32;
        let message = r.string(MAX_MESSAGE_BYTES, "message length")?.to_owned();
        let author = if flags & FLAG_AUTHOR != 0 {
            let author = r.string(MAX_AUTHOR_BYTES, "author length")?;
            if author.is_empty() {
                // An empty author is written as no author at all (canonical encoding).
                return Err(r.err("empty author with the author flag set"));
            }
            author.to_owned()
        } else {
            String::new()
        };
        r.finish()?;
        Ok(Self { volume: VolumeId(vol), parent, base, root, seq, time_ms, change_count, message, author })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(author: &str) -> Commit {
        Commit {
            volume: VolumeId([7; 16]),
            parent: Some(CommitId::of(b"p")),
            base: None,
            root: TreeId::of(b"r"),
            seq: 42,
            time_ms: 1_700_000_000_000,
            change_count: 3,
            message: "hello".into(),
            author: author.into(),
        }
    }

    #[test]
    fn roundtrip_and_truncation() {
        for author in ["", "sailbox/sb-1", &"a".repeat(MAX_AUTHOR_BYTES)] {
            let c = sample(author);
            let bytes = c.encode();
            assert_eq!(Commit::decode(&bytes).unwrap(), c);
            for cut in 0..bytes.len() {
                assert!(Commit::decode(&bytes[..cut]).is_err(), "{author:?} cut at {cut}");
            }
        }
    }

    /// A record as builds before the author wrote it (no bit 2, nothing after the message).
    const OLD_RECORD: &[u8] = &[
        0x01, // version
        7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,    // volume id
        0x03, // flags: parent, base
        0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, // parent
        0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xbb, 0xbb, 0xbb, 0xbb,
        0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, // base
        0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xcc, 0xcc, 0xcc, 0xcc,
        0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, // root
        0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0x2a, // seq 42
        0x80, 0xd0, 0x95, 0xff, 0xbc, 0x31, // time_ms 1_700_000_000_000
        0x03, // change_count
        0x05, b'h', b'e', b'l', b'l', b'o', // message
    ];

    #[test]
    fn records_from_before_the_author_decode_with_an_empty_author_and_keep_their_id() {
        let c = Commit::decode(OLD_RECORD).expect("an old record decodes");
        assert_eq!(c.author, "");
        assert_eq!(c.parent, Some(CommitId::from_bytes([0xaa; 32])));
        assert_eq!(c.base, Some(CommitId::from_bytes([0xbb; 32])));
        assert_eq!(c.root, TreeId::from_bytes([0xcc; 32]));
        assert_eq!((c.seq, c.time_ms, c.change_count, c.message.as_str()), (42, 1_700_000_000_000, 3, "hello"));
        // Re-encoded, it is the same bytes, so the same id.
        let (id, bytes) = c.encode_with_id();
        assert_eq!(bytes, OLD_RECORD);
        assert_eq!(id, CommitId::of(OLD_RECORD));
    }

    #[test]
    fn an_author_is_an_optional_trailing_field() {
        let with = sample("sailbox/sb-1").encode();
        let without = sample("").encode();
        // Flag bit 2, then the length-prefixed author after everything an old record holds.
        assert_eq!(with[17], without[17] | FLAG_AUTHOR);
        assert_eq!(with[18..without.len()], without[18..]);
        assert_eq!(&with[without.len()..], b"\x0csailbox/sb-1");
        // Bit 2 with an empty author, or an author over the limit, does not decode.
        let mut empty = without.clone();
        empty[17] |= FLAG_AUTHOR;
        empty.push(0);
        assert!(Commit::decode(&empty).unwrap_err().reason.starts_with("empty author"));
        let long = sample(&"a".repeat(MAX_AUTHOR_BYTES + 1)).encode();
        assert!(Commit::decode(&long).unwrap_err().reason.starts_with("author length"));
        // Unknown flags still fail.
        let mut unknown = without;
        unknown[17] |= 1 << 3;
        assert!(Commit::decode(&unknown).unwrap_err().reason.starts_with("unknown flags"));
    }
}
