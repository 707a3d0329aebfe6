//! Errors of the daemon, and the wire kind each one is reported as.

use cowfs::control::ErrorKind;
use cowfs::manifest::ManifestError;

/// What a cowfs operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// A bad request (name, size, range).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A request line that does not decode.
    #[error("bad request: {0}")]
    BadRequest(#[source] serde_json::Error),
    /// A manifest id that is not a chunk id.
    #[error("bad manifest id: {0}")]
    BadManifestId(#[source] chunkstore::ChunkError),
    /// No such file.
    #[error("no file named {0}")]
    NotFound(String),
    /// The file already exists.
    #[error("a file named {0} already exists")]
    Exists(String),
    /// A manifest is out of range (a bad request) or fails to decode (corrupt).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Stored bytes failed verification.
    #[error("integrity failure: {0}")]
    Corrupt(String),
    /// The chunk store failed.
    #[error("chunk store: {0}")]
    Chunks(#[from] chunkstore::ChunkError),
    /// A write to a read-only file (a checkpoint's memory view).
    #[error("{0} is read-only")]
    ReadOnly(String),
    /// Local I/O failed (the layer files).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl CowError {
    /// The errno a FUSE request gets for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            _ => match self.kind() {
                ErrorKind::Invalid => libc::EINVAL,
                ErrorKind::NotFound => libc::ENOENT,
                ErrorKind::Exists => libc::EEXIST,
                ErrorKind::ReadOnly => libc::EROFS,
                ErrorKind::Corrupt | ErrorKind::Chunks | ErrorKind::Io => libc::EIO,
            },
        }
    }

    /// The kind a control reply carries for this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) | Self::BadRequest(_) | Self::BadManifestId(_) => ErrorKind::Invalid,
            Self::Manifest(ManifestError::TooLarge { .. }) => ErrorKind::Invalid,
            Self::Manifest(_) | Self::Corrupt(_) => ErrorKind::Corrupt,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Exists(_) => ErrorKind::Exists,
            Self::ReadOnly(_) => ErrorKind::ReadOnly,
            Self::Chunks(_) => ErrorKind::Chunks,
            Self::Io(_) => ErrorKind::Io,
        }
    }
}

/// Result alias.
pub type Result<T, E = CowError> = std::result::Result<T, E>;
