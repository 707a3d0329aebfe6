//! Tree nodes: one directory's entries, content-addressed like git trees.
//!
//! Encoding (version 1), all integers LEB128 varints unless noted:
//! ```text
//! node    := 0x01 (version) count entry{count}        entries sorted by name, names unique
//! entry   := name_len name type mode mtime_zigzag body
//! type    := 1 file | 2 dir | 3 symlink               (one byte)
//! file    := size policy nchunks (id[32] len){nchunks}
//! policy  := 1 size  |  2 min avg max                 (tag byte, then varints)
//! dir     := tree_id[32]
//! symlink := len target
//! ```
//! The node's id is BLAKE3 of these bytes. [`TreeNode::decode`] enforces every limit below
//! before allocating, so hostile bytes cannot make it allocate more than the input size.

use std::collections::BTreeMap;

use chunkstore::{ChunkId, ChunkPolicy};

use crate::codec::{DecodeError, Reader, Writer};
use crate::entry::{MAX_CHUNKS_PER_FILE, MAX_FILE_SIZE, MAX_SYMLINK_BYTES};
use crate::path::{MAX_NAME_BYTES, check_name};
use crate::{Entry, EntryKind, FileData, TreeId};

/// Encoding version written by this build.
pub const NODE_VERSION: u8 = 1;
/// Largest encoded node accepted (64 MiB).
pub const MAX_NODE_BYTES: usize = 64 << 20;
/// Most entries in one directory.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;

const TYPE_FILE: u8 = 1;
const TYPE_DIR: u8 = 2;
const TYPE_SYMLINK: u8 = 3;
const POLICY_FIXED: u8 = 1;
const POLICY_CDC: u8 = 2;

/// A directory: names to entries, kept sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeNode {
    /// The entries by name.
    pub entries: BTreeMap<String, Entry>,
}

impl TreeNode {
    /// Encodes the node (deterministic: equal nodes give equal bytes and ids).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(NODE_VERSION);
        w.varint(self.entries.len() as u64);
        for (name, e) in &self.entries {
            w.bytes(name.as_bytes());
            let ty = match &e.kind {
                EntryKind::File(_) => TYPE_FILE,
                EntryKind::Dir(_) => TYPE_DIR,
                EntryKind::Symlink(_) => TYPE_SYMLINK,
            };
            w.u8(ty);
            w.varint(e.mode as u64);
            w.zigzag(e.mtime_ns);
            match &e.kind {
                EntryKind::File(f) => {
                    w.varint(f.size);
                    match f.policy {
                        ChunkPolicy::Fixed { size } => {
                            w.u8(POLICY_FIXED);
                            w.varint(size);
                        }
                        ChunkPolicy::FastCdc { min, avg, max } => {
                            w.u8(POLICY_CDC);
                            w.varint(min as u64);
                            w.varint(avg as u64);
                            w.varint(max as u64);
                        }
                    }
                    w.varint(f.chunks.len() as u64);
                    for (id, len) in &f.chunks {
                        w.raw(id.as_bytes());
                        w.varint(*len as u64);
                    }
                }
                EntryKind::Dir(tree) => w.raw(tree.as_bytes()),
                EntryKind::Symlink(target) => w.bytes(target.as_bytes()),
            }
        }
        w.buf
    }

    /// Encodes the node and returns its id with the bytes.
    pub fn encode_with_id(&self) -> (TreeId, Vec<u8>) {
        let bytes = self.encode();
        (TreeId::of(&bytes), bytes)
    }

    /// Decodes and validates a node: version, limits, sorted unique valid names, valid entries.
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(data, "tree node");
        if data.len() > MAX_NODE_BYTES {
            return Err(r.err(format!("{} bytes exceeds {MAX_NODE_BYTES}", data.len())));
        }
        let version = r.u8()?;
        if version != NODE_VERSION {
            return Err(r.err(format!("unsupported version {version}")));
        }
        // Each entry takes at least 5 bytes, which bounds the count by the input size.
        let count = r.bounded(MAX_DIR_ENTRIES.min(r.remaining() / 5) as u64, "entry count")?;
        let mut entries = BTreeMap::new();
        let mut prev: Option<String> = None;
        for _ in 0..count {
            let name = r.string(MAX_NAME_BYTES, "name length")?.to_owned();
            check_name(&name).map_err(|e| r.err(e.to_string()))?;
            if prev.as_ref().is_some_and(|p| *p >= name) {
                return Err(r.err(format!("entry {name:?} out of order or duplicated")));
            }
            let ty = r.u8()?;
            let mode = r.bounded(0o7777, "mode")? as u32;
            let mtime_ns = r.zigzag()?;
            let kind = match ty {
                TYPE_FILE => EntryKind::File(decode_file(&mut r)?),
                TYPE_DIR => EntryKind::Dir(TreeId::from_bytes(r.id32()?)),
                TYPE_SYMLINK => {
                    let target = r.string(MAX_SYMLINK_BYTES, "symlink length")?;
                    EntryKind::Symlink(target.to_owned())
                }
                other => return Err(r.err(format!("unknown entry type {other}"))),
            };
            let entry = Entry { mode, mtime_ns, kind };
            entry.validate().map_err(|e| r.err(format!("entry {name:?}: {e}")))?;
            prev = Some(name.clone());
            entries.insert(name, entry);
        }
        r.finish()?;
        Ok(Self { entries })
    }
}

fn decode_file(r: &mut Reader<'_>) -> Result<FileData, DecodeError> {
    let size = r.bounded(MAX_FILE_SIZE, "file size")?;
    let policy = match r.u8()? {
        POLICY_FIXED => ChunkPolicy::Fixed { size: r.varint()? },
        POLICY_CDC => {
            let min = r.bounded(u32::MAX as u64, "cdc min")? as u32;
            let avg = r.bounded(u32::MAX as u64, "cdc avg")? as u32;
            let max = r.bounded(u32::MAX as u64, "cdc max")? as u32;
            ChunkPolicy::FastCdc { min, avg, max }
        }
        other => return Err(r.err(format!("unknown chunk policy {other}"))),
    };
    // Each chunk takes at least 33 bytes.
    let n = r.bounded(MAX_CHUNKS_PER_FILE.min(r.remaining() / 33) as u64, "chunk count")?;
    let mut chunks = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let id = ChunkId::from_bytes(r.id32()?);
        let len = r.bounded(u32::MAX as u64, "chunk length")? as u32;
        chunks.push((id, len));
    }
    Ok(FileData { size, policy, chunks })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> TreeNode {
        let mut n = TreeNode::default();
        let data = b"hello world";
        n.entries.insert(
            "a.txt".into(),
            Entry {
                mode: 0o644,
                mtime_ns: -5,
                kind: EntryKind::File(FileData {
                    size: data.len() as u64,
                    policy: ChunkPolicy::Fixed { size: 8 << 20 },
                    chunks: vec![(ChunkId::of(data), data.len() as u32)],
                }),
            },
        );
        n.entries.insert("dir".into(), Entry { mode: 0o755, mtime_ns: 1, kind: EntryKind::Dir(TreeId::of(b"x")) });
        n.entries.insert("link".into(), Entry { mode: 0o777, mtime_ns: 2, kind: EntryKind::Symlink("../a".into()) });
        n
    }

    /// `sample().encode()` as the current format writes it. Tree ids are hashes of these
    /// bytes: if this changes, every stored tree id changes, and old volumes no longer match.
    /// Change it only with a format version bump.
    const SAMPLE_ENCODED_HEX: &str = "010305612e74787401a403090b018080800401d74981efa70a0c880b8d8c1985d075dbcbf679b99a5f9914e5aaf96b831a9e240b0364697202ed03023ae7d805f6789a6402acb70ad4096a85a56bf6804eaf25c0493ac697548d30b5046c696e6b03ff0304042e2e2f61";

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut s, b| {
            use std::fmt::Write;
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    #[test]
    fn roundtrip_and_determinism() {
        let n = sample();
        let bytes = n.encode();
        assert_eq!(TreeNode::decode(&bytes).unwrap(), n);
        assert_eq!(hex(&bytes), SAMPLE_ENCODED_HEX, "the tree node encoding changed");
        assert_eq!(n.clone().encode(), bytes);
        assert_eq!(TreeNode::decode(&TreeNode::default().encode()).unwrap(), TreeNode::default());
    }

    #[test]
    fn rejects_every_truncation_and_trailing_bytes() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(TreeNode::decode(&bytes[..cut]).is_err(), "prefix of {cut} accepted");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(TreeNode::decode(&long).is_err());
    }

    #[test]
    fn rejects_bad_version_and_huge_counts() {
        let mut bytes = sample().encode();
        bytes[0] = 9;
        assert!(TreeNode::decode(&bytes).is_err());
        // version 1, count = u64::MAX
        let hostile = [1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(TreeNode::decode(&hostile).is_err());
    }
}
