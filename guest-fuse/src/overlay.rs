//! Where locally written bytes live until commit. Small files stay in memory (creating an
//! anonymous file on ext4 costs about half a millisecond and a descriptor, which would make
//! unpacking a source tree slow and could exhaust descriptors); a file that grows past
//! [`MEM_FILE_LIMIT`], or any file once the mount's in-memory budget is spent, is kept in a
//! sparse anonymous file in the overlay directory. Either way, bytes never written read as
//! zeros, and nothing is left on disk when the helper exits.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Largest file kept in memory.
pub const MEM_FILE_LIMIT: u64 = 1 << 20;

/// Memory all in-memory overlays of a mount may use together.
pub const MEM_BUDGET: u64 = 256 << 20;

/// A file's local bytes.
#[derive(Clone, Debug)]
pub enum Overlay {
    /// In memory (the whole file, holes as zeros).
    Mem(Arc<Mutex<Vec<u8>>>),
    /// A sparse anonymous file.
    File(Arc<File>),
}

/// Bytes held by in-memory overlays of one mount.
#[derive(Debug, Default)]
pub struct MemUsage(AtomicU64);

impl Overlay {
    /// A new overlay for a file of `size` bytes (memory when it fits the limits).
    pub fn create(dir: &Path, size: u64, usage: &MemUsage) -> std::io::Result<Overlay> {
        if size <= MEM_FILE_LIMIT && usage.0.load(Ordering::Relaxed) + size <= MEM_BUDGET {
            usage.0.fetch_add(size, Ordering::Relaxed);
            return Ok(Overlay::Mem(Arc::new(Mutex::new(vec![0u8; size as usize]))));
        }
        let file = tempfile::tempfile_in(dir)?;
        file.set_len(size)?;
        Ok(Overlay::File(Arc::new(file)))
    }

    /// Moves an in-memory overlay to a file if writing up to `end` would exceed the limits.
    /// Call with the state lock held (the overlay is replaced in the file's state).
    pub fn spill_if_needed(&mut self, end: u64, dir: &Path, usage: &MemUsage) -> std::io::Result<()> {
        let Overlay::Mem(m) = self else { return Ok(()) };
        let mut data = m.lock();
        let len = data.len() as u64;
        if end <= len {
            return Ok(());
        }
        let fits = end <= MEM_FILE_LIMIT && usage.0.load(Ordering::Relaxed) + (end - len) <= MEM_BUDGET;
        if fits {
            usage.0.fetch_add(end - len, Ordering::Relaxed);
            data.resize(end as usize, 0);
            return Ok(());
        }
        let file = tempfile::tempfile_in(dir)?;
        file.write_all_at(&data, 0)?;
        file.set_len(len)?;
        usage.0.fetch_sub(len, Ordering::Relaxed);
        data.clear();
        data.shrink_to_fit();
        drop(data);
        *self = Overlay::File(Arc::new(file));
        Ok(())
    }

    /// Reads `buf.len()` bytes at `pos`; bytes past the end read as zeros.
    pub fn read_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        match self {
            Overlay::Mem(m) => {
                let data = m.lock();
                let start = (pos as usize).min(data.len());
                let n = (data.len() - start).min(buf.len());
                buf[..n].copy_from_slice(&data[start..start + n]);
                buf[n..].fill(0);
                Ok(())
            }
            Overlay::File(f) => {
                let mut done = 0;
                while done < buf.len() {
                    let n = f.read_at(&mut buf[done..], pos + done as u64)?;
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
                let mut buf = m.lock();
                let end = pos as usize + data.len();
                if end > buf.len() {
                    buf.resize(end, 0);
                }
                buf[pos as usize..end].copy_from_slice(data);
                Ok(())
            }
            Overlay::File(f) => f.write_all_at(data, pos),
        }
    }

    /// Sets the length (new bytes are zeros).
    pub fn set_len(&self, len: u64, usage: &MemUsage) -> std::io::Result<()> {
        match self {
            Overlay::Mem(m) => {
                let mut buf = m.lock();
                let old = buf.len() as u64;
                if len < old {
                    usage.0.fetch_sub(old - len, Ordering::Relaxed);
                } else {
                    usage.0.fetch_add(len - old, Ordering::Relaxed);
                }
                buf.resize(len as usize, 0);
                Ok(())
            }
            Overlay::File(f) => f.set_len(len),
        }
    }

    /// Flushes a file overlay to disk (no-op in memory).
    pub fn sync(&self) -> std::io::Result<()> {
        match self {
            Overlay::Mem(_) => Ok(()),
            Overlay::File(f) => f.sync_data(),
        }
    }

    /// Bytes of memory this overlay holds.
    pub fn mem_len(&self) -> u64 {
        match self {
            Overlay::Mem(m) => m.lock().len() as u64,
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
