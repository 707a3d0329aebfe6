//! The data path: how chunk bytes move between clients and the backend without passing
//! through the gRPC API.
//!
//! - Local backend: volumed serves `/v1/chunks/{id}` itself ([`http`]) at HMAC-signed,
//!   expiring URLs ([`sign`]).
//! - S3 backend: URLs are S3 presigned URLs; no chunk byte passes through volumed.

pub mod http;
pub mod sign;

use std::sync::Arc;
use std::time::Duration;

use chunkstore::{Backend, ChunkId, LocalBackend, Presigned, S3Backend};

use crate::error::{Result, VolumeError};
use crate::meta::store::now_ms;
use sign::UrlSigner;

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

    /// A URL to upload chunk `id` of `len` bytes, valid for `ttl`.
    pub async fn upload_url(&self, id: ChunkId, len: u64, ttl: Duration) -> Result<Presigned> {
        match self {
            DataPath::Local { signer, base_url, .. } => {
                let exp = now_ms() + ttl.as_millis() as u64;
                Ok(Presigned {
                    url: signer.sign(base_url, "PUT", &id.to_hex(), len, exp),
                    method: "PUT",
                    headers: Vec::new(),
                    expires_unix_ms: exp,
                })
            }
            DataPath::S3 { backend } => {
                backend.presign_put(id, len, ttl).await?.ok_or_else(|| VolumeError::Backend("S3 backend did not presign".into()))
            }
        }
    }

    /// A URL to download chunk `id`, valid for `ttl`.
    pub async fn download_url(&self, id: ChunkId, ttl: Duration) -> Result<Presigned> {
        match self {
            DataPath::Local { signer, base_url, .. } => {
                let exp = now_ms() + ttl.as_millis() as u64;
                Ok(Presigned {
                    url: signer.sign(base_url, "GET", &id.to_hex(), 0, exp),
                    method: "GET",
                    headers: Vec::new(),
                    expires_unix_ms: exp,
                })
            }
            DataPath::S3 { backend } => {
                backend.presign_get(id, ttl).await?.ok_or_else(|| VolumeError::Backend("S3 backend did not presign".into()))
            }
        }
    }
}
