//! `LocalBackend`: chunks as files in a local directory (the embedded default).
//!
//! Layout: `<root>/chunks/<first 2 hex>/<64 hex>`; temp files in `<root>/tmp/` (those of a
//! [`crate::ChunkBatch`] in a directory of their own there).
//!
//! Durability and atomicity of a put: the bytes go to a unique temp file, which is fsynced,
//! then renamed into its shard directory (rename is atomic: readers see the whole chunk or
//! nothing), then the shard directory is fsynced so the rename itself survives a crash. A
//! newly created shard directory is fsynced into `chunks/` first. Temp files left by a crash
//! are removed at open. Every `get` re-hashes the file, so a corrupted file is an
//! [`ChunkError::Integrity`] error, never returned data.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::backend::{Backend, MAX_CHUNK_SIZE, Presigned};
use crate::error::{ChunkError, Result};
use crate::id::ChunkId;
use crate::staging::Owner;

/// Chunks in a local directory. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LocalBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    chunks: PathBuf,
    tmp: PathBuf,
    counter: AtomicU64,
    /// What marks this backend's temp entries as staged by a live process (`crate::staging`).
    owner: Owner,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(ChunkError::Task)?
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| ChunkError::io("fsyncing directory", dir, e))
}

impl LocalBackend {
    /// Opens (creating if needed) a chunk directory and removes temp files a crash left: only
    /// those no open backend owns (`crate::staging`), so a second process opening the same
    /// directory never deletes an upload or batch another live one is staging.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let chunks = root.join("chunks");
        let tmp = root.join("tmp");
        fs::create_dir_all(&chunks).map_err(|e| ChunkError::io("creating", &chunks, e))?;
        fs::create_dir_all(&tmp).map_err(|e| ChunkError::io("creating", &tmp, e))?;
        crate::staging::remove_stale(&tmp)?;
        let owner = Owner::create(&tmp)?;
        Ok(Self { inner: Arc::new(Inner { root, chunks, tmp, counter: AtomicU64::new(0), owner }) })
    }

    /// The directory this backend was opened on.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Where the chunk's file lives (whether or not it exists).
    pub fn chunk_path(&self, id: ChunkId) -> PathBuf {
        self.shard_dir(id).join(id.to_hex())
    }

    /// The shard directory holding the chunk's file: `chunks/<first 2 hex>`.
    pub(crate) fn shard_dir(&self, id: ChunkId) -> PathBuf {
        self.inner.chunks.join(&id.to_hex()[..2])
    }

    /// The `chunks/` directory holding the shard directories.
    pub(crate) fn chunks_dir(&self) -> &Path {
        &self.inner.chunks
    }

    /// A fresh temp name: `<owner token>-<n>-<random>` (see `crate::staging`).
    pub(crate) fn temp_path(&self) -> PathBuf {
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        self.inner.tmp.join(format!("{}-{n}-{:016x}", self.inner.owner.token(), rand::random::<u64>()))
    }

    /// Moves a complete, fsynced temp file into place and makes the rename durable.
    fn install(&self, tmp: &Path, id: ChunkId) -> Result<()> {
        let dest = self.chunk_path(id);
        let shard = self.shard_dir(id);
        if !shard.exists() {
            match fs::create_dir(&shard) {
                Ok(()) => fsync_dir(&self.inner.chunks)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(ChunkError::io("creating", shard, e)),
            }
        }
        fs::rename(tmp, &dest).map_err(|e| ChunkError::io("renaming a temp file to", &dest, e))?;
        fsync_dir(&shard)?;
        Ok(())
    }

    /// Starts a streamed upload of chunk `expected` of at most `max_len` bytes. The bytes
    /// become visible only when [`ChunkUpload::finish`] verifies their hash.
    pub fn begin_upload(&self, expected: ChunkId, max_len: u64) -> Result<ChunkUpload> {
        if max_len > MAX_CHUNK_SIZE {
            return Err(ChunkError::TooLarge { size: max_len, limit: MAX_CHUNK_SIZE });
        }
        let path = self.temp_path();
        let file =
            OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| ChunkError::io("creating", &path, e))?;
        Ok(ChunkUpload {
            backend: self.clone(),
            expected,
            max_len,
            written: 0,
            hasher: blake3::Hasher::new(),
            file: Some(file),
            path,
        })
    }

    /// Every chunk id stored (files whose names are not ids are skipped and logged).
    pub fn list(&self) -> Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        let chunks = &self.inner.chunks;
        for shard in fs::read_dir(chunks).map_err(|e| ChunkError::io("listing", chunks, e))? {
            let shard = shard.map_err(|e| ChunkError::io("listing", chunks, e))?;
            let path = shard.path();
            if !shard.file_type().map_err(|e| ChunkError::io("reading the type of", &path, e))?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&path).map_err(|e| ChunkError::io("listing", &path, e))? {
                let name = entry.map_err(|e| ChunkError::io("listing", &path, e))?.file_name();
                match name.to_str().and_then(|n| n.parse::<ChunkId>().ok()) {
                    Some(id) => out.push(id),
                    None => tracing::warn!(name = ?name, "unexpected file in chunk directory"),
                }
            }
        }
        Ok(out)
    }
}

/// A streamed upload in progress (see [`LocalBackend::begin_upload`]). Dropping it without
/// [`ChunkUpload::finish`] removes the temp file. Its methods do blocking I/O.
pub struct ChunkUpload {
    backend: LocalBackend,
    expected: ChunkId,
    max_len: u64,
    written: u64,
    hasher: blake3::Hasher,
    file: Option<File>,
    path: PathBuf,
}

impl ChunkUpload {
    /// Appends bytes; fails with [`ChunkError::TooLarge`] past the announced length.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let size = self.written + bytes.len() as u64;
        if size > self.max_len {
            return Err(ChunkError::TooLarge { size, limit: self.max_len });
        }
        let file = self.file.as_mut().ok_or(ChunkError::UploadFinished(self.expected))?;
        file.write_all(bytes).map_err(|e| ChunkError::io("writing", &self.path, e))?;
        self.hasher.update(bytes);
        self.written = size;
        Ok(())
    }

    /// Verifies the hash, fsyncs and installs the chunk; returns its length. On a mismatch
    /// the temp file is removed and nothing becomes visible.
    pub fn finish(mut self) -> Result<u64> {
        let actual = ChunkId::from_bytes(*self.hasher.finalize().as_bytes());
        if actual != self.expected {
            return Err(ChunkError::Integrity { expected: self.expected, actual });
        }
        let file = self.file.take().ok_or(ChunkError::UploadFinished(self.expected))?;
        file.sync_all().map_err(|e| ChunkError::io("fsyncing", &self.path, e))?;
        drop(file);
        if self.backend.chunk_path(self.expected).exists() {
            let _ = fs::remove_file(&self.path);
        } else {
            self.backend.install(&self.path, self.expected)?;
        }
        self.path = PathBuf::new();
        Ok(self.written)
    }
}

impl Drop for ChunkUpload {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[async_trait]
impl Backend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn put(&self, id: ChunkId, data: Bytes) -> Result<()> {
        if data.len() as u64 > MAX_CHUNK_SIZE {
            return Err(ChunkError::TooLarge { size: data.len() as u64, limit: MAX_CHUNK_SIZE });
        }
        let this = self.clone();
        blocking(move || {
            if this.chunk_path(id).exists() {
                return Ok(());
            }
            id.verify(&data)?;
            let tmp = this.temp_path();
            let result = (|| {
                let written = (|| {
                    let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
                    f.write_all(&data)?;
                    f.sync_all()
                })();
                written.map_err(|e| ChunkError::io("writing", &tmp, e))?;
                this.install(&tmp, id)
            })();
            if result.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            result
        })
        .await
    }

    async fn get(&self, id: ChunkId) -> Result<Bytes> {
        let path = self.chunk_path(id);
        blocking(move || {
            let data = match fs::read(&path) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ChunkError::NotFound(id));
                }
                Err(e) => return Err(ChunkError::io("reading", path, e)),
            };
            id.verify(&data)?;
            Ok(Bytes::from(data))
        })
        .await
    }

    async fn get_range(&self, id: ChunkId, offset: u64, len: u64) -> Result<Bytes> {
        let path = self.chunk_path(id);
        blocking(move || {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ChunkError::NotFound(id));
                }
                Err(e) => return Err(ChunkError::io("opening", path, e)),
            };
            let size = file.metadata().map_err(|e| ChunkError::io("reading the size of", &path, e))?.len();
            let end = offset.checked_add(len).filter(|&e| e <= size).ok_or(ChunkError::InvalidRange {
                chunk: id,
                offset,
                len,
                size: Some(size),
            })?;
            // Read into spare capacity: no zeroing pass over a buffer about to be overwritten.
            let want = (end - offset) as usize;
            let mut buf = Vec::with_capacity(want);
            let read = (&file).seek(SeekFrom::Start(offset)).and_then(|_| (&file).take(want as u64).read_to_end(&mut buf));
            read.map_err(|e| ChunkError::io("reading", &path, e))?;
            if buf.len() != want {
                return Err(ChunkError::ShortRead { chunk: id, wanted: want as u64, got: buf.len() as u64 });
            }
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn exists(&self, id: ChunkId) -> Result<bool> {
        Ok(self.size(id).await?.is_some())
    }

    async fn size(&self, id: ChunkId) -> Result<Option<u64>> {
        let path = self.chunk_path(id);
        blocking(move || match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ChunkError::io("reading the size of", path, e)),
        })
        .await
    }

    async fn delete(&self, id: ChunkId) -> Result<()> {
        let path = self.chunk_path(id);
        blocking(move || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ChunkError::io("removing", path, e)),
        })
        .await
    }

    async fn presign_get(&self, _id: ChunkId, _ttl: Duration) -> Result<Option<Presigned>> {
        Ok(None)
    }

    async fn presign_put(&self, _id: ChunkId, _len: u64, _ttl: Duration) -> Result<Option<Presigned>> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_keeps_what_a_live_backend_stages_and_removes_what_a_dead_one_left() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        let first = LocalBackend::open(dir.path()).unwrap();
        // An upload and a batch the first backend is staging.
        let upload = first.begin_upload(ChunkId::of(b"abc"), 3).unwrap();
        let batch = first.begin_batch().unwrap();
        let staged = |prefix: &str| -> Vec<PathBuf> {
            let mut v: Vec<_> = fs::read_dir(&tmp)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
                .collect();
            v.sort();
            v
        };
        let live = staged(first.inner.owner.token());
        assert_eq!(live.len(), 3, "owner file, upload, batch: {live:?}");
        // Left by backends that are gone: an owner file nobody holds, one that is missing,
        // and an old-style name.
        fs::write(tmp.join("o1x00000000000000aa.owner"), b"").unwrap();
        fs::write(tmp.join("o1x00000000000000aa-0-00000000000000ff"), b"x").unwrap();
        fs::create_dir(tmp.join("o2x00000000000000bb-1-00000000000000ee.batch")).unwrap();
        fs::write(tmp.join("4194303-0-1"), b"x").unwrap();
        // Another opener of the same directory (a second server, a tool).
        let second = LocalBackend::open(dir.path()).unwrap();
        assert_eq!(staged(first.inner.owner.token()), live, "the live backend's staging survives");
        assert_eq!(staged("o1x").len() + staged("o2x").len() + staged("419").len(), 0, "the dead ones' is gone");
        // Once the first backend is dropped (its process ended), the next opener cleans up.
        drop((upload, batch));
        let token = first.inner.owner.token().to_owned();
        drop(first);
        let _third = LocalBackend::open(dir.path()).unwrap();
        assert!(staged(&token).is_empty());
        drop(second);
    }
}
