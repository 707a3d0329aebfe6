//! `Remote`: the mount's blocking view of volumed and the chunk cache. FUSE callbacks run on
//! fuser's worker threads; they call these methods, which drive the async client on the
//! helper's tokio runtime. Chunks are verified by the client or the cache before they get
//! here, and recently used ones stay in a small in-memory LRU so that a 64 MiB chunk is not
//! re-read from disk for every 128 KiB FUSE read.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chunkstore::{ChunkCache, ChunkId, Chunking};
use proto::volume as pb;
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
}

/// Recently used chunks (or pieces), capped by bytes.
pub(crate) struct Lru<K> {
    cap: u64,
    used: u64,
    order: VecDeque<(K, Bytes)>,
}

impl<K: Copy + PartialEq> Lru<K> {
    pub(crate) fn new(cap: u64) -> Self {
        Lru { cap, used: 0, order: VecDeque::new() }
    }

    pub(crate) fn contains(&self, id: K) -> bool {
        self.order.iter().any(|(i, _)| *i == id)
    }

    pub(crate) fn get(&mut self, id: K) -> Option<Bytes> {
        let pos = self.order.iter().position(|(i, _)| *i == id)?;
        let item = self.order.remove(pos)?;
        let bytes = item.1.clone();
        self.order.push_back(item);
        Some(bytes)
    }

    pub(crate) fn insert(&mut self, id: K, bytes: Bytes) {
        if self.order.iter().any(|(i, _)| *i == id) || bytes.len() as u64 > self.cap {
            return;
        }
        self.used += bytes.len() as u64;
        self.order.push_back((id, bytes));
        while self.used > self.cap {
            match self.order.pop_front() {
                Some((_, b)) => self.used -= b.len() as u64,
                None => break,
            }
        }
    }
}

/// One slot per chunk being loaded, so concurrent readers of a chunk share one load.
type Loading = Arc<Mutex<Option<Bytes>>>;

/// The mount's connection to volumed plus its chunk caches.
pub struct Remote {
    pub(crate) rt: Handle,
    pub(crate) client: VolumeClient,
    org: String,
    volume: String,
    pub(crate) hot: Mutex<Lru<ChunkId>>,
    loading: Mutex<HashMap<ChunkId, Loading>>,
    pub(crate) pieces: Mutex<Lru<(ChunkId, usize)>>,
    pub(crate) piece_loading: Mutex<HashMap<(ChunkId, usize), Loading>>,
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
            hot: Mutex::new(Lru::new(memory_cache_bytes)),
            loading: Mutex::new(HashMap::new()),
            pieces: Mutex::new(Lru::new(PIECE_MEMORY)),
            piece_loading: Mutex::new(HashMap::new()),
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
        let root = TreeId::from_slice(&head.root).map_err(|e| FuseError::Protocol(e.to_string()))?;
        Ok((head.commit, root))
    }

    /// How the volume chunks new files.
    pub fn chunking(&self) -> Result<Chunking> {
        let mut c = self.client.clone();
        let vol = self.rt.block_on(c.get_volume(&self.org, &self.volume, false))?;
        Ok(chunking_from_proto(vol.chunking).unwrap_or(Chunking::Fixed))
    }

    /// One directory node's entries.
    pub fn tree(&self, id: &TreeId) -> Result<Vec<(String, Entry)>> {
        let mut c = self.client.clone();
        let req = pb::GetTreeRequest {
            volume: Some(pb::VolumeRef { org: self.org.clone(), name: self.volume.clone() }),
            tree: id.as_bytes().to_vec(),
        };
        let resp = self.rt.block_on(async move { c.grpc().get_tree(req).await });
        let resp = resp.map_err(volume_client::ClientError::from)?.into_inner();
        resp.entries
            .into_iter()
            .map(|ne| {
                let entry = ne.entry.ok_or_else(|| FuseError::Protocol(format!("entry {} has no body", ne.name)))?;
                let entry = entry_from_proto(&entry, false).map_err(|e| FuseError::Protocol(e.to_string()))?;
                if ne.name.is_empty() || ne.name.contains('/') || ne.name == "." || ne.name == ".." {
                    return Err(FuseError::Protocol(format!("invalid entry name {:?}", ne.name)));
                }
                Ok((ne.name, entry))
            })
            .collect()
    }

    /// A chunk's verified bytes: from memory, else the disk cache, else volumed's data path.
    pub fn chunk(&self, id: ChunkId) -> Result<Bytes> {
        if let Some(b) = self.hot.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        self.counters.memory_misses.fetch_add(1, Ordering::Relaxed);
        self.load(id)
    }

    /// Whether chunk `id` is held locally (in memory or in the disk cache, not verified yet).
    pub fn is_cached(&self, id: ChunkId) -> bool {
        self.hot.lock().unwrap_or_else(|p| p.into_inner()).contains(id) || self.cache().is_some_and(|c| c.contains(id))
    }

    /// A chunk's verified bytes if held locally (memory, else the disk cache, verified as it
    /// is read); never fetched, and not added to the in-memory cache.
    pub fn cached_chunk(&self, id: ChunkId) -> Result<Option<Bytes>> {
        if let Some(b) = self.hot.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(Some(b));
        }
        let Some(cache) = self.cache() else {
            return Ok(None);
        };
        self.rt.block_on(cache.get(id)).map_err(|e| FuseError::Protocol(e.to_string()))
    }

    fn load(&self, id: ChunkId) -> Result<Bytes> {
        let slot = {
            let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            loading.entry(id).or_default().clone()
        };
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = guard.as_ref() {
            return Ok(b.clone());
        }
        if let Some(b) = self.hot.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(b);
        }
        let result = self.fetch(id);
        if let Ok(bytes) = &result {
            self.hot.lock().unwrap_or_else(|p| p.into_inner()).insert(id, bytes.clone());
            *guard = Some(bytes.clone());
        }
        drop(guard);
        self.loading.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        result
    }

    /// A chunk from the disk cache (verified as it is read), else downloaded (verified) and
    /// handed to the reader at once while the cache is filled in the background: writing
    /// 8-64 MiB into the cache must not sit between a cold reader and its bytes.
    pub(crate) fn fetch(&self, id: ChunkId) -> Result<Bytes> {
        let cache = self.client.cache().cloned();
        if let Some(cache) = &cache
            && let Some(bytes) = self.rt.block_on(cache.get(id)).map_err(|e| FuseError::Protocol(e.to_string()))?
        {
            return Ok(bytes);
        }
        let mut c = self.client.clone();
        let got = self.rt.block_on(c.fetch_chunks(&self.org, &self.volume, &[id]))?;
        let bytes = got.into_iter().next().ok_or_else(|| FuseError::Protocol(format!("no bytes for chunk {id}")))?;
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

    /// Starts loading `ids` in the background (bounded; skipped when all slots are busy).
    pub fn prefetch(self: &Arc<Self>, ids: Vec<ChunkId>) {
        for id in ids {
            if self.hot.lock().unwrap_or_else(|p| p.into_inner()).contains(id) {
                continue;
            }
            let Ok(permit) = self.prefetch.clone().try_acquire_owned() else {
                return;
            };
            let this = self.clone();
            self.rt.spawn_blocking(move || {
                if this.load(id).is_ok() {
                    this.counters.prefetched.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
            });
        }
    }

    /// Uploads the chunks the store lacks, registering piece CVs of large ones.
    pub fn upload(&self, chunks: &HashMap<ChunkId, Bytes>, pieces: &HashMap<ChunkId, Vec<u8>>) -> Result<TransferStats> {
        let mut c = self.client.clone();
        Ok(self.rt.block_on(c.upload_chunks_with_pieces(&self.org, &self.volume, chunks, pieces))?)
    }

    /// Publishes a commit of `changes` made against `base`.
    pub fn commit(&self, base: &str, changes: Vec<pb::Change>) -> Result<pb::CommitResponse> {
        let mut c = self.client.clone();
        let req = pb::CommitRequest {
            volume: Some(pb::VolumeRef { org: self.org.clone(), name: self.volume.clone() }),
            base: base.to_owned(),
            changes,
            message: String::new(),
        };
        let resp = self.rt.block_on(async move { c.grpc().commit(req).await });
        Ok(resp.map_err(volume_client::ClientError::from)?.into_inner())
    }
}
