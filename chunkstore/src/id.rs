//! `ChunkId`: the BLAKE3 hash of a chunk's plain bytes, and the one check every read passes.

use std::fmt;
use std::str::FromStr;

use crate::error::ChunkError;

/// The name of a chunk: BLAKE3 of its uncompressed bytes.
///
/// ```
/// use chunkstore::ChunkId;
/// let id = ChunkId::of(b"hello");
/// assert_eq!(id.to_string().len(), 64);
/// assert_eq!(id.to_string().parse::<ChunkId>().unwrap(), id);
/// assert!(id.verify(b"hello").is_ok());
/// assert!(id.verify(b"hellO").is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    /// Length of an id in bytes.
    pub const LEN: usize = 32;

    /// Hashes `data` and returns its id.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// Wraps raw hash bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses a 32-byte slice (as carried in protobuf `bytes` fields).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ChunkError> {
        let arr: [u8; 32] =
            bytes.try_into().map_err(|_| ChunkError::InvalidId(format!("expected 32 bytes, got {}", bytes.len())))?;
        Ok(Self(arr))
    }

    /// The raw hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Checks that `data` hashes to this id; a mismatch is [`ChunkError::Integrity`].
    pub fn verify(&self, data: &[u8]) -> Result<(), ChunkError> {
        let actual = ChunkId::of(data);
        if actual == *self { Ok(()) } else { Err(ChunkError::Integrity { expected: *self, actual }) }
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl FromStr for ChunkId {
    type Err = ChunkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 64 {
            return Err(ChunkError::InvalidId(format!("expected 64 hex chars, got {}", s.len())));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| ChunkError::InvalidId(e.to_string()))?;
        Ok(Self(out))
    }
}
