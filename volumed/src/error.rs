//! Typed errors of the volume service. Each variant has a contract name (DESIGN 2.4) that
//! travels in gRPC status details, so the CLI and SDKs raise the same error type.
//!
//! A failure with a cause (RocksDB, the chunk store, a file or socket, a blocking task) keeps
//! it as its `#[source]`; the message names the cause too, because the gRPC status carries
//! only the text. Every such internal failure is a `SailError` with code INTERNAL.

use std::path::PathBuf;

use chunkstore::ChunkError;

use volume_model::{DecodeError, InvalidRequest, TreeId};

/// Everything a volume operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// No volume with this org and name.
    #[error("volume {org}/{name} not found")]
    NotFound {
        /// Org of the missing volume.
        org: String,
        /// Name of the missing volume.
        name: String,
    },
    /// The commit id does not exist in this volume.
    #[error("commit {0} not found in this volume")]
    CommitNotFound(String),
    /// Nothing at this path in the commit.
    #[error("path {0:?} not found")]
    PathNotFound(String),
    /// The request is malformed: bad name, path, id, entry or limit.
    #[error("invalid argument: {0}")]
    InvalidArgument(#[from] InvalidRequest),
    /// An HTTP request body could not be read (the client went away or broke the framing).
    #[error("invalid argument: reading request body: {0}")]
    RequestBody(#[source] axum::Error),
    /// The changes cannot be merged onto the head (a path's parent is a file in the head).
    #[error("commit conflict: {0}")]
    CommitConflict(String),
    /// The commit references chunks the store does not have.
    #[error("{count} referenced chunks are not in the store (first: {first})")]
    MissingChunks {
        /// How many are missing.
        count: usize,
        /// The first missing id, hex.
        first: String,
    },
    /// A stored metadata object is malformed or does not match its id; the text says which.
    #[error("integrity failure: {0}")]
    Integrity(String),
    /// A stored metadata object does not decode.
    #[error("integrity failure: {0}")]
    Decode(#[from] DecodeError),
    /// A tree node the metadata references is not in the store.
    #[error("integrity failure: tree node {0} is missing")]
    TreeMissing(TreeId),
    /// Chunk bytes failed verification against their id or piece chaining values.
    #[error("integrity failure: {0}")]
    ChunkIntegrity(#[source] ChunkError),
    /// A signed URL was forged, expired, or used for another chunk or method.
    #[error("signed URL rejected: {0}")]
    BadSignature(String),
    /// The metadata database failed.
    #[error("metadata store error: {0}")]
    RocksDb(#[from] rocksdb::Error),
    /// The metadata database lacks one of the column families it was opened with.
    #[error("metadata store error: column family {0} missing")]
    MissingColumnFamily(&'static str),
    /// A file or socket operation of the server failed (data directory, listener, key file,
    /// chunk file check).
    #[error("{op}: {source}")]
    Io {
        /// What was being done, with the file or address ("creating data dir /var/lib/sail").
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The URL-signing key file exists but does not hold 32 bytes.
    #[error("{} is not a 32-byte key", .0.display())]
    BadSigningKey(PathBuf),
    /// A blocking task (RocksDB work, a chunk writer) panicked or was cancelled.
    #[error("{what} failed: {source}")]
    Task {
        /// Which task.
        what: &'static str,
        /// Why it did not finish.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The chunk backend failed.
    #[error("chunk backend error: {0}")]
    Chunk(#[source] ChunkError),
    /// The chunk backend cannot do what was asked (a capability it lacks, not a failure:
    /// there is no cause to keep).
    #[error("the chunk backend cannot {0}")]
    Unsupported(&'static str),
}

impl VolumeError {
    /// Shorthand for [`VolumeError::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(InvalidRequest::new(msg))
    }

    /// Shorthand for [`VolumeError::Io`].
    pub fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { op: op.into(), source }
    }

    /// Shorthand for [`VolumeError::Task`].
    pub fn task(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Self {
        move |source| Self::Task { what, source }
    }

    /// Whether stored or uploaded bytes failed verification (contract name
    /// `VolumeIntegrityError`).
    pub fn is_integrity(&self) -> bool {
        matches!(self, Self::Integrity(_) | Self::Decode(_) | Self::TreeMissing(_) | Self::ChunkIntegrity(_))
    }

    /// The error's contract name, as carried in status details.
    pub fn name(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "VolumeNotFoundError",
            Self::CommitNotFound(_) => "VolumeCommitNotFoundError",
            Self::PathNotFound(_) => "VolumePathNotFoundError",
            Self::InvalidArgument(_) | Self::RequestBody(_) => "VolumeInvalidArgumentError",
            Self::CommitConflict(_) => "VolumeCommitConflictError",
            Self::MissingChunks { .. } => "VolumeMissingChunksError",
            Self::Integrity(_) | Self::Decode(_) | Self::TreeMissing(_) | Self::ChunkIntegrity(_) => "VolumeIntegrityError",
            Self::BadSignature(_) => "VolumeSignatureError",
            Self::RocksDb(_)
            | Self::MissingColumnFamily(_)
            | Self::Io { .. }
            | Self::BadSigningKey(_)
            | Self::Task { .. }
            | Self::Chunk(_)
            | Self::Unsupported(_) => "SailError",
        }
    }
}

impl From<ChunkError> for VolumeError {
    fn from(e: ChunkError) -> Self {
        match e {
            e if e.is_integrity() => Self::ChunkIntegrity(e),
            ChunkError::InvalidId(m) => Self::invalid(m),
            ChunkError::TooLarge { .. } => Self::invalid(e.to_string()),
            other => Self::Chunk(other),
        }
    }
}

/// Result alias for volume operations.
pub type Result<T, E = VolumeError> = std::result::Result<T, E>;
