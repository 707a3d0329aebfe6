//! chunkstore: the content-addressed store under volumes and sailbox snapshots.
//!
//! - [`ChunkId`]: BLAKE3 of a chunk's bytes; every read is checked against it.
//! - [`chunker`]: fixed aligned size classes (8 MiB; 64 MiB from 1 GiB up) and FastCDC v2020.
//! - [`Backend`]: where chunks live; [`LocalBackend`] (a directory, the embedded default) and
//!   [`S3Backend`] (any S3-compatible endpoint).
//! - [`ChunkCache`]: a verified, size-capped LRU directory shared by every reader on a host.
//!
//! ```
//! # tokio_test();
//! # fn tokio_test() { tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use chunkstore::{Backend, ChunkId, LocalBackend};
//! let dir = std::env::temp_dir().join(format!("chunkstore-doc-{}", std::process::id()));
//! let store = LocalBackend::open(&dir).unwrap();
//! let data = bytes::Bytes::from_static(b"some bytes");
//! let id = ChunkId::of(&data);
//! store.put(id, data.clone()).await.unwrap();
//! assert_eq!(store.get(id).await.unwrap(), data);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # }) }
//! ```
#![warn(missing_docs)]

pub mod backend;
pub mod cache;
pub mod chunker;
pub mod error;
pub mod id;
pub mod memory;
pub mod pieces;
mod staging;
#[cfg(feature = "testing")]
pub mod testing;

pub use backend::batch::ChunkBatch;
pub use backend::durable::SyncPolicy;
pub use backend::local::LocalBackend;
#[cfg(feature = "s3")]
pub use backend::s3::{S3Backend, S3Config, S3Credentials};
pub use backend::{Backend, MAX_CHUNK_SIZE, Presigned};
pub use cache::{CacheStats, ChunkCache};
pub use chunker::{ChunkPolicy, ChunkSpan, Chunking};
pub use error::{ChunkError, Result};
pub use id::ChunkId;
