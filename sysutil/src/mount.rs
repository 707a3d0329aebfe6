//! Unmounting. A FUSE daemon that dies leaves its mount point answering every access with
//! ENOTCONN ("transport endpoint is not connected") until it is unmounted; both daemons
//! (the volume helper and cowfs) clean such a mount before mounting over it again.

use std::io;
use std::path::Path;

use rustix::mount::{UnmountFlags, unmount};

/// `umount -l`: detaches the mount now; the kernel finishes when its last user leaves.
pub fn lazy_unmount(path: &Path) -> io::Result<()> {
    unmount(path, UnmountFlags::DETACH).map_err(io::Error::from)
}

/// Detaches the mount at `path` if its daemon died (the path fails with ENOTCONN); returns
/// whether it did. Anything else at `path` (nothing, a directory, a live mount) is left alone.
///
/// `statfs` is asked as well as `stat`: the kernel may answer a stat of a dead FUSE root from
/// its cached attributes, while statfs always goes to the (gone) daemon.
pub fn clean_dead_mount(path: &Path) -> bool {
    let notconn = rustix::io::Errno::NOTCONN;
    let stat_dead = matches!(std::fs::metadata(path), Err(e) if e.raw_os_error() == Some(notconn.raw_os_error()));
    let dead = stat_dead || rustix::fs::statfs(path).err() == Some(notconn);
    dead && lazy_unmount(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_plain_paths_alone() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!clean_dead_mount(dir.path()));
        assert!(!clean_dead_mount(&dir.path().join("missing")));
        // Not a mount point: the kernel refuses (EINVAL), and the error comes back.
        assert!(lazy_unmount(dir.path()).is_err());
    }
}
