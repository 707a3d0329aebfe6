//! Cache (being written).
pub struct ChunkCache;
