//! `Remote`: the mount's blocking view of volumed and the chunk cache. FUSE callbacks run on
//! fuser's worker threads; they call these methods, which drive the async client on the
//! helper's tokio runtime. Chunks are verified by the client or the cache before they get
//! here, and recently used ones stay in a small in-memory cache (quick_cache, weighed in
//! bytes) so that a 64 MiB chunk is not re-read from disk for every 128 KiB FUSE read.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use chunkstore::memory::{ByteCache, byte_cache};
use chunkstore::pieces::PIECE_SIZE;
use chunkstore::{ChunkCache, ChunkId, Chunking};
use parking_lot::Mutex;
use proto::volume as pb;
use quick_cache::sync::GuardResult;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use volume_client::{TransferStats, VolumeClient};
use volume_model::convert::{chunking_from_proto, entry_from_proto};
use volume_model::{Entry, TreeId};

use crate::error::{FuseError, Result};

/// Chunk fetches that readahead may run at once (per mount).
pub const PREFETCH_CONCURRENCY: usize = 4;

/// Piece fetches that readahead may run at once (per mount).
pub const PIECE_PREFETCH_CONCURRENCY: usize = 8;

/// Memory for pieces of large chunks read piece by piece (see `pieced`).
pub const PIECE_MEMORY: u64 = 160 << 20;

/// Size of most chunks (small files' fixed class), for sizing the chunk cache's index.
const TYPICAL_CHUNK: u64 = 8 << 20;

/// Counters of the mount's reads.
#[derive(Debug, Default)]
pub struct ReadCounters {
    /// Chunk reads served from memory.
    pub memory_hits: AtomicU64,
    /// Chunk reads that went to the disk cache or the network.
    pub memory_misses: AtomicU64,
    /// Chunks fetched ahead of the reader.
    pub prefetched: AtomicU64,
    /// 1 MiB pieces of large chunks fetched with range requests (verified against their CVs).
    pub pieces_fetched: AtomicU64,
    /// First reads of a chunk served by a range request of their own while the whole chunk
    /// was fetched behind them (trusted endpoints only).
    pub first_reads: AtomicU64,
}

/// The mount's connection to volumed plus its chunk caches.
pub struct Remote {
    pub(crate) rt: Handle,
    pub(crate) client: VolumeClient,
    org: String,
    volume: String,
    pub(crate) hot: ByteCache<ChunkId>,
    pub(crate) pieces: ByteCache<(ChunkId, usize)>,
    pub(crate) urls: Mutex<HashMap<ChunkId, proto::volume::SignedUrl>>,
    pub(crate) prefetch: Arc<Semaphore>,
    pub(crate) piece_prefetch: Arc<Semaphore>,
    pub(crate) fills: Arc<Semaphore>,
    /// Read counters.
    pub counters: ReadCounters,
}

impl Remote {
    /// Wraps a connected client (which should carry the shared [`ChunkCache`]).
    pub fn new(rt: Handle, client: VolumeClient, org: &str, volume: &str, memory_cache_bytes: u64) -> Self {
        Self {
            rt,
            client,
            org: org.to_owned(),
            volume: volume.to_owned(),
            hot: byte_cache(memory_cache_bytes, TYPICAL_CHUNK),
            pieces: byte_cache(PIECE_MEMORY, PIECE_SIZE),
            urls: Mutex::new(HashMap::new()),
            prefetch: Arc::new(Semaphore::new(PREFETCH_CONCURRENCY)),
            piece_prefetch: Arc::new(Semaphore::new(PIECE_PREFETCH_CONCURRENCY)),
            fills: Arc::new(Semaphore::new(PREFETCH_CONCURRENCY * 2)),
            counters: ReadCounters::default(),
        }
    }

    /// The volume's name.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// The volume's org.
    pub fn org(&self) -> &str {
        &self.org
    }

    /// The shared disk cache, if any.
    pub fn cache(&self) -> Option<&ChunkCache> {
        self.client.cache()
    }

    /// The head commit id and its root tree.
    pub fn head(&self) -> Result<(String, TreeId)> {
        let mut c = self.client.clone();
        let head = self.rt.block_on(c.head(&self.org, &self.volume))?;
        let root = TreeId::from_slice(&head.root)?;
        Ok((head.commit, root))
    }

    /// How the volume chunks new files.
    pub fn chunking(&self) -> Result<Chunking> {
        let mut c = self.client.clone();
        let vol = self.rt.block_on(c.get_volume(&self.org, &self.volume, false))?;
        Ok(chunking_from_proto(vol.chunking).unwrap_or(Chunking::Fixed))
    }

    /// The root tree of commit `id` (sequence number `seq` if known), from the log: None
    /// when it is not among the newest 1,000 commits.
    pub fn commit_root(&self, id: &str, seq: Option<u64>) -> Result<Option<TreeId>> {
        let mut c = self.client.clone();
        let (before_seq, limit) = match seq {
            Some(s) => (s.saturating_add(1), 1),
            None => (0, 1000),
        };
        let req = pb::LogRequest {
            volume: Some(pb::VolumeRef { org: self.org.clone(), name: self.volume.clone() }),
            limit,
            before_seq,
        };
        let resp = self.rt.block_on(async move { c.grpc().log(req).await });
        let resp = resp.map_err(volume_client::ClientError::from)?.into_inner();
        match resp.commits.into_iter().find(|ci| ci.id == id) {
            Some(ci) => Ok(Some(TreeId::from_slice(&ci.root)?)),
            None if seq.is_some() => self.commit_root(id, None),
            None => Ok(None),
        }
    }

    /// One directory node's entries.
    pub fn tree(&self, id: &TreeId) -> Result<Vec<(String, Entry)>> {
        let mut c = self.client.clone();
        let req = pb::GetTreeRequest {
            volume: Some(pb::VolumeRef { org: self.org.clone(), name: self.volume.clone() }),
            tree: id.as_bytes().to_vec(),
        };
        let resp = self.rt.block_on(volume_client::retry_idempotent(|| {
            let (mut g, req) = (c.grpc().clone(), req.clone());
            async move { g.get_tree(req).await }
        }));
        let resp = resp.map_err(volume_client::ClientError::from)?.into_inner();
        resp.entries
            .into_iter()
            .map(|ne| {
                let entry = ne.entry.ok_or_else(|| FuseError::Protocol(format!("entry {} has no body", ne.name)))?;
                let entry = entry_from_proto(&entry, false)?;
                if ne.name.is_empty() || ne.name.contains('/') || ne.name == "." || ne.name == ".." {
                    return Err(FuseError::Protocol(format!("invalid entry name {:?}", ne.name)));
                }
                Ok((ne.name, entry))
            })
            .collect()
    }

    /// A chunk's verified bytes: from memory, else the disk cache, else volumed's data path.
    pub fn chunk(&self, id: ChunkId) -> Result<Bytes> {
        if let Some(b) = self.hot.get(&id) {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        self.counters.memory_misses.fetch_add(1, Ordering::Relaxed);
        self.load(id)
    }

    /// Whether chunk `id` is held locally (in memory or in the disk cache, not verified yet).
    pub fn is_cached(&self, id: ChunkId) -> bool {
        self.hot.contains_key(&id) || self.cache().is_some_and(|c| c.contains(id))
    }

    /// A chunk's verified bytes if held locally (memory, else the disk cache, verified as it
    /// is read); never fetched, and not added to the in-memory cache.
    pub fn cached_chunk(&self, id: ChunkId) -> Result<Option<Bytes>> {
        if let Some(b) = self.hot.get(&id) {
            return Ok(Some(b));
        }
        let Some(cache) = self.cache() else {
            return Ok(None);
        };
        self.rt.block_on(cache.get(id)).map_err(FuseError::Cache)
    }

    /// A chunk from memory, else fetched once for all concurrent readers and kept in memory.
    fn load(&self, id: ChunkId) -> Result<Bytes> {
        match self.hot.get_value_or_guard(&id, None) {
            GuardResult::Value(b) => Ok(b),
            GuardResult::Guard(guard) => {
                let bytes = self.fetch(id)?;
                // Err only when the placeholder was removed meanwhile: the bytes are still good.
                let _ = guard.insert(bytes.clone());
                Ok(bytes)
            }
            // No timeout was given, so this does not happen; fetch without sharing if it does.
            GuardResult::Timeout => self.fetch(id),
        }
    }

    /// A chunk from the disk cache (verified as it is read), else downloaded (verified) and
    /// handed to the reader at once while the cache is filled in the background: writing
    /// 8-64 MiB into the cache must not sit between a cold reader and its bytes.
    pub(crate) fn fetch(&self, id: ChunkId) -> Result<Bytes> {
        let cache = self.client.cache().cloned();
        if let Some(cache) = &cache
            && let Some(bytes) = self.rt.block_on(cache.get(id)).map_err(FuseError::Cache)?
        {
            return Ok(bytes);
        }
        let bytes = self.with_url(id, |url| Ok(self.rt.block_on(self.client.fetch_chunk_at(url, id))?))?;
        self.fill_cache(id, bytes.clone());
        Ok(bytes)
    }

    /// Stores verified chunk bytes in the disk cache in the background (bounded: when fills
    /// back up, chunks are served without being cached).
    pub(crate) fn fill_cache(&self, id: ChunkId, bytes: Bytes) {
        self.fill_cache_parts(id, vec![bytes]);
    }

    /// [`Remote::fill_cache`] for a verified chunk held in parts (pieces).
    pub(crate) fn fill_cache_parts(&self, id: ChunkId, parts: Vec<Bytes>) {
        let Some(cache) = self.client.cache().cloned() else {
            return;
        };
        if let Ok(permit) = self.fills.clone().try_acquire_owned() {
            self.rt.spawn(async move {
                if let Err(e) = cache.insert_verified_parts(id, parts).await {
                    tracing::debug!(chunk = %id, error = %e, "cache fill skipped");
                }
                drop(permit);
            });
        }
    }

    /// Starts loading `ids` in the background (bounded; skipped when all slots are busy). The
    /// URLs the mount does not hold yet are asked for in one call first.
    pub fn prefetch(self: &Arc<Self>, ids: Vec<ChunkId>) {
        let mut jobs = Vec::new();
        for id in ids {
            if self.hot.contains_key(&id) {
                continue;
            }
            let Ok(permit) = self.prefetch.clone().try_acquire_owned() else {
                break;
            };
            jobs.push((id, permit));
        }
        if jobs.is_empty() {
            return;
        }
        let this = self.clone();
        self.rt.spawn_blocking(move || {
            let unknown: Vec<ChunkId> =
                jobs.iter().map(|(id, _)| *id).filter(|id| !this.is_cached(*id) && this.fresh_url(*id).is_none()).collect();
            if let Err(e) = this.learn_urls(&unknown) {
                tracing::debug!(error = %e, "readahead could not learn chunk URLs");
            }
            for (id, permit) in jobs {
                let this2 = this.clone();
                this.rt.spawn_blocking(move || {
                    if this2.load(id).is_ok() {
                        this2.counters.prefetched.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                });
            }
        });
    }

    /// Uploads the chunks the store lacks, registering piece CVs of large ones.
    pub fn upload(&self, chunks: &HashMap<ChunkId, Bytes>, pieces: &HashMap<ChunkId, Vec<u8>>) -> Result<TransferStats> {
        let mut c = self.client.clone();
        Ok(self.rt.block_on(c.upload_chunks_with_pieces(&self.org, &self.volume, chunks, pieces))?)
    }

    /// Publishes a commit of `changes` made against `base`, by the client's author (the
    /// runner sets `fuse/<hostname>`; a sailbox's gateway replaces it with `sailbox/<id>`).
    pub fn commit(&self, base: &str, changes: Vec<pb::Change>) -> Result<pb::CommitResponse> {
        let mut c = self.client.clone();
        let req = pb::CommitRequest {
            volume: Some(pb::VolumeRef { org: self.org.clone(), name: self.volume.clone() }),
            base: base.to_owned(),
            changes,
            message: String::new(),
            author: c.author().to_owned(),
        };
        let resp = self.rt.block_on(async move { c.grpc().commit(req).await });
        Ok(resp.map_err(volume_client::ClientError::from)?.into_inner())
    }
}
