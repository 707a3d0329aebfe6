//! Typed errors of the chunk store.

use crate::id::ChunkId;

/// Everything that can go wrong storing or reading a chunk.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// A piece of a chunk did not match its chaining value (see `pieces`).
    #[error("integrity failure: piece {piece} of chunk {chunk} does not match its chaining value")]
    PieceIntegrity {
        /// The chunk.
        chunk: ChunkId,
        /// The piece index.
        piece: usize,
    },
    /// Bytes did not hash to the id they were stored or requested under.
    #[error("chunk integrity failure: expected {expected}, got bytes hashing to {actual}")]
    Integrity {
        /// The id that was asked for.
        expected: ChunkId,
        /// What the bytes actually hash to.
        actual: ChunkId,
    },
    /// The backend has no chunk with this id.
    #[error("chunk {0} not found")]
    NotFound(ChunkId),
    /// A malformed chunk id (wrong length or not hex).
    #[error("invalid chunk id: {0}")]
    InvalidId(String),
    /// A chunk larger than the store accepts.
    #[error("chunk of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size offered.
        size: u64,
        /// Largest size accepted.
        limit: u64,
    },
    /// A configuration value is unusable (bad endpoint, missing bucket, ...).
    #[error("invalid chunk store configuration: {0}")]
    Config(String),
    /// The backend failed (network, S3 error status, ...) after retries.
    #[error("chunk backend error: {0}")]
    Backend(String),
    /// Local file system error.
    #[error("chunk store I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result alias for chunk store operations.
pub type Result<T, E = ChunkError> = std::result::Result<T, E>;
