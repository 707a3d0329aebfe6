//! Errors of the FUSE helper, with the contract's names and the errno each maps to.

use chunkstore::ChunkError;
use volume_client::ClientError;
use volume_model::InvalidRequest;

/// What a mount operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// volumed answered with an error (its contract name is kept).
    #[error(transparent)]
    Remote(#[from] ClientError),
    /// A local file (overlay, cache, socket) failed.
    #[error("local I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Stored metadata did not decode or validate; the text says how.
    #[error("malformed metadata from volumed: {0}")]
    Protocol(String),
    /// A value from volumed (a tree id, an entry) breaks the model's rules.
    #[error("malformed metadata from volumed: {0}")]
    Malformed(#[from] InvalidRequest),
    /// The shared chunk cache failed reading a chunk (bytes that fail verification included).
    #[error("chunk cache: {0}")]
    Cache(#[source] ChunkError),
    /// A commit or reload is already running on this mount.
    #[error("another commit or reload is in progress on this mount")]
    Busy,
}

impl FuseError {
    /// The contract error name for clients of the control socket.
    pub fn name(&self) -> &str {
        match self {
            FuseError::Remote(ClientError::Integrity(_)) => "VolumeIntegrityError",
            FuseError::Remote(e) => e.name().unwrap_or("SailError"),
            FuseError::Protocol(_) | FuseError::Malformed(_) | FuseError::Cache(_) => "VolumeIntegrityError",
            FuseError::Io(_) | FuseError::Busy => "SailError",
        }
    }

    /// The errno a filesystem call reports for this error.
    pub fn errno(&self) -> fuser::Errno {
        match self {
            FuseError::Io(e) => e.raw_os_error().map(fuser::Errno::from_i32).unwrap_or(fuser::Errno::EIO),
            FuseError::Busy => fuser::Errno::from_i32(libc::EBUSY),
            _ => fuser::Errno::EIO,
        }
    }
}

/// Result alias.
pub type Result<T, E = FuseError> = std::result::Result<T, E>;
