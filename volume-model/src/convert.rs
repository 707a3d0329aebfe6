//! Conversions between protobuf messages and the model, with full validation of everything
//! that arrives from a client.

use std::collections::{HashMap, HashSet};

use chunkstore::{ChunkId, ChunkPolicy, Chunking};
use proto::volume as pb;

use crate::volume_name::check_volume_name;
use crate::{Change, ChangeOp, CommitId, Entry, EntryKind, FileData, InvalidRequest, TreeId, VolPath};

/// Result of a validation: the valid value, or why the input is not.
pub type Result<T, E = InvalidRequest> = std::result::Result<T, E>;

/// Most changes one commit may carry.
pub const MAX_CHANGES_PER_COMMIT: usize = 100_000;
/// Most chunks one MissingChunks or ChunkUrls request may name.
pub const MAX_CHUNKS_PER_REQUEST: usize = 10_000;

/// A volume reference whose org and name passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidRef {
    /// Org name.
    pub org: String,
    /// Volume name.
    pub name: String,
}

/// Validates a volume reference.
pub fn volume_ref(r: Option<&pb::VolumeRef>) -> Result<ValidRef> {
    let r = r.ok_or_else(|| InvalidRequest::new("missing volume reference"))?;
    check_volume_name("org", &r.org)?;
    check_volume_name("volume name", &r.name)?;
    Ok(ValidRef { org: r.org.clone(), name: r.name.clone() })
}

/// A commit request that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidCommit {
    /// The volume.
    pub volume: ValidRef,
    /// The commit the changes were made against (`None`: the client did not say).
    pub base: Option<CommitId>,
    /// The changes, normalised, in request order.
    pub changes: Vec<Change>,
    /// Message (bounded).
    pub message: String,
    /// Who makes the commit (bounded; free-form).
    pub author: String,
}

impl ValidCommit {
    /// Chunks referenced by file upserts, de-duplicated, with lengths.
    pub fn referenced_chunks(&self) -> Vec<(ChunkId, u64)> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for c in &self.changes {
            if let ChangeOp::Upsert(Entry { kind: EntryKind::File(f), .. }) = &c.op {
                for (id, len) in &f.chunks {
                    if seen.insert(*id) {
                        out.push((*id, *len as u64));
                    }
                }
            }
        }
        out
    }
}

/// Validates a whole commit request: volume reference, base id, every path (normalised, not
/// the root, no `..`/NUL, bounded), no path twice, every entry consistent, counts, message
/// and author bounded.
pub fn validate_commit(req: &pb::CommitRequest) -> Result<ValidCommit> {
    let volume = volume_ref(req.volume.as_ref())?;
    let base = optional_commit_id(&req.base)?;
    if req.changes.is_empty() {
        return Err(InvalidRequest::new("a commit needs at least one change"));
    }
    if req.changes.len() > MAX_CHANGES_PER_COMMIT {
        return Err(InvalidRequest::new(format!(
            "{} changes exceed the limit of {MAX_CHANGES_PER_COMMIT} per commit",
            req.changes.len()
        )));
    }
    if req.message.len() > crate::commit::MAX_MESSAGE_BYTES {
        return Err(InvalidRequest::new("commit message too long"));
    }
    if req.author.len() > crate::commit::MAX_AUTHOR_BYTES {
        return Err(InvalidRequest::new(format!(
            "commit author too long ({} bytes, at most {})",
            req.author.len(),
            crate::commit::MAX_AUTHOR_BYTES
        )));
    }
    // A path appears once, except a delete marker followed by an upsert of the same path:
    // that is a replace (the FUSE helper sends it when a path was removed and made again).
    let mut seen: HashMap<VolPath, bool> = HashMap::with_capacity(req.changes.len());
    let mut changes = Vec::with_capacity(req.changes.len());
    for c in &req.changes {
        let path = VolPath::parse(&c.path)?;
        if path.is_root() {
            return Err(InvalidRequest::new("a change cannot target the volume root"));
        }
        let is_delete = matches!(c.op, Some(pb::change::Op::Delete(_)));
        let replace = match seen.get(&path) {
            None => false,
            Some(true) if !is_delete => true,
            Some(_) => return Err(InvalidRequest::new(format!("path {path} appears twice in one commit"))),
        };
        seen.insert(path.clone(), is_delete && !replace);
        let op = match &c.op {
            Some(pb::change::Op::Upsert(e)) => ChangeOp::Upsert(entry_from_proto(e, true)?),
            Some(pb::change::Op::Delete(true)) => ChangeOp::Delete,
            Some(pb::change::Op::Delete(false)) | None => {
                return Err(InvalidRequest::new(format!("change for {path} has no operation")));
            }
        };
        changes.push(Change { path, op });
    }
    Ok(ValidCommit { volume, base, changes, message: req.message.clone(), author: req.author.clone() })
}

/// Parses an optional 64-hex commit id ("" = none).
pub fn optional_commit_id(s: &str) -> Result<Option<CommitId>> {
    if s.is_empty() { Ok(None) } else { Ok(Some(s.parse()?)) }
}

/// Converts and validates an entry. In upserts (`upsert = true`) a directory's tree id is
/// ignored: directories are built by the server.
pub fn entry_from_proto(e: &pb::Entry, upsert: bool) -> Result<Entry> {
    let kind = match &e.kind {
        Some(pb::entry::Kind::File(f)) => {
            let policy = match f.policy.as_ref().and_then(|p| p.kind.as_ref()) {
                Some(pb::chunk_policy::Kind::FixedSize(size)) => ChunkPolicy::Fixed { size: *size },
                Some(pb::chunk_policy::Kind::Fastcdc(c)) => {
                    ChunkPolicy::FastCdc { min: c.min_size, avg: c.avg_size, max: c.max_size }
                }
                None => return Err(InvalidRequest::new("file entry has no chunk policy")),
            };
            if f.chunks.len() > crate::entry::MAX_CHUNKS_PER_FILE {
                return Err(InvalidRequest::new("too many chunks in one file"));
            }
            let chunks = f.chunks.iter().map(|c| Ok((ChunkId::from_slice(&c.id)?, c.len))).collect::<Result<Vec<_>>>()?;
            EntryKind::File(FileData { size: f.size, policy, chunks })
        }
        Some(pb::entry::Kind::Dir(d)) => {
            if upsert {
                EntryKind::Dir(TreeId::from_bytes([0; 32]))
            } else {
                EntryKind::Dir(TreeId::from_slice(&d.tree)?)
            }
        }
        Some(pb::entry::Kind::Symlink(s)) => EntryKind::Symlink(s.target.clone()),
        None => return Err(InvalidRequest::new("entry has no kind")),
    };
    let entry = Entry { mode: e.mode, mtime_ns: e.mtime_ns, kind };
    entry.validate()?;
    Ok(entry)
}

/// Converts an entry to its protobuf form.
pub fn entry_to_proto(e: &Entry) -> pb::Entry {
    let kind = match &e.kind {
        EntryKind::File(f) => pb::entry::Kind::File(pb::FileEntry {
            size: f.size,
            policy: Some(policy_to_proto(&f.policy)),
            chunks: f.chunks.iter().map(|(id, len)| pb::ChunkRef { id: id.as_bytes().to_vec(), len: *len }).collect(),
        }),
        EntryKind::Dir(t) => pb::entry::Kind::Dir(pb::DirEntry { tree: t.as_bytes().to_vec() }),
        EntryKind::Symlink(t) => pb::entry::Kind::Symlink(pb::SymlinkEntry { target: t.clone() }),
    };
    pb::Entry { mode: e.mode, mtime_ns: e.mtime_ns, kind: Some(kind) }
}

/// Converts a chunk policy to its protobuf form.
pub fn policy_to_proto(p: &ChunkPolicy) -> pb::ChunkPolicy {
    let kind = match *p {
        ChunkPolicy::Fixed { size } => pb::chunk_policy::Kind::FixedSize(size),
        ChunkPolicy::FastCdc { min, avg, max } => {
            pb::chunk_policy::Kind::Fastcdc(pb::FastCdc { min_size: min, avg_size: avg, max_size: max })
        }
    };
    pb::ChunkPolicy { kind: Some(kind) }
}

/// Converts a change to its protobuf form.
pub fn change_to_proto(c: &Change) -> pb::Change {
    let op = match &c.op {
        ChangeOp::Upsert(e) => pb::change::Op::Upsert(entry_to_proto(e)),
        ChangeOp::Delete => pb::change::Op::Delete(true),
    };
    pb::Change { path: c.path.to_string(), op: Some(op) }
}

/// Converts the protobuf chunking enum (unspecified = fixed).
pub fn chunking_from_proto(v: i32) -> Result<Chunking> {
    match pb::Chunking::try_from(v) {
        Ok(pb::Chunking::Unspecified | pb::Chunking::Fixed) => Ok(Chunking::Fixed),
        Ok(pb::Chunking::Fastcdc) => Ok(Chunking::FastCdc),
        Err(_) => Err(InvalidRequest::new(format!("unknown chunking {v}"))),
    }
}

/// Parses a list of chunk ids, bounded.
pub fn chunk_ids(ids: &[Vec<u8>]) -> Result<Vec<ChunkId>> {
    if ids.len() > MAX_CHUNKS_PER_REQUEST {
        return Err(InvalidRequest::new(format!(
            "{} chunks exceed the limit of {MAX_CHUNKS_PER_REQUEST} per request",
            ids.len()
        )));
    }
    ids.iter().map(|b| Ok(ChunkId::from_slice(b)?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::MAX_AUTHOR_BYTES;

    fn request(author: String) -> pb::CommitRequest {
        pb::CommitRequest {
            volume: Some(pb::VolumeRef { org: "o".into(), name: "v".into() }),
            base: String::new(),
            changes: vec![pb::Change { path: "gone".into(), op: Some(pb::change::Op::Delete(true)) }],
            message: String::new(),
            author,
        }
    }

    #[test]
    fn the_author_is_kept_and_bounded() {
        assert_eq!(validate_commit(&request(String::new())).unwrap().author, "");
        let longest = "é".repeat(MAX_AUTHOR_BYTES / 2);
        assert_eq!(validate_commit(&request(longest.clone())).unwrap().author, longest);
        let err = validate_commit(&request("a".repeat(MAX_AUTHOR_BYTES + 1))).unwrap_err();
        assert!(err.to_string().contains("author too long"), "{err}");
    }
}
