//! Reading a file's current bytes: ranges written locally come from the overlay file, the
//! rest from the committed chunks (verified, through the caches). `FileView` is a snapshot
//! of what a read needs, taken under the state lock and used without it.

use std::sync::Arc;

use bytes::Bytes;
use chunkstore::ChunkId;
use volume_model::FileData;

use crate::error::{FuseError, Result};
use crate::overlay::Overlay;
use crate::ranges::RangeSet;
use crate::remote::Remote;
use crate::tree::FileState;

/// How far ahead of a sequential reader chunks are fetched, in bytes (at least one chunk).
pub const READAHEAD_BYTES: u64 = 32 << 20;

/// What reading one file needs.
#[derive(Clone, Debug)]
pub struct FileView {
    /// Committed content.
    pub base: Option<Arc<FileData>>,
    /// Current length.
    pub size: u64,
    /// Overlay file and which ranges it holds (None when nothing was written locally).
    pub local: Option<(Overlay, RangeSet)>,
}

impl FileView {
    /// Snapshot of a file's state.
    pub fn of(f: &FileState) -> Self {
        let local = match (&f.overlay, f.local.is_empty()) {
            (Some(o), false) => Some((o.clone(), f.local.clone())),
            _ => None,
        };
        FileView { base: f.base.clone(), size: f.size, local }
    }

    /// Reads up to `len` bytes at `offset` (short only at end of file). When `sequential`,
    /// the chunks after the read are fetched ahead.
    pub fn read(&self, remote: &Arc<Remote>, offset: u64, len: usize, sequential: bool) -> Result<Vec<u8>> {
        let end = self.size.min(offset.saturating_add(len as u64));
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let mut pos = offset;
        while pos < end {
            let (seg_end, from_overlay) = match &self.local {
                Some((_, r)) => match r.containing(pos) {
                    Some((_, e)) => (e.min(end), true),
                    None => (r.next_after(pos).map(|(s, _)| s).unwrap_or(end).min(end), false),
                },
                None => (end, false),
            };
            let buf = &mut out[(pos - offset) as usize..(seg_end - offset) as usize];
            if from_overlay {
                if let Some((overlay, _)) = &self.local {
                    overlay.read_at(buf, pos)?;
                }
            } else {
                self.read_base(remote, pos, buf)?;
            }
            pos = seg_end;
        }
        if sequential {
            self.read_ahead(remote, end);
        }
        Ok(out)
    }

    /// [`FileView::read`] for replies: a range inside one committed chunk, with no local bytes,
    /// is returned as a slice of the chunk (or 1 MiB piece) in memory, without a copy.
    pub fn read_bytes(&self, remote: &Arc<Remote>, offset: u64, len: usize, sequential: bool) -> Result<Bytes> {
        let end = self.size.min(offset.saturating_add(len as u64));
        if offset >= end {
            return Ok(Bytes::new());
        }
        let local = self.local.as_ref().is_some_and(|(_, r)| r.intersects(offset, end));
        if !local
            && let Some(base) = &self.base
            && let Some((idx, start)) = base.locate(offset)
            && let Some(&(id, clen)) = base.chunks.get(idx)
            && end <= start + clen as u64
        {
            let bytes = remote.read_range(id, clen as u64, offset - start, (end - offset) as usize)?;
            if sequential {
                self.read_ahead(remote, end);
            }
            return Ok(bytes);
        }
        self.read(remote, offset, len, sequential).map(Bytes::from)
    }

    /// Fills `buf` from the committed chunks starting at `pos` (zeros past their end).
    fn read_base(&self, remote: &Remote, mut pos: u64, buf: &mut [u8]) -> Result<()> {
        let Some(base) = &self.base else {
            buf.fill(0);
            return Ok(());
        };
        let mut done = 0usize;
        while done < buf.len() {
            let Some((idx, start)) = base.locate(pos) else {
                buf[done..].fill(0);
                return Ok(());
            };
            let (id, clen) = base.chunks[idx];
            let from = pos - start;
            let n = ((clen as u64).saturating_sub(from) as usize).min(buf.len() - done);
            if n == 0 {
                return Err(FuseError::Protocol(format!("chunk {id} is shorter than its entry says")));
            }
            remote.read_into(id, clen as u64, from, &mut buf[done..done + n])?;
            done += n;
            pos += n as u64;
        }
        Ok(())
    }

    /// Starts fetching the committed bytes in `[from, from + READAHEAD_BYTES)`: pieces of
    /// large chunks read piece by piece, whole chunks otherwise.
    fn read_ahead(&self, remote: &Arc<Remote>, from: u64) {
        let Some(base) = &self.base else { return };
        let Some((mut idx, mut start)) = base.locate(from) else {
            return;
        };
        let mut ids: Vec<ChunkId> = Vec::new();
        let mut covered = 0u64;
        while idx < base.chunks.len() && (covered < READAHEAD_BYTES || ids.is_empty()) {
            let (id, len) = base.chunks[idx];
            let len = len as u64;
            let in_chunk = from.max(start) - start;
            let in_overlay = self.local.as_ref().is_some_and(|(_, r)| r.containing(start).is_some_and(|(_, e)| e >= start + len));
            if !in_overlay && !remote.prefetch_pieces(id, len, in_chunk, READAHEAD_BYTES - covered.min(READAHEAD_BYTES)) {
                ids.push(id);
            }
            covered += len - in_chunk;
            start += len;
            idx += 1;
        }
        remote.prefetch(ids);
    }
}

/// A `Read` over a file view, for the streaming chunker at commit.
pub struct ViewReader<'a> {
    view: &'a FileView,
    remote: &'a Arc<Remote>,
    pos: u64,
}

impl<'a> ViewReader<'a> {
    /// Reads `view` from the start.
    pub fn new(view: &'a FileView, remote: &'a Arc<Remote>) -> Self {
        ViewReader { view, remote, pos: 0 }
    }
}

impl std::io::Read for ViewReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min(8 << 20);
        let data = self.view.read(self.remote, self.pos, want, false).map_err(std::io::Error::other)?;
        buf[..data.len()].copy_from_slice(&data);
        self.pos += data.len() as u64;
        Ok(data.len())
    }
}
