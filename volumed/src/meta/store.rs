//! `MetaStore`: volumes, commits, tree nodes and chunk records in RocksDB.
//!
//! Column families (keys → values):
//! - `volumes`: volume id (16 B) → [`VolumeRecord`]
//! - `names`: `org \0 name` → volume id
//! - `commits`: commit id (32 B) → [`Commit`] encoding
//! - `log`: volume id (16 B) ++ seq (u64 big-endian) → commit id; the commit log by volume
//! - `trees`: tree id (32 B) → [`TreeNode`] encoding (content-addressed, shared by volumes)
//! - `chunks`: chunk id (32 B) → varint size, varint first-seen ms: chunks known to be in the
//!   backend; garbage collection will sweep backend chunks absent from every live tree and
//!   older than a grace period, using first-seen to spare chunks of commits in flight.
//! - `pieces`: chunk id → its pieces' chaining values
//! - `keys`: API key id (16 hex digits) → [`crate::keys::KeyRecord`] (JSON; the secret's hash,
//!   never the secret)
//!
//! Durability: every mutation is one `WriteBatch` written with `sync = true` (the WAL is
//! fsynced before the call returns), so a publish is all-or-nothing and acknowledged only once
//! it would survive a crash. Readers of a head see either the old or the new record, never
//! a head whose commit or trees are missing: the trees, commit, log entry and head move in the
//! same batch.

use std::path::Path;
use std::sync::Arc;

use chunkstore::{ChunkId, Chunking};
use rocksdb::{ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};
use sysutil::clock::now_ms;

use crate::error::{Result, VolumeError};
use crate::meta::volume::VolumeRecord;
use volume_model::codec::{Reader, Writer};
use volume_model::{Commit, CommitId, TreeId, TreeNode, VolumeId};

const CF_VOLUMES: &str = "volumes";
const CF_NAMES: &str = "names";
const CF_COMMITS: &str = "commits";
const CF_LOG: &str = "log";
const CF_TREES: &str = "trees";
const CF_CHUNKS: &str = "chunks";
const CF_PIECES: &str = "pieces";
const CF_KEYS: &str = "keys";
const ALL_CFS: [&str; 8] = [CF_VOLUMES, CF_NAMES, CF_COMMITS, CF_LOG, CF_TREES, CF_CHUNKS, CF_PIECES, CF_KEYS];

/// The metadata database. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct MetaStore {
    db: Arc<DB>,
}

impl MetaStore {
    /// Opens (creating if needed) the database under `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Point lookups dominate (tree ids, commit ids): bloom filters and a shared cache.
        let cache = rocksdb::Cache::new_lru_cache(256 << 20);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);
        let cfs = ALL_CFS.iter().map(|name| {
            let mut cf = Options::default();
            cf.set_block_based_table_factory(&table);
            ColumnFamilyDescriptor::new(*name, cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(Self { db: Arc::new(db) })
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or(VolumeError::MissingColumnFamily(name))
    }

    fn sync_write(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    fn name_key(org: &str, name: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(org.len() + name.len() + 1);
        k.extend_from_slice(org.as_bytes());
        k.push(0);
        k.extend_from_slice(name.as_bytes());
        k
    }

    /// Looks a volume up by org and name.
    pub fn find_volume(&self, org: &str, name: &str) -> Result<Option<VolumeRecord>> {
        let Some(id) = self.db.get_cf(self.cf(CF_NAMES)?, Self::name_key(org, name))? else {
            return Ok(None);
        };
        let id: [u8; 16] =
            id.as_slice().try_into().map_err(|_| VolumeError::Integrity("volume name index entry is malformed".into()))?;
        self.volume_by_id(VolumeId(id))
    }

    /// Looks a volume up by id.
    pub fn volume_by_id(&self, id: VolumeId) -> Result<Option<VolumeRecord>> {
        match self.db.get_cf(self.cf(CF_VOLUMES)?, id.0)? {
            Some(raw) => Ok(Some(VolumeRecord::decode(&raw)?)),
            None => Ok(None),
        }
    }

    /// Creates a volume with an initial empty commit (seq 0). The caller serialises creation
    /// of one name (see [`crate::service`]).
    pub fn create_volume(&self, org: &str, name: &str, chunking: Chunking) -> Result<VolumeRecord> {
        let id = VolumeId::random();
        let created_ms = now_ms();
        let (empty_id, empty_bytes) = TreeNode::default().encode_with_id();
        let commit = Commit {
            volume: id,
            parent: None,
            base: None,
            root: empty_id,
            seq: 0,
            time_ms: created_ms,
            change_count: 0,
            message: "volume created".into(),
            author: String::new(),
        };
        let (commit_id, commit_bytes) = commit.encode_with_id();
        let rec = VolumeRecord { id, org: org.to_owned(), name: name.to_owned(), chunking, created_ms, head: commit_id, seq: 0 };
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_TREES)?, empty_id.as_bytes(), &empty_bytes);
        batch.put_cf(self.cf(CF_COMMITS)?, commit_id.as_bytes(), &commit_bytes);
        batch.put_cf(self.cf(CF_LOG)?, log_key(id, 0), commit_id.as_bytes());
        batch.put_cf(self.cf(CF_VOLUMES)?, id.0, rec.encode());
        batch.put_cf(self.cf(CF_NAMES)?, Self::name_key(org, name), id.0);
        self.sync_write(batch)?;
        Ok(rec)
    }

    /// Volumes of one org, sorted by name.
    pub fn list_volumes(&self, org: &str) -> Result<Vec<VolumeRecord>> {
        let mut prefix = org.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(self.cf(CF_NAMES)?, IteratorMode::From(&prefix, Direction::Forward));
        for item in iter {
            let (key, id) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            let id: [u8; 16] =
                id.as_ref().try_into().map_err(|_| VolumeError::Integrity("volume name index entry is malformed".into()))?;
            if let Some(rec) = self.volume_by_id(VolumeId(id))? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Removes a volume's name, record and log. Its commits, trees and chunks stay until
    /// garbage collection proves nothing else references them (trees and chunks are shared
    /// between volumes by content address).
    pub fn delete_volume(&self, rec: &VolumeRecord) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_NAMES)?, Self::name_key(&rec.org, &rec.name));
        batch.delete_cf(self.cf(CF_VOLUMES)?, rec.id.0);
        batch.delete_range_cf(self.cf(CF_LOG)?, log_key(rec.id, 0), log_key(rec.id, u64::MAX));
        batch.delete_cf(self.cf(CF_LOG)?, log_key(rec.id, u64::MAX));
        self.sync_write(batch)
    }

    /// A commit by id, checked to belong to `volume`.
    pub fn commit(&self, volume: VolumeId, id: &CommitId) -> Result<Commit> {
        let raw = self.db.get_cf(self.cf(CF_COMMITS)?, id.as_bytes())?.ok_or_else(|| VolumeError::CommitNotFound(id.to_hex()))?;
        if CommitId::of(&raw) != *id {
            return Err(VolumeError::Integrity(format!("commit {id} does not match its id")));
        }
        let commit = Commit::decode(&raw)?;
        if commit.volume != volume {
            return Err(VolumeError::CommitNotFound(id.to_hex()));
        }
        Ok(commit)
    }

    /// A tree node by id, verified against its id.
    pub fn tree(&self, id: &TreeId) -> Result<TreeNode> {
        let raw = self.db.get_cf(self.cf(CF_TREES)?, id.as_bytes())?.ok_or(VolumeError::TreeMissing(*id))?;
        if TreeId::of(&raw) != *id {
            return Err(VolumeError::Integrity(format!("tree node {id} does not match its id")));
        }
        Ok(TreeNode::decode(&raw)?)
    }

    /// The commit log of a volume, newest first: at most `limit` commits with seq below
    /// `before_seq` (all when `before_seq` is `None`).
    pub fn log(&self, volume: VolumeId, before_seq: Option<u64>, limit: usize) -> Result<Vec<(CommitId, Commit)>> {
        let start = log_key(volume, before_seq.map_or(u64::MAX, |s| s.saturating_sub(1)));
        let mut out = Vec::new();
        if before_seq == Some(0) {
            return Ok(out);
        }
        let iter = self.db.iterator_cf(self.cf(CF_LOG)?, IteratorMode::From(&start, Direction::Reverse));
        for item in iter {
            let (key, val) = item?;
            if !key.starts_with(&volume.0) || out.len() >= limit {
                break;
            }
            let id = CommitId::from_slice(&val).map_err(|_| VolumeError::Integrity("commit log entry is malformed".into()))?;
            out.push((id, self.commit(volume, &id)?));
        }
        Ok(out)
    }

    /// An API key's record (JSON bytes).
    pub fn key(&self, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_KEYS)?, id.as_bytes())?)
    }

    /// Stores an API key's record, synced (a key acknowledged to its creator survives a crash).
    pub fn put_key(&self, id: &str, record: &[u8]) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_KEYS)?, id.as_bytes(), record);
        self.sync_write(batch)
    }

    /// Deletes an API key's record, synced (a revocation acknowledged is never undone).
    pub fn delete_key(&self, id: &str) -> Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_KEYS)?, id.as_bytes());
        self.sync_write(batch)
    }

    /// Every API key record (JSON bytes).
    pub fn keys(&self) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_KEYS)?, IteratorMode::Start) {
            out.push(item?.1.to_vec());
        }
        Ok(out)
    }

    /// Whether the chunk is recorded as present in the backend.
    pub fn chunk_known(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.db.get_pinned_cf(self.cf(CF_CHUNKS)?, id.as_bytes())?.is_some())
    }

    /// Stores a chunk's piece chaining values (checked by the caller to merge into `id`).
    /// Not synced: they are a read optimisation that readers verify, and losing them only
    /// means whole-chunk reads.
    pub fn put_pieces(&self, id: &ChunkId, cvs: &[u8]) -> Result<()> {
        Ok(self.db.put_cf(self.cf(CF_PIECES)?, id.as_bytes(), cvs)?)
    }

    /// A chunk's piece chaining values, if known.
    pub fn pieces(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_PIECES)?, id.as_bytes())?)
    }

    /// Records chunks as present in the backend (after a verified upload or a backend check).
    ///
    /// Not synced: the chunk file itself is already durable, and a record lost in a crash
    /// only makes the chunk look missing, so a client uploads it again (a future GC must
    /// treat unrecorded chunk files as new). Skipping the WAL fsync here halves the cost of
    /// uploading many small chunks.
    pub fn record_chunks(&self, chunks: &[(ChunkId, u64)]) -> Result<()> {
        let cf = self.cf(CF_CHUNKS)?;
        let now = now_ms();
        let mut batch = WriteBatch::default();
        for (id, size) in chunks {
            if self.db.get_pinned_cf(cf, id.as_bytes())?.is_some() {
                continue;
            }
            let mut w = Writer::default();
            w.varint(*size);
            w.varint(now);
            batch.put_cf(cf, id.as_bytes(), w.buf);
        }
        if batch.is_empty() {
            return Ok(());
        }
        Ok(self.db.write(batch)?)
    }

    /// Size recorded for a known chunk.
    pub fn chunk_size(&self, id: &ChunkId) -> Result<Option<u64>> {
        let Some(raw) = self.db.get_pinned_cf(self.cf(CF_CHUNKS)?, id.as_bytes())? else {
            return Ok(None);
        };
        let mut r = Reader::new(&raw, "chunk record");
        Ok(Some(r.varint()?))
    }

    /// Publishes a commit atomically: new tree nodes, the commit, its log entry and the
    /// volume's new head in one synced batch. `rec` is the record the commit was built on;
    /// the caller holds the volume's commit lock so the head cannot move underneath.
    pub fn publish(
        &self,
        rec: &VolumeRecord,
        commit: &Commit,
        new_trees: &[(TreeId, Vec<u8>)],
    ) -> Result<(CommitId, VolumeRecord)> {
        let (commit_id, commit_bytes) = commit.encode_with_id();
        let mut next = rec.clone();
        next.head = commit_id;
        next.seq = commit.seq;
        let trees = self.cf(CF_TREES)?;
        let mut batch = WriteBatch::default();
        for (id, bytes) in new_trees {
            batch.put_cf(trees, id.as_bytes(), bytes);
        }
        batch.put_cf(self.cf(CF_COMMITS)?, commit_id.as_bytes(), &commit_bytes);
        batch.put_cf(self.cf(CF_LOG)?, log_key(rec.id, commit.seq), commit_id.as_bytes());
        batch.put_cf(self.cf(CF_VOLUMES)?, rec.id.0, next.encode());
        self.sync_write(batch)?;
        Ok((commit_id, next))
    }
}

fn log_key(volume: VolumeId, seq: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&volume.0);
    k[16..].copy_from_slice(&seq.to_be_bytes());
    k
}
