//! Where locally written bytes live until commit. Small files stay in memory (creating a
//! file on ext4 costs tens of microseconds and a descriptor, which would make unpacking a
//! source tree slow and could exhaust descriptors); a file that grows past
//! [`MEM_FILE_LIMIT`], or any file once the mount's in-memory budget is spent, is kept in a
//! sparse file in the overlay directory. Either way, bytes never written read as zeros.
//!
//! Every overlay has a number, unique in its overlay directory, and a *named* data file
//! `<overlay dir>/dirty/data/<id>` (see [`DataDir`]), so that uncommitted bytes survive the
//! helper: a file overlay is that file; an in-memory overlay is copied there by
//! [`MemOverlay::save`] (at close, fsync, and by the background saver of
//! [`crate::persist`]), never on each write. A data file is removed only once a saved state
//! that no longer names it is on disk (see [`DataDir::take_dropped`]), so a crash at any
//! point leaves every file the last saved state refers to.

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

/// The directory holding overlay data files, and the numbers of overlays that went away.
#[derive(Debug)]
pub struct DataDir {
    dir: PathBuf,
    next_id: AtomicU64,
    dropped: Mutex<Vec<u64>>,
}

impl DataDir {
    /// Data files in `dir` (created if missing); new overlays are numbered from `next_id`.
    pub fn open(dir: PathBuf, next_id: u64) -> std::io::Result<Arc<DataDir>> {
        std::fs::create_dir_all(&dir)?;
        Ok(Arc::new(DataDir { dir, next_id: AtomicU64::new(next_id.max(1)), dropped: Mutex::new(Vec::new()) }))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data file of overlay `id`.
    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(id.to_string())
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
            match std::fs::remove_file(self.path(*id)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(id, error = %e, "removing an overlay data file failed"),
            }
        }
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
    id: u64,
    data: Mutex<Vec<u8>>,
    /// Bumped by every change of `data`.
    generation: AtomicU64,
    /// The generation last copied to the data file (`u64::MAX`: never).
    saved: AtomicU64,
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

impl Drop for MemOverlay {
    fn drop(&mut self) {
        self.dir.dropped.lock().push(self.id);
    }
}

impl Drop for FileOverlay {
    fn drop(&mut self) {
        self.dir.dropped.lock().push(self.id);
    }
}

fn create_named(dir: &DataDir, id: u64) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path(id))
}

impl MemOverlay {
    /// Copies the bytes to the data file if they changed since the last save (`sync`: and
    /// flushes it to the disk). Returns whether anything was written.
    pub fn save(&self, sync: bool) -> std::io::Result<bool> {
        // Under the data lock: saves of one overlay never interleave, and the bytes written
        // are exactly those of the generation recorded.
        let d = self.data.lock();
        let generation = self.generation.load(Ordering::Acquire);
        if self.saved.load(Ordering::Acquire) == generation {
            drop(d);
            if sync {
                // Saved before, perhaps without a flush: flush it now.
                File::open(self.dir.path(self.id))?.sync_data()?;
            }
            return Ok(false);
        }
        let f = create_named(&self.dir, self.id)?;
        f.write_all_at(&d, 0)?;
        if sync {
            f.sync_data()?;
        }
        self.saved.store(generation, Ordering::Release);
        Ok(true)
    }

    /// Whether bytes changed since the last save.
    pub fn unsaved(&self) -> bool {
        self.saved.load(Ordering::Acquire) != self.generation.load(Ordering::Acquire)
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
                id: dir.next(),
                data: Mutex::new(vec![0u8; size as usize]),
                generation: AtomicU64::new(0),
                saved: AtomicU64::new(u64::MAX),
                dir: dir.clone(),
            })));
        }
        let id = dir.next();
        let file = create_named(dir, id)?;
        file.set_len(size)?;
        Ok(Overlay::File(Arc::new(FileOverlay { id, file, dir: dir.clone() })))
    }

    /// An overlay restored from data file `id` holding the first `size` bytes of a file
    /// (bytes the data file lacks read as zeros): in memory when it fits the limits.
    pub fn restore(dir: &Arc<DataDir>, id: u64, size: u64, usage: &MemUsage) -> std::io::Result<Overlay> {
        let file = OpenOptions::new().read(true).write(true).open(dir.path(id))?;
        if size <= MEM_FILE_LIMIT && usage.0.load(Ordering::Relaxed) + size <= MEM_BUDGET {
            let mut data = vec![0u8; size as usize];
            let mut done = 0;
            while done < data.len() {
                let n = file.read_at(&mut data[done..], done as u64)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            usage.0.fetch_add(size, Ordering::Relaxed);
            // The data file may hold more than `size` bytes (written after the state was
            // saved): mark it unsaved, so the next save rewrites it to match.
            let on_disk = file.metadata()?.len();
            let saved = if on_disk == size { 0 } else { u64::MAX };
            return Ok(Overlay::Mem(Arc::new(MemOverlay {
                id,
                data: Mutex::new(data),
                generation: AtomicU64::new(0),
                saved: AtomicU64::new(saved),
                dir: dir.clone(),
            })));
        }
        Ok(Overlay::File(Arc::new(FileOverlay { id, file, dir: dir.clone() })))
    }

    /// The overlay's number (its data file's name).
    pub fn id(&self) -> u64 {
        match self {
            Overlay::Mem(m) => m.id,
            Overlay::File(f) => f.id,
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
        // A new number: the old one's data file goes once a state without it is saved.
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
            Overlay::Mem(m) => m.save(true).map(|_| ()),
            Overlay::File(f) => f.file.sync_data(),
        }
    }

    /// Writes an in-memory overlay's changed bytes to its data file (no flush; a file
    /// overlay already is its data file).
    pub fn save(&self) -> std::io::Result<()> {
        match self {
            Overlay::Mem(m) => m.save(false).map(|_| ()),
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
