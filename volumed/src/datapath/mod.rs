//! The data path: how chunk bytes move between clients and the backend without passing
//! through the gRPC API.
//!
//! - Local backend: volumed serves `/v1/chunks/{id}` itself ([`http`]) at HMAC-signed,
//!   expiring URLs ([`sign`]), and `/v1/batches/{digest}` ([`batch`]): many small chunks in
//!   one signed request, made durable together.
//! - S3 backend: URLs are S3 presigned URLs; no chunk byte passes through volumed.

pub mod batch;
pub mod body;
pub mod http;
pub mod sign;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use chunkstore::{Backend, ChunkId, LocalBackend, Presigned, S3Backend};

use crate::error::{Result, VolumeError};
use sign::UrlSigner;
use sysutil::clock::ms_after;

/// A signed batch upload: the URL and the chunks it accepts, in body order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchUrl {
    /// The signed request.
    pub url: Presigned,
    /// Chunks (id, length) in the order their frames must come.
    pub chunks: Vec<(ChunkId, u64)>,
    /// Exact body length.
    pub body_len: u64,
}

/// Counters of the local data path's uploads (for tests and logs).
#[derive(Debug, Default)]
pub struct DataPathStats {
    /// Single-chunk uploads stored.
    pub chunk_uploads: AtomicU64,
    /// Batch uploads stored.
    pub batch_uploads: AtomicU64,
    /// Chunks stored through batches.
    pub batch_chunks: AtomicU64,
    /// Uploads (single or batch) rejected: bad signature, bytes, length or framing.
    pub rejected_uploads: AtomicU64,
}

/// Where chunks live and how clients reach them.
#[derive(Clone)]
pub enum DataPath {
    /// Chunks in a local directory, served by volumed at `base_url`.
    Local {
        /// The chunk directory.
        backend: LocalBackend,
        /// Signs URLs.
        signer: UrlSigner,
        /// Public base URL of this volumed (`http://host:port`).
        base_url: String,
    },
    /// Chunks in an S3 bucket, reached through presigned URLs.
    S3 {
        /// The bucket.
        backend: Arc<S3Backend>,
    },
}

impl DataPath {
    /// The backend, for existence checks.
    pub fn backend(&self) -> Arc<dyn Backend> {
        match self {
            DataPath::Local { backend, .. } => Arc::new(backend.clone()),
            DataPath::S3 { backend } => backend.clone(),
        }
    }

    /// Whether `id` is present in the backend.
    pub async fn exists(&self, id: ChunkId) -> Result<bool> {
        Ok(match self {
            DataPath::Local { backend, .. } => backend.exists(id).await?,
            DataPath::S3 { backend } => backend.exists(id).await?,
        })
    }

    /// Which of `ids` are present in the backend, in order. The local backend checks them all
    /// on one blocking thread (a `stat` each); S3 sends `concurrency` HEAD requests at a time.
    pub async fn exists_many(&self, ids: Vec<ChunkId>, concurrency: usize) -> Result<Vec<bool>> {
        use futures::{StreamExt, TryStreamExt};
        match self {
            DataPath::Local { backend, .. } => {
                let paths: Vec<_> = ids.iter().map(|id| backend.chunk_path(*id)).collect();
                tokio::task::spawn_blocking(move || {
                    paths
                        .iter()
                        .map(|p| match std::fs::metadata(p) {
                            Ok(_) => Ok(true),
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                            Err(e) => Err(VolumeError::io(format!("checking {}", p.display()), e)),
                        })
                        .collect()
                })
                .await
                .map_err(VolumeError::task("existence check"))?
            }
            DataPath::S3 { backend } => {
                futures::stream::iter(ids)
                    .map(|id| async move { Ok::<_, VolumeError>(backend.exists(id).await?) })
                    .buffered(concurrency)
                    .try_collect()
                    .await
            }
        }
    }

    /// A URL to upload chunk `id` of `len` bytes, valid for `ttl`.
    pub async fn upload_url(&self, id: ChunkId, len: u64, ttl: Duration) -> Result<Presigned> {
        match self {
            DataPath::Local { signer, base_url, .. } => {
                let exp = ms_after(ttl);
                Ok(Presigned {
                    url: signer.sign(base_url, "PUT", &id.to_hex(), len, exp),
                    method: "PUT",
                    headers: Vec::new(),
                    expires_unix_ms: exp,
                })
            }
            DataPath::S3 { backend } => {
                backend.presign_put(id, len, ttl).await?.ok_or_else(|| VolumeError::Unsupported("presign a PUT URL"))
            }
        }
    }

    /// Whether this data path takes batch uploads (the local backend does; S3 has no
    /// multi-object put, so small chunks there keep one presigned PUT each).
    pub fn supports_batches(&self) -> bool {
        matches!(self, DataPath::Local { .. })
    }

    /// A URL that uploads `chunks` (each at most [`volume_model::batch::BATCH_CHUNK_MAX`] bytes) in one
    /// request, valid for `ttl`; `None` when the backend does not take batches.
    pub fn batch_upload_url(&self, chunks: Vec<(ChunkId, u64)>, ttl: Duration) -> Option<BatchUrl> {
        let DataPath::Local { signer, base_url, .. } = self else {
            return None;
        };
        let exp = ms_after(ttl);
        let digest = volume_model::batch::BatchDigest::of(&chunks).hex();
        let body_len = volume_model::batch::body_len(chunks.iter().map(|(_, l)| *l));
        let url = signer.sign_batch(base_url, &digest, chunks.len() as u64, body_len, exp);
        Some(BatchUrl { url: Presigned { url, method: "PUT", headers: Vec::new(), expires_unix_ms: exp }, chunks, body_len })
    }

    /// A URL to download chunk `id`, valid for `ttl`.
    pub async fn download_url(&self, id: ChunkId, ttl: Duration) -> Result<Presigned> {
        match self {
            DataPath::Local { signer, base_url, .. } => {
                let exp = ms_after(ttl);
                Ok(Presigned {
                    url: signer.sign(base_url, "GET", &id.to_hex(), 0, exp),
                    method: "GET",
                    headers: Vec::new(),
                    expires_unix_ms: exp,
                })
            }
            DataPath::S3 { backend } => {
                backend.presign_get(id, ttl).await?.ok_or_else(|| VolumeError::Unsupported("presign a GET URL"))
            }
        }
    }
}
