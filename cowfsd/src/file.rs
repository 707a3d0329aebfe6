//! `CowFile`: one copy-on-write file. Its bytes are the base manifest's regions (chunks,
//! fetched on first read) overlaid with a local layer: a sparse file holding every 4 KiB page
//! written (or copied up by a partial write), with a bitmap of the pages it holds.
//!
//! Dirty tracking is per region: every write marks its regions dirty. A checkpoint is
//! [`CowFile::freeze`] (while the writer, the VM, is paused: the dirty set becomes the frozen
//! set, and a new dirty set starts) followed by [`CowFile::export`] (after the VM runs again:
//! each frozen region is read, hashed, stored if the store lacks it, and the manifest updated).
//! A write to a frozen region that is not exported yet first saves the region's frozen bytes,
//! so the export sees the file exactly as it was at the freeze.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;

use crate::chunks::Chunks;
use crate::error::{CowError, Result};
use cowfs::manifest::{Manifest, RegionRef};

/// Page size of the layer bitmap.
pub const PAGE: u64 = 4096;
/// Regions read into memory at once during an export (16 MiB of 256 KiB regions).
const EXPORT_BATCH: usize = 64;

/// What an export did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ExportStats {
    /// Regions that were frozen (written since the previous checkpoint).
    pub regions: u64,
    /// Of those, all-zero (stored as nothing).
    pub zero_regions: u64,
    /// Chunks uploaded (the store did not have them).
    pub chunks_uploaded: u64,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Bytes of the frozen regions (what changed, at region granularity).
    pub bytes_frozen: u64,
}

/// Counters of a file.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FileStats {
    /// File size.
    pub size: u64,
    /// Pages held in the layer.
    pub layer_pages: u64,
    /// Regions written since the last freeze.
    pub dirty_regions: u64,
    /// Regions frozen and not exported yet.
    pub frozen_regions: u64,
    /// Bytes read from base chunks (not from the layer).
    pub base_read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
}

struct State {
    size: u64,
    base: Manifest,
    present: Vec<u64>,
    dirty: BTreeSet<u32>,
    frozen: BTreeSet<u32>,
    frozen_copies: HashMap<u32, Arc<Vec<u8>>>,
    base_read_bytes: u64,
    written_bytes: u64,
}

impl State {
    fn has(&self, page: u64) -> bool {
        self.present.get((page / 64) as usize).is_some_and(|w| w & (1 << (page % 64)) != 0)
    }
    fn set(&mut self, page: u64) {
        if let Some(w) = self.present.get_mut((page / 64) as usize) {
            *w |= 1 << (page % 64);
        }
    }
}

/// One copy-on-write file.
pub struct CowFile {
    layer: std::fs::File,
    chunks: Arc<Chunks>,
    state: RwLock<State>,
    /// Refuses writes: its bytes are its base, for good (a checkpoint's memory view, which
    /// VMs map privately: a write would change what every one of them reads).
    readonly: bool,
}

fn bitmap_words(size: u64) -> usize {
    size.div_ceil(PAGE).div_ceil(64) as usize
}

impl CowFile {
    /// A file over `base`, with its (new, empty) layer at `layer_path`.
    pub fn create(layer_path: &Path, base: Manifest, chunks: Arc<Chunks>) -> Result<Self> {
        Self::create_with(layer_path, base, chunks, false)
    }

    /// Like [`CowFile::create`]; a `readonly` file refuses every write.
    pub fn create_with(layer_path: &Path, base: Manifest, chunks: Arc<Chunks>, readonly: bool) -> Result<Self> {
        let layer = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(layer_path)?;
        layer.set_len(base.size)?;
        let size = base.size;
        Ok(Self {
            layer,
            chunks,
            state: RwLock::new(State {
                size,
                present: vec![0; bitmap_words(size)],
                base,
                dirty: BTreeSet::new(),
                frozen: BTreeSet::new(),
                frozen_copies: HashMap::new(),
                base_read_bytes: 0,
                written_bytes: 0,
            }),
            readonly,
        })
    }

    /// Whether the file refuses writes.
    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    fn read_lock(&self) -> parking_lot::RwLockReadGuard<'_, State> {
        self.state.read()
    }

    fn write_lock(&self) -> parking_lot::RwLockWriteGuard<'_, State> {
        self.state.write()
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.read_lock().size
    }

    /// Counters.
    pub fn stats(&self) -> FileStats {
        let st = self.read_lock();
        FileStats {
            size: st.size,
            layer_pages: st.present.iter().map(|w| w.count_ones() as u64).sum(),
            dirty_regions: st.dirty.len() as u64,
            frozen_regions: st.frozen.len() as u64,
            base_read_bytes: st.base_read_bytes,
            written_bytes: st.written_bytes,
        }
    }

    /// Base bytes `[off, off + out.len())` of region `r` (zeros where the base has none).
    fn read_base(&self, st: &State, r: u32, off_in_region: u64, out: &mut [u8]) -> Result<()> {
        out.fill(0);
        let Some(Some(RegionRef { chunk, offset, len })) = st.base.regions.get(r as usize).copied() else {
            return Ok(());
        };
        if off_in_region >= len as u64 {
            return Ok(());
        }
        let data = self.chunks.get(chunk)?;
        let start = offset as u64 + off_in_region;
        let avail = (len as u64 - off_in_region).min(out.len() as u64) as usize;
        let src = data
            .get(start as usize..start as usize + avail)
            .ok_or_else(|| CowError::Corrupt(format!("chunk {chunk} is shorter than the manifest says")))?;
        out[..avail].copy_from_slice(src);
        Ok(())
    }

    /// Reads `out.len()` bytes at `off` (short at the end of the file). Returns bytes read.
    fn read_locked(&self, st: &State, off: u64, out: &mut [u8]) -> Result<(usize, u64)> {
        if off >= st.size {
            return Ok((0, 0));
        }
        let len = (out.len() as u64).min(st.size - off) as usize;
        let region = st.base.region_size;
        let mut done = 0usize;
        let mut from_base = 0u64;
        while done < len {
            let pos = off + done as u64;
            let page = pos / PAGE;
            // A run of pages that are all in the layer, or all not.
            let in_layer = st.has(page);
            let mut end = ((page + 1) * PAGE).min(off + len as u64);
            while end < off + len as u64 && st.has(end / PAGE) == in_layer {
                end = ((end / PAGE + 1) * PAGE).min(off + len as u64);
            }
            let mut at = pos;
            while at < end {
                let r = (at / region) as u32;
                let stop = end.min((r as u64 + 1) * region);
                let buf = &mut out[(at - off) as usize..(stop - off) as usize];
                if in_layer {
                    self.layer.read_exact_at(buf, at)?;
                } else {
                    self.read_base(st, r, at % region, buf)?;
                    from_base += buf.len() as u64;
                }
                at = stop;
            }
            done = (end - off) as usize;
        }
        Ok((len, from_base))
    }

    /// Reads at `off`; returns the bytes (short at the end of the file).
    pub fn read(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let (n, from_base) = {
            let st = self.read_lock();
            self.read_locked(&st, off, &mut out)?
        };
        out.truncate(n);
        if from_base > 0 {
            self.write_lock().base_read_bytes += from_base;
        }
        Ok(out)
    }

    /// The whole of region `r` as it is now.
    fn region_bytes(&self, st: &State, r: u32) -> Result<Vec<u8>> {
        let region = st.base.region_size;
        let start = r as u64 * region;
        let len = region.min(st.size.saturating_sub(start)) as usize;
        let mut buf = vec![0u8; len];
        self.read_locked(st, start, &mut buf)?;
        Ok(buf)
    }

    /// Writes `data` at `off` (the file does not grow: a write past the end is refused).
    pub fn write(&self, off: u64, data: &[u8]) -> Result<usize> {
        if self.readonly {
            return Err(CowError::ReadOnly("the file".into()));
        }
        let mut st = self.write_lock();
        let end = off.checked_add(data.len() as u64).ok_or_else(|| CowError::Invalid("offset overflow".into()))?;
        if end > st.size {
            return Err(CowError::Invalid(format!("write past the end ({end} > {})", st.size)));
        }
        if data.is_empty() {
            return Ok(0);
        }
        let region = st.base.region_size;
        // Save frozen bytes before they change.
        for r in (off / region) as u32..=((end - 1) / region) as u32 {
            if st.frozen.contains(&r) && !st.frozen_copies.contains_key(&r) {
                let copy = self.region_bytes(&st, r)?;
                st.frozen_copies.insert(r, Arc::new(copy));
            }
        }
        // Copy up the partial pages at either end that the layer does not hold yet.
        let first = off / PAGE;
        let last = (end - 1) / PAGE;
        for page in [first, last] {
            let covered = off <= page * PAGE && end >= (page + 1) * PAGE;
            if !covered && !st.has(page) {
                let start = page * PAGE;
                let plen = PAGE.min(st.size - start) as usize;
                let mut buf = vec![0u8; plen];
                self.read_base(&st, (start / region) as u32, start % region, &mut buf)?;
                self.layer.write_all_at(&buf, start)?;
                st.set(page);
            }
        }
        self.layer.write_all_at(data, off)?;
        for page in first..=last {
            st.set(page);
        }
        for r in (off / region) as u32..=((end - 1) / region) as u32 {
            st.dirty.insert(r);
        }
        st.written_bytes += data.len() as u64;
        Ok(data.len())
    }

    /// Starts a checkpoint: the regions written since the last one become the frozen set.
    /// Call while nothing writes (the VM is paused and its writes flushed). A previous
    /// checkpoint that was frozen but never exported (its caller failed in between) is
    /// abandoned: its regions join this one, with their current bytes.
    pub fn freeze(&self) -> Result<u64> {
        let mut st = self.write_lock();
        let mut frozen = std::mem::take(&mut st.dirty);
        frozen.append(&mut st.frozen);
        st.frozen = frozen;
        // Saved frozen bytes belonged to the abandoned checkpoint; the file is still now.
        st.frozen_copies.clear();
        Ok(st.frozen.len() as u64)
    }

    /// Finishes a checkpoint: stores each frozen region as a chunk (all-zero regions as
    /// nothing), and returns the new manifest. The file keeps serving meanwhile. Regions are
    /// read in batches and stored concurrently, so memory use stays bounded.
    /// If storing fails, the checkpoint is abandoned and every frozen region is marked
    /// written again, so the next checkpoint stores it (nothing is lost).
    pub fn export(&self) -> Result<(Manifest, ExportStats)> {
        let regions: Vec<u32> = self.read_lock().frozen.iter().copied().collect();
        let exported = self.export_regions(&regions);
        if exported.is_err() {
            let mut st = self.write_lock();
            st.dirty.extend(regions);
            st.frozen.clear();
            st.frozen_copies.clear();
        }
        exported
    }

    fn export_regions(&self, regions: &[u32]) -> Result<(Manifest, ExportStats)> {
        let mut stats = ExportStats::default();
        let mut updates = Vec::with_capacity(regions.len());
        for batch in regions.chunks(EXPORT_BATCH) {
            let mut pending = Vec::with_capacity(batch.len());
            let mut datas = Vec::with_capacity(batch.len());
            for &r in batch {
                let bytes = {
                    let mut st = self.write_lock();
                    let bytes = match st.frozen_copies.remove(&r) {
                        Some(copy) => Arc::try_unwrap(copy).unwrap_or_else(|a| (*a).clone()),
                        None => self.region_bytes(&st, r)?,
                    };
                    st.frozen.remove(&r);
                    bytes
                };
                stats.regions += 1;
                stats.bytes_frozen += bytes.len() as u64;
                if bytes.iter().all(|&b| b == 0) {
                    stats.zero_regions += 1;
                    updates.push((r, None));
                } else {
                    pending.push((r, bytes.len() as u32));
                    datas.push(Bytes::from(bytes));
                }
            }
            for ((r, len), (chunk, uploaded)) in pending.into_iter().zip(self.chunks.put_many(datas)?) {
                if uploaded {
                    stats.chunks_uploaded += 1;
                    stats.bytes_uploaded += len as u64;
                }
                updates.push((r, Some(RegionRef { chunk, offset: 0, len })));
            }
        }
        let mut st = self.write_lock();
        for (r, entry) in updates {
            if let Some(slot) = st.base.regions.get_mut(r as usize) {
                *slot = entry;
            }
        }
        Ok((st.base.clone(), stats))
    }

    /// The manifest of the last export (or the base the file was created from).
    pub fn manifest(&self) -> Manifest {
        self.read_lock().base.clone()
    }
}
