//! `ChunkCache`: a verified, size-capped LRU cache of chunks in a local directory, shared by
//! every reader on a host (threads of one process, and several processes on one directory).
//!
//! Layout: `<dir>/<first 2 hex>/<64 hex>` per chunk, temp files in `<dir>/tmp/`, fill locks in
//! `<dir>/locks/`.
//!
//! - **Verified**: bytes are checked against their id before they are stored, and again on
//!   every read; a file that fails is deleted and counted, and the read becomes a miss. The
//!   cache never returns bytes that do not hash to the requested id.
//! - **LRU across processes**: the recency order lives in the file system: a hit sets the
//!   file's mtime to now, and eviction removes the oldest mtimes first. The byte total lives
//!   in `<dir>/size` (8 bytes) and is read, checked and updated under an exclusive `flock`,
//!   so processes sharing the directory stay under the capacity together: a fill reserves
//!   its bytes (evicting first if needed) before writing and gives them back if the write
//!   fails. A crash between a write and its accounting can leave the total off by a chunk;
//!   every open recounts the directory.
//! - **One fetch per missing chunk**: concurrent `get_or_fetch` calls for one id in a process
//!   share one fetch (single-flight); across processes an advisory `flock` on a per-chunk
//!   lock file serialises fills, and the cache is re-checked after taking it.
//! - **Survives restarts**: the index is the directory itself, re-scanned at open.
//! - Fills are written to a temp file and renamed into place, not fsynced: it is a cache, and
//!   a torn file after a crash just fails verification and is fetched again.
//! - A fill that cannot be written (disk full) still returns the verified bytes.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::OnceCell;

use crate::error::{ChunkError, Result};
use crate::id::ChunkId;

/// Counters of a cache since it was opened (this process only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads that found nothing usable.
    pub misses: u64,
    /// Fetches run by `get_or_fetch` (one per missing chunk, however many callers).
    pub fetches: u64,
    /// Files removed to stay under the capacity.
    pub evictions: u64,
    /// Files removed because they failed verification.
    pub corrupt_dropped: u64,
    /// Chunks not stored because they were larger than the capacity or the write failed.
    pub fills_skipped: u64,
    /// Bytes in the cache directory (as last counted).
    pub bytes_cached: u64,
    /// Capacity in bytes.
    pub capacity: u64,
}

/// The cache. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct ChunkCache {
    inner: Arc<Inner>,
}

type Flight = Arc<OnceCell<std::result::Result<Bytes, Arc<ChunkError>>>>;

struct Inner {
    dir: PathBuf,
    size_file: PathBuf,
    capacity: u64,
    bytes: AtomicU64,
    stats: Mutex<CacheStats>,
    inflight: Mutex<HashMap<ChunkId, Flight>>,
    /// Marks this opener's temp files as in use (`crate::staging`): the host's cache is
    /// opened by several processes at once (the gateway, host mounts' helpers, the CLI).
    owner: crate::staging::Owner,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(ChunkError::Task)?
}

/// The error of a shared fetch for one of its waiters (errors are not `Clone`): the plain
/// variants are re-created, so waiters match on them as the fetching caller would; the ones
/// holding a cause get [`ChunkError::Shared`], which displays as, and has the source of,
/// the original (see [`ChunkError::root`]).
fn share_error(e: &Arc<ChunkError>) -> ChunkError {
    match &**e {
        ChunkError::Integrity { expected, actual } => ChunkError::Integrity { expected: *expected, actual: *actual },
        ChunkError::PieceIntegrity { chunk, piece } => ChunkError::PieceIntegrity { chunk: *chunk, piece: *piece },
        ChunkError::NotFound(id) => ChunkError::NotFound(*id),
        ChunkError::TooLarge { size, limit } => ChunkError::TooLarge { size: *size, limit: *limit },
        ChunkError::InvalidId(m) => ChunkError::InvalidId(m.clone()),
        ChunkError::Config(m) => ChunkError::Config(m.clone()),
        _ => ChunkError::Shared(e.clone()),
    }
}

/// Maps an I/O error on `path` to [`ChunkError::Io`].
fn io_at<'a>(op: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> ChunkError + 'a {
    move |e| ChunkError::io(op, path, e)
}

impl ChunkCache {
    /// Opens (creating if needed) a cache directory holding at most `capacity` bytes.
    pub fn open(dir: impl AsRef<Path>, capacity: u64) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let (tmp, locks) = (dir.join("tmp"), dir.join("locks"));
        fs::create_dir_all(&tmp).map_err(io_at("creating", &tmp))?;
        fs::create_dir_all(&locks).map_err(io_at("creating", &locks))?;
        crate::staging::remove_stale(&tmp)?;
        let owner = crate::staging::Owner::create(&tmp)?;
        let cache = Self {
            inner: Arc::new(Inner {
                size_file: dir.join("size"),
                dir,
                capacity,
                bytes: AtomicU64::new(0),
                stats: Mutex::new(CacheStats { capacity, ..CacheStats::default() }),
                inflight: Mutex::new(HashMap::new()),
                owner,
            }),
        };
        cache.with_size(|total| {
            *total = cache.scan()?.iter().map(|e| e.1).sum();
            Ok(())
        })?;
        Ok(cache)
    }

    /// Where chunk `id` is (or would be) cached.
    pub fn path_of(&self, id: ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.inner.dir.join(&hex[..2]).join(hex)
    }

    /// Whether a file for `id` is present (not verified; [`ChunkCache::get`] verifies).
    pub fn contains(&self, id: ChunkId) -> bool {
        self.path_of(id).is_file()
    }

    /// Counters and sizes.
    pub fn stats(&self) -> CacheStats {
        let mut s = *self.inner.stats.lock();
        s.bytes_cached = self.inner.bytes.load(Ordering::Relaxed);
        s
    }

    fn count(&self, f: impl FnOnce(&mut CacheStats)) {
        f(&mut self.inner.stats.lock());
    }

    /// Runs `f` on the shared byte total while holding the directory's size lock.
    fn with_size<T>(&self, f: impl FnOnce(&mut u64) -> Result<T>) -> Result<T> {
        use std::os::unix::fs::FileExt;
        let size_file = &self.inner.size_file;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(size_file)
            .map_err(io_at("opening", size_file))?;
        // Released when `file` is closed.
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| ChunkError::io("locking", size_file, e.into()))?;
        let mut raw = [0u8; 8];
        let mut total = match file.read_exact_at(&mut raw, 0) {
            Ok(()) => u64::from_le_bytes(raw),
            Err(_) => 0, // new or torn: recounted at the next open
        };
        let out = f(&mut total)?;
        file.write_all_at(&total.to_le_bytes(), 0).map_err(io_at("writing", size_file))?;
        self.inner.bytes.store(total, Ordering::Relaxed);
        Ok(out)
    }

    /// Every cached file: (path, size, mtime).
    fn scan(&self) -> Result<Vec<(PathBuf, u64, SystemTime)>> {
        let mut out = Vec::new();
        let dir = &self.inner.dir;
        for shard in fs::read_dir(dir).map_err(io_at("listing", dir))? {
            let shard = shard.map_err(io_at("listing", dir))?;
            let (name, path) = (shard.file_name(), shard.path());
            if name.len() != 2 || !shard.file_type().map_err(io_at("reading the type of", &path))?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&path).map_err(io_at("listing", &path))? {
                let entry = entry.map_err(io_at("listing", &path))?;
                match entry.metadata() {
                    Ok(m) if m.is_file() => out.push((entry.path(), m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH))),
                    _ => {} // removed by another process meanwhile, or not a file
                }
            }
        }
        Ok(out)
    }

    /// Reads, verifies and touches a cached chunk (blocking).
    fn read_verified(&self, id: ChunkId) -> Result<Option<Bytes>> {
        let path = self.path_of(id);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ChunkError::io("reading", path, e)),
        };
        if id.verify(&data).is_err() {
            tracing::warn!(chunk = %id, path = %path.display(), "cached chunk failed verification; dropping it");
            if fs::remove_file(&path).is_ok() {
                let len = data.len() as u64;
                self.with_size(|t| {
                    *t = t.saturating_sub(len);
                    Ok(())
                })?;
            }
            self.count(|s| s.corrupt_dropped += 1);
            return Ok(None);
        }
        // Touch: the mtime is the shared LRU clock.
        if let Ok(f) = File::options().write(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Ok(Some(Bytes::from(data)))
    }

    /// The chunk's bytes if cached and intact.
    pub async fn get(&self, id: ChunkId) -> Result<Option<Bytes>> {
        let this = self.clone();
        let got = blocking(move || this.read_verified(id)).await?;
        self.count(|s| if got.is_some() { s.hits += 1 } else { s.misses += 1 });
        Ok(got)
    }

    /// Verifies and stores a chunk, evicting least-recently-used chunks to make room.
    pub async fn insert(&self, id: ChunkId, data: Bytes) -> Result<()> {
        id.verify(&data)?;
        let this = self.clone();
        blocking(move || this.store_verified(id, &data)).await
    }

    /// Stores bytes the caller has just verified against `id` (for example, bytes that
    /// [`ChunkId::verify`] accepted after a download), without hashing them a second time.
    /// Passing unverified bytes here breaks the cache's guarantee; use [`ChunkCache::insert`].
    pub async fn insert_verified(&self, id: ChunkId, data: Bytes) -> Result<()> {
        let this = self.clone();
        blocking(move || this.store_verified(id, &data)).await
    }

    /// [`ChunkCache::insert_verified`] for a chunk held in parts (for example the verified
    /// pieces of a large chunk, see [`crate::pieces`]): written one after the other, never
    /// joined in memory. The parts, in order, must be the chunk's bytes, verified.
    pub async fn insert_verified_parts(&self, id: ChunkId, parts: Vec<Bytes>) -> Result<()> {
        let this = self.clone();
        blocking(move || this.store_verified_parts(id, &parts)).await
    }

    /// Stores bytes already verified against `id` (blocking).
    fn store_verified(&self, id: ChunkId, data: &[u8]) -> Result<()> {
        self.store_verified_parts(id, &[data])
    }

    /// Stores a verified chunk given in parts (blocking).
    fn store_verified_parts<B: AsRef<[u8]>>(&self, id: ChunkId, parts: &[B]) -> Result<()> {
        let len: u64 = parts.iter().map(|p| p.as_ref().len() as u64).sum();
        if len > self.inner.capacity {
            self.count(|s| s.fills_skipped += 1);
            return Ok(());
        }
        let dest = self.path_of(id);
        if dest.is_file() {
            return Ok(());
        }
        self.with_size(|total| self.make_room(total, len))?;
        let tmp = self.inner.dir.join("tmp").join(format!("{}-{:016x}", self.inner.owner.token(), rand::random::<u64>()));
        let written = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            for part in parts {
                f.write_all(part.as_ref())?;
            }
            drop(f);
            if let Some(shard) = dest.parent() {
                fs::create_dir_all(shard)?;
            }
            fs::rename(&tmp, &dest)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            self.with_size(|t| {
                *t = t.saturating_sub(len);
                Ok(())
            })?;
            self.count(|s| s.fills_skipped += 1);
            tracing::warn!(chunk = %id, error = %e, "could not cache chunk");
        }
        Ok(())
    }

    /// With the size lock held: evicts oldest-touched files until `incoming` more bytes fit,
    /// then reserves them in `total`.
    fn make_room(&self, total: &mut u64, incoming: u64) -> Result<()> {
        let cap = self.inner.capacity;
        if *total + incoming > cap {
            let mut files = self.scan()?;
            *total = files.iter().map(|f| f.1).sum();
            files.sort_by_key(|f| f.2);
            let mut evicted = 0;
            for (path, size, _) in files {
                if *total + incoming <= cap {
                    break;
                }
                if fs::remove_file(&path).is_ok() {
                    *total -= size;
                    evicted += 1;
                }
            }
            self.count(|s| s.evictions += evicted);
        }
        *total += incoming;
        Ok(())
    }

    /// Returns the chunk from the cache, or fetches it with `fetch`, verifies it, caches it
    /// and returns it. Concurrent callers for one id share one fetch; the error of a failed
    /// fetch goes to every waiter and the next call tries again.
    pub async fn get_or_fetch<F, Fut>(&self, id: ChunkId, fetch: F) -> Result<Bytes>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes>>,
    {
        if let Some(bytes) = self.get(id).await? {
            return Ok(bytes);
        }
        let flight: Flight = {
            let mut map = self.inner.inflight.lock();
            map.entry(id).or_default().clone()
        };
        let result = flight
            .get_or_init(|| async {
                let r = self.fill(id, fetch).await.map_err(Arc::new);
                self.inner.inflight.lock().remove(&id);
                r
            })
            .await;
        match result {
            Ok(bytes) => Ok(bytes.clone()),
            Err(e) => Err(share_error(e)),
        }
    }

    async fn fill<F, Fut>(&self, id: ChunkId, fetch: F) -> Result<Bytes>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes>>,
    {
        // Cross-process: hold an advisory lock on the chunk while filling it.
        let lock_path = self.inner.dir.join("locks").join(format!("{}.lock", id.to_hex()));
        let lock = blocking(move || {
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(io_at("opening", &lock_path))?;
            // Blocks until the lock is free.
            rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
                .map_err(|e| ChunkError::io("locking", &lock_path, e.into()))?;
            Ok(f)
        })
        .await?;
        let this = self.clone();
        if let Some(bytes) = blocking(move || this.read_verified(id)).await? {
            return Ok(bytes); // another process filled it while we waited
        }
        self.count(|s| s.fetches += 1);
        let data = fetch().await?;
        id.verify(&data)?;
        let this = self.clone();
        let stored = data.clone();
        blocking(move || {
            let r = this.store_verified(id, &stored);
            drop(lock); // closing the descriptor releases the flock
            r
        })
        .await?;
        Ok(data)
    }
}
