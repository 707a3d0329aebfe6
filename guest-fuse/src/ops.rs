//! Changing operations: create, mkdir, symlink, unlink, rmdir, rename, write, truncate,
//! chmod and utimens. Each updates the inode table and records what commit will need.

use fuser::{Errno, FileAttr, TimeOrNow};
use volume_model::entry::MAX_FILE_SIZE;
use volume_model::path::check_name;

use crate::mount::{MountCore, from_time};
use crate::overlay::{MemUsage, Overlay};
use crate::tree::{FileState, Kind, Node, ROOT, empty_dir, empty_file};
use sysutil::clock::now_ns;

/// Validates a name from the kernel as a volume path component.
pub fn name_of(name: &std::ffi::OsStr) -> Result<&str, Errno> {
    let name = name.to_str().ok_or(Errno::EINVAL)?;
    check_name(name).map_err(|_| if name.len() > 255 { Errno::ENAMETOOLONG } else { Errno::EINVAL })?;
    Ok(name)
}

/// Changes the length of a file, keeping the overlay in step. Bytes from the old end (or
/// the new end, when shrinking) onwards now live in the overlay: zeros until written.
fn resize(core: &MountCore, mem: &MemUsage, f: &mut FileState, new_size: u64) -> Result<(), Errno> {
    overlay_of(core, mem, f)?;
    let overlay = f.overlay.as_mut().ok_or(Errno::EIO)?;
    overlay.spill_if_needed(new_size, &core.data, mem).map_err(io_errno)?;
    overlay.set_len(new_size, mem).map_err(io_errno)?;
    let from = f.size.min(new_size);
    f.local.truncate(from);
    f.local.insert(from, u64::MAX);
    f.changed.insert(from, u64::MAX);
    f.size = new_size;
    Ok(())
}

/// The file's overlay, created on first use.
fn overlay_of(core: &MountCore, mem: &MemUsage, f: &mut FileState) -> Result<Overlay, Errno> {
    if let Some(o) = &f.overlay {
        return Ok(o.clone());
    }
    let o = Overlay::create(&core.data, f.size, mem).map_err(io_errno)?;
    f.overlay = Some(o.clone());
    Ok(o)
}

fn io_errno(e: std::io::Error) -> Errno {
    tracing::warn!(error = %e, "overlay I/O failed");
    e.raw_os_error().map(Errno::from_i32).unwrap_or(Errno::EIO)
}

impl MountCore {
    fn add(&self, parent: u64, name: &str, mode: u32, kind: Kind) -> Result<(u64, FileAttr), Errno> {
        self.ensure_loaded(parent)?;
        let mut st = self.lock();
        if !st.get(parent)?.attached {
            return Err(Errno::ENOENT);
        }
        let ino = st.add_child(parent, name, Node::new_local(parent, name.to_owned(), mode, kind))?;
        let node = st.get_mut(ino)?;
        node.lookups += 1;
        let attr = self.attr(ino, node);
        Ok((ino, attr))
    }

    /// Creates an empty regular file.
    pub fn create_file(&self, parent: u64, name: &str, mode: u32) -> Result<(u64, FileAttr), Errno> {
        self.add(parent, name, mode, empty_file())
    }

    /// Creates a directory.
    pub fn mkdir(&self, parent: u64, name: &str, mode: u32) -> Result<FileAttr, Errno> {
        self.add(parent, name, mode, empty_dir()).map(|(_, a)| a)
    }

    /// Creates a symlink.
    pub fn symlink(&self, parent: u64, name: &str, target: &str) -> Result<FileAttr, Errno> {
        if target.is_empty() || target.len() > volume_model::entry::MAX_SYMLINK_BYTES || target.contains('\0') {
            return Err(Errno::ENAMETOOLONG);
        }
        self.add(parent, name, 0o777, Kind::Symlink(target.to_owned())).map(|(_, a)| a)
    }

    /// Removes a non-directory.
    pub fn unlink(&self, parent: u64, name: &str) -> Result<(), Errno> {
        self.ensure_loaded(parent)?;
        let mut st = self.lock();
        let child = *st.children(parent)?.ok_or(Errno::EIO)?.get(name).ok_or(Errno::ENOENT)?;
        if st.get(child)?.is_dir() {
            return Err(Errno::EISDIR);
        }
        st.detach(child);
        Ok(())
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: u64, name: &str) -> Result<(), Errno> {
        self.ensure_loaded(parent)?;
        let child = {
            let st = self.lock();
            *st.children(parent)?.ok_or(Errno::EIO)?.get(name).ok_or(Errno::ENOENT)?
        };
        self.ensure_loaded(child)?;
        let mut st = self.lock();
        match st.children(child)? {
            Some(c) if c.is_empty() => {}
            Some(_) => return Err(Errno::ENOTEMPTY),
            None => return Err(Errno::EIO),
        }
        if st.children(parent)?.and_then(|c| c.get(name)) != Some(&child) {
            return Err(Errno::ENOENT);
        }
        st.detach(child);
        Ok(())
    }

    /// Renames `parent/name` to `newparent/newname` (POSIX semantics; `noreplace` is
    /// RENAME_NOREPLACE; RENAME_EXCHANGE is refused by the caller).
    pub fn rename(&self, parent: u64, name: &str, newparent: u64, newname: &str, noreplace: bool) -> Result<(), Errno> {
        self.ensure_loaded(parent)?;
        self.ensure_loaded(newparent)?;
        // A directory being replaced must be loaded to know whether it is empty.
        let target = {
            let st = self.lock();
            st.children(newparent)?.ok_or(Errno::EIO)?.get(newname).copied()
        };
        if let Some(t) = target
            && self.lock().get(t)?.is_dir()
        {
            self.ensure_loaded(t)?;
        }
        let mut st = self.lock();
        let src = *st.children(parent)?.ok_or(Errno::EIO)?.get(name).ok_or(Errno::ENOENT)?;
        if !st.get(newparent)?.attached {
            return Err(Errno::ENOENT);
        }
        if st.is_ancestor(src, newparent) {
            return Err(Errno::EINVAL);
        }
        let src_dir = st.get(src)?.is_dir();
        if let Some(dst) = st.children(newparent)?.ok_or(Errno::EIO)?.get(newname).copied() {
            if dst == src {
                return Ok(());
            }
            if noreplace {
                return Err(Errno::EEXIST);
            }
            match (src_dir, &st.get(dst)?.kind) {
                (true, Kind::Dir(d)) => match &d.children {
                    Some(c) if c.is_empty() => {}
                    Some(_) => return Err(Errno::ENOTEMPTY),
                    None => return Err(Errno::EIO),
                },
                (true, _) => return Err(Errno::ENOTDIR),
                (false, Kind::Dir(_)) => return Err(Errno::EISDIR),
                (false, _) => {}
            }
            st.detach(dst);
        }
        st.move_node(src, newparent, newname);
        Ok(())
    }

    /// Writes `data` at `offset` into the file's overlay.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let end = offset.checked_add(data.len() as u64).filter(|e| *e <= MAX_FILE_SIZE).ok_or(Errno::EFBIG)?;
        let overlay = {
            let mut st = self.lock();
            let mem = st.mem.clone();
            let overlay = match &mut st.get_mut(ino)?.kind {
                Kind::File(f) => {
                    overlay_of(self, &mem, f)?;
                    let o = f.overlay.as_mut().ok_or(Errno::EIO)?;
                    o.spill_if_needed(end, &self.data, &mem).map_err(io_errno)?;
                    o.clone()
                }
                Kind::Dir(_) => return Err(Errno::EISDIR),
                Kind::Symlink(_) => return Err(Errno::EINVAL),
            };
            // Counted now: a spill replaced the overlay (see `MountCore::save_state`).
            st.changes += 1;
            overlay
        };
        overlay.write_at(data, offset).map_err(io_errno)?;
        let mut st = self.lock();
        let node = st.get_mut(ino)?;
        if let Kind::File(f) = &mut node.kind {
            if end > f.size {
                let from = f.size;
                f.local.insert(from, u64::MAX);
                f.changed.insert(from, u64::MAX);
                f.size = end;
            }
            f.local.insert(offset, end);
            f.changed.insert(offset, end);
        }
        node.mtime_ns = now_ns();
        node.mode &= !0o6000; // writing clears set-user-id and set-group-id (KILLPRIV_V2)
        node.touch();
        let attached = node.attached;
        if attached {
            st.dirty.insert(ino);
        }
        st.changes += 1;
        Ok(data.len() as u32)
    }

    /// chmod, truncate and utimens (ownership changes are accepted and not stored).
    pub fn setattr(&self, ino: u64, mode: Option<u32>, size: Option<u64>, mtime: Option<TimeOrNow>) -> Result<FileAttr, Errno> {
        let mut st = self.lock();
        let mem = st.mem.clone();
        let node = st.get_mut(ino)?;
        let mut changed = false;
        if let Some(size) = size {
            if size > MAX_FILE_SIZE {
                return Err(Errno::EFBIG);
            }
            match &mut node.kind {
                Kind::File(f) => {
                    if size != f.size {
                        resize(self, &mem, f, size)?;
                    }
                }
                Kind::Dir(_) => return Err(Errno::EISDIR),
                Kind::Symlink(_) => return Err(Errno::EINVAL),
            }
            node.mtime_ns = now_ns();
            changed = true;
        }
        if let Some(mode) = mode {
            node.mode = mode & 0o7777;
            changed = true;
        }
        if let Some(t) = mtime {
            node.mtime_ns = match t {
                TimeOrNow::SpecificTime(t) => from_time(t),
                TimeOrNow::Now => now_ns(),
            };
            changed = true;
        }
        if changed {
            node.touch();
        }
        let attr = self.attr(ino, node);
        if changed && node.attached && ino != ROOT {
            st.dirty.insert(ino);
        }
        if changed {
            st.changes += 1;
        }
        Ok(attr)
    }

    /// Flushes the overlay of `ino` to its data file on disk and saves the dirty state (see
    /// [`crate::persist`]), so the change survives a crash of the helper. Local only: the
    /// durability boundary of a volume is commit.
    pub fn fsync(&self, ino: u64) -> Result<(), Errno> {
        let overlay = match &self.lock().get(ino)?.kind {
            Kind::File(f) => f.overlay.clone(),
            _ => None,
        };
        if let Some(o) = overlay {
            o.sync().map_err(io_errno)?;
        }
        self.save_state(true).map_err(|e| {
            tracing::warn!(error = %e, "saving the overlay state failed");
            Errno::EIO
        })
    }
}
