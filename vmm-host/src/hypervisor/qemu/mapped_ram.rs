//! QEMU `mapped-ram` migration files: how a VM whose memory is a private mapping (a fork,
//! mapping its checkpoint's memory copy-on-write) is checkpointed.
//!
//! Such a VM's RAM is not a shared file, so QEMU cannot leave it out of the migration
//! stream (`x-ignore-shared` only skips shared, named files). With the `mapped-ram`
//! capability QEMU writes each RAM page at a fixed offset of the file instead of inline, so
//! the file holds both the device state and a raw image of RAM. This module splits one into
//! the two: [`RamLayout::locate`] finds the guest memory block, [`RamLayout::clean`] punches
//! out the pages QEMU marks as not sent (zero pages; their bytes may be stale from an
//! earlier pass of a live migration), leaving the pages region equal to guest memory, and
//! [`device_state`] keeps everything else, with the block's page bitmap cleared, as a
//! sparse blob. Loaded with `mapped-ram` on a VM whose memory file already holds the image,
//! the cleared bitmap means QEMU reads no page: memory stays the lazily mapped file.
//!
//! File layout (QEMU's `docs/devel/migration/mapped-ram.rst`): the RAM setup section lists
//! each RAM block as `idstr_len:u8 idstr used_length:be64` followed by a header
//! `version:be32 (1) page_size:be64 bitmap_offset:be64 pages_offset:be64`; the bitmap has one
//! bit per page (little-endian words, set = page written at `pages_offset + page * page_size`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The RAM block id of guest memory (the memory backend's id on the QEMU command line).
pub const MEMORY_BLOCK: &str = "mem";
/// The mapped-ram header version this module reads.
const HEADER_VERSION: u32 = 1;
/// How far into the file the block list is searched for (it follows the stream header).
const SEARCH_LIMIT: u64 = 64 << 10;
/// Magic of the sparse device-state blob.
const SPARSE_MAGIC: &[u8; 8] = b"SAILSPR1";
/// Largest file a sparse blob may describe.
const MAX_SPARSE_SIZE: u64 = 1 << 42;

/// What can go wrong reading a mapped-ram file or a sparse blob.
#[derive(Debug, thiserror::Error)]
pub enum MappedRamError {
    /// The file is not a mapped-ram migration of the expected memory block.
    #[error("not a mapped-ram migration file of a {size}-byte block {block:?}: {why}")]
    Format {
        /// Block looked for.
        block: String,
        /// Its expected size.
        size: u64,
        /// What did not match.
        why: String,
    },
    /// A sparse device-state blob is malformed.
    #[error("bad sparse device state: {0}")]
    Sparse(String),
    /// I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, MappedRamError>;

/// Where guest memory lives in a mapped-ram file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamLayout {
    /// Bytes per page.
    pub page_size: u64,
    /// Offset of the page bitmap.
    pub bitmap_offset: u64,
    /// Offset of page 0.
    pub pages_offset: u64,
    /// Size of the block (guest memory) in bytes.
    pub size: u64,
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl RamLayout {
    /// Finds the block `block` of `size` bytes in the migration file at `path`.
    pub fn locate(path: &Path, block: &str, size: u64) -> Result<Self> {
        let bad = |why: String| MappedRamError::Format { block: block.to_owned(), size, why };
        let mut f = File::open(path)?;
        let file_len = f.metadata()?.len();
        let mut head = Vec::new();
        (&mut f).take(SEARCH_LIMIT).read_to_end(&mut head)?;
        if !head.starts_with(b"QEVM") {
            return Err(bad("no QEVM stream header".into()));
        }
        let id = block.as_bytes();
        let id_len = u8::try_from(id.len()).map_err(|_| bad("block id too long".into()))?;
        let mut needle = vec![id_len];
        needle.extend_from_slice(id);
        needle.extend_from_slice(&size.to_be_bytes());
        let at = head
            .windows(needle.len())
            .position(|w| w == needle.as_slice())
            .ok_or_else(|| bad("block not found in the RAM setup section".into()))?;
        let h = head.get(at + needle.len()..at + needle.len() + 28).ok_or_else(|| bad("truncated block header".into()))?;
        let version = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let layout = Self { page_size: be64(&h[4..]), bitmap_offset: be64(&h[12..]), pages_offset: be64(&h[20..]), size };
        if version != HEADER_VERSION {
            return Err(bad(format!("mapped-ram header version {version}")));
        }
        if layout.page_size == 0 || !layout.page_size.is_power_of_two() || !size.is_multiple_of(layout.page_size) {
            return Err(bad(format!("page size {}", layout.page_size)));
        }
        let bitmap_end = layout.bitmap_offset.checked_add(layout.bitmap_len()).ok_or_else(|| bad("bitmap overflows".into()))?;
        let pages_end = layout.pages_offset.checked_add(size).ok_or_else(|| bad("pages overflow".into()))?;
        if bitmap_end > layout.pages_offset || pages_end > file_len {
            return Err(bad(format!(
                "bitmap {}..{bitmap_end} and pages {}..{pages_end} do not fit a {file_len}-byte file",
                layout.bitmap_offset, layout.pages_offset
            )));
        }
        Ok(layout)
    }

    /// Bytes of the page bitmap (whole 64-bit words, as QEMU writes it).
    pub fn bitmap_len(&self) -> u64 {
        (self.size / self.page_size).div_ceil(64) * 8
    }

    /// Punches out every page whose bitmap bit is clear, so the pages region reads as guest
    /// memory (pages QEMU found zero were never written, or hold stale bytes from an earlier
    /// pass). Returns the number of pages written.
    pub fn clean(&self, path: &Path) -> Result<u64> {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        let mut bitmap = vec![0u8; self.bitmap_len() as usize];
        f.read_exact_at(&mut bitmap, self.bitmap_offset)?;
        let pages = self.size / self.page_size;
        let bit = |p: u64| bitmap[(p / 8) as usize] & (1 << (p % 8)) != 0;
        let mut written = 0;
        let mut p = 0;
        while p < pages {
            if bit(p) {
                written += 1;
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && !bit(p) {
                p += 1;
            }
            punch(&f, self.pages_offset + start * self.page_size, (p - start) * self.page_size)?;
        }
        Ok(written)
    }
}

fn punch(f: &File, offset: u64, len: u64) -> Result<()> {
    // The range is inside the file (checked by locate).
    use rustix::fs::FallocateFlags;
    rustix::fs::fallocate(f, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len)
        .map_err(|e| std::io::Error::from(e).into())
}

/// The data extents of a sparse file (SEEK_DATA / SEEK_HOLE).
fn extents(f: &File, len: u64) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < len {
        let data = match rustix::fs::seek(f, rustix::fs::SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(std::io::Error::from(e).into()),
        };
        let hole = rustix::fs::seek(f, rustix::fs::SeekFrom::Hole(data)).map_err(std::io::Error::from)?;
        out.push((data, hole - data));
        at = hole;
    }
    Ok(out)
}

/// The device state of a mapped-ram file: every data extent outside guest memory's pages,
/// with guest memory's page bitmap zeroed, as a sparse blob
/// (`SAILSPR1 size:u64le count:u32le` then per extent `offset:u64le len:u64le bytes`).
pub fn device_state(path: &Path, layout: &RamLayout) -> Result<Vec<u8>> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let (skip_start, skip_end) = (layout.pages_offset, layout.pages_offset + layout.size);
    let mut pieces = Vec::new();
    for (off, n) in extents(&f, len)? {
        let end = off + n;
        for (s, e) in [(off, end.min(skip_start)), (off.max(skip_end), end)] {
            if s < e {
                pieces.push((s, e));
            }
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(SPARSE_MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(pieces.len() as u32).to_le_bytes());
    let (bm_start, bm_end) = (layout.bitmap_offset, layout.bitmap_offset + layout.bitmap_len());
    for (s, e) in pieces {
        let mut buf = vec![0u8; (e - s) as usize];
        f.read_exact_at(&mut buf, s)?;
        // Clear the bitmap: the loading QEMU then reads no page and keeps the mapped file.
        let (zs, ze) = (bm_start.max(s), bm_end.min(e));
        if zs < ze {
            buf[(zs - s) as usize..(ze - s) as usize].fill(0);
        }
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&(e - s).to_le_bytes());
        out.extend_from_slice(&buf);
    }
    Ok(out)
}

/// Whether `blob` is a sparse device-state blob (else a plain migration stream).
pub fn is_sparse(blob: &[u8]) -> bool {
    blob.starts_with(SPARSE_MAGIC)
}

/// Writes a sparse device-state blob back out as the (sparse) migration file it came from.
pub fn write_sparse(blob: &[u8], path: &Path) -> Result<()> {
    let bad = |m: &str| MappedRamError::Sparse(m.to_owned());
    let take = |at: &mut usize, n: usize| -> Result<&[u8]> {
        let s = blob.get(*at..at.checked_add(n).ok_or_else(|| bad("overflow"))?).ok_or_else(|| bad("truncated"))?;
        *at += n;
        Ok(s)
    };
    let mut at = 0;
    if take(&mut at, 8)? != SPARSE_MAGIC {
        return Err(bad("bad magic"));
    }
    let size = le64(take(&mut at, 8)?);
    if size > MAX_SPARSE_SIZE {
        return Err(bad("file too large"));
    }
    let count = u32::from_le_bytes(take(&mut at, 4)?.try_into().map_err(|_| bad("truncated"))?);
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().create_new(true).write(true).open(path)?;
    f.set_len(size)?;
    let mut last_end = 0;
    for _ in 0..count {
        let off = le64(take(&mut at, 8)?);
        let len = le64(take(&mut at, 8)?);
        let end = off.checked_add(len).ok_or_else(|| bad("extent overflows"))?;
        if off < last_end || end > size {
            return Err(bad("extents out of order or past the end"));
        }
        let data = take(&mut at, usize::try_from(len).map_err(|_| bad("extent too large"))?)?;
        f.seek(SeekFrom::Start(off))?;
        std::io::Write::write_all(&mut f, data)?;
        last_end = end;
    }
    if at != blob.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(())
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file laid out like QEMU's: header, block list, bitmap, pages, trailing state.
    fn fake(dir: &Path, size: u64, written: &[(u64, u8)], stale: &[(u64, u8)]) -> std::path::PathBuf {
        let path = dir.join("mig");
        let f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&path).unwrap();
        let (bitmap_offset, pages_offset) = (0x84u64, 0x10_0000u64);
        let mut head = b"QEVM\0\0\0\x03 ram...".to_vec();
        head.push(3);
        head.extend_from_slice(b"mem");
        head.extend_from_slice(&size.to_be_bytes());
        head.extend_from_slice(&1u32.to_be_bytes());
        head.extend_from_slice(&4096u64.to_be_bytes());
        head.extend_from_slice(&bitmap_offset.to_be_bytes());
        head.extend_from_slice(&pages_offset.to_be_bytes());
        f.write_all_at(&head, 0).unwrap();
        let mut bitmap = vec![0u8; ((size / 4096).div_ceil(64) * 8) as usize];
        for &(page, byte) in written {
            bitmap[(page / 8) as usize] |= 1 << (page % 8);
            f.write_all_at(&[byte; 4096], pages_offset + page * 4096).unwrap();
        }
        for &(page, byte) in stale {
            f.write_all_at(&[byte; 4096], pages_offset + page * 4096).unwrap();
        }
        f.write_all_at(&bitmap, bitmap_offset).unwrap();
        f.write_all_at(b"DEVICE-STATE", pages_offset + size + 4096).unwrap();
        path
    }

    #[test]
    fn splits_memory_from_device_state() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 << 20;
        let path = fake(dir.path(), size, &[(0, b'a'), (100, b'b')], &[(7, b'x')]);
        let layout = RamLayout::locate(&path, MEMORY_BLOCK, size).unwrap();
        assert_eq!((layout.bitmap_offset, layout.pages_offset), (0x84, 0x10_0000));
        assert_eq!(layout.clean(&path).unwrap(), 2);
        let f = File::open(&path).unwrap();
        let mut page = vec![0u8; 4096];
        for (p, want) in [(0u64, b'a'), (7, 0), (100, b'b'), (101, 0)] {
            f.read_exact_at(&mut page, layout.pages_offset + p * 4096).unwrap();
            assert!(page.iter().all(|&b| b == want), "page {p}");
        }
        let blob = device_state(&path, &layout).unwrap();
        assert!(is_sparse(&blob));
        assert!(blob.len() < 64 << 10, "memory pages left out: {} bytes", blob.len());
        let out = dir.path().join("restored");
        write_sparse(&blob, &out).unwrap();
        let restored = std::fs::read(&out).unwrap();
        assert_eq!(restored.len() as u64, std::fs::metadata(&path).unwrap().len());
        let bm = layout.bitmap_offset as usize..(layout.bitmap_offset + layout.bitmap_len()) as usize;
        assert!(restored[bm].iter().all(|&b| b == 0), "bitmap cleared");
        assert!(restored[layout.pages_offset as usize..].windows(12).any(|w| w == b"DEVICE-STATE"));
        assert!(restored[layout.pages_offset as usize..(layout.pages_offset + size) as usize].iter().all(|&b| b == 0));
    }

    #[test]
    fn rejects_what_is_not_a_mapped_ram_file() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 << 20;
        let path = fake(dir.path(), size, &[], &[]);
        assert!(matches!(RamLayout::locate(&path, MEMORY_BLOCK, 8 << 20), Err(MappedRamError::Format { .. })));
        assert!(matches!(RamLayout::locate(&path, "other", size), Err(MappedRamError::Format { .. })));
        std::fs::write(&path, b"not a migration").unwrap();
        assert!(matches!(RamLayout::locate(&path, MEMORY_BLOCK, size), Err(MappedRamError::Format { .. })));
        for blob in [&b"SAILSPR1"[..], b"SAILSPR1\x10\0\0\0\0\0\0\0\x01\0\0\0\x08\0\0\0\0\0\0\0\x10\0\0\0\0\0\0\0ab", b"nope"] {
            assert!(write_sparse(blob, &dir.path().join("x")).is_err());
        }
    }
}
