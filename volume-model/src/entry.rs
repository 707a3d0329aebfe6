//! What a path names: files (size, mode, mtime, chunk policy, chunk list), directories
//! (a tree id) and symlinks.

use chunkstore::{ChunkId, ChunkPolicy};

use crate::InvalidRequest;
use crate::TreeId;

/// Largest file a volume holds (4 TiB).
pub const MAX_FILE_SIZE: u64 = 4 << 40;
/// Most chunks one file may have.
pub const MAX_CHUNKS_PER_FILE: usize = 1 << 20;
/// Longest symlink target, in bytes.
pub const MAX_SYMLINK_BYTES: usize = 4096;

/// One entry of a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Permission bits (`0o7777` at most); the type lives in `kind`.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// File, directory or symlink.
    pub kind: EntryKind,
}

/// The type-specific part of an [`Entry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File(FileData),
    /// A directory, by the id of its tree node.
    Dir(TreeId),
    /// A symbolic link and its target.
    Symlink(String),
}

/// A regular file's content description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileData {
    /// Length in bytes; equals the sum of the chunk lengths.
    pub size: u64,
    /// How the bytes were cut.
    pub policy: ChunkPolicy,
    /// Chunks in file order, with their lengths.
    pub chunks: Vec<(ChunkId, u32)>,
}

impl Entry {
    /// Checks an entry's invariants (mode range, file chunk list consistent with size and
    /// policy, symlink target bounds).
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        if self.mode > 0o7777 {
            return Err(InvalidRequest::new(format!("mode {:o} exceeds 07777", self.mode)));
        }
        match &self.kind {
            EntryKind::File(f) => f.validate(),
            EntryKind::Dir(_) => Ok(()),
            EntryKind::Symlink(target) => {
                if target.is_empty() || target.len() > MAX_SYMLINK_BYTES || target.contains('\0') {
                    Err(InvalidRequest::new(format!("symlink target must be 1..={MAX_SYMLINK_BYTES} bytes without NUL")))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// True for directories.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir(_))
    }
}

impl FileData {
    /// Checks that the chunk list is what `policy` would produce for a file of `size` bytes:
    /// lengths sum to `size`, no chunk is empty or longer than the policy allows, and fixed
    /// chunks are all full except the last.
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        if self.size > MAX_FILE_SIZE {
            return Err(InvalidRequest::new(format!("file size {} exceeds {MAX_FILE_SIZE}", self.size)));
        }
        if !self.policy.is_valid() {
            return Err(InvalidRequest::new(format!("invalid chunk policy {:?}", self.policy)));
        }
        if self.chunks.len() > MAX_CHUNKS_PER_FILE {
            return Err(InvalidRequest::new("too many chunks in one file"));
        }
        let max = self.policy.max_chunk_len();
        let mut total: u64 = 0;
        for (i, (_, len)) in self.chunks.iter().enumerate() {
            let len = *len as u64;
            if len == 0 || len > max {
                return Err(InvalidRequest::new(format!("chunk {i} has invalid length {len}")));
            }
            if let ChunkPolicy::Fixed { size } = self.policy
                && i + 1 < self.chunks.len()
                && len != size
            {
                return Err(InvalidRequest::new(format!("fixed-size chunk {i} is {len} bytes, expected {size}")));
            }
            total += len;
        }
        if total != self.size {
            return Err(InvalidRequest::new(format!("chunk lengths add up to {total}, file size is {}", self.size)));
        }
        Ok(())
    }

    /// Index of the chunk holding byte `offset` and that chunk's starting offset.
    pub fn locate(&self, offset: u64) -> Option<(usize, u64)> {
        if offset >= self.size {
            return None;
        }
        if let Some(idx) = self.policy.fixed_index(offset) {
            let size = self.policy.max_chunk_len();
            return Some((idx as usize, idx * size));
        }
        let mut start = 0u64;
        for (i, (_, len)) in self.chunks.iter().enumerate() {
            let end = start + *len as u64;
            if offset < end {
                return Some((i, start));
            }
            start = end;
        }
        None
    }
}
