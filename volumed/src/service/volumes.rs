//! `Volumes`: the volume operations, independent of the transport.
//!
//! Commits to one volume are serialised by a per-volume lock held from reading the head to
//! publishing the new one (a few milliseconds); commits to different volumes run in parallel.
//! All RocksDB work runs on blocking threads so a synced write never stalls the async runtime.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chunkstore::{ChunkId, Chunking, Presigned};
use parking_lot::Mutex;
use sysutil::clock::now_ms;
use tracing::{Instrument, info_span};

use crate::datapath::{BatchUrl, DataPath};
use crate::error::{Result, VolumeError};
use crate::meta::read::{diff, list_dir, resolve};
use crate::meta::{MetaStore, VolumeRecord, apply_changes};
use volume_model::batch::{BATCH_CHUNK_MAX, BATCH_MAX_BYTES, BATCH_MAX_CHUNKS, FRAME_HEADER_LEN};
use volume_model::convert::{ValidCommit, ValidRef};
use volume_model::{Change, Commit, CommitId, Entry, TreeId, TreeNode, VolPath, VolumeId};

/// How long signed URLs stay valid by default.
pub const DEFAULT_URL_TTL: Duration = Duration::from_secs(15 * 60);
/// How many backend existence checks run at once.
const EXISTS_CONCURRENCY: usize = 32;

/// Where the missing chunks of a `MissingChunks` request go: each in exactly one of them.
#[derive(Clone, Debug, Default)]
pub struct MissingUploads {
    /// Chunks with a signed URL of their own.
    pub single: Vec<(ChunkId, Presigned)>,
    /// Batches of small chunks, one signed URL each.
    pub batches: Vec<BatchUrl>,
}

/// Splits small chunks into batches within the limits of [`crate::batch`], of about equal
/// size (so a client can send them in parallel). Sorted by id first, so that each batch falls
/// into a contiguous run of shard directories: its durability pass then fsyncs a tenth of
/// them (for ten batches), not nearly all 256.
fn split_batches(mut small: Vec<(ChunkId, u64)>) -> Vec<Vec<(ChunkId, u64)>> {
    if small.is_empty() {
        return Vec::new();
    }
    small.sort_unstable_by_key(|(id, _)| *id);
    let bytes: u64 = volume_model::batch::body_len(small.iter().map(|(_, l)| *l));
    let k = small.len().div_ceil(BATCH_MAX_CHUNKS).max(bytes.div_ceil(BATCH_MAX_BYTES) as usize).max(1);
    let target = small.len().div_ceil(k);
    let mut out: Vec<Vec<(ChunkId, u64)>> = Vec::with_capacity(k + 1);
    let mut cur = Vec::with_capacity(target);
    let mut cur_bytes = 0u64;
    for (id, len) in small {
        let frame = FRAME_HEADER_LEN as u64 + len;
        if !cur.is_empty() && (cur.len() >= target || cur_bytes + frame > BATCH_MAX_BYTES) {
            out.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
        cur.push((id, len));
        cur_bytes += frame;
    }
    out.push(cur);
    out
}

/// The result of a successful commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The new head.
    pub commit: CommitId,
    /// Its sequence number.
    pub seq: u64,
    /// Whether the head had moved past the client's base (the changes were merged).
    pub merged: bool,
}

/// Entries of the commit-lock table past which idle ones are dropped.
const COMMIT_LOCKS_PRUNE_AT: usize = 1024;

/// The volume service's operations.
#[derive(Clone)]
pub struct Volumes {
    store: MetaStore,
    data: DataPath,
    url_ttl: Duration,
    commit_locks: Arc<Mutex<HashMap<VolumeId, Arc<Mutex<()>>>>>,
    create_lock: Arc<Mutex<()>>,
}

/// Runs metadata work on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(VolumeError::task("metadata task"))?
}

impl Volumes {
    /// Builds the service over a metadata store and a data path.
    pub fn new(store: MetaStore, data: DataPath, url_ttl: Duration) -> Self {
        Self { store, data, url_ttl, commit_locks: Arc::default(), create_lock: Arc::default() }
    }

    /// The metadata store.
    pub fn store(&self) -> &MetaStore {
        &self.store
    }

    /// Returns the volume, creating it (with `chunking`) when `mint` is set.
    pub async fn get_volume(&self, v: ValidRef, mint: bool, chunking: Chunking) -> Result<VolumeRecord> {
        let store = self.store.clone();
        let lock = self.create_lock.clone();
        blocking(move || {
            if let Some(rec) = store.find_volume(&v.org, &v.name)? {
                return Ok(rec);
            }
            if !mint {
                return Err(VolumeError::NotFound { org: v.org, name: v.name });
            }
            let _guard = lock.lock();
            // Another request may have created it while we waited.
            if let Some(rec) = store.find_volume(&v.org, &v.name)? {
                return Ok(rec);
            }
            let rec = store.create_volume(&v.org, &v.name, chunking)?;
            tracing::info!(volume = %rec.id, org = %rec.org, name = %rec.name, "volume created");
            Ok(rec)
        })
        .await
    }

    async fn existing(&self, v: &ValidRef) -> Result<VolumeRecord> {
        self.get_volume(v.clone(), false, Chunking::Fixed).await
    }

    /// Volumes of an org.
    pub async fn list(&self, org: String) -> Result<Vec<VolumeRecord>> {
        volume_model::volume_name::check_volume_name("org", &org)?;
        let store = self.store.clone();
        blocking(move || store.list_volumes(&org)).await
    }

    /// Deletes a volume's metadata (chunks stay for garbage collection).
    pub async fn delete(&self, v: ValidRef) -> Result<()> {
        let rec = self.existing(&v).await?;
        let lock = self.commit_lock(rec.id);
        let store = self.store.clone();
        blocking(move || {
            let _guard = lock.lock();
            store.delete_volume(&rec)
        })
        .await
    }

    /// The head commit and its root tree.
    pub async fn head(&self, v: ValidRef) -> Result<(VolumeRecord, Commit)> {
        let rec = self.existing(&v).await?;
        let store = self.store.clone();
        blocking(move || {
            let commit = store.commit(rec.id, &rec.head)?;
            Ok((rec, commit))
        })
        .await
    }

    /// Resolves `commit` (None = head) of a volume.
    async fn at(&self, v: &ValidRef, commit: Option<CommitId>) -> Result<(VolumeRecord, CommitId, Commit)> {
        let rec = self.existing(v).await?;
        let id = commit.unwrap_or(rec.head);
        let store = self.store.clone();
        let vol = rec.id;
        let c = blocking(move || store.commit(vol, &id)).await?;
        Ok((rec, id, c))
    }

    /// Lists a directory at a commit.
    pub async fn list_dir(&self, v: ValidRef, commit: Option<CommitId>, path: VolPath) -> Result<(CommitId, TreeId, TreeNode)> {
        let (_, id, c) = self.at(&v, commit).await?;
        let store = self.store.clone();
        let (tree, node) = blocking(move || list_dir(&store, c.root, &path)).await?;
        Ok((id, tree, node))
    }

    /// The entry at a path at a commit.
    pub async fn stat(&self, v: ValidRef, commit: Option<CommitId>, path: VolPath) -> Result<(CommitId, Entry)> {
        let (_, id, c) = self.at(&v, commit).await?;
        let store = self.store.clone();
        let entry = blocking(move || resolve(&store, c.root, &path)).await?;
        Ok((id, entry))
    }

    /// A tree node by id (after checking the volume exists).
    pub async fn tree(&self, v: ValidRef, tree: TreeId) -> Result<TreeNode> {
        self.existing(&v).await?;
        let store = self.store.clone();
        blocking(move || {
            store.tree(&tree).map_err(|e| match e {
                VolumeError::TreeMissing(_) => VolumeError::invalid(format!("unknown tree {tree}")),
                other => other,
            })
        })
        .await
    }

    /// Changes from commit `from` to commit `to` (None = head).
    pub async fn diff(&self, v: ValidRef, from: CommitId, to: Option<CommitId>) -> Result<Vec<Change>> {
        let (rec, _, to_commit) = self.at(&v, to).await?;
        let store = self.store.clone();
        blocking(move || {
            let from_commit = store.commit(rec.id, &from)?;
            diff(&store, from_commit.root, to_commit.root)
        })
        .await
    }

    /// Chunks among `chunks` the backend lacks, with signed upload URLs: one per chunk, or,
    /// when the client accepts batches and the backend takes them, batch URLs for the chunks
    /// of at most [`BATCH_CHUNK_MAX`] bytes.
    pub async fn missing_chunks(&self, v: ValidRef, chunks: Vec<(ChunkId, u64)>, accept_batches: bool) -> Result<MissingUploads> {
        self.existing(&v).await?;
        for (id, len) in &chunks {
            if *len == 0 || *len > chunkstore::MAX_CHUNK_SIZE {
                return Err(VolumeError::invalid(format!("chunk {id} has invalid length {len}")));
            }
        }
        let mut seen = std::collections::HashSet::with_capacity(chunks.len());
        let chunks: Vec<(ChunkId, u64)> = chunks.into_iter().filter(|(id, _)| seen.insert(*id)).collect();
        let missing = self.absent(chunks).await?;
        let batching = accept_batches && self.data.supports_batches();
        let (small, large): (Vec<_>, Vec<_>) = missing.into_iter().partition(|(_, len)| batching && *len <= BATCH_CHUNK_MAX);
        let mut out = MissingUploads::default();
        for (id, len) in large {
            out.single.push((id, self.data.upload_url(id, len, self.url_ttl).await?));
        }
        for group in split_batches(small) {
            let batch =
                self.data.batch_upload_url(group, self.url_ttl).ok_or_else(|| VolumeError::Unsupported("take batches"))?;
            out.batches.push(batch);
        }
        Ok(out)
    }

    /// Stores piece chaining values offered with MissingChunks (already checked against the
    /// chunk ids), unless known.
    pub async fn record_pieces(&self, v: &ValidRef, pieces: Vec<(ChunkId, Vec<u8>)>) -> Result<()> {
        if pieces.is_empty() {
            return Ok(());
        }
        self.existing(v).await?;
        let store = self.store.clone();
        blocking(move || {
            for (id, cvs) in pieces {
                if store.pieces(&id)?.is_none() {
                    store.put_pieces(&id, &cvs)?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Piece chaining values of chunks, where known.
    pub async fn pieces_of(&self, ids: Vec<ChunkId>) -> Result<Vec<Option<Vec<u8>>>> {
        let store = self.store.clone();
        blocking(move || ids.iter().map(|id| store.pieces(id)).collect()).await
    }

    /// Signed download URLs for chunks.
    pub async fn chunk_urls(&self, v: ValidRef, ids: Vec<ChunkId>) -> Result<Vec<(ChunkId, Presigned)>> {
        self.existing(&v).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push((id, self.data.download_url(id, self.url_ttl).await?));
        }
        Ok(out)
    }

    /// Filters `chunks` down to those the backend does not have, recording the present ones.
    async fn absent(&self, chunks: Vec<(ChunkId, u64)>) -> Result<Vec<(ChunkId, u64)>> {
        let store = self.store.clone();
        let unknown = blocking(move || {
            let mut unknown = Vec::new();
            for (id, len) in chunks {
                if !store.chunk_known(&id)? {
                    unknown.push((id, len));
                }
            }
            Ok(unknown)
        })
        .await?;
        if unknown.is_empty() {
            return Ok(unknown);
        }
        let found = self.data.exists_many(unknown.iter().map(|(id, _)| *id).collect(), EXISTS_CONCURRENCY).await?;
        let (present, missing): (Vec<_>, Vec<_>) = unknown.into_iter().zip(found).partition(|(_, p)| *p);
        let present: Vec<(ChunkId, u64)> = present.into_iter().map(|(c, _)| c).collect();
        if !present.is_empty() {
            let store = self.store.clone();
            blocking(move || store.record_chunks(&present)).await?;
        }
        Ok(missing.into_iter().map(|(c, _)| c).collect())
    }

    /// Applies a validated commit onto the volume's current head (merge rules of
    /// [`crate::meta::apply`]) and publishes it durably.
    pub async fn commit(&self, req: ValidCommit) -> Result<CommitOutcome> {
        let rec = self.existing(&req.volume).await?;
        let span = info_span!("commit", volume = %rec.id, org = %rec.org, name = %rec.name);
        async move {
            let missing = self.absent(req.referenced_chunks()).await?;
            if let Some((first, _)) = missing.first() {
                return Err(VolumeError::MissingChunks { count: missing.len(), first: first.to_hex() });
            }
            let lock = self.commit_lock(rec.id);
            let store = self.store.clone();
            let vol = rec.id;
            let outcome = blocking(move || {
                let _guard = lock.lock();
                let rec = store
                    .volume_by_id(vol)?
                    .ok_or_else(|| VolumeError::NotFound { org: req.volume.org.clone(), name: req.volume.name.clone() })?;
                if let Some(base) = &req.base {
                    store.commit(rec.id, base)?; // must exist in this volume
                }
                let head = store.commit(rec.id, &rec.head)?;
                let now = now_ms();
                let applied = apply_changes(&store, head.root, &req.changes, (now as i64) * 1_000_000)?;
                let commit = Commit {
                    volume: rec.id,
                    parent: Some(rec.head),
                    base: req.base,
                    root: applied.root,
                    seq: rec.seq + 1,
                    time_ms: now,
                    change_count: req.changes.len() as u32,
                    message: req.message,
                    author: req.author,
                };
                let (id, next) = store.publish(&rec, &commit, &applied.new_nodes)?;
                Ok(CommitOutcome { commit: id, seq: next.seq, merged: req.base.is_some_and(|b| b != rec.head) })
            })
            .await?;
            tracing::info!(commit = %outcome.commit, seq = outcome.seq, merged = outcome.merged, "commit published");
            Ok(outcome)
        }
        .instrument(span)
        .await
    }

    /// The commit log, newest first.
    pub async fn log(&self, v: ValidRef, before_seq: Option<u64>, limit: usize) -> Result<Vec<(CommitId, Commit)>> {
        let rec = self.existing(&v).await?;
        let store = self.store.clone();
        blocking(move || store.log(rec.id, before_seq, limit)).await
    }

    /// The lock commits (and deletion) of volume `id` take. The table is pruned as it grows:
    /// a lock nobody holds or waits for (only the table refers to it) is dropped, and made
    /// anew when the volume commits again, so deleted and idle volumes do not keep an entry
    /// each forever.
    fn commit_lock(&self, id: VolumeId) -> Arc<Mutex<()>> {
        lock_in(&self.commit_locks, id)
    }
}

/// [`Volumes::commit_lock`] over a lock table.
fn lock_in(table: &Mutex<HashMap<VolumeId, Arc<Mutex<()>>>>, id: VolumeId) -> Arc<Mutex<()>> {
    let mut locks = table.lock();
    if locks.len() >= COMMIT_LOCKS_PRUNE_AT {
        locks.retain(|_, l| Arc::strong_count(l) > 1);
    }
    locks.entry(id).or_default().clone()
}

#[cfg(test)]
mod lock_table_tests {
    use super::*;

    #[test]
    fn idle_commit_locks_are_pruned_and_held_ones_kept() {
        let table = Mutex::new(HashMap::new());
        let held_id = VolumeId::random();
        let held = lock_in(&table, held_id);
        let _guard = held.lock();
        for _ in 0..10 * COMMIT_LOCKS_PRUNE_AT {
            drop(lock_in(&table, VolumeId::random()));
        }
        assert!(table.lock().len() <= COMMIT_LOCKS_PRUNE_AT, "idle entries were dropped");
        // The held lock is still the volume's: a second committer waits on the same one.
        assert!(Arc::ptr_eq(&lock_in(&table, held_id), &held));
    }
}
