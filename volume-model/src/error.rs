//! The one error of the model: a value or request that breaks its rules.

/// A malformed argument: a bad name, path, id, entry or limit. The reason names what is wrong
/// and is meant for the caller (volumed sends it back as the message of an invalid-argument
/// status); there is no underlying error to keep, the input itself is the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct InvalidRequest {
    reason: String,
}

impl InvalidRequest {
    /// An invalid request, for `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        Self { reason: reason.into() }
    }

    /// Why the input was rejected.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// A malformed chunk id (the only error [`chunkstore::ChunkId`] parsing returns) is an
/// invalid argument; its text is kept as the reason.
impl From<chunkstore::ChunkError> for InvalidRequest {
    fn from(e: chunkstore::ChunkError) -> Self {
        match e {
            chunkstore::ChunkError::InvalidId(m) => Self::new(m),
            other => Self::new(other.to_string()),
        }
    }
}
