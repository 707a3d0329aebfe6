//! Typed errors of the volume service. Each variant has a contract name (DESIGN 2.4) that
//! travels in gRPC status details, so the CLI and SDKs raise the same error type.

use chunkstore::ChunkError;

use volume_model::{DecodeError, InvalidRequest};

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
    /// Stored bytes failed verification (a chunk's hash or a metadata object's encoding).
    #[error("integrity failure: {0}")]
    Integrity(String),
    /// A signed URL was forged, expired, or used for another chunk or method.
    #[error("signed URL rejected: {0}")]
    BadSignature(String),
    /// The metadata database failed.
    #[error("metadata store error: {0}")]
    Storage(String),
    /// The chunk backend failed.
    #[error("chunk backend error: {0}")]
    Backend(String),
}

impl VolumeError {
    /// Shorthand for [`VolumeError::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(InvalidRequest::new(msg))
    }

    /// The error's contract name, as carried in status details.
    pub fn name(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "VolumeNotFoundError",
            Self::CommitNotFound(_) => "VolumeCommitNotFoundError",
            Self::PathNotFound(_) => "VolumePathNotFoundError",
            Self::InvalidArgument(_) => "VolumeInvalidArgumentError",
            Self::CommitConflict(_) => "VolumeCommitConflictError",
            Self::MissingChunks { .. } => "VolumeMissingChunksError",
            Self::Integrity(_) => "VolumeIntegrityError",
            Self::BadSignature(_) => "VolumeSignatureError",
            Self::Storage(_) | Self::Backend(_) => "SailError",
        }
    }
}

impl From<rocksdb::Error> for VolumeError {
    fn from(e: rocksdb::Error) -> Self {
        Self::Storage(e.into_string())
    }
}

impl From<DecodeError> for VolumeError {
    fn from(e: DecodeError) -> Self {
        Self::Integrity(e.to_string())
    }
}

impl From<ChunkError> for VolumeError {
    fn from(e: ChunkError) -> Self {
        match e {
            ChunkError::Integrity { .. } | ChunkError::PieceIntegrity { .. } => Self::Integrity(e.to_string()),
            ChunkError::InvalidId(m) => Self::invalid(m),
            ChunkError::TooLarge { .. } => Self::invalid(e.to_string()),
            other => Self::Backend(other.to_string()),
        }
    }
}

/// Result alias for volume operations.
pub type Result<T, E = VolumeError> = std::result::Result<T, E>;
