//! The `Backend` trait: where chunks live (a local directory or an S3 bucket).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::id::ChunkId;

pub mod batch;
pub mod durable;
pub mod local;
#[cfg(feature = "s3")]
pub mod s3;

/// Largest chunk any backend accepts (the 64 MiB large-file class with head-room for
/// FastCDC and future classes).
pub const MAX_CHUNK_SIZE: u64 = 256 * 1024 * 1024;

/// A presigned request that lets a client move one chunk straight to or from the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presigned {
    /// Full URL, including the signature.
    pub url: String,
    /// HTTP method to use ("GET" or "PUT").
    pub method: &'static str,
    /// Headers the client must send with the request (name, value).
    pub headers: Vec<(String, String)>,
    /// When the URL stops working, in milliseconds since the Unix epoch.
    pub expires_unix_ms: u64,
}

/// Storage for immutable, content-addressed chunks.
///
/// Implementations must make `put` atomic (a reader sees the whole chunk or nothing) and durable
/// before returning, and `get` must verify the bytes against the id before returning them.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and docs ("local", "s3").
    fn kind(&self) -> &'static str;

    /// Stores `data` under `id`. The caller guarantees `id == ChunkId::of(&data)`; backends
    /// verify it anyway where it costs nothing extra. Storing an existing chunk is a no-op.
    async fn put(&self, id: ChunkId, data: Bytes) -> Result<()>;

    /// Returns the chunk's bytes, verified against `id`.
    async fn get(&self, id: ChunkId) -> Result<Bytes>;

    /// Returns `len` bytes at `offset` inside the chunk, unverified (a range cannot be checked
    /// against a whole-chunk hash); callers that need verified bytes use [`Backend::get`].
    async fn get_range(&self, id: ChunkId, offset: u64, len: u64) -> Result<Bytes>;

    /// Whether the chunk is present.
    async fn exists(&self, id: ChunkId) -> Result<bool>;

    /// Size in bytes of a present chunk, `None` if absent.
    async fn size(&self, id: ChunkId) -> Result<Option<u64>>;

    /// Removes a chunk; removing an absent chunk is not an error. Only garbage collection
    /// calls this.
    async fn delete(&self, id: ChunkId) -> Result<()>;

    /// A URL a client can GET the chunk from directly, or `None` when this backend has no
    /// URL scheme of its own (the local backend: volumed serves and signs its URLs itself).
    async fn presign_get(&self, id: ChunkId, ttl: Duration) -> Result<Option<Presigned>>;

    /// A URL a client can PUT the chunk to directly, or `None` (see [`Backend::presign_get`]).
    async fn presign_put(&self, id: ChunkId, len: u64, ttl: Duration) -> Result<Option<Presigned>>;
}

/// Milliseconds since the Unix epoch, `ttl` from now.
#[cfg_attr(not(feature = "s3"), allow(dead_code))]
pub(crate) fn expiry_ms(ttl: Duration) -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (now + ttl).as_millis() as u64
}
