//! FUSE passthrough for files whose bytes are all local and unmodified: the kernel reads such
//! a file straight from a local *backing file* (page cache, readahead and mmap of a local
//! file system), without a round trip through this process per read.
//!
//! - **Assembled files.** Passthrough needs one local file holding the whole file. When a
//!   read-only open finds a clean file (no overlay) of at least [`PASSTHROUGH_MIN_BYTES`]
//!   whose chunks are all in the verified chunk cache, a background task copies the chunks,
//!   verified as they are read from the cache, into an anonymous file in the overlay directory
//!   (`O_TMPFILE`: nothing is left on disk after the helper exits or crashes). Assembled files
//!   are keyed by content (length and chunk ids), kept in an LRU capped by bytes, and one is
//!   built at a time. That open and any open before the file is assembled use the plain path.
//! - **Which opens.** A read-only open (`O_RDONLY`, no `O_TRUNC`/`O_DIRECT`) of a clean file
//!   with an assembled copy and no plain open handle gets `FOPEN_PASSTHROUGH` with a backing
//!   id registered for its inode. Everything else takes the plain path; so does any open when
//!   registering the backing file fails (and a permission, support or stacking error turns
//!   passthrough off for the mount).
//! - **Kernel rule.** While an inode has passthrough handles, the kernel fails (`EIO`) every
//!   open of it that is not also passthrough with the same backing. So opens of such an inode
//!   that must not read the assembled copy (writers, or readers once the file has local
//!   changes) get `FOPEN_PASSTHROUGH | FOPEN_DIRECT_IO`: their reads and writes come to this
//!   process as usual (overlay, copy-up), and only an `mmap` of those descriptors maps the
//!   assembled copy (a writer's assembled copy is then dropped from the store, so a shared
//!   writable mapping can never leak into later opens). Readers whose handle was opened in
//!   passthrough keep reading the committed bytes they opened, like handles of a file replaced
//!   by a reload.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chunkstore::ChunkId;
use fuser::BackingId;
use parking_lot::Mutex;
use volume_model::FileData;

use crate::error::FuseError;
use crate::remote::Remote;

/// Smallest file served through passthrough: smaller files are cheap through the page cache
/// of the plain path, and assembling each of them would copy every small file once more.
pub const PASSTHROUGH_MIN_BYTES: u64 = 1 << 20;

/// Why a file could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// A chunk left the caches between the check and the copy.
    #[error("chunk {0} is no longer cached")]
    NotCached(ChunkId),
    /// A cached chunk's length differs from the file's chunk list.
    #[error("chunk {id} has {got} bytes, the file says {want}")]
    Length {
        /// The chunk.
        id: ChunkId,
        /// Bytes found.
        got: usize,
        /// Bytes expected.
        want: u32,
    },
    /// Creating or writing the assembled file failed.
    #[error("assembling failed: {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading a chunk from the caches failed.
    #[error("assembling failed: {0}")]
    Cache(#[source] FuseError),
    /// The chunks do not add up to the file's size.
    #[error("assembling failed: chunks hold {held} bytes, the file {size}")]
    Size {
        /// Bytes the chunks hold.
        held: u64,
        /// The file's size.
        size: u64,
    },
}

/// A committed file's content: BLAKE3 of its length and chunk list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContentKey([u8; 32]);

impl ContentKey {
    /// The key of `data`.
    pub fn of(data: &FileData) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(&data.size.to_le_bytes());
        for (id, len) in &data.chunks {
            h.update(id.as_bytes());
            h.update(&len.to_le_bytes());
        }
        ContentKey(*h.finalize().as_bytes())
    }
}

/// Passthrough counters (this mount).
#[derive(Debug, Default)]
pub struct PassthroughCounters {
    /// Opens whose reads the kernel serves from an assembled file.
    pub opens: AtomicU64,
    /// Opens of an inode in passthrough mode served by this process (`FOPEN_DIRECT_IO`).
    pub direct_opens: AtomicU64,
    /// Opens that fell back to the plain path because registering a backing file failed.
    pub fallbacks: AtomicU64,
    /// Files assembled.
    pub assembled: AtomicU64,
    /// Assemblies abandoned (a chunk evicted meanwhile, disk full, ...).
    pub assembly_failures: AtomicU64,
}

/// How an open is served.
pub enum OpenMode {
    /// Through this process and the page cache (`FOPEN_KEEP_CACHE`).
    Plain,
    /// `FOPEN_PASSTHROUGH`: the kernel reads the backing file.
    Backing(Arc<BackingId>),
    /// `FOPEN_PASSTHROUGH | FOPEN_DIRECT_IO`: reads and writes come here; mmap maps the backing.
    Direct(Arc<BackingId>),
}

/// What [`Passthrough::choose`] needs to know about the file being opened.
pub struct OpenRequest<'a> {
    /// The inode.
    pub ino: u64,
    /// The open is read-only (no `O_TRUNC`, no `O_DIRECT`).
    pub read_only: bool,
    /// The open allows writing (`O_WRONLY` or `O_RDWR`).
    pub writable: bool,
    /// The committed content, when the file is clean and large enough.
    pub clean: Option<&'a Arc<FileData>>,
    /// Handles of the inode already open (all plain when the inode has no backing).
    pub open_handles: u32,
}

struct Assembled {
    file: Arc<File>,
    size: u64,
    used: u64,
}

#[derive(Default)]
struct Store {
    files: HashMap<ContentKey, Assembled>,
    bytes: u64,
    clock: u64,
    building: HashSet<ContentKey>,
}

impl Store {
    /// Evicts least recently used files until `incoming` more bytes fit under `cap`.
    fn make_room(&mut self, incoming: u64, cap: u64) {
        while self.bytes + incoming > cap {
            let Some(oldest) = self.files.iter().min_by_key(|(_, a)| a.used).map(|(k, _)| *k) else { break };
            if let Some(a) = self.files.remove(&oldest) {
                self.bytes -= a.size;
            }
        }
    }
}

/// The kernel backing of one inode while passthrough handles of it are open.
struct InodeBacking {
    id: Arc<BackingId>,
    base: Arc<FileData>,
    key: ContentKey,
    handles: u32,
    /// Some handle was served with `FOPEN_DIRECT_IO` (its reads bypassed the page cache).
    mixed: bool,
}

/// Passthrough state of one mount.
pub struct Passthrough {
    enabled: AtomicBool,
    dir: PathBuf,
    max_bytes: u64,
    store: Mutex<Store>,
    inodes: Mutex<HashMap<u64, InodeBacking>>,
    /// Counters.
    pub counters: PassthroughCounters,
}

impl Passthrough {
    /// Passthrough (on when `enabled`) with assembled files in `dir`, at most `max_bytes`.
    pub fn new(enabled: bool, dir: PathBuf, max_bytes: u64) -> Self {
        Passthrough {
            enabled: AtomicBool::new(enabled),
            dir,
            max_bytes,
            store: Mutex::new(Store::default()),
            inodes: Mutex::new(HashMap::new()),
            counters: PassthroughCounters::default(),
        }
    }

    /// Whether new passthrough opens are made.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Turns passthrough off for the rest of the mount (handles already open keep working).
    pub fn disable(&self, why: &str) {
        if self.enabled.swap(false, Ordering::Relaxed) {
            tracing::warn!("FUSE passthrough off: {why}");
        }
    }

    /// Assembled files and their bytes, and whether one is being built.
    pub fn assembled(&self) -> (usize, u64, usize) {
        let s = self.store.lock();
        (s.files.len(), s.bytes, s.building.len())
    }

    /// Inodes with a passthrough handle open now. The kernel sends `RELEASE` after `close`
    /// has returned, so this drops to zero a moment after the last handle closes.
    pub fn held_inodes(&self) -> usize {
        self.inodes.lock().len()
    }

    /// Decides how to serve an open and, for a passthrough open, counts the handle on its
    /// inode. `register` hands a backing file to the kernel. Call with the state lock held, so
    /// decisions for one inode are made one at a time.
    pub fn choose(&self, req: OpenRequest<'_>, register: &dyn Fn(&File) -> std::io::Result<BackingId>) -> OpenMode {
        let mut inodes = self.inodes.lock();
        if let Some(b) = inodes.get_mut(&req.ino) {
            b.handles += 1;
            if req.read_only && req.clean.is_some_and(|d| Arc::ptr_eq(d, &b.base)) {
                self.counters.opens.fetch_add(1, Ordering::Relaxed);
                return OpenMode::Backing(b.id.clone());
            }
            b.mixed = true;
            if req.writable {
                // A shared writable mmap of this descriptor would write into the assembled
                // file: never hand it to another open again.
                let mut s = self.store.lock();
                if let Some(a) = s.files.remove(&b.key) {
                    s.bytes -= a.size;
                }
            }
            self.counters.direct_opens.fetch_add(1, Ordering::Relaxed);
            return OpenMode::Direct(b.id.clone());
        }
        let Some(base) = req.clean else { return OpenMode::Plain };
        if !self.enabled() || !req.read_only || req.open_handles > 0 {
            return OpenMode::Plain;
        }
        let key = ContentKey::of(base);
        let file = {
            let mut s = self.store.lock();
            s.clock += 1;
            let now = s.clock;
            match s.files.get_mut(&key) {
                Some(a) => {
                    a.used = now;
                    a.file.clone()
                }
                None => return OpenMode::Plain,
            }
        };
        match register(&file) {
            Ok(id) => {
                let id = Arc::new(id);
                inodes.insert(req.ino, InodeBacking { id: id.clone(), base: base.clone(), key, handles: 1, mixed: false });
                self.counters.opens.fetch_add(1, Ordering::Relaxed);
                OpenMode::Backing(id)
            }
            Err(e) => {
                self.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "registering a passthrough backing file failed; plain read path");
                // No capability, no kernel support, or a backing file system that cannot be
                // stacked under FUSE: every later attempt would fail the same way.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM | libc::ENOTTY | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ELOOP)
                ) {
                    self.disable(&format!("the kernel refused backing files ({e})"));
                }
                OpenMode::Plain
            }
        }
    }

    /// A passthrough handle of `ino` was closed. Returns true when that was the inode's last
    /// one and some handle bypassed the page cache (the caller then invalidates it).
    pub fn release(&self, ino: u64) -> bool {
        let mut inodes = self.inodes.lock();
        let Some(b) = inodes.get_mut(&ino) else { return false };
        b.handles = b.handles.saturating_sub(1);
        if b.handles > 0 {
            return false;
        }
        // Dropping the last reference closes the backing id in the kernel.
        inodes.remove(&ino).is_some_and(|b| b.mixed)
    }

    /// Starts assembling `data` in the background if passthrough is on, the file fits the
    /// budget, has no assembled copy yet, nothing else is being assembled, and every chunk is
    /// cached. Cheap when any of those fails.
    pub fn maybe_assemble(self: &Arc<Self>, remote: &Arc<Remote>, data: Arc<FileData>) {
        if !self.enabled() || data.size < PASSTHROUGH_MIN_BYTES || data.size > self.max_bytes {
            return;
        }
        let key = ContentKey::of(&data);
        {
            let s = self.store.lock();
            if !s.building.is_empty() || s.files.contains_key(&key) {
                return;
            }
        }
        if !data.chunks.iter().all(|(id, _)| remote.is_cached(*id)) {
            return;
        }
        {
            let mut s = self.store.lock();
            if !s.building.is_empty() || s.files.contains_key(&key) {
                return;
            }
            s.building.insert(key);
            s.make_room(data.size, self.max_bytes);
        }
        let (this, remote2) = (self.clone(), remote.clone());
        remote.rt.spawn_blocking(move || {
            let built = this.assemble(&remote2, &data);
            let mut s = this.store.lock();
            s.building.remove(&key);
            match built {
                Ok(file) => {
                    s.make_room(data.size, this.max_bytes);
                    s.clock += 1;
                    let used = s.clock;
                    s.bytes += data.size;
                    s.files.insert(key, Assembled { file: Arc::new(file), size: data.size, used });
                    this.counters.assembled.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(bytes = data.size, "file assembled for passthrough");
                }
                Err(e) => {
                    this.counters.assembly_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(error = %e, "file not assembled for passthrough");
                }
            }
        });
    }

    /// Copies the file's chunks, verified as they are read from the caches, into a new
    /// anonymous file.
    fn assemble(&self, remote: &Remote, data: &FileData) -> Result<File, AssembleError> {
        let io = |op: &'static str| move |source: std::io::Error| AssembleError::Io { op, source };
        let file = tempfile::tempfile_in(&self.dir).map_err(io("creating the file"))?;
        file.set_len(data.size).map_err(io("sizing the file"))?;
        let mut pos = 0u64;
        for &(id, want) in &data.chunks {
            let bytes = remote.cached_chunk(id).map_err(AssembleError::Cache)?.ok_or(AssembleError::NotCached(id))?;
            if bytes.len() != want as usize {
                return Err(AssembleError::Length { id, got: bytes.len(), want });
            }
            file.write_all_at(&bytes, pos).map_err(io("writing the file"))?;
            pos += want as u64;
        }
        if pos != data.size {
            return Err(AssembleError::Size { held: pos, size: data.size });
        }
        Ok(file)
    }
}
