//! Reading large chunks piece by piece. A 64 MiB chunk that is not cached locally is not
//! fetched whole before a reader gets its first byte: when volumed knows the chunk's piece
//! chaining values (registered at upload, see `chunkstore::pieces`), the reader's 1 MiB piece
//! is fetched with an HTTP range request and verified against its CV, and readahead fetches
//! the following pieces. Once every piece of a chunk has been read, they are joined into the
//! whole chunk (already verified: the CVs merge into its id) and written to the disk cache.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use chunkstore::ChunkId;
use chunkstore::pieces::{PIECE_SIZE, PIECED_MIN, piece_count, piece_range, root_from_cvs};
use proto::volume::SignedUrl;
use quick_cache::sync::GuardResult;
use sysutil::clock::now_ms;

use crate::error::{FuseError, Result};
use crate::remote::Remote;

/// A URL is reused until this long before it expires.
const URL_MARGIN_MS: u64 = 30_000;

/// URLs kept (forgotten all at once past this: they are cheap to ask for again).
const MAX_URLS: usize = 4096;

/// The largest first read served by a range request ([`Remote::first_read`]); chunks no
/// larger than this are fetched whole.
const FIRST_READ_MAX: u64 = 1 << 20;

impl Remote {
    /// Copies bytes `[from, from + out.len())` of chunk `id` (`clen` bytes long) into `out`.
    pub fn read_into(&self, id: ChunkId, clen: u64, from: u64, out: &mut [u8]) -> Result<()> {
        if let Some(b) = self.hot.get(&id) {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return copy_out(&b, from, out, id);
        }
        if clen >= PIECED_MIN
            && (!self.cache().is_some_and(|c| c.contains(id)) || self.pieces_held(id, clen, from, from + out.len() as u64))
            && let Some(url) = self.piece_url(id, clen)?
        {
            let mut pos = from;
            let end = from + out.len() as u64;
            while pos < end {
                let idx = (pos / PIECE_SIZE) as usize;
                let piece = self.piece(&url, id, clen, idx)?;
                let (start, _) = piece_range(clen, idx);
                let n = ((start + piece.len() as u64).min(end) - pos) as usize;
                let at = (pos - from) as usize;
                copy_out(&piece, pos - start, &mut out[at..at + n], id)?;
                pos += n as u64;
            }
            return Ok(());
        }
        let b = self.chunk(id)?;
        copy_out(&b, from, out, id)
    }

    /// Bytes `[from, from + len)` of chunk `id` (`clen` bytes long): a slice of the chunk or of
    /// one piece held in memory when the range lies inside it (no copy), else copied together.
    pub fn read_range(self: &Arc<Self>, id: ChunkId, clen: u64, from: u64, len: usize) -> Result<Bytes> {
        let end = from + len as u64;
        let slice = |b: Bytes, at: u64| -> Result<Bytes> {
            let (a, z) = ((from - at) as usize, (end - at) as usize);
            if z > b.len() {
                return Err(FuseError::Protocol(format!("read past the end of chunk {id}")));
            }
            Ok(b.slice(a..z))
        };
        if let Some(b) = self.hot.get(&id) {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return slice(b, 0);
        }
        if clen >= PIECED_MIN {
            let idx = (from / PIECE_SIZE) as usize;
            let (start, n) = piece_range(clen, idx);
            let one_piece = end <= start + n;
            // Pieces still in memory beat a whole-chunk read of the disk cache they filled.
            if one_piece && let Some(p) = self.pieces.get(&(id, idx)) {
                self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
                return slice(p, start);
            }
            if !self.cache().is_some_and(|c| c.contains(id))
                && let Some(url) = self.piece_url(id, clen)?
            {
                if one_piece {
                    return slice(self.piece(&url, id, clen, idx)?, start);
                }
                let mut out = vec![0u8; len];
                self.read_into(id, clen, from, &mut out)?;
                return Ok(Bytes::from(out));
            }
        }
        if let Some(b) = self.first_read(id, clen, from, len)? {
            return Ok(b);
        }
        slice(self.chunk(id)?, 0)
    }

    /// Whether every piece of chunk `id` covering `[from, end)` is in memory.
    fn pieces_held(&self, id: ChunkId, clen: u64, from: u64, end: u64) -> bool {
        let first = (from / PIECE_SIZE) as usize;
        let last = (end.min(clen).div_ceil(PIECE_SIZE) as usize).max(first + 1);
        (first..last).all(|i| self.pieces.contains_key(&(id, i)))
    }

    /// The download URL of a large chunk, if volumed has its piece CVs (and they check out).
    fn piece_url(&self, id: ChunkId, clen: u64) -> Result<Option<SignedUrl>> {
        let Some(url) = self.url(id)? else {
            return Ok(None);
        };
        if url.piece_cvs.is_empty() {
            return Ok(None);
        }
        if root_from_cvs(clen, &url.piece_cvs) != Some(id) {
            tracing::warn!(chunk = %id, "piece CVs from volumed do not match the chunk; reading it whole");
            return Ok(None);
        }
        Ok(Some(url))
    }

    /// Chunk `id`'s download URL: the one learnt earlier while it has time left, else asked
    /// for (None: the answer named no URL for it).
    pub(crate) fn url(&self, id: ChunkId) -> Result<Option<SignedUrl>> {
        if let Some(u) = self.fresh_url(id) {
            return Ok(Some(u));
        }
        self.learn_urls(&[id])?;
        Ok(self.fresh_url(id))
    }

    pub(crate) fn fresh_url(&self, id: ChunkId) -> Option<SignedUrl> {
        self.urls.lock().get(&id).filter(|u| u.expires_unix_ms > now_ms() + URL_MARGIN_MS).cloned()
    }

    /// Asks for the URLs of `ids` in one call and keeps them (readahead learns a window's
    /// URLs at once instead of one round trip per chunk).
    pub(crate) fn learn_urls(&self, ids: &[ChunkId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = self.client.clone();
        let got = self.rt.block_on(c.chunk_urls(self.org(), self.volume(), ids))?;
        let mut urls = self.urls.lock();
        if urls.len() + got.len() > MAX_URLS {
            urls.clear();
        }
        for (id, u) in ids.iter().zip(got) {
            urls.insert(*id, u);
        }
        Ok(())
    }

    /// Forgets a URL the endpoint refused (a gateway that restarted with a new key, a sailbox
    /// restored on another host): the next use asks for a fresh one.
    pub(crate) fn forget_url(&self, id: ChunkId) {
        self.urls.lock().remove(&id);
    }

    /// Runs `f` with chunk `id`'s URL; when the endpoint refuses the URL (403: granted by a
    /// gateway that is gone), once more with a fresh one.
    pub(crate) fn with_url<T>(&self, id: ChunkId, f: impl Fn(SignedUrl) -> Result<T>) -> Result<T> {
        let url = self.url(id)?.ok_or_else(|| FuseError::Protocol(format!("no URL for chunk {id}")))?;
        match f(url) {
            Err(FuseError::Remote(volume_client::ClientError::Refused { status: 403, .. })) => {
                self.forget_url(id);
                let url = self.url(id)?.ok_or_else(|| FuseError::Protocol(format!("no URL for chunk {id}")))?;
                f(url)
            }
            other => other,
        }
    }

    /// A reader's first read of a chunk that is neither in memory nor being fetched, from a
    /// trusted endpoint (the host's gateway): the read's own bytes come with one small range
    /// request while the whole chunk is fetched in the background for the reads that follow.
    /// So a cold reader's first byte waits for its few KiB, not for an 8 MiB chunk to cross
    /// the guest's NIC (~0.3-0.8 s under TCG). None: the chunk is in memory or being fetched
    /// already, or this is not a trusted endpoint.
    fn first_read(self: &Arc<Self>, id: ChunkId, clen: u64, from: u64, len: usize) -> Result<Option<Bytes>> {
        if !self.client.trusts_endpoint() || clen <= FIRST_READ_MAX || len as u64 > FIRST_READ_MAX {
            return Ok(None);
        }
        match self.hot.get_value_or_guard(&id, Some(Duration::ZERO)) {
            // In memory (arrived since the caller looked) or being fetched: the caller's
            // whole-chunk path serves it from memory or waits for the fetch.
            GuardResult::Value(_) | GuardResult::Timeout => return Ok(None),
            // Nobody is fetching it: give the placeholder up and start the whole chunk.
            GuardResult::Guard(guard) => drop(guard),
        }
        // The whole chunk starts after the range arrived: on one vCPU the two transfers would
        // share it, and the reader's first byte would wait for half of the chunk's cost.
        let got = self.with_url(id, |url| Ok(self.rt.block_on(self.client.fetch_trusted_range(&url, id, from, len as u64))?));
        self.prefetch(vec![id]);
        self.counters.first_reads.fetch_add(1, Ordering::Relaxed);
        got.map(Some)
    }

    /// One verified piece (memory, else a range request; concurrent readers share a fetch).
    fn piece(&self, url: &SignedUrl, id: ChunkId, clen: u64, idx: usize) -> Result<Bytes> {
        if let Some(b) = self.pieces.get(&(id, idx)) {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(b);
        }
        self.counters.memory_misses.fetch_add(1, Ordering::Relaxed);
        let guard = match self.pieces.get_value_or_guard(&(id, idx), None) {
            GuardResult::Value(b) => return Ok(b),
            GuardResult::Guard(guard) => Some(guard),
            // No timeout was given, so this does not happen; fetch without sharing if it does.
            GuardResult::Timeout => None,
        };
        let bytes = self.rt.block_on(self.client.fetch_piece(url, id, clen, idx))?;
        self.counters.pieces_fetched.fetch_add(1, Ordering::Relaxed);
        if let Some(guard) = guard {
            // Err only when the placeholder was removed meanwhile: the bytes are still good.
            let _ = guard.insert(bytes.clone());
        }
        self.maybe_assemble(id, clen);
        Ok(bytes)
    }

    /// Writes a chunk whose pieces are all in memory to the disk cache, piece after piece
    /// (never joined into one buffer: that copy cost a cold reader 5% of the machine). The
    /// pieces stay in memory for readers until the piece cache evicts them.
    fn maybe_assemble(&self, id: ChunkId, clen: u64) {
        let n = piece_count(clen);
        if !(0..n).all(|i| self.pieces.contains_key(&(id, i))) {
            return;
        }
        let parts: Vec<Bytes> = (0..n).filter_map(|i| self.pieces.get(&(id, i))).collect();
        if parts.len() != n || parts.iter().map(|p| p.len() as u64).sum::<u64>() != clen {
            return;
        }
        // Every piece was verified against CVs that merge into `id`: the whole is verified.
        self.fill_cache_parts(id, parts);
    }

    /// Fetches the pieces of chunk `id` in `[from, from + len)` in the background, bounded like
    /// chunk readahead. Returns false when the chunk is not read piece by piece (small, or
    /// already in memory or in the disk cache): the caller prefetches it whole.
    pub fn prefetch_pieces(self: &Arc<Self>, id: ChunkId, clen: u64, from: u64, len: u64) -> bool {
        if clen < PIECED_MIN || self.hot.contains_key(&id) || self.cache().is_some_and(|c| c.contains(id)) {
            return false;
        }
        let url = match self.urls.lock().get(&id) {
            Some(u) if u.expires_unix_ms > now_ms() + URL_MARGIN_MS => Some(u.clone()),
            _ => None,
        };
        let Some(url) = url else {
            // Learn the URL (and whether volumed has CVs) off the reader's path, then come back.
            let Ok(permit) = self.piece_prefetch.clone().try_acquire_owned() else {
                return true;
            };
            let this = self.clone();
            self.rt.spawn_blocking(move || {
                let pieced = matches!(this.piece_url(id, clen), Ok(Some(_)));
                drop(permit);
                if pieced {
                    this.prefetch_pieces(id, clen, from, len);
                } else {
                    this.prefetch(vec![id]);
                }
            });
            return true;
        };
        if url.piece_cvs.is_empty() {
            return false;
        }
        let first = (from / PIECE_SIZE) as usize;
        let last = ((from + len).min(clen).div_ceil(PIECE_SIZE) as usize).min(piece_count(clen));
        for idx in first..last {
            if self.piece_present_or_loading(id, idx) {
                continue;
            }
            let Ok(permit) = self.piece_prefetch.clone().try_acquire_owned() else {
                break;
            };
            let (this, url) = (self.clone(), url.clone());
            self.rt.spawn_blocking(move || {
                if this.piece(&url, id, clen, idx).is_ok() {
                    this.counters.prefetched.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
            });
        }
        true
    }
}

impl Remote {
    /// Whether piece `idx` of chunk `id` is in memory or being fetched (readahead skips it).
    fn piece_present_or_loading(&self, id: ChunkId, idx: usize) -> bool {
        if self.pieces.contains_key(&(id, idx)) {
            return true;
        }
        // A zero timeout never waits: a fetch in flight answers Timeout; otherwise this call
        // holds the load, and dropping its guard at once gives it up (nobody waits on it yet).
        match self.pieces.get_value_or_guard(&(id, idx), Some(Duration::ZERO)) {
            GuardResult::Value(_) | GuardResult::Timeout => true,
            GuardResult::Guard(_) => false,
        }
    }
}

fn copy_out(b: &Bytes, from: u64, out: &mut [u8], id: ChunkId) -> Result<()> {
    let from = from as usize;
    let Some(src) = b.get(from..from + out.len()) else {
        return Err(FuseError::Protocol(format!("read past the end of chunk {id}")));
    };
    out.copy_from_slice(src);
    Ok(())
}
