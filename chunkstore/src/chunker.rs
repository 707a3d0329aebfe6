//! Chunkers: how a file's bytes are cut into chunks.
//!
//! Two policies, recorded per file so a reader never has to guess:
//! - [`ChunkPolicy::Fixed`]: aligned chunks of one size class (8 MiB, or 64 MiB for files of
//!   1 GiB and more). Offset-to-chunk is O(1), rewriting bytes inside a chunk changes only that
//!   chunk, and appending after a full final chunk only adds tail chunks.
//! - [`ChunkPolicy::FastCdc`]: FastCDC v2020 content-defined boundaries, a per-volume option for
//!   data where bytes get inserted in the middle (the crate caps the average at 4 MiB).

use std::io::Read;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::id::ChunkId;

/// Chunk size for files under [`LARGE_FILE_THRESHOLD`].
pub const SMALL_CHUNK_SIZE: u64 = 8 * 1024 * 1024;
/// Chunk size for files of [`LARGE_FILE_THRESHOLD`] bytes and more.
pub const LARGE_CHUNK_SIZE: u64 = 64 * 1024 * 1024;
/// Files at least this large use [`LARGE_CHUNK_SIZE`].
pub const LARGE_FILE_THRESHOLD: u64 = 1024 * 1024 * 1024;
/// FastCDC minimum chunk size.
pub const CDC_MIN: u32 = 1024 * 1024;
/// FastCDC average chunk size (the fastcdc crate's maximum average).
pub const CDC_AVG: u32 = 4 * 1024 * 1024;
/// FastCDC maximum chunk size.
pub const CDC_MAX: u32 = 16 * 1024 * 1024;

/// A volume's choice of chunker for new files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chunking {
    /// Fixed, aligned size classes (the default).
    #[default]
    Fixed,
    /// FastCDC v2020 content-defined chunking.
    FastCdc,
}

impl Chunking {
    /// The policy a file of `file_size` bytes gets under this volume setting.
    ///
    /// ```
    /// use chunkstore::{Chunking, ChunkPolicy};
    /// assert_eq!(Chunking::Fixed.policy_for(10), ChunkPolicy::Fixed { size: 8 << 20 });
    /// assert_eq!(Chunking::Fixed.policy_for(1 << 30), ChunkPolicy::Fixed { size: 64 << 20 });
    /// ```
    pub fn policy_for(self, file_size: u64) -> ChunkPolicy {
        match self {
            Chunking::Fixed if file_size >= LARGE_FILE_THRESHOLD => ChunkPolicy::Fixed { size: LARGE_CHUNK_SIZE },
            Chunking::Fixed => ChunkPolicy::Fixed { size: SMALL_CHUNK_SIZE },
            Chunking::FastCdc => ChunkPolicy::FastCdc { min: CDC_MIN, avg: CDC_AVG, max: CDC_MAX },
        }
    }
}

/// How one file was cut; stored in the file's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChunkPolicy {
    /// Aligned chunks of `size` bytes; the last one may be shorter.
    Fixed {
        /// Chunk size in bytes.
        size: u64,
    },
    /// FastCDC v2020 with these bounds.
    FastCdc {
        /// Minimum chunk size.
        min: u32,
        /// Average chunk size.
        avg: u32,
        /// Maximum chunk size.
        max: u32,
    },
}

/// One chunk of a buffer or stream: where it is and what it is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    /// Offset of the chunk's first byte in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// BLAKE3 of the chunk's bytes.
    pub id: ChunkId,
}

impl ChunkPolicy {
    /// Whether the policy's parameters are in the range every reader and backend supports.
    pub fn is_valid(&self) -> bool {
        match *self {
            ChunkPolicy::Fixed { size } => (4096..=crate::backend::MAX_CHUNK_SIZE).contains(&size) && size % 4096 == 0,
            ChunkPolicy::FastCdc { min, avg, max } => {
                (fastcdc::v2020::MINIMUM_MIN..=fastcdc::v2020::MINIMUM_MAX).contains(&min)
                    && (fastcdc::v2020::AVERAGE_MIN..=fastcdc::v2020::AVERAGE_MAX).contains(&avg)
                    && (fastcdc::v2020::MAXIMUM_MIN..=fastcdc::v2020::MAXIMUM_MAX).contains(&max)
                    && min <= avg
                    && avg <= max
            }
        }
    }

    /// Largest chunk this policy can produce.
    pub fn max_chunk_len(&self) -> u64 {
        match *self {
            ChunkPolicy::Fixed { size } => size,
            ChunkPolicy::FastCdc { max, .. } => max as u64,
        }
    }

    /// For fixed policies, the index of the chunk holding byte `offset` (O(1)); `None` for
    /// content-defined policies, whose readers search the chunk list's running offsets.
    pub fn fixed_index(&self, offset: u64) -> Option<u64> {
        match *self {
            ChunkPolicy::Fixed { size } => Some(offset / size),
            ChunkPolicy::FastCdc { .. } => None,
        }
    }

    /// Chunk boundaries of `data` as (offset, length) pairs, without hashing.
    pub fn boundaries(&self, data: &[u8]) -> Vec<(usize, usize)> {
        match *self {
            ChunkPolicy::Fixed { size } => {
                let size = size as usize;
                (0..data.len()).step_by(size.max(1)).map(|off| (off, size.min(data.len() - off))).collect()
            }
            ChunkPolicy::FastCdc { min, avg, max } => {
                fastcdc::v2020::FastCDC::new(data, min, avg, max).map(|c| (c.offset, c.length)).collect()
            }
        }
    }

    /// Cuts and hashes `data` on the calling thread.
    pub fn chunk(&self, data: &[u8]) -> Vec<ChunkSpan> {
        self.boundaries(data).into_iter().map(|(off, len)| span(off, len, &data[off..off + len])).collect()
    }

    /// Cuts `data` and hashes the chunks on all cores (rayon's global pool). Same result as
    /// [`ChunkPolicy::chunk`].
    pub fn chunk_parallel(&self, data: &[u8]) -> Vec<ChunkSpan> {
        self.boundaries(data).into_par_iter().map(|(off, len)| span(off, len, &data[off..off + len])).collect()
    }

    /// Cuts a stream without holding more than one chunk in memory (two for FastCDC's
    /// look-ahead), calling `sink` with each chunk's span and bytes in order.
    pub fn chunk_reader<R: Read, E: From<std::io::Error>>(
        &self,
        mut reader: R,
        mut sink: impl FnMut(ChunkSpan, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        match *self {
            ChunkPolicy::Fixed { size } => {
                // The buffer grows with what is read (a small file never costs a chunk-sized
                // allocation) and is reused from one chunk to the next.
                let mut buf = Vec::with_capacity(size.min(256 << 10) as usize);
                let mut offset = 0u64;
                loop {
                    buf.clear();
                    let n = (&mut reader).take(size).read_to_end(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    sink(ChunkSpan { offset, len: n as u64, id: ChunkId::of(&buf) }, &buf)?;
                    offset += n as u64;
                    if (n as u64) < size {
                        return Ok(());
                    }
                }
            }
            ChunkPolicy::FastCdc { min, avg, max } => {
                for chunk in fastcdc::v2020::StreamCDC::new(reader, min, avg, max) {
                    let chunk = chunk.map_err(|e| match e {
                        fastcdc::v2020::Error::IoError(io) => E::from(io),
                        other => E::from(std::io::Error::other(other.to_string())),
                    })?;
                    let span = ChunkSpan { offset: chunk.offset, len: chunk.length as u64, id: ChunkId::of(&chunk.data) };
                    sink(span, &chunk.data)?;
                }
                Ok(())
            }
        }
    }
}

fn span(off: usize, len: usize, bytes: &[u8]) -> ChunkSpan {
    ChunkSpan { offset: off as u64, len: len as u64, id: ChunkId::of(bytes) }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::pseudo_random;

    #[test]
    fn fixed_rewrite_inside_a_chunk_changes_only_that_chunk() {
        let policy = ChunkPolicy::Fixed { size: 64 * 1024 };
        let mut data = pseudo_random(64 * 1024 * 5 + 100, 1);
        let before = policy.chunk(&data);
        data[64 * 1024 * 2 + 7] ^= 0xff;
        let after = policy.chunk(&data);
        let changed: Vec<usize> = (0..before.len()).filter(|&i| before[i].id != after[i].id).collect();
        assert_eq!(changed, vec![2]);
    }

    #[test]
    fn fixed_append_after_full_chunk_adds_only_tail() {
        let policy = ChunkPolicy::Fixed { size: 4096 };
        let mut data = pseudo_random(4096 * 3, 2);
        let before = policy.chunk(&data);
        data.extend(pseudo_random(1000, 3));
        let after = policy.chunk(&data);
        assert_eq!(&after[..3], &before[..]);
        assert_eq!(after.len(), 4);
        assert_eq!(after[3].len, 1000);
    }

    #[test]
    fn parallel_and_stream_match_single_thread() {
        let data = pseudo_random(3 * 1024 * 1024 + 17, 4);
        for policy in
            [ChunkPolicy::Fixed { size: 256 * 1024 }, ChunkPolicy::FastCdc { min: 64 * 1024, avg: 256 * 1024, max: 1024 * 1024 }]
        {
            let single = policy.chunk(&data);
            assert_eq!(policy.chunk_parallel(&data), single);
            let mut streamed = Vec::new();
            policy
                .chunk_reader(&data[..], |span, bytes| {
                    assert_eq!(span.id, ChunkId::of(bytes));
                    streamed.push(span);
                    Ok::<_, std::io::Error>(())
                })
                .unwrap();
            assert_eq!(streamed, single);
            let total: u64 = single.iter().map(|s| s.len).sum();
            assert_eq!(total, data.len() as u64);
        }
    }

    #[test]
    fn cdc_insert_keeps_most_chunks() {
        let policy = ChunkPolicy::FastCdc { min: 16 * 1024, avg: 64 * 1024, max: 256 * 1024 };
        let data = pseudo_random(4 * 1024 * 1024, 5);
        let mut inserted = data.clone();
        inserted.splice(1_000_000..1_000_000, pseudo_random(333, 6));
        let a: std::collections::HashSet<_> = policy.chunk(&data).iter().map(|s| s.id).collect();
        let b = policy.chunk(&inserted);
        let shared = b.iter().filter(|s| a.contains(&s.id)).count();
        assert!(shared + 3 >= b.len(), "only {shared} of {} chunks shared", b.len());
    }

    #[test]
    fn policy_validation() {
        assert!(Chunking::Fixed.policy_for(0).is_valid());
        assert!(Chunking::FastCdc.policy_for(0).is_valid());
        assert!(!ChunkPolicy::Fixed { size: 0 }.is_valid());
        assert!(!ChunkPolicy::Fixed { size: 1 << 40 }.is_valid());
        assert!(!ChunkPolicy::FastCdc { min: 1, avg: 2, max: 3 }.is_valid());
        assert_eq!(ChunkPolicy::Fixed { size: 4096 }.boundaries(&[]), vec![]);
    }
}
