//! Chunk access for FUSE threads: a verified read from the backend (every `get` checks the
//! bytes against the id), a small in-memory LRU in front, single-flight per chunk, and
//! blocking calls into the async backend on the daemon's runtime.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use chunkstore::{Backend, ChunkId};

use crate::error::Result;

/// Chunks held in memory (bytes), most recent first out last.
const DEFAULT_CACHE_BYTES: usize = 256 << 20;
/// Chunk uploads in flight at once.
const PUT_CONCURRENCY: usize = 16;

#[derive(Default)]
struct Lru {
    map: HashMap<ChunkId, Bytes>,
    order: VecDeque<ChunkId>,
    bytes: usize,
    loading: HashMap<ChunkId, ()>,
}

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
    lru: Mutex<Lru>,
    loaded: Condvar,
    capacity: usize,
    stats: Mutex<ChunkStats>,
}

impl Chunks {
    /// Chunk access through `backend`, running its futures on `rt`.
    pub fn new(backend: Arc<dyn Backend>, rt: tokio::runtime::Handle) -> Self {
        Self {
            backend,
            rt,
            lru: Mutex::default(),
            loaded: Condvar::new(),
            capacity: DEFAULT_CACHE_BYTES,
            stats: Mutex::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ChunkStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A chunk's verified bytes (blocking; call from a plain thread, not the runtime).
    pub fn get(&self, id: ChunkId) -> Result<Bytes> {
        let mut lru = self.lru.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(b) = lru.map.get(&id) {
                let b = b.clone();
                if let Some(pos) = lru.order.iter().position(|x| *x == id) {
                    lru.order.remove(pos);
                }
                lru.order.push_back(id);
                return Ok(b);
            }
            if !lru.loading.contains_key(&id) {
                break;
            }
            lru = self.loaded.wait(lru).unwrap_or_else(|p| p.into_inner());
        }
        lru.loading.insert(id, ());
        drop(lru);
        let fetched = self.rt.block_on(self.backend.get(id));
        let mut lru = self.lru.lock().unwrap_or_else(|p| p.into_inner());
        lru.loading.remove(&id);
        self.loaded.notify_all();
        let bytes = fetched?;
        {
            let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            s.fetched += 1;
            s.fetched_bytes += bytes.len() as u64;
        }
        lru.bytes += bytes.len();
        lru.map.insert(id, bytes.clone());
        lru.order.push_back(id);
        while lru.bytes > self.capacity {
            let Some(old) = lru.order.pop_front() else { break };
            if let Some(b) = lru.map.remove(&old) {
                lru.bytes -= b.len();
            }
        }
        Ok(bytes)
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
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
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
