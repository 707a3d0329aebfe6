//! `ChunkBatch`: many small chunks stored in a [`LocalBackend`] with one durability pass.
//!
//! Storing a small chunk on its own costs two synchronous writes (the file, then its shard
//! directory): for thousands of small files that is the whole cost of a commit. A batch pays
//! for durability once for all of its chunks:
//!
//! 1. [`ChunkBatch::add`] verifies a chunk against its id and writes it, without fsync, to a
//!    temp file in the batch's own directory `<root>/tmp/*.batch/` (batches running at once
//!    never contend for one directory's lock);
//! 2. [`ChunkBatch::commit`] makes every temp file durable in one pass (one `syncfs`, or one
//!    fsync per file on a few threads: see [`SyncPolicy`]), renames each into its shard
//!    directory, then fsyncs every shard directory it touched once (and `chunks/` when a
//!    shard was created).
//!
//! Nothing is visible before `commit`: dropping a batch, or a failed `add`, removes every
//! temp file it wrote and its directory, and a crash leaves only temp files, which
//! [`LocalBackend::open`] removes. After `commit` returns every chunk is durable, exactly as
//! if it had been stored by [`crate::Backend::put`]. Its methods do blocking I/O.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;

use crate::backend::MAX_CHUNK_SIZE;
use crate::backend::durable::{SyncPolicy, sync_files};
use crate::backend::local::{LocalBackend, fsync_dir};
use crate::error::{ChunkError, Result};
use crate::id::ChunkId;

/// A chunk written to a temp file, waiting for [`ChunkBatch::commit`].
struct Staged {
    id: ChunkId,
    len: u64,
    tmp: PathBuf,
}

/// Chunks being stored together (see the module docs).
pub struct ChunkBatch {
    backend: LocalBackend,
    dir: PathBuf,
    next: u64,
    staged: Vec<Staged>,
    ids: HashSet<ChunkId>,
    present: Vec<(ChunkId, u64)>,
}

impl LocalBackend {
    /// Starts a batch of chunks stored with one durability pass (see [`ChunkBatch`]); creates
    /// its temp directory.
    pub fn begin_batch(&self) -> Result<ChunkBatch> {
        let dir = self.temp_path().with_extension("batch");
        fs::create_dir(&dir).map_err(|e| ChunkError::io("creating", &dir, e))?;
        Ok(ChunkBatch { backend: self.clone(), dir, next: 0, staged: Vec::new(), ids: HashSet::new(), present: Vec::new() })
    }
}

impl ChunkBatch {
    /// Verifies `data` against `id` and writes it to a temp file (neither durable nor visible
    /// until [`ChunkBatch::commit`]). A chunk already stored, or already in this batch, is
    /// verified and not written again.
    pub fn add(&mut self, id: ChunkId, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        if len > MAX_CHUNK_SIZE {
            return Err(ChunkError::TooLarge { size: len, limit: MAX_CHUNK_SIZE });
        }
        id.verify(data)?;
        if self.ids.contains(&id) {
            return Ok(());
        }
        if self.backend.chunk_path(id).exists() {
            self.ids.insert(id);
            self.present.push((id, len));
            return Ok(());
        }
        let tmp = self.dir.join(self.next.to_string());
        self.next += 1;
        let written = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(data)?;
            Ok(())
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(ChunkError::io("writing", tmp, e));
        }
        self.ids.insert(id);
        self.staged.push(Staged { id, len, tmp });
        Ok(())
    }

    /// Distinct chunks added so far (stored or already present).
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Chunks added that were already stored (not written again).
    pub fn already_present(&self) -> usize {
        self.present.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes every added chunk durable and visible; returns each chunk with its length (those
    /// that were already stored included). On an error, chunks renamed before it stay (they
    /// are complete and verified); the rest are removed.
    pub fn commit(self) -> Result<Vec<(ChunkId, u64)>> {
        self.commit_with(SyncPolicy::Auto)
    }

    /// [`ChunkBatch::commit`] with a given way of making the files durable.
    pub fn commit_with(mut self, policy: SyncPolicy) -> Result<Vec<(ChunkId, u64)>> {
        let started = std::time::Instant::now();
        let tmps: Vec<PathBuf> = self.staged.iter().map(|s| s.tmp.clone()).collect();
        let used = if tmps.is_empty() { policy } else { sync_files(&self.dir, &tmps, policy)? };
        let synced = started.elapsed();
        let chunks_dir = self.backend.chunks_dir().to_path_buf();
        let mut shards = BTreeSet::new();
        let mut new_shard = false;
        let staged = std::mem::take(&mut self.staged);
        let mut out = std::mem::take(&mut self.present);
        let mut rest = staged.into_iter();
        let renamed = (|| -> Result<()> {
            for s in rest.by_ref() {
                let dest = self.backend.chunk_path(s.id);
                let shard = self.backend.shard_dir(s.id);
                if shards.insert(shard.clone()) && !shard.exists() {
                    match fs::create_dir(&shard) {
                        Ok(()) => new_shard = true,
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(e) => {
                            let _ = fs::remove_file(&s.tmp);
                            return Err(ChunkError::io("creating", shard, e));
                        }
                    }
                }
                if let Err(e) = fs::rename(&s.tmp, &dest) {
                    let _ = fs::remove_file(&s.tmp);
                    return Err(ChunkError::io("renaming a temp file to", dest, e));
                }
                out.push((s.id, s.len));
            }
            Ok(())
        })();
        for s in rest {
            let _ = fs::remove_file(&s.tmp);
        }
        let _ = fs::remove_dir(&self.dir);
        renamed?;
        let moved = started.elapsed();
        if new_shard {
            fsync_dir(&chunks_dir)?;
        }
        for shard in &shards {
            fsync_dir(shard)?;
        }
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        tracing::debug!(
            chunks = out.len(), shards = shards.len(), sync = ?used, sync_ms = ms(synced), rename_ms = ms(moved - synced),
            dir_fsync_ms = ms(started.elapsed() - moved), "batch durable"
        );
        Ok(out)
    }
}

impl Drop for ChunkBatch {
    fn drop(&mut self) {
        for s in &self.staged {
            let _ = fs::remove_file(&s.tmp);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}
