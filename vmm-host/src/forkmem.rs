//! Forks' memory. Every VM started from a checkpoint on this host (forks, restores by
//! checkpoint id) maps one read-only cowfs view of that checkpoint's memory privately
//! (copy-on-write): pages no fork has written are one copy in the host page cache, shared
//! by all of them, and each fork holds only the pages it wrote. The view is removed when
//! the last VM mapping it stops.
//!
//! A VM on a private mapping has no cowfs file tracking its writes, so its checkpoint is a
//! live save of all of memory (see [`crate::hypervisor::VmHandle::save_with_memory`]);
//! [`ForkMemory::import_memory`] turns the RAM image in it into a memory manifest, uploading only the
//! regions the store lacks (those the guest changed since the base checkpoint). Once such a
//! sailbox is woken from its own checkpoint it has its own memory file again.
//!
//! [`ForkMemory`] owns which VMs map which view; the lifecycle maps and unmaps views as VMs
//! start and stop, snapshots import RAM images, recovery re-counts the VMs it re-attaches to.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use chunkstore::ChunkId;
use cowfs::{Exported, Manifest, REGION_SIZE, RegionRef};
use futures::StreamExt;

use crate::error::{Result, SailboxError};
use crate::hypervisor::RamImage;
use crate::model::SailboxRecord;
use crate::runtime::{Live, Runtime};
use crate::vmfiles::VmFiles;

/// Where RAM saves go when it is a tmpfs with room (see [`ram_save_path`]).
const SHM: &str = "/dev/shm";
/// `statfs` magic of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Where a live save of a private VM's memory (`size` bytes of RAM) is written: `/dev/shm`
/// when it is a tmpfs with room for it, else the run directory `run_dir`. QEMU syncs a
/// mapped-ram file to disk before it completes the save, with the guest stopped; on tmpfs
/// that sync is free, so the pause stays the last pass (measured: ~400 ms for 900 MiB of
/// data on this machine's disk, a few ms on tmpfs). The file lives only until its RAM image
/// is stored (host memory of up to the guest's used memory, for that long).
pub(crate) fn ram_save_path(id: &str, run_dir: &Path, size: u64) -> PathBuf {
    let shm = Path::new(SHM);
    let tmpfs_with_room = rustix::fs::statfs(c"/dev/shm").is_ok_and(|st| {
        let free = st.f_bavail.saturating_mul(st.f_bsize as u64);
        st.f_type == TMPFS_MAGIC && free > size.saturating_add(256 << 20)
    });
    if tmpfs_with_room { shm.join(ram_save_name(id)) } else { run_dir.join("ram.mig") }
}

/// The file name of a sailbox's RAM save under `/dev/shm`.
fn ram_save_name(id: &str) -> String {
    format!("sail-{id}.ram.mig")
}

/// Removes a RAM save of sailbox `id` left under `/dev/shm` by a crash mid-checkpoint
/// (recovery calls it for every sailbox it knows: none is checkpointing then).
pub(crate) fn remove_stale_ram_save(id: &str) {
    let _ = std::fs::remove_file(Path::new(SHM).join(ram_save_name(id)));
}

/// Regions read and hashed per blocking task (8 MiB).
const REGIONS_PER_TASK: u64 = 32;
/// Tasks in flight (reading, hashing, uploading).
const TASKS_IN_FLIGHT: usize = 4;

/// The checkpoints' memory views of this host and the VMs that map each (the part of a
/// host that forks' memory is).
pub(crate) struct ForkMemory {
    rt: Arc<Runtime>,
    /// Checkpoint id -> the sailboxes whose VMs map its view; held while a view is created
    /// or removed.
    views: tokio::sync::Mutex<HashMap<String, BTreeSet<String>>>,
}

impl ForkMemory {
    pub(crate) fn new(rt: Arc<Runtime>) -> Self {
        Self { rt, views: tokio::sync::Mutex::default() }
    }

    /// Makes sure checkpoint `ck_id`'s memory view exists and records, under the views lock,
    /// that the sailbox's VM maps it (so no concurrent stop of another VM removes it).
    pub(crate) async fn map_view(&self, live: &Arc<Live>, ck_id: &str, memory_manifest: &str) -> Result<()> {
        let mut views = self.views.lock().await;
        self.rt.files.ensure_view(ck_id, memory_manifest).await?;
        let rec = live.update(|r| r.memory_base = Some(ck_id.to_owned()));
        views.entry(ck_id.to_owned()).or_default().insert(rec.id.clone());
        self.rt.state.put_sailbox(&rec)
    }

    /// Counts a VM that already maps a view (one vmm-host re-attached to after a restart).
    pub(crate) async fn adopt_view(&self, rec: &SailboxRecord) {
        if let Some(ck_id) = &rec.memory_base {
            self.views.lock().await.entry(ck_id.clone()).or_default().insert(rec.id.clone());
        }
    }

    /// Records that the sailbox's VM no longer maps a view (its VM is gone, or never
    /// started), and removes the view if no other VM maps it.
    pub(crate) async fn unmap_view(&self, live: &Arc<Live>) {
        let Some(ck_id) = live.snapshot().memory_base else { return };
        let mut views = self.views.lock().await;
        let rec = live.update(|r| r.memory_base = None);
        self.rt.put_quietly(&rec);
        let users = views.entry(ck_id.clone()).or_default();
        users.remove(&rec.id);
        if users.is_empty() {
            views.remove(&ck_id);
            if let Err(e) = self.rt.files.remove_name(&VmFiles::view_name(&ck_id)).await {
                tracing::warn!(checkpoint = %ck_id, error = %e, "removing a memory view failed");
            } else {
                tracing::debug!(checkpoint = %ck_id, "memory view removed (no VM maps it)");
            }
        }
    }

    /// Whether any VM maps checkpoint `ck_id`'s view.
    pub(crate) async fn view_in_use(&self, ck_id: &str) -> bool {
        self.views.lock().await.get(ck_id).is_some_and(|u| !u.is_empty())
    }

    /// Stores the RAM image of a live save as a memory manifest. Regions equal to `base`'s (the checkpoint the VM started from) are
    /// not counted as changed; chunks the store has are not uploaded.
    pub(crate) async fn import_memory(&self, image: &RamImage, base: &Manifest) -> Result<Exported> {
        let layout = (image.offset, image.size);
        let regions = image.size.div_ceil(REGION_SIZE);
        let tasks = regions.div_ceil(REGIONS_PER_TASK);
        let file = Arc::new(std::fs::File::open(&image.path).map_err(|e| SailboxError::io("opening the RAM image", e))?);
        let backend = self.rt.backend.clone();
        let mut results = futures::stream::iter(0..tasks)
            .map(|t| {
                let (file, backend) = (file.clone(), backend.clone());
                async move {
                    let first = t * REGIONS_PER_TASK;
                    let last = (first + REGIONS_PER_TASK).min(regions);
                    let read = tokio::task::spawn_blocking(move || read_regions(&file, layout, first..last)).await??;
                    let mut out = Vec::with_capacity(read.len());
                    for (r, data) in read {
                        let Some(data) = data else {
                            out.push((r, None, false));
                            continue;
                        };
                        let id = ChunkId::of(&data);
                        let len = data.len() as u32;
                        let uploaded = !backend.exists(id).await?;
                        if uploaded {
                            backend.put(id, data).await?;
                        }
                        out.push((r, Some(RegionRef { chunk: id, offset: 0, len }), uploaded));
                    }
                    Ok::<_, SailboxError>(out)
                }
            })
            .buffered(TASKS_IN_FLIGHT);
        let mut manifest =
            Manifest::zeros(image.size).map_err(|source| SailboxError::Manifest { what: "the RAM image".into(), source })?;
        let mut stats = Exported {
            manifest: String::new(),
            regions: 0,
            zero_regions: 0,
            chunks_uploaded: 0,
            bytes_uploaded: 0,
            bytes_frozen: 0,
        };
        while let Some(batch) = results.next().await {
            for (r, entry, uploaded) in batch? {
                let was = base.regions.get(r as usize).copied().flatten();
                if was != entry {
                    stats.regions += 1;
                    stats.bytes_frozen += REGION_SIZE.min(image.size - r * REGION_SIZE);
                    stats.zero_regions += u64::from(entry.is_none());
                }
                if uploaded {
                    stats.chunks_uploaded += 1;
                    stats.bytes_uploaded += entry.map_or(0, |e| u64::from(e.len));
                }
                if let Some(slot) = manifest.regions.get_mut(r as usize) {
                    *slot = entry;
                }
            }
        }
        let bytes = Bytes::from(manifest.encode());
        let id = ChunkId::of(&bytes);
        self.rt.backend.put(id, bytes).await?;
        stats.manifest = id.to_hex();
        Ok(stats)
    }
}

/// Reads regions of the RAM image: `None` for all-zero ones (holes are not read).
/// `layout` is where guest memory starts in the file and its size.
fn read_regions(file: &std::fs::File, layout: (u64, u64), regions: std::ops::Range<u64>) -> Result<Vec<(u64, Option<Bytes>)>> {
    let (offset, size) = layout;
    let io = |e: std::io::Error| SailboxError::io("reading the RAM image", e);
    let mut out = Vec::with_capacity((regions.end - regions.start) as usize);
    for r in regions {
        let start = r * REGION_SIZE;
        let len = REGION_SIZE.min(size - start);
        let at = offset + start;
        // pread below does not use the file offset.
        let data_at = rustix::fs::seek(file, rustix::fs::SeekFrom::Data(at));
        if !data_at.is_ok_and(|d| d < at + len) {
            out.push((r, None));
            continue;
        }
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, at).map_err(io)?;
        let zero = buf.iter().all(|&b| b == 0);
        out.push((r, if zero { None } else { Some(Bytes::from(buf)) }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_and_zero_regions_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let f = std::fs::File::create(&path).unwrap();
        let offset = 4096;
        let size = 4 * REGION_SIZE;
        f.set_len(offset + size).unwrap();
        f.write_all_at(&[7u8; 100], offset + REGION_SIZE + 5).unwrap();
        f.write_all_at(&[0u8; 4096], offset + 3 * REGION_SIZE).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let got = read_regions(&f, (offset, size), 0..4).unwrap();
        let present: Vec<(u64, bool)> = got.iter().map(|(r, b)| (*r, b.is_some())).collect();
        assert_eq!(present, [(0, false), (1, true), (2, false), (3, false)]);
        let data = got[1].1.as_ref().unwrap();
        assert_eq!(data.len() as u64, REGION_SIZE);
        assert_eq!(&data[5..105], &[7u8; 100][..]);
    }
}
