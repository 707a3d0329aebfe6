//! The FUSE side: one flat directory whose entries are the registry's files. Regular reads,
//! writes and shared mappings work on them (QEMU maps guest memory from one, and opens a
//! disk image from another); files are created and removed through the control socket only.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use parking_lot::RwLock;

use crate::chunks::Chunks;
use crate::error::{CowError, Result};
use crate::file::CowFile;
use cowfs::manifest::Manifest;

const ROOT: u64 = 1;
/// Entries and attributes are not cached by the kernel: files are created and removed
/// through the control socket, which the kernel does not see (a cached entry of a removed
/// file would hide the new file of the same name).
const TTL: Duration = Duration::ZERO;

/// The files of a cowfs mount, by name and inode.
pub struct Registry {
    /// Where layer files live.
    pub store: PathBuf,
    /// Chunk access.
    pub chunks: Arc<Chunks>,
    files: RwLock<Files>,
}

#[derive(Default)]
struct Files {
    by_name: BTreeMap<String, u64>,
    by_ino: BTreeMap<u64, (String, Arc<CowFile>)>,
    next_ino: u64,
}

/// Checks a file name: 1..=128 of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(CowError::Invalid(format!("bad file name {name:?}"))) }
}

impl Registry {
    /// An empty registry keeping layers in `store`.
    pub fn new(store: PathBuf, chunks: Arc<Chunks>) -> Self {
        Self { store, chunks, files: RwLock::new(Files { next_ino: ROOT + 1, ..Default::default() }) }
    }

    fn read(&self) -> parking_lot::RwLockReadGuard<'_, Files> {
        self.files.read()
    }

    /// Creates a file over `base`.
    pub fn create(&self, name: &str, base: Manifest) -> Result<Arc<CowFile>> {
        self.create_with(name, base, false)
    }

    /// Creates a file over `base`; a `readonly` one refuses writes (and opens for writing).
    pub fn create_with(&self, name: &str, base: Manifest, readonly: bool) -> Result<Arc<CowFile>> {
        check_name(name)?;
        let mut files = self.files.write();
        if files.by_name.contains_key(name) {
            return Err(CowError::Exists(name.to_owned()));
        }
        let layer = self.store.join(format!("{name}.layer"));
        let _ = std::fs::remove_file(&layer);
        let file = Arc::new(CowFile::create_with(&layer, base, self.chunks.clone(), readonly)?);
        // The layer is only reached through the open descriptor: unlink it now, so nothing
        // is left on disk when the daemon goes away.
        let _ = std::fs::remove_file(&layer);
        let ino = files.next_ino;
        files.next_ino += 1;
        files.by_name.insert(name.to_owned(), ino);
        files.by_ino.insert(ino, (name.to_owned(), file.clone()));
        Ok(file)
    }

    /// Removes a file (open descriptors keep working until closed).
    pub fn remove(&self, name: &str) -> Result<()> {
        let mut files = self.files.write();
        let ino = files.by_name.remove(name).ok_or_else(|| CowError::NotFound(name.to_owned()))?;
        files.by_ino.remove(&ino);
        Ok(())
    }

    /// A file by name.
    pub fn get(&self, name: &str) -> Result<Arc<CowFile>> {
        let files = self.read();
        let ino = files.by_name.get(name).ok_or_else(|| CowError::NotFound(name.to_owned()))?;
        files.by_ino.get(ino).map(|(_, f)| f.clone()).ok_or_else(|| CowError::NotFound(name.to_owned()))
    }

    /// Names of every file.
    pub fn names(&self) -> Vec<String> {
        self.read().by_name.keys().cloned().collect()
    }

    fn by_ino(&self, ino: u64) -> Option<Arc<CowFile>> {
        self.read().by_ino.get(&ino).map(|(_, f)| f.clone())
    }
}

fn attr(ino: u64, kind: FileType, size: u64, perm: u16) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// The filesystem handed to fuser.
pub struct CowFs(pub Arc<Registry>);

const GEN: Generation = Generation(0);

fn errno(e: &CowError) -> Errno {
    Errno::from_i32(e.errno())
}

impl CowFs {
    fn file_attr(&self, ino: u64) -> Option<FileAttr> {
        if ino == ROOT {
            return Some(attr(ROOT, FileType::Directory, 0, 0o755));
        }
        self.0.by_ino(ino).map(|f| attr(ino, FileType::RegularFile, f.size(), if f.is_readonly() { 0o400 } else { 0o600 }))
    }
}

impl Filesystem for CowFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else { return reply.error(Errno::ENOENT) };
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let ino = self.0.read().by_name.get(name).copied();
        match ino.and_then(|i| self.file_attr(i)) {
            Some(a) => reply.entry(&TTL, &a, GEN),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.file_attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(a) = self.file_attr(ino.0) else { return reply.error(Errno::ENOENT) };
        // Sizes are fixed at create (QEMU truncates memory files to the size they already
        // have); anything else is refused rather than silently ignored.
        if let Some(s) = size
            && s != a.size
        {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &a);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let Some(f) = self.0.by_ino(ino.0) else { return reply.error(Errno::ENOENT) };
        if f.is_readonly() && flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // The page cache stays valid: every change goes through this mount.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(f) = self.0.by_ino(ino.0) else { return reply.error(Errno::ENOENT) };
        match f.read(offset, size as usize) {
            Ok(data) => reply.data(&data),
            Err(e) => {
                tracing::error!(ino = ino.0, offset, error = %e, "read failed");
                reply.error(errno(&e))
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self.0.by_ino(ino.0) else { return reply.error(Errno::ENOENT) };
        match f.write(offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => {
                tracing::error!(ino = ino.0, offset, error = %e, "write failed");
                reply.error(errno(&e))
            }
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Writes are applied to the layer when they arrive; the durability of a file is its
        // checkpoint (export), not fsync.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![(ROOT, FileType::Directory, ".".to_owned()), (ROOT, FileType::Directory, "..".to_owned())];
        entries.extend(self.0.read().by_name.iter().map(|(n, i)| (*i, FileType::RegularFile, n.clone())));
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.0.read().by_name.len() as u64;
        reply.statfs(0, 0, 0, files, 0, 4096, 255, 4096);
    }
}
