//! Verified reads of part of a chunk. A chunk id is the BLAKE3 root of the whole chunk, so a
//! range cannot be checked against it directly. BLAKE3 is itself a Merkle tree, though: the
//! chaining values (CVs) of the chunk's 1 MiB pieces merge, following BLAKE3's own tree
//! shape, into the root. Given a chunk's piece CVs (32 bytes each, 2 KiB for a 64 MiB chunk),
//! a reader checks once that they merge into the chunk id, then checks any single piece
//! against its CV. That is how a lazy reader serves the first byte of a 64 MiB chunk after
//! fetching 1 MiB instead of 64 MiB, with every byte still verified.
//!
//! CV lists are self-certifying: whoever supplies them, a wrong list fails [`root_from_cvs`].

use blake3::hazmat::{ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root};
use rayon::prelude::*;

use crate::error::ChunkError;
use crate::id::ChunkId;

/// Bytes per piece (a power of two, so pieces are whole BLAKE3 subtrees).
pub const PIECE_SIZE: u64 = 1 << 20;

/// Chunks at least this long get piece CVs (smaller ones are fetched whole).
pub const PIECED_MIN: u64 = 16 << 20;

/// Bytes per CV.
pub const CV_LEN: usize = 32;

/// Pieces in a chunk of `len` bytes.
pub fn piece_count(len: u64) -> usize {
    len.div_ceil(PIECE_SIZE) as usize
}

/// Offset and length of piece `idx` of a chunk of `len` bytes.
pub fn piece_range(len: u64, idx: usize) -> (u64, u64) {
    let start = idx as u64 * PIECE_SIZE;
    (start, PIECE_SIZE.min(len.saturating_sub(start)))
}

fn piece_cv(idx: usize, bytes: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(idx as u64 * PIECE_SIZE);
    h.update(bytes);
    h.finalize_non_root()
}

/// The CVs of every piece of `data`, concatenated (in parallel across pieces).
pub fn piece_cvs(data: &[u8]) -> Vec<u8> {
    let cvs: Vec<ChainingValue> = data.par_chunks(PIECE_SIZE as usize).enumerate().map(|(i, p)| piece_cv(i, p)).collect();
    cvs.concat()
}

/// The chunk id that piece CVs merge into, or None if the list does not fit a chunk of `len`
/// bytes (a chunk of one piece has no CVs: its id is its hash).
pub fn root_from_cvs(len: u64, cvs: &[u8]) -> Option<ChunkId> {
    if len <= PIECE_SIZE || cvs.len() != piece_count(len) * CV_LEN {
        return None;
    }
    let cv = |i: usize| -> ChainingValue {
        let mut out = [0u8; CV_LEN];
        out.copy_from_slice(&cvs[i * CV_LEN..(i + 1) * CV_LEN]);
        out
    };
    // A subtree of `len` bytes starting at piece `first`, split the way BLAKE3 splits it:
    // the left part is the largest power of two below `len`, always a multiple of a piece.
    fn subtree(cv: &dyn Fn(usize) -> ChainingValue, first: usize, len: u64) -> ChainingValue {
        if len <= PIECE_SIZE {
            return cv(first);
        }
        let left = left_subtree_len(len);
        let l = subtree(cv, first, left);
        let r = subtree(cv, first + (left / PIECE_SIZE) as usize, len - left);
        merge_subtrees_non_root(&l, &r, Mode::Hash)
    }
    let left = left_subtree_len(len);
    let l = subtree(&cv, 0, left);
    let r = subtree(&cv, (left / PIECE_SIZE) as usize, len - left);
    Some(ChunkId::from_bytes(*merge_subtrees_root(&l, &r, Mode::Hash).as_bytes()))
}

/// Checks `bytes` as piece `idx` of chunk `chunk` (of `len` bytes) whose CVs are `cvs`
/// (already checked with [`root_from_cvs`]).
pub fn verify_piece(chunk: ChunkId, len: u64, cvs: &[u8], idx: usize, bytes: &[u8]) -> Result<(), ChunkError> {
    let (_, want_len) = piece_range(len, idx);
    let expected = cvs.get(idx * CV_LEN..(idx + 1) * CV_LEN);
    if bytes.len() as u64 != want_len || expected.is_none() || expected != Some(&piece_cv(idx, bytes)[..]) {
        return Err(ChunkError::PieceIntegrity { chunk, piece: idx });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()[3]).collect()
    }

    #[test]
    fn cvs_merge_into_the_chunk_id_for_any_length() {
        for len in [PIECE_SIZE + 1, 2 * PIECE_SIZE, 3 * PIECE_SIZE - 7, 16 * PIECE_SIZE, 37 * PIECE_SIZE + 1000] {
            let d = data(len as usize);
            let cvs = piece_cvs(&d);
            assert_eq!(cvs.len(), piece_count(len) * CV_LEN);
            assert_eq!(root_from_cvs(len, &cvs), Some(ChunkId::of(&d)), "len {len}");
            let id = ChunkId::of(&d);
            for idx in [0, piece_count(len) - 1] {
                let (s, l) = piece_range(len, idx);
                verify_piece(id, len, &cvs, idx, &d[s as usize..(s + l) as usize]).unwrap();
            }
        }
    }

    #[test]
    fn wrong_cvs_or_pieces_are_rejected() {
        let len = 5 * PIECE_SIZE + 3;
        let d = data(len as usize);
        let id = ChunkId::of(&d);
        let mut cvs = piece_cvs(&d);
        let mut piece = d[..PIECE_SIZE as usize].to_vec();
        piece[100] ^= 1;
        assert!(verify_piece(id, len, &cvs, 0, &piece).is_err());
        assert!(verify_piece(id, len, &cvs, 1, &d[..PIECE_SIZE as usize]).is_err(), "right bytes, wrong place");
        assert!(verify_piece(id, len, &cvs, 5, &d[5 * PIECE_SIZE as usize..][..2]).is_err(), "short tail");
        assert_eq!(root_from_cvs(len + PIECE_SIZE, &cvs), None, "piece count must fit the length");
        // A wrong length with the same piece count merges to the same root, but then the last
        // piece cannot verify: its CV covers exactly its real bytes.
        let (s, _) = piece_range(len, 5);
        assert!(verify_piece(id, len - 1, &cvs, 5, &d[s as usize..(len - 1) as usize]).is_err());
        cvs[40] ^= 1;
        assert_ne!(root_from_cvs(len, &cvs), Some(id));
        assert_eq!(root_from_cvs(len, &cvs[..64]), None);
        assert_eq!(root_from_cvs(PIECE_SIZE, &[]), None);
    }
}
