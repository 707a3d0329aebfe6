//! The mount point of a daemon, seen from outside it.

use std::path::Path;

/// Detaches a mount whose daemon died (`ENOTCONN`); returns whether it did. The daemon
/// calls it before mounting, and its users before starting a new daemon on the same point.
pub fn clean_dead_mount(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
            // SAFETY: c is NUL-terminated.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) == 0 }
        }
        _ => false,
    }
}
