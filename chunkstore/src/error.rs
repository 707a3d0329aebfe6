//! Typed errors of the chunk store.
//!
//! Every failure that has a cause keeps it as its `#[source]` (an S3 SDK error, an
//! `io::Error`, a failed blocking task, the error of a caller's fetch), so callers decide on
//! the variant, never on the text. Each variant's message also names its cause: callers in
//! this workspace turn chunk errors into their own messages with `to_string()`, and the
//! reason must survive that.
//!
//! Retry decisions use [`ChunkError::is_transient`] (timeouts, network failures, S3 5xx and
//! 429 answers): the S3 backend's requests are already retried by the SDK, so callers that
//! retry again (a whole commit, a batch) ask this, never the message.

use std::path::PathBuf;
use std::sync::Arc;

use crate::id::ChunkId;

/// A boxed error of another library kept as a cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How an S3 request failed (what [`ChunkError::is_transient`] decides on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Failure {
    /// No response in time (connect or attempt timeout).
    Timeout,
    /// The request could not be sent or the connection broke (network, TLS, DNS).
    Dispatch,
    /// The server answered with this HTTP status.
    Status(u16),
    /// The request could not be built or the answer not parsed.
    Other,
}

impl S3Failure {
    /// Whether a later attempt can succeed: timeouts, network failures, 5xx and 429.
    pub fn is_transient(self) -> bool {
        match self {
            S3Failure::Timeout | S3Failure::Dispatch => true,
            S3Failure::Status(s) => s >= 500 || s == 429,
            S3Failure::Other => false,
        }
    }
}

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
    /// A malformed chunk id (wrong length or not hex); the text says what was wrong.
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
    /// A byte range that does not lie inside the chunk (or overflows).
    #[error("range {offset}+{len} is outside chunk {chunk}{}", .size.map(|s| format!(" of {s} bytes")).unwrap_or_default())]
    InvalidRange {
        /// The chunk.
        chunk: ChunkId,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The chunk's size, when known.
        size: Option<u64>,
    },
    /// A configuration value is unusable (empty bucket, part size too small, missing
    /// credentials); the text says which.
    #[error("invalid chunk store configuration: {0}")]
    Config(String),
    /// A presigned URL cannot have this lifetime.
    #[error("invalid presigned URL lifetime: {source}")]
    PresignTtl {
        /// What the SDK said.
        #[source]
        source: BoxError,
    },
    /// An S3 request failed (after the SDK's own retries).
    #[error("S3 {op}{}: {}", .chunk.map(|c| format!(" {c}")).unwrap_or_default(), error_context(.source.as_ref()))]
    S3 {
        /// The S3 operation ("PutObject", "GetObject", ...).
        op: &'static str,
        /// The chunk concerned, if any.
        chunk: Option<ChunkId>,
        /// How it failed.
        failure: S3Failure,
        /// The SDK's error.
        #[source]
        source: BoxError,
    },
    /// An S3 answer broke the protocol (a range of the wrong length, no upload id).
    #[error("S3 {op} {chunk}: {problem}")]
    S3Protocol {
        /// The S3 operation.
        op: &'static str,
        /// The chunk concerned.
        chunk: ChunkId,
        /// What was wrong with the answer.
        problem: String,
    },
    /// A file system operation failed.
    #[error("chunk store I/O error: {op} {}: {source}", .path.display())]
    Io {
        /// What was being done ("reading", "renaming into place", "syncfs", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A chunk file ended before the range read from it (it changed while being read).
    #[error("chunk {chunk} shrank while read: wanted {wanted} bytes, got {got}")]
    ShortRead {
        /// The chunk.
        chunk: ChunkId,
        /// Bytes wanted.
        wanted: u64,
        /// Bytes read.
        got: u64,
    },
    /// A blocking I/O task panicked or was cancelled.
    #[error("chunk store I/O task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// A thread of the per-file fsync pass panicked (its files' durability is unknown).
    #[error("an fsync thread panicked")]
    SyncThreadPanicked,
    /// [`crate::backend::local::ChunkUpload`] used after it finished.
    #[error("upload of chunk {0} already finished")]
    UploadFinished(ChunkId),
    /// The fetch a caller gave [`crate::ChunkCache::get_or_fetch`] failed.
    #[error("fetching chunk {chunk}: {source}")]
    Fetch {
        /// The chunk.
        chunk: ChunkId,
        /// The caller's error.
        #[source]
        source: BoxError,
    },
    /// The error of a fetch another caller ran for the same chunk (a single-flight fetch in
    /// [`crate::ChunkCache::get_or_fetch`]; errors are not `Clone`, so waiters share it).
    #[error(transparent)]
    Shared(Arc<ChunkError>),
}

impl ChunkError {
    /// Shorthand for [`ChunkError::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { op, path: path.into(), source }
    }

    /// The error itself, or the shared error it stands for (see [`ChunkError::Shared`]).
    pub fn root(&self) -> &ChunkError {
        match self {
            ChunkError::Shared(e) => e.root(),
            other => other,
        }
    }

    /// Whether trying again later can succeed: an S3 timeout, network failure, 5xx or 429
    /// (after the SDK's own retries), or an interrupted or timed-out file operation.
    pub fn is_transient(&self) -> bool {
        match self.root() {
            ChunkError::S3 { failure, .. } => failure.is_transient(),
            ChunkError::Io { source, .. } => {
                matches!(source.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut)
            }
            _ => false,
        }
    }

    /// Whether bytes failed verification ([`ChunkError::Integrity`] or
    /// [`ChunkError::PieceIntegrity`], shared or not).
    pub fn is_integrity(&self) -> bool {
        matches!(self.root(), ChunkError::Integrity { .. } | ChunkError::PieceIntegrity { .. })
    }
}

/// An error followed by its causes, `: `-separated (SDK errors say little at the top level).
fn error_context(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

/// Result alias for chunk store operations.
pub type Result<T, E = ChunkError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_are_told_by_kind() {
        let s3 = |failure| ChunkError::S3 { op: "GetObject", chunk: None, failure, source: "x".into() };
        for (failure, transient) in [
            (S3Failure::Timeout, true),
            (S3Failure::Dispatch, true),
            (S3Failure::Status(503), true),
            (S3Failure::Status(500), true),
            (S3Failure::Status(429), true),
            (S3Failure::Status(403), false),
            (S3Failure::Status(404), false),
            (S3Failure::Other, false),
        ] {
            assert_eq!(s3(failure).is_transient(), transient, "{failure:?}");
            assert_eq!(ChunkError::Shared(Arc::new(s3(failure))).is_transient(), transient, "shared {failure:?}");
        }
        let io = |kind| ChunkError::io("reading", "/x", std::io::Error::from(kind));
        assert!(io(std::io::ErrorKind::TimedOut).is_transient());
        assert!(!io(std::io::ErrorKind::PermissionDenied).is_transient());
        let id = ChunkId::of(b"a");
        let integrity = ChunkError::Integrity { expected: id, actual: ChunkId::of(b"b") };
        assert!(!integrity.is_transient() && integrity.is_integrity());
        assert!(ChunkError::Shared(Arc::new(integrity)).is_integrity());
        assert!(!ChunkError::NotFound(id).is_integrity());
    }

    #[test]
    fn messages_name_the_operation_and_the_cause() {
        let id = ChunkId::of(b"a");
        let e = ChunkError::io("reading", "/data/chunk", std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(e.to_string(), "chunk store I/O error: reading /data/chunk: permission denied");
        assert!(std::error::Error::source(&e).is_some());
        let e = ChunkError::S3 { op: "PutObject", chunk: Some(id), failure: S3Failure::Status(403), source: "denied".into() };
        assert_eq!(e.to_string(), format!("S3 PutObject {id}: denied"));
        let e = ChunkError::InvalidRange { chunk: id, offset: 10, len: 5, size: Some(12) };
        assert_eq!(e.to_string(), format!("range 10+5 is outside chunk {id} of 12 bytes"));
    }
}
