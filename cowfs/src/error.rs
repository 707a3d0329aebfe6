//! Errors of cowfs.

/// What a cowfs operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// A bad request (name, size, range).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No such file.
    #[error("no file named {0}")]
    NotFound(String),
    /// The file already exists.
    #[error("a file named {0} already exists")]
    Exists(String),
    /// Stored bytes or a manifest failed verification.
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
            Self::Invalid(_) => libc::EINVAL,
            Self::NotFound(_) => libc::ENOENT,
            Self::Exists(_) => libc::EEXIST,
            Self::ReadOnly(_) => libc::EROFS,
            Self::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            Self::Corrupt(_) | Self::Chunks(_) => libc::EIO,
        }
    }
}

/// Result alias.
pub type Result<T, E = CowError> = std::result::Result<T, E>;
