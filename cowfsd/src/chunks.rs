//! Chunk access for FUSE threads: a verified read from the backend (every `get` checks the
//! bytes against the id), a bounded in-memory cache in front (quick_cache, weighed in bytes,
//! which also makes loads single-flight per chunk), and blocking calls into the async
//! backend on the daemon's runtime.

use std::sync::Arc;

use bytes::Bytes;
use chunkstore::memory::ByLength;
use chunkstore::{Backend, ChunkId};
use parking_lot::Mutex;
use quick_cache::sync::Cache;

use crate::error::Result;

/// Bytes of chunks held in memory.
const DEFAULT_CACHE_BYTES: u64 = 256 << 20;
/// How many chunks that is, about (checkpoint regions are 256 KiB; image chunks larger).
const ESTIMATED_CACHED_CHUNKS: usize = 1024;
/// Chunk uploads in flight at once.
const PUT_CONCURRENCY: usize = 16;

/// Counters, for status and tests.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ChunkStats {
    /// Chunks fetched from the backend.
    pub fetched: u64,
    /// Bytes fetched from the backend.
    pub fetched_bytes: u64,
    /// Chunks stored.
    pub stored: u64,
    /// Bytes stored.
    pub stored_bytes: u64,
    /// Chunks that were already stored (not uploaded again).
    pub already_stored: u64,
}

/// The chunk store as seen by cowfs.
pub struct Chunks {
    backend: Arc<dyn Backend>,
    rt: tokio::runtime::Handle,
    cache: Cache<ChunkId, Bytes, ByLength>,
    stats: Mutex<ChunkStats>,
}

impl Chunks {
    /// Chunk access through `backend`, running its futures on `rt`.
    pub fn new(backend: Arc<dyn Backend>, rt: tokio::runtime::Handle) -> Self {
        Self {
            backend,
            rt,
            cache: Cache::with_weighter(ESTIMATED_CACHED_CHUNKS, DEFAULT_CACHE_BYTES, ByLength),
            stats: Mutex::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ChunkStats {
        *self.stats.lock()
    }

    /// A chunk's verified bytes (blocking; call from a plain thread, not the runtime). One
    /// fetch per chunk at a time: concurrent readers of the same chunk wait for it, and
    /// retry the fetch themselves if it failed.
    pub fn get(&self, id: ChunkId) -> Result<Bytes> {
        self.cache.get_or_insert_with(&id, || {
            let bytes = self.rt.block_on(self.backend.get(id))?;
            let mut s = self.stats.lock();
            s.fetched += 1;
            s.fetched_bytes += bytes.len() as u64;
            Ok(bytes)
        })
    }

    /// Stores a chunk unless the backend has it; returns its id and whether it was uploaded.
    pub fn put(&self, data: Bytes) -> Result<(ChunkId, bool)> {
        let mut out = self.put_many(vec![data])?;
        out.pop().ok_or_else(|| crate::error::CowError::Invalid("nothing stored".into()))
    }

    /// Stores chunks the backend lacks, `PUT_CONCURRENCY` at a time (each put is durable on
    /// its own: on the local backend two fsyncs, which overlap well). Returns, in order, each
    /// chunk's id and whether it was uploaded.
    pub fn put_many(&self, chunks: Vec<Bytes>) -> Result<Vec<(ChunkId, bool)>> {
        use futures::StreamExt;
        let backend = self.backend.clone();
        let results: Vec<std::result::Result<(ChunkId, bool, u64), chunkstore::ChunkError>> = self.rt.block_on(
            futures::stream::iter(chunks)
                .map(|data| {
                    let backend = backend.clone();
                    async move {
                        let id = ChunkId::of(&data);
                        let len = data.len() as u64;
                        if backend.exists(id).await? {
                            return Ok((id, false, len));
                        }
                        backend.put(id, data).await?;
                        Ok((id, true, len))
                    }
                })
                .buffered(PUT_CONCURRENCY)
                .collect(),
        );
        let mut out = Vec::with_capacity(results.len());
        let mut s = self.stats.lock();
        for r in results {
            let (id, uploaded, len) = r?;
            if uploaded {
                s.stored += 1;
                s.stored_bytes += len;
            } else {
                s.already_stored += 1;
            }
            out.push((id, uploaded));
        }
        Ok(out)
    }
}
