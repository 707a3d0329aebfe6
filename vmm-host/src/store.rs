//! `StateStore`: vmm-host's durable state in RocksDB.
//!
//! Column families (keys → values):
//! - `sailboxes`: sailbox id → [`SailboxRecord`] (JSON)
//! - `apps`: app key → creation time (Unix ms, decimal); the key is `<org>/<name>`, and the
//!   bare name for org `default` (the records from before orgs keep working; `/` is not a
//!   name character, so the two forms cannot collide)
//! - `execs`: exec id → [`ExecRecord`] (JSON)
//! - `exec_results`: exec id → `sail.sailbox.v1.ExecResult` (protobuf)
//! - `images`: image id → image manifest (JSON, see `image`)
//! - `checkpoints`: checkpoint id → [`CheckpointRecord`] (JSON; also stored as a chunk)
//!
//! Durability: every mutation is one `WriteBatch` written with `sync = true`, so a state
//! transition is on disk (WAL fsynced) before it is acknowledged, and the records that move
//! together (an exec record and its sailbox's active request) move atomically.

use std::path::Path;
use std::sync::Arc;

use prost::Message;
use proto::sailbox as pb;
use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch, WriteOptions};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, SailboxError};
use crate::model::{CheckpointRecord, ExecRecord, ExecStatus, SailboxRecord};

const CF_SAILBOXES: &str = "sailboxes";
const CF_APPS: &str = "apps";
const CF_EXECS: &str = "execs";
const CF_EXEC_RESULTS: &str = "exec_results";
const CF_IMAGES: &str = "images";
const CF_CHECKPOINTS: &str = "checkpoints";
const ALL_CFS: [&str; 6] = [CF_SAILBOXES, CF_APPS, CF_EXECS, CF_EXEC_RESULTS, CF_IMAGES, CF_CHECKPOINTS];

/// The state database; cheap to clone.
#[derive(Clone)]
pub struct StateStore {
    db: Arc<DB>,
}

/// A set of changes written atomically and durably by [`StateStore::commit`].
#[derive(Default)]
pub struct Changes {
    batch: WriteBatch,
    /// The first record that could not be added (the commit fails with it).
    encode_error: Option<SailboxError>,
}

impl Changes {
    fn put_json<T: Serialize>(&mut self, store: &StateStore, cf: &str, key: &str, value: &T) {
        match (store.cf(cf), serde_json::to_vec(value)) {
            (Ok(cf), Ok(bytes)) => self.batch.put_cf(cf, key.as_bytes(), bytes),
            (Err(e), _) => self.encode_error = Some(e),
            (_, Err(source)) => self.encode_error = Some(SailboxError::Encode { what: format!("{cf} record {key}"), source }),
        }
    }

    /// Stores a sailbox record.
    pub fn sailbox(mut self, store: &StateStore, rec: &SailboxRecord) -> Self {
        self.put_json(store, CF_SAILBOXES, &rec.id, rec);
        self
    }

    /// Stores an exec record.
    pub fn exec(mut self, store: &StateStore, rec: &ExecRecord) -> Self {
        self.put_json(store, CF_EXECS, &rec.id, rec);
        self
    }

    /// Stores a checkpoint record.
    pub fn checkpoint(mut self, store: &StateStore, id: &str, rec: &CheckpointRecord) -> Self {
        self.put_json(store, CF_CHECKPOINTS, id, rec);
        self
    }

    /// Stores an exec result.
    pub fn exec_result(mut self, store: &StateStore, id: &str, result: &pb::ExecResult) -> Self {
        match store.cf(CF_EXEC_RESULTS) {
            Ok(cf) => self.batch.put_cf(cf, id.as_bytes(), result.encode_to_vec()),
            Err(e) => self.encode_error = Some(e),
        }
        self
    }
}

impl StateStore {
    /// Opens (creating if needed) the database under `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        let cfs = ALL_CFS.iter().map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(Self { db: Arc::new(db) })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or_else(|| SailboxError::MissingColumnFamily(name.to_owned()))
    }

    /// Starts a set of changes.
    pub fn changes(&self) -> Changes {
        Changes::default()
    }

    /// Writes the changes atomically; returns once they are durable.
    pub fn commit(&self, changes: Changes) -> Result<()> {
        if let Some(e) = changes.encode_error {
            return Err(e);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(changes.batch, &wo)?;
        Ok(())
    }

    /// Durably stores one sailbox record.
    pub fn put_sailbox(&self, rec: &SailboxRecord) -> Result<()> {
        self.commit(self.changes().sailbox(self, rec))
    }

    fn get_json<T: DeserializeOwned>(&self, cf: &str, key: &str) -> Result<Option<T>> {
        let Some(bytes) = self.db.get_cf(self.cf(cf)?, key.as_bytes())? else { return Ok(None) };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| SailboxError::CorruptRecord { what: format!("{cf} record {key}"), source })
    }

    fn all_json<T: DeserializeOwned>(&self, cf: &str) -> Result<Vec<T>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf)?, IteratorMode::Start) {
            let (key, value) = item?;
            match serde_json::from_slice(&value) {
                Ok(v) => out.push(v),
                // One corrupt record must not hide every other sailbox: report and go on.
                Err(e) => tracing::error!(cf, key = %String::from_utf8_lossy(&key), error = %e, "corrupt record skipped"),
            }
        }
        Ok(out)
    }

    /// One sailbox.
    pub fn sailbox(&self, id: &str) -> Result<Option<SailboxRecord>> {
        self.get_json(CF_SAILBOXES, id)
    }

    /// Every sailbox ever created on this host (terminated ones included).
    pub fn sailboxes(&self) -> Result<Vec<SailboxRecord>> {
        self.all_json(CF_SAILBOXES)
    }

    /// One checkpoint.
    pub fn checkpoint(&self, id: &str) -> Result<Option<CheckpointRecord>> {
        self.get_json(CF_CHECKPOINTS, id)
    }

    /// One exec request.
    pub fn exec(&self, id: &str) -> Result<Option<ExecRecord>> {
        self.get_json(CF_EXECS, id)
    }

    /// Every exec request that has not finished.
    pub fn running_execs(&self) -> Result<Vec<ExecRecord>> {
        let all: Vec<ExecRecord> = self.all_json(CF_EXECS)?;
        Ok(all.into_iter().filter(|e| e.status == ExecStatus::Running).collect())
    }

    /// The stored result of an exec request.
    pub fn exec_result(&self, id: &str) -> Result<Option<pb::ExecResult>> {
        let Some(bytes) = self.db.get_cf(self.cf(CF_EXEC_RESULTS)?, id.as_bytes())? else { return Ok(None) };
        pb::ExecResult::decode(bytes.as_slice())
            .map(Some)
            .map_err(|source| SailboxError::CorruptResult { id: id.to_owned(), source })
    }

    /// Deletes the finished exec requests (and their results) that started before
    /// `started_before_ms`; running ones are kept. Returns how many were deleted.
    pub fn prune_execs(&self, started_before_ms: u64) -> Result<usize> {
        let all: Vec<ExecRecord> = self.all_json(CF_EXECS)?;
        let (execs, results) = (self.cf(CF_EXECS)?, self.cf(CF_EXEC_RESULTS)?);
        let mut changes = self.changes();
        let mut pruned = 0;
        for e in all.iter().filter(|e| e.status != ExecStatus::Running && e.started_unix_ms < started_before_ms) {
            changes.batch.delete_cf(execs, e.id.as_bytes());
            changes.batch.delete_cf(results, e.id.as_bytes());
            pruned += 1;
        }
        if pruned > 0 {
            self.commit(changes)?;
        }
        Ok(pruned)
    }

    fn app_key(org: &str, name: &str) -> String {
        if org == crate::model::DEFAULT_ORG { name.to_owned() } else { format!("{org}/{name}") }
    }

    /// An app's creation time (Unix ms), if it exists in `org`.
    pub fn app(&self, org: &str, name: &str) -> Result<Option<u64>> {
        let Some(raw) = self.db.get_cf(self.cf(CF_APPS)?, Self::app_key(org, name).as_bytes())? else { return Ok(None) };
        // Written by `ensure_app` as decimal; an unreadable value still names an app.
        Ok(Some(std::str::from_utf8(&raw).ok().and_then(|s| s.parse().ok()).unwrap_or(0)))
    }

    /// Finds or mints an app of `org` by name; returns whether it was minted.
    pub fn ensure_app(&self, org: &str, name: &str) -> Result<bool> {
        let cf = self.cf(CF_APPS)?;
        let key = Self::app_key(org, name);
        if self.db.get_cf(cf, key.as_bytes())?.is_some() {
            return Ok(false);
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(cf, key.as_bytes(), sysutil::clock::now_ms().to_string());
        let mut changes = self.changes();
        changes.batch = batch;
        self.commit(changes)?;
        Ok(true)
    }

    /// Stores an image manifest (JSON bytes) under its id.
    pub fn put_image(&self, id: &str, manifest: &[u8]) -> Result<()> {
        let mut changes = self.changes();
        changes.batch.put_cf(self.cf(CF_IMAGES)?, id.as_bytes(), manifest);
        self.commit(changes)
    }

    /// Forgets an image's manifest (its chunks stay until garbage collection).
    pub fn delete_image(&self, id: &str) -> Result<()> {
        let mut changes = self.changes();
        changes.batch.delete_cf(self.cf(CF_IMAGES)?, id.as_bytes());
        self.commit(changes)
    }

    /// An image manifest (JSON bytes).
    pub fn image(&self, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_IMAGES)?, id.as_bytes())?)
    }

    /// Every image id stored.
    pub fn image_ids(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_IMAGES)?, IteratorMode::Start) {
            let (key, _) = item?;
            out.push(String::from_utf8_lossy(&key).into_owned());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(id: &str, started: u64, status: ExecStatus) -> ExecRecord {
        ExecRecord {
            id: id.into(),
            sailbox: "sb-1".into(),
            command: "true".into(),
            cwd: String::new(),
            timeout_ms: 0,
            background: false,
            env: Default::default(),
            started_unix_ms: started,
            status,
        }
    }

    #[test]
    fn finished_execs_past_the_cutoff_are_pruned_with_their_results() {
        let dir = tempfile::tempdir().unwrap();
        let st = StateStore::open(dir.path()).unwrap();
        let result = pb::ExecResult { stdout: b"out".to_vec(), ..Default::default() };
        for (id, started, status) in [
            ("ex-old", 1_000, ExecStatus::Finished),
            ("ex-old-failed", 1_500, ExecStatus::Failed("x".into())),
            ("ex-old-running", 1_000, ExecStatus::Running),
            ("ex-new", 9_000, ExecStatus::Finished),
        ] {
            st.commit(st.changes().exec(&st, &exec(id, started, status)).exec_result(&st, id, &result)).unwrap();
        }
        assert_eq!(st.prune_execs(5_000).unwrap(), 2);
        assert!(st.exec("ex-old").unwrap().is_none() && st.exec_result("ex-old").unwrap().is_none());
        assert!(st.exec("ex-old-failed").unwrap().is_none());
        assert!(st.exec("ex-old-running").unwrap().is_some(), "a running request is kept");
        assert!(st.exec("ex-new").unwrap().is_some() && st.exec_result("ex-new").unwrap().is_some());
        assert_eq!(st.prune_execs(5_000).unwrap(), 0);
    }
}
