//! Where locally written bytes live until commit. Small files stay in memory (creating a
//! file on ext4 costs tens of microseconds and a descriptor, which would make unpacking a
//! source tree slow and could exhaust descriptors); a file that grows past
//! [`MEM_FILE_LIMIT`], or any file once the mount's in-memory budget is spent, is kept in a
//! sparse file in the overlay directory. Either way, bytes never written read as zeros.
//!
//! Uncommitted bytes survive the helper (see [`crate::persist`]):
//! - a file overlay is a *named* data file `<overlay dir>/dirty/data/<id>`, removed once a
//!   saved state that no longer names it is on disk (see [`DataDir::take_dropped`]);
//! - an in-memory overlay is appended, whole, to the current *pack* `dirty/data/p<n>` when
//!   it changed since its last save: when a handle of it is closed, on fsync, and by the
//!   background saver; never on each write. One append costs a few microseconds where
//!   creating a file per small file cost about 150 us of helper CPU per file (measured:
//!   10,000-file `tar -x`). A new pack is started at [`PACK_ROLL_BYTES`] and by every new
//!   process (the tail of an old one may be torn); packs no saved state names are removed
//!   after each save, and when the packs hold far more than the saved state names, the next
//!   save rewrites the live overlays into the current pack so the old ones can go.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Largest file kept in memory.
pub const MEM_FILE_LIMIT: u64 = 1 << 20;

/// Memory all in-memory overlays of a mount may use together.
pub const MEM_BUDGET: u64 = 256 << 20;

/// A new pack is started once the current one holds this many bytes.
pub const PACK_ROLL_BYTES: u64 = 64 << 20;

/// Where an in-memory overlay's bytes were last saved: `len` bytes at `off` in pack `pack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackLoc {
    /// The pack's number (its file is `p<pack>`).
    pub pack: u64,
    /// Offset in the pack.
    pub off: u64,
    /// Length.
    pub len: u64,
}

/// The packs of a data directory.
#[derive(Debug, Default)]
struct Packs {
    /// The pack appended to: number, file, length.
    current: Option<(u64, Arc<File>, u64)>,
    /// Every pack on disk.
    existing: std::collections::BTreeSet<u64>,
    /// Bytes in packs on disk.
    bytes: u64,
}

/// The directory holding overlay data files and packs, and the numbers of file overlays
/// that went away.
#[derive(Debug)]
pub struct DataDir {
    dir: PathBuf,
    next_id: AtomicU64,
    dropped: Mutex<Vec<u64>>,
    packs: Mutex<Packs>,
}

impl DataDir {
    /// Data files in `dir` (created if missing); new overlays and packs are numbered from
    /// `next_id`; `packs` lists the packs on disk.
    pub fn open(dir: PathBuf, next_id: u64, packs: &[(u64, u64)]) -> std::io::Result<Arc<DataDir>> {
        std::fs::create_dir_all(&dir)?;
        let p = Packs {
            current: None,
            existing: packs.iter().map(|(n, _)| *n).collect(),
            bytes: packs.iter().map(|(_, b)| *b).sum(),
        };
        Ok(Arc::new(DataDir {
            dir,
            next_id: AtomicU64::new(next_id.max(1)),
            dropped: Mutex::new(Vec::new()),
            packs: Mutex::new(p),
        }))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data file of overlay `id`.
    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// The file of pack `n`.
    pub fn pack_path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("p{n}"))
    }

    fn next(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Overlays dropped since the last call: their data files may be removed once a state
    /// saved *after* this call is on disk (no such state can name them).
    pub fn take_dropped(&self) -> Vec<u64> {
        std::mem::take(&mut *self.dropped.lock())
    }

    /// Removes the data files of `ids` (missing ones are fine).
    pub fn remove(&self, ids: &[u64]) {
        for id in ids {
            remove_quietly(&self.path(*id));
        }
    }

    /// Appends `data` to the current pack (`sync`: and flushes the pack to the disk).
    fn append(&self, data: &[u8], sync: bool) -> std::io::Result<PackLoc> {
        let mut p = self.packs.lock();
        if p.current.as_ref().is_none_or(|(_, _, len)| *len >= PACK_ROLL_BYTES) {
            let n = self.next();
            let f = OpenOptions::new().read(true).write(true).create_new(true).open(self.pack_path(n))?;
            p.existing.insert(n);
            p.current = Some((n, Arc::new(f), 0));
        }
        let Some((n, f, len)) = p.current.as_mut() else { return Err(std::io::Error::other("no current pack")) };
        let loc = PackLoc { pack: *n, off: *len, len: data.len() as u64 };
        let file = f.clone();
        *len += loc.len;
        p.bytes += loc.len;
        // Written under the lock: a torn append can only be at the end of the pack.
        file.write_all_at(data, loc.off)?;
        drop(p);
        if sync {
            file.sync_data()?;
        }
        Ok(loc)
    }

    /// Flushes pack `n` to the disk.
    fn sync_pack(&self, n: u64) -> std::io::Result<()> {
        let current = self.packs.lock().current.as_ref().filter(|(c, _, _)| *c == n).map(|(_, f, _)| f.clone());
        match current {
            Some(f) => f.sync_data(),
            None => File::open(self.pack_path(n))?.sync_data(),
        }
    }

    /// Whether pack `n` is on disk.
    pub fn pack_exists(&self, n: u64) -> bool {
        self.packs.lock().existing.contains(&n)
    }

    /// The current pack's number, if one was started.
    pub fn current_pack(&self) -> Option<u64> {
        self.packs.lock().current.as_ref().map(|(n, _, _)| *n)
    }

    /// Bytes in packs on disk.
    pub fn pack_bytes(&self) -> u64 {
        self.packs.lock().bytes
    }

    /// Removes every pack but the current one and those in `keep` (call after a state that
    /// names only packs in `keep` is on disk).
    pub fn remove_packs_except(&self, keep: &std::collections::HashSet<u64>) {
        let mut p = self.packs.lock();
        let current = p.current.as_ref().map(|(n, _, _)| *n);
        let gone: Vec<u64> = p.existing.iter().copied().filter(|n| Some(*n) != current && !keep.contains(n)).collect();
        for n in gone {
            let path = self.pack_path(n);
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            remove_quietly(&path);
            p.existing.remove(&n);
            p.bytes = p.bytes.saturating_sub(len);
        }
    }
}

fn remove_quietly(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "removing an overlay data file failed"),
    }
}

/// A file's local bytes.
#[derive(Clone, Debug)]
pub enum Overlay {
    /// In memory (the whole file, holes as zeros).
    Mem(Arc<MemOverlay>),
    /// A sparse named file in the data directory.
    File(Arc<FileOverlay>),
}

/// An in-memory overlay and what of it is saved.
#[derive(Debug)]
pub struct MemOverlay {
    data: Mutex<Vec<u8>>,
    /// Bumped by every change of `data`.
    generation: AtomicU64,
    /// The generation last saved (`u64::MAX`: never).
    saved: AtomicU64,
    /// Where it was saved.
    loc: Mutex<Option<PackLoc>>,
    dir: Arc<DataDir>,
}

/// A file overlay.
#[derive(Debug)]
pub struct FileOverlay {
    id: u64,
    file: File,
    dir: Arc<DataDir>,
}

/// Bytes held by in-memory overlays of one mount.
#[derive(Debug, Default)]
pub struct MemUsage(AtomicU64);

impl Drop for FileOverlay {
    fn drop(&mut self) {
        self.dir.dropped.lock().push(self.id);
    }
}

fn create_named(dir: &DataDir, id: u64) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path(id))
}

impl MemOverlay {
    /// Appends the bytes to the current pack if they changed since the last save, or if
    /// `rewrite` and they are not in the current pack (`sync`: and flushes the pack to the
    /// disk). Returns where they are saved.
    pub fn save(&self, sync: bool, rewrite: bool) -> std::io::Result<PackLoc> {
        // Under the data lock: saves of one overlay never interleave, and the bytes written
        // are exactly those of the generation recorded.
        let d = self.data.lock();
        let generation = self.generation.load(Ordering::Acquire);
        let loc = *self.loc.lock();
        if let Some(loc) = loc
            && self.saved.load(Ordering::Acquire) == generation
            && self.dir.pack_exists(loc.pack)
            && !(rewrite && self.dir.current_pack() != Some(loc.pack))
        {
            drop(d);
            if sync {
                self.dir.sync_pack(loc.pack)?;
            }
            return Ok(loc);
        }
        let loc = self.dir.append(&d, sync)?;
        *self.loc.lock() = Some(loc);
        self.saved.store(generation, Ordering::Release);
        Ok(loc)
    }

    /// Where the bytes were last saved.
    pub fn location(&self) -> Option<PackLoc> {
        *self.loc.lock()
    }

    /// Whether bytes changed since the last save (or were never saved, or their pack is
    /// gone).
    pub fn unsaved(&self) -> bool {
        self.saved.load(Ordering::Acquire) != self.generation.load(Ordering::Acquire)
            || self.loc.lock().is_none_or(|l| !self.dir.pack_exists(l.pack))
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

impl Overlay {
    /// A new overlay for a file of `size` bytes (memory when it fits the limits).
    pub fn create(dir: &Arc<DataDir>, size: u64, usage: &MemUsage) -> std::io::Result<Overlay> {
        if size <= MEM_FILE_LIMIT && usage.0.load(Ordering::Relaxed) + size <= MEM_BUDGET {
            usage.0.fetch_add(size, Ordering::Relaxed);
            return Ok(Overlay::Mem(Arc::new(MemOverlay {
                data: Mutex::new(vec![0u8; size as usize]),
                generation: AtomicU64::new(0),
                saved: AtomicU64::new(u64::MAX),
                loc: Mutex::new(None),
                dir: dir.clone(),
            })));
        }
        let id = dir.next();
        let file = create_named(dir, id)?;
        file.set_len(size)?;
        Ok(Overlay::File(Arc::new(FileOverlay { id, file, dir: dir.clone() })))
    }

    /// A file overlay restored from data file `id`.
    pub fn restore_file(dir: &Arc<DataDir>, id: u64) -> std::io::Result<Overlay> {
        let file = OpenOptions::new().read(true).write(true).open(dir.path(id))?;
        Ok(Overlay::File(Arc::new(FileOverlay { id, file, dir: dir.clone() })))
    }

    /// An in-memory overlay restored from its saved bytes at `loc` (`bytes`), for a file of
    /// `size` bytes: in memory when it fits the limits, else moved to a new file overlay.
    pub fn restore_mem(
        dir: &Arc<DataDir>,
        loc: PackLoc,
        mut bytes: Vec<u8>,
        size: u64,
        usage: &MemUsage,
    ) -> std::io::Result<Overlay> {
        let exact = bytes.len() as u64 == size;
        bytes.resize(size as usize, 0);
        if size <= MEM_FILE_LIMIT && usage.0.load(Ordering::Relaxed) + size <= MEM_BUDGET {
            usage.0.fetch_add(size, Ordering::Relaxed);
            return Ok(Overlay::Mem(Arc::new(MemOverlay {
                data: Mutex::new(bytes),
                generation: AtomicU64::new(0),
                saved: AtomicU64::new(if exact { 0 } else { u64::MAX }),
                loc: Mutex::new(Some(loc)),
                dir: dir.clone(),
            })));
        }
        let id = dir.next();
        let file = create_named(dir, id)?;
        file.write_all_at(&bytes, 0)?;
        Ok(Overlay::File(Arc::new(FileOverlay { id, file, dir: dir.clone() })))
    }

    /// The file overlay's number (its data file's name); None in memory.
    pub fn file_id(&self) -> Option<u64> {
        match self {
            Overlay::Mem(_) => None,
            Overlay::File(f) => Some(f.id),
        }
    }

    /// Moves an in-memory overlay to a file if writing up to `end` would exceed the limits.
    /// Call with the state lock held (the overlay is replaced in the file's state).
    pub fn spill_if_needed(&mut self, end: u64, dir: &Arc<DataDir>, usage: &MemUsage) -> std::io::Result<()> {
        let Overlay::Mem(m) = self else { return Ok(()) };
        let mut data = m.data.lock();
        let len = data.len() as u64;
        if end <= len {
            return Ok(());
        }
        let fits = end <= MEM_FILE_LIMIT && usage.0.load(Ordering::Relaxed) + (end - len) <= MEM_BUDGET;
        if fits {
            usage.0.fetch_add(end - len, Ordering::Relaxed);
            data.resize(end as usize, 0);
            m.bump();
            return Ok(());
        }
        let id = dir.next();
        let file = create_named(dir, id)?;
        file.write_all_at(&data, 0)?;
        file.set_len(len)?;
        usage.0.fetch_sub(len, Ordering::Relaxed);
        data.clear();
        data.shrink_to_fit();
        drop(data);
        *self = Overlay::File(Arc::new(FileOverlay { id, file, dir: dir.clone() }));
        Ok(())
    }

    /// Reads `buf.len()` bytes at `pos`; bytes past the end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        match self {
            Overlay::Mem(m) => {
                let data = m.data.lock();
                let start = (pos as usize).min(data.len());
                let n = (data.len() - start).min(buf.len());
                buf[..n].copy_from_slice(&data[start..start + n]);
                buf[n..].fill(0);
                Ok(())
            }
            Overlay::File(f) => {
                let mut done = 0;
                while done < buf.len() {
                    let n = f.file.read_at(&mut buf[done..], pos + done as u64)?;
                    if n == 0 {
                        buf[done..].fill(0);
                        break;
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Writes `data` at `pos` (an in-memory overlay must already be large enough: see
    /// [`Overlay::spill_if_needed`]).
    pub fn write_at(&self, data: &[u8], pos: u64) -> std::io::Result<()> {
        match self {
            Overlay::Mem(m) => {
                let mut buf = m.data.lock();
                let end = pos as usize + data.len();
                if end > buf.len() {
                    buf.resize(end, 0);
                }
                buf[pos as usize..end].copy_from_slice(data);
                m.bump();
                Ok(())
            }
            Overlay::File(f) => f.file.write_all_at(data, pos),
        }
    }

    /// Sets the length (new bytes are zeros).
    pub fn set_len(&self, len: u64, usage: &MemUsage) -> std::io::Result<()> {
        match self {
            Overlay::Mem(m) => {
                let mut buf = m.data.lock();
                let old = buf.len() as u64;
                if len < old {
                    usage.0.fetch_sub(old - len, Ordering::Relaxed);
                } else {
                    usage.0.fetch_add(len - old, Ordering::Relaxed);
                }
                buf.resize(len as usize, 0);
                m.bump();
                Ok(())
            }
            Overlay::File(f) => f.file.set_len(len),
        }
    }

    /// Writes the overlay's bytes to its data file and flushes them to the disk.
    pub fn sync(&self) -> std::io::Result<()> {
        match self {
            Overlay::Mem(m) => m.save(true, false).map(|_| ()),
            Overlay::File(f) => f.file.sync_data(),
        }
    }

    /// Writes an in-memory overlay's changed bytes to its data file (no flush; a file
    /// overlay already is its data file).
    pub fn save(&self) -> std::io::Result<()> {
        match self {
            Overlay::Mem(m) => m.save(false, false).map(|_| ()),
            Overlay::File(_) => Ok(()),
        }
    }

    /// Bytes of memory this overlay holds.
    pub fn mem_len(&self) -> u64 {
        match self {
            Overlay::Mem(m) => m.data.lock().len() as u64,
            Overlay::File(_) => 0,
        }
    }
}

impl MemUsage {
    /// Returns memory of a dropped overlay to the budget.
    pub fn release(&self, bytes: u64) {
        self.0.fetch_sub(bytes.min(self.0.load(Ordering::Relaxed)), Ordering::Relaxed);
    }

    /// Bytes in use.
    pub fn bytes(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
