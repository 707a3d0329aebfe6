//! `MountCore`: the state one mount shares between its FUSE worker threads and its control
//! socket: the inode table, the remote, the overlay directory, the open handles and the
//! passthrough state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo, Notifier};
use parking_lot::{Mutex, MutexGuard};

use crate::error::FuseError;
use crate::file_io::FileView;
use crate::overlay::{DataDir, Overlay};
use crate::passthrough::{OpenMode, OpenRequest, PASSTHROUGH_MIN_BYTES, Passthrough};
use crate::persist::Persist;
use crate::remote::Remote;
use crate::tree::{Kind, Node, ROOT, State};

/// How long the kernel may cache entries and attributes. Every change to this view goes
/// through this process, and a reload invalidates what the kernel cached, so it can be long.
pub const TTL: Duration = Duration::from_secs(60);

/// The extended attribute on the mount root that holds the control socket's path.
pub const CONTROL_XATTR: &str = "user.sail.control";

/// An open file or directory.
#[derive(Debug)]
pub struct Handle {
    /// The inode.
    pub ino: u64,
    /// End of the previous read, to detect sequential reading.
    pub next_read: AtomicU64,
    /// Directory listing taken at opendir: (ino, type, name).
    pub listing: Option<Vec<(u64, FileType, String)>>,
    /// Opened through passthrough (holds a reference on its inode's backing file).
    pub passthrough: bool,
}

/// The shared core of one mount.
pub struct MountCore {
    /// Inode table and pending changes.
    pub state: Mutex<State>,
    /// volumed and the chunk caches.
    pub remote: Arc<Remote>,
    /// The overlay directory (its free space is what statfs reports; assembled passthrough
    /// copies are anonymous files there).
    pub overlay_dir: PathBuf,
    /// Overlay data files (`<overlay dir>/dirty/data`).
    pub data: Arc<DataDir>,
    /// The dirty state on disk (see [`crate::persist`]).
    pub persist: Persist,
    /// The control socket's path (reported through [`CONTROL_XATTR`]).
    pub control_socket: PathBuf,
    /// The mount point.
    pub mountpoint: PathBuf,
    /// volumed endpoint (for status).
    pub endpoint: String,
    /// Open handles.
    pub handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    /// Serialises commit and reload.
    pub sync_lock: Mutex<()>,
    /// Kernel cache invalidation (set once the session exists).
    pub notifier: OnceLock<Notifier>,
    /// FUSE passthrough: assembled files and the inodes reading from them.
    pub passthrough: Arc<Passthrough>,
    uid: u32,
    gid: u32,
}

impl MountCore {
    /// A core over `state`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: State,
        remote: Arc<Remote>,
        overlay_dir: PathBuf,
        data: Arc<DataDir>,
        persist: Persist,
        control_socket: PathBuf,
        mountpoint: PathBuf,
        endpoint: String,
        passthrough: Passthrough,
    ) -> Self {
        let (uid, gid) = (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw());
        MountCore {
            state: Mutex::new(state),
            remote,
            overlay_dir,
            data,
            persist,
            control_socket,
            mountpoint,
            endpoint,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            sync_lock: Mutex::new(()),
            notifier: OnceLock::new(),
            passthrough: Arc::new(passthrough),
            uid,
            gid,
        }
    }

    /// Locks the state (parking_lot: a panic elsewhere does not poison the mount).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Attributes of a node.
    pub fn attr(&self, ino: u64, n: &Node) -> FileAttr {
        let (kind, size, nlink) = match &n.kind {
            Kind::Dir(d) => (FileType::Directory, d.children.as_ref().map_or(0, |c| c.len() as u64), 2),
            Kind::File(f) => (FileType::RegularFile, f.size, 1),
            Kind::Symlink(t) => (FileType::Symlink, t.len() as u64, 1),
        };
        let mtime = to_time(n.mtime_ns);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: to_time(n.ctime_ns),
            crtime: mtime,
            kind,
            perm: (n.mode & 0o7777) as u16,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 128 << 10,
            flags: 0,
        }
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let st = self.lock();
        Ok(self.attr(ino, st.get(ino)?))
    }

    /// Makes sure directory `ino`'s children are loaded (fetching its tree node unlocked).
    pub fn ensure_loaded(&self, ino: u64) -> Result<(), Errno> {
        let tree = {
            let st = self.lock();
            match &st.get(ino)?.kind {
                Kind::Dir(d) if d.children.is_some() => return Ok(()),
                Kind::Dir(d) => d.tree.ok_or(Errno::EIO)?,
                _ => return Err(Errno::ENOTDIR),
            }
        };
        let entries = self.remote.tree(&tree).map_err(|e| log_err("load directory", e))?;
        self.lock().install_children(ino, tree, entries);
        Ok(())
    }

    /// Looks `name` up in `parent`, counting a kernel reference.
    pub fn lookup(&self, parent: u64, name: &str) -> Result<FileAttr, Errno> {
        self.ensure_loaded(parent)?;
        let mut st = self.lock();
        let child = *st.children(parent)?.ok_or(Errno::EIO)?.get(name).ok_or(Errno::ENOENT)?;
        let node = st.get_mut(child)?;
        node.lookups += 1;
        let node = st.get(child)?;
        Ok(self.attr(child, node))
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut st = self.lock();
        if let Some(node) = st.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        st.maybe_drop(ino);
    }

    /// Registers an open handle.
    pub fn open_handle(&self, ino: u64, listing: Option<Vec<(u64, FileType, String)>>) -> Result<u64, Errno> {
        self.lock().get_mut(ino)?.opens += 1;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(Handle { ino, next_read: AtomicU64::new(0), listing, passthrough: false });
        self.handles.lock().insert(fh, h);
        Ok(fh)
    }

    /// Opens regular file `ino` with open(2) `flags`: decides whether the kernel reads it
    /// through passthrough (see [`crate::passthrough`]) and registers the handle. `register`
    /// hands a backing file to the kernel. A plain read-only open of a clean, fully cached
    /// file starts assembling it, so that later opens can use passthrough.
    pub fn open_file(
        &self,
        ino: u64,
        flags: i32,
        register: &dyn Fn(&std::fs::File) -> std::io::Result<fuser::BackingId>,
    ) -> Result<(u64, OpenMode), Errno> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let read_only = !writable && flags & (libc::O_TRUNC | libc::O_DIRECT) == 0;
        let (fh, mode, assemble) = {
            let mut st = self.lock();
            let node = st.get_mut(ino)?;
            let clean = match &node.kind {
                Kind::File(f) if f.overlay.is_none() && f.size >= PASSTHROUGH_MIN_BYTES => f.base.clone(),
                _ => None,
            };
            let req = OpenRequest { ino, read_only, writable, clean: clean.as_ref(), open_handles: node.opens };
            let mode = self.passthrough.choose(req, register);
            node.opens += 1;
            let passthrough = !matches!(mode, OpenMode::Plain);
            let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
            let h = Arc::new(Handle { ino, next_read: AtomicU64::new(0), listing: None, passthrough });
            self.handles.lock().insert(fh, h);
            let assemble = if passthrough || !read_only { None } else { clean };
            (fh, mode, assemble)
        };
        if let Some(data) = assemble {
            self.passthrough.maybe_assemble(&self.remote, data);
        }
        Ok((fh, mode))
    }

    /// The handle `fh`.
    pub fn handle(&self, fh: u64) -> Result<Arc<Handle>, Errno> {
        self.handles.lock().get(&fh).cloned().ok_or(Errno::EBADF)
    }

    /// Closes `fh`. The last passthrough handle of an inode releases its backing file; the
    /// last plain handle of a clean file starts assembling it if all its chunks are cached.
    pub fn release(&self, fh: u64) {
        let h = self.handles.lock().remove(&fh);
        let Some(h) = h else { return };
        let mut assemble = None;
        let mut invalidate = false;
        let mut unsaved = None;
        {
            let mut st = self.lock();
            if h.passthrough {
                invalidate = self.passthrough.release(h.ino);
            }
            if let Some(n) = st.nodes.get_mut(&h.ino) {
                n.opens = n.opens.saturating_sub(1);
                if let Kind::File(f) = &n.kind
                    && n.attached
                    && let Some(Overlay::Mem(m)) = &f.overlay
                    && m.unsaved()
                {
                    unsaved = Some(m.clone());
                }
                if let Kind::File(f) = &n.kind
                    && !h.passthrough
                    && n.opens == 0
                    && f.overlay.is_none()
                    && f.size >= PASSTHROUGH_MIN_BYTES
                {
                    assemble = f.base.clone();
                }
            }
            st.maybe_drop(h.ino);
        }
        // A closed file's bytes reach its data file (not flushed to the disk): a crash of
        // the helper from now on keeps them.
        if let Some(m) = unsaved
            && let Err(e) = m.save(false, false)
        {
            tracing::warn!(ino = h.ino, error = %e, "saving an overlay failed");
        }
        if let Some(data) = assemble {
            self.passthrough.maybe_assemble(&self.remote, data);
        }
        if invalidate && let Some(n) = self.notifier.get().cloned() {
            // Pages a direct-I/O handle may have left behind (splice reads fill the page
            // cache); dropped off this thread, which may be needed to serve a locked page.
            let ino = h.ino;
            self.remote.rt.spawn_blocking(move || {
                let _ = n.inval_inode(INodeNo(ino), 0, 0);
            });
        }
    }

    /// A directory listing for opendir.
    pub fn listing(&self, ino: u64) -> Result<Vec<(u64, FileType, String)>, Errno> {
        self.ensure_loaded(ino)?;
        let st = self.lock();
        let node = st.get(ino)?;
        let children = st.children(ino)?.ok_or(Errno::EIO)?;
        let mut out = Vec::with_capacity(children.len() + 2);
        out.push((ino, FileType::Directory, ".".to_owned()));
        out.push((node.parent, FileType::Directory, "..".to_owned()));
        for (name, &child) in children {
            let kind = match st.nodes.get(&child).map(|n| &n.kind) {
                Some(Kind::Dir(_)) => FileType::Directory,
                Some(Kind::Symlink(_)) => FileType::Symlink,
                _ => FileType::RegularFile,
            };
            out.push((child, kind, name.clone()));
        }
        Ok(out)
    }

    /// Reads from an open file (without copying when the range lies in one chunk in memory).
    pub fn read(&self, fh: u64, ino: u64, offset: u64, size: u32) -> Result<bytes::Bytes, Errno> {
        let view = {
            let st = self.lock();
            match &st.get(ino)?.kind {
                Kind::File(f) => FileView::of(f),
                Kind::Dir(_) => return Err(Errno::EISDIR),
                Kind::Symlink(_) => return Err(Errno::EINVAL),
            }
        };
        let sequential = match self.handle(fh) {
            Ok(h) => {
                let prev = h.next_read.swap(offset + size as u64, Ordering::Relaxed);
                prev == offset
            }
            Err(_) => false,
        };
        view.read_bytes(&self.remote, offset, size as usize, sequential).map_err(|e| log_err("read", e))
    }

    /// The symlink target of `ino`.
    pub fn readlink(&self, ino: u64) -> Result<String, Errno> {
        match &self.lock().get(ino)?.kind {
            Kind::Symlink(t) => Ok(t.clone()),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The root's inode number, for readability at call sites.
    pub fn root(&self) -> u64 {
        ROOT
    }
}

/// Logs an error and turns it into the errno a FUSE reply carries.
pub fn log_err(what: &str, e: FuseError) -> Errno {
    tracing::warn!(error = %e, "{what} failed");
    e.errno()
}

/// ns since the epoch to `SystemTime` (clamped before the epoch).
pub fn to_time(ns: i64) -> SystemTime {
    if ns >= 0 { UNIX_EPOCH + Duration::from_nanos(ns as u64) } else { UNIX_EPOCH }
}

/// `SystemTime` to ns since the epoch.
pub fn from_time(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(_) => 0,
    }
}
