//! The batch upload format: many small chunks in one signed request body.
//!
//! ```text
//! body  := frame{n}
//! frame := id[32] len[4, big-endian] bytes[len]      1 <= len <= BATCH_CHUNK_MAX
//! ```
//!
//! The frames come in the order of the chunk list the server signed. That list is bound by
//! its [`BatchDigest`]: BLAKE3 of `"sail-batch-v1\n"` followed by each chunk's id and length
//! (u64 little-endian). Everything here is pure (no I/O), shared by the client that builds a
//! body and the server that parses one, and fuzzable.

use chunkstore::ChunkId;

/// Largest chunk sent in a batch; bigger ones get a URL of their own.
pub const BATCH_CHUNK_MAX: u64 = 1 << 20;
/// Most chunks in one batch.
pub const BATCH_MAX_CHUNKS: usize = 2500;
/// Most body bytes in one batch (frame headers included).
pub const BATCH_MAX_BYTES: u64 = 16 << 20;
/// Bytes of a frame header: id and length.
pub const FRAME_HEADER_LEN: usize = 32 + 4;

/// A malformed batch body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame announced a length of zero or over [`BATCH_CHUNK_MAX`].
    #[error("frame {index} has invalid chunk length {len}")]
    BadLength {
        /// Index of the frame.
        index: usize,
        /// The length it announced.
        len: u64,
    },
    /// The body ended inside a frame.
    #[error("body ends inside frame {index}")]
    Truncated {
        /// Index of the unfinished frame.
        index: usize,
    },
}

/// The header of the frame carrying chunk `id` of `len` bytes.
pub fn frame_header(id: &ChunkId, len: u32) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[..32].copy_from_slice(id.as_bytes());
    h[32..].copy_from_slice(&len.to_be_bytes());
    h
}

/// Body length of a batch of chunks with these lengths.
pub fn body_len(lens: impl IntoIterator<Item = u64>) -> u64 {
    lens.into_iter().map(|l| FRAME_HEADER_LEN as u64 + l).sum()
}

/// The digest a batch URL signs, computed incrementally over the chunk list.
#[derive(Clone)]
pub struct BatchDigest {
    hasher: blake3::Hasher,
    count: usize,
}

impl Default for BatchDigest {
    fn default() -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"sail-batch-v1\n");
        Self { hasher, count: 0 }
    }
}

impl BatchDigest {
    /// Adds the next chunk of the list.
    pub fn push(&mut self, id: &ChunkId, len: u64) {
        self.hasher.update(id.as_bytes());
        self.hasher.update(&len.to_le_bytes());
        self.count += 1;
    }

    /// Chunks pushed so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The digest, hex.
    pub fn hex(&self) -> String {
        self.hasher.finalize().to_hex().to_string()
    }

    /// The digest of a whole list.
    pub fn of(chunks: &[(ChunkId, u64)]) -> Self {
        let mut d = Self::default();
        for (id, len) in chunks {
            d.push(id, *len);
        }
        d
    }
}

/// Parses a batch body fed in pieces of any size, holding at most one chunk.
#[derive(Debug, Default)]
pub struct FrameParser {
    header: Vec<u8>,
    current: Option<(ChunkId, usize)>,
    buf: Vec<u8>,
    frames: usize,
}

impl FrameParser {
    /// A parser at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the body; calls `chunk(id, bytes)` for every complete frame, in
    /// order. A frame error, or the first error `chunk` returns, ends parsing.
    pub fn feed<E: From<FrameError>>(
        &mut self,
        mut input: &[u8],
        mut chunk: impl FnMut(ChunkId, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while !input.is_empty() {
            match self.current {
                None => {
                    let take = (FRAME_HEADER_LEN - self.header.len()).min(input.len());
                    self.header.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.header.len() < FRAME_HEADER_LEN {
                        continue;
                    }
                    let mut id = [0u8; 32];
                    id.copy_from_slice(&self.header[..32]);
                    let mut len = [0u8; 4];
                    len.copy_from_slice(&self.header[32..]);
                    let len = u32::from_be_bytes(len) as u64;
                    if len == 0 || len > BATCH_CHUNK_MAX {
                        return Err(FrameError::BadLength { index: self.frames, len }.into());
                    }
                    self.header.clear();
                    self.buf.clear();
                    self.buf.reserve(len as usize);
                    self.current = Some((ChunkId::from_bytes(id), len as usize));
                }
                Some((id, len)) => {
                    let take = (len - self.buf.len()).min(input.len());
                    // A whole frame in the input: hand it over without copying.
                    if self.buf.is_empty() && take == len {
                        chunk(id, &input[..len])?;
                    } else {
                        self.buf.extend_from_slice(&input[..take]);
                        if self.buf.len() == len {
                            chunk(id, &self.buf)?;
                        }
                    }
                    input = &input[take..];
                    if take == len || self.buf.len() == len {
                        self.current = None;
                        self.buf.clear();
                        self.frames += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Complete frames parsed so far.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Checks the body ended between frames.
    pub fn finish(&self) -> Result<usize, FrameError> {
        if self.current.is_some() || !self.header.is_empty() {
            return Err(FrameError::Truncated { index: self.frames });
        }
        Ok(self.frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&frame_header(&ChunkId::of(c), c.len() as u32));
            out.extend_from_slice(c);
        }
        out
    }

    fn parse(body: &[u8], step: usize) -> Result<Vec<(ChunkId, Vec<u8>)>, FrameError> {
        let mut p = FrameParser::new();
        let mut got = Vec::new();
        for piece in body.chunks(step.max(1)) {
            p.feed(piece, |id, b| {
                got.push((id, b.to_vec()));
                Ok::<_, FrameError>(())
            })?;
        }
        p.finish()?;
        Ok(got)
    }

    #[test]
    fn round_trips_in_pieces_of_any_size() {
        let chunks: Vec<Vec<u8>> = (1..20).map(|i| vec![i as u8; i * 37]).collect();
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        let b = body(&refs);
        assert_eq!(b.len() as u64, body_len(chunks.iter().map(|c| c.len() as u64)));
        for step in [1, 7, 36, 37, 1000, b.len()] {
            let got = parse(&b, step).unwrap();
            assert_eq!(got.len(), chunks.len());
            for ((id, bytes), c) in got.iter().zip(&chunks) {
                assert_eq!(*id, ChunkId::of(c));
                assert_eq!(bytes, c);
            }
        }
    }

    #[test]
    fn truncated_and_bad_lengths_are_errors() {
        let b = body(&[b"hello", b"world!"]);
        for cut in [1, 36, 40, b.len() - 1] {
            assert!(matches!(parse(&b[..cut], 3), Err(FrameError::Truncated { .. })), "cut at {cut}");
        }
        let mut zero = frame_header(&ChunkId::of(b""), 0).to_vec();
        zero.extend_from_slice(b"x");
        assert!(matches!(parse(&zero, 5), Err(FrameError::BadLength { len: 0, .. })));
        let huge = frame_header(&ChunkId::of(b""), u32::MAX).to_vec();
        assert!(matches!(parse(&huge, 5), Err(FrameError::BadLength { .. })));
        assert_eq!(parse(&[], 1).unwrap().len(), 0);
    }

    #[test]
    fn digest_binds_ids_lengths_and_order() {
        let a = (ChunkId::of(b"a"), 1);
        let b = (ChunkId::of(b"b"), 1);
        let d = BatchDigest::of(&[a, b]).hex();
        assert_ne!(d, BatchDigest::of(&[b, a]).hex());
        assert_ne!(d, BatchDigest::of(&[a]).hex());
        assert_ne!(d, BatchDigest::of(&[a, (b.0, 2)]).hex());
        assert_eq!(d, BatchDigest::of(&[a, b]).hex());
    }
}
