//! A manifest: what a file's bytes are, region by region, in chunks.
//!
//! Binary format, version 1 (all integers little-endian):
//! `b"SCOW" version:u8 size:u64 region_size:u64 count:u32` then per region a tag byte:
//! `0` an all-zero region, or `1` followed by `chunk id (32 bytes) offset:u32 len:u32` (the
//! region's bytes are `chunk[offset..offset+len]`, zero-padded to the region size). A region
//! may point into a larger chunk (a disk made from an image's 8 MiB chunks) or be a chunk of
//! its own (what checkpoints write). A manifest is itself stored as a chunk: its id names it.

use chunkstore::ChunkId;

/// Why a manifest cannot be made or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// A file larger than a manifest may describe.
    #[error("size {size} is over the limit of {max}")]
    TooLarge {
        /// The size asked for.
        size: u64,
        /// [`MAX_SIZE`].
        max: u64,
    },
    /// Encoded bytes that are not a valid manifest (what is wrong with them).
    #[error("manifest: {0}")]
    Malformed(&'static str),
}

type Result<T, E = ManifestError> = std::result::Result<T, E>;

/// Bytes per region of the files this crate makes.
pub const REGION_SIZE: u64 = 256 << 10;

const MAGIC: &[u8; 4] = b"SCOW";
const VERSION: u8 = 1;
/// Largest file a manifest may describe (the region table must stay small).
pub const MAX_SIZE: u64 = 1 << 40;

/// Where a region's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionRef {
    /// The chunk.
    pub chunk: ChunkId,
    /// Start of the region's bytes in the chunk.
    pub offset: u32,
    /// How many bytes (the rest of the region is zero).
    pub len: u32,
}

/// A file's content as regions of chunks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// File size in bytes.
    pub size: u64,
    /// Region size in bytes (a multiple of 4 KiB).
    pub region_size: u64,
    /// One entry per region; `None` is all zeros.
    pub regions: Vec<Option<RegionRef>>,
}

impl Manifest {
    /// An all-zero file of `size` bytes.
    pub fn zeros(size: u64) -> Result<Self> {
        if size > MAX_SIZE {
            return Err(ManifestError::TooLarge { size, max: MAX_SIZE });
        }
        Ok(Self { size, region_size: REGION_SIZE, regions: vec![None; size.div_ceil(REGION_SIZE) as usize] })
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(25 + self.regions.len() * 41);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.region_size.to_le_bytes());
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for r in &self.regions {
            match r {
                None => out.push(0),
                Some(r) => {
                    out.push(1);
                    out.extend_from_slice(r.chunk.as_bytes());
                    out.extend_from_slice(&r.offset.to_le_bytes());
                    out.extend_from_slice(&r.len.to_le_bytes());
                }
            }
        }
        out
    }

    /// Decodes and checks a manifest (sizes, region count, bounds).
    pub fn decode(data: &[u8]) -> Result<Self> {
        let bad = ManifestError::Malformed;
        let mut r = Reader { data, at: 0 };
        if r.take(4).ok_or_else(|| bad("truncated"))? != MAGIC {
            return Err(bad("bad magic"));
        }
        if r.take(1).ok_or_else(|| bad("truncated"))?[0] != VERSION {
            return Err(bad("unknown version"));
        }
        let size = r.u64().ok_or_else(|| bad("truncated"))?;
        let region_size = r.u64().ok_or_else(|| bad("truncated"))?;
        let count = r.u32().ok_or_else(|| bad("truncated"))? as u64;
        if size > MAX_SIZE || region_size == 0 || region_size % 4096 != 0 || region_size > 64 << 20 {
            return Err(bad("size or region size out of range"));
        }
        if count != size.div_ceil(region_size) {
            return Err(bad("region count does not match the size"));
        }
        let mut regions = Vec::with_capacity(count as usize);
        for _ in 0..count {
            match r.take(1).ok_or_else(|| bad("truncated"))?[0] {
                0 => regions.push(None),
                1 => {
                    let chunk = ChunkId::from_bytes(r.array().ok_or_else(|| bad("truncated"))?);
                    let offset = r.u32().ok_or_else(|| bad("truncated"))?;
                    let len = r.u32().ok_or_else(|| bad("truncated"))?;
                    if len as u64 > region_size {
                        return Err(bad("region length over the region size"));
                    }
                    regions.push(Some(RegionRef { chunk, offset, len }));
                }
                _ => return Err(bad("bad region tag")),
            }
        }
        if r.at != data.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self { size, region_size, regions })
    }

    /// Distinct chunks referenced.
    pub fn chunks(&self) -> std::collections::BTreeSet<ChunkId> {
        self.regions.iter().flatten().map(|r| r.chunk).collect()
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.data.get(self.at..end)?;
        self.at = end;
        Some(out)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|b| b.try_into().ok())
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let mut m = Manifest::zeros(3 * REGION_SIZE + 5).unwrap();
        m.regions[1] = Some(RegionRef { chunk: ChunkId::of(b"x"), offset: 7, len: 100 });
        let enc = m.encode();
        assert_eq!(Manifest::decode(&enc).unwrap(), m);
        for cut in [0, 3, 10, enc.len() - 1] {
            assert!(Manifest::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = enc.clone();
        bad.push(0);
        assert!(Manifest::decode(&bad).is_err(), "trailing byte");
        let mut bad = enc.clone();
        bad[25 + 1] = 7;
        assert!(Manifest::decode(&bad).is_err(), "bad tag");
        assert!(Manifest::zeros(MAX_SIZE + 1).is_err());
    }
}
