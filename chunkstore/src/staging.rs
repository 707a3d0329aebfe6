//! Temp files of a directory that several processes open (a chunk directory, the host's
//! chunk cache): whose they are, and which a crash left behind.
//!
//! Why: opening used to delete every temp file found, and a second process opening the same
//! directory (a vmm-host beside `sail up`, a FUSE helper beside the gateway on one host
//! cache, a test's second server, a tool) deleted uploads, batches and cache fills a live
//! process was writing. Now each opened store holds an exclusive `flock` on an owner file
//! `tmp/<token>.owner` for as long as it is open and names every temp entry `<token>-...`;
//! opening removes only entries whose owner file is gone or no longer locked (its process
//! ended, however it ended: the kernel drops the lock with the process). The owner file is
//! locked under another name and then renamed, so no opener ever sees it unlocked.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{ChunkError, Result};

/// An open store's claim on its temp entries (the lock is held while this lives).
pub(crate) struct Owner {
    token: String,
    path: PathBuf,
    _lock: File,
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner").field("token", &self.token).finish()
    }
}

impl Owner {
    /// Makes and locks a fresh owner file in `tmp`.
    pub(crate) fn create(tmp: &Path) -> Result<Self> {
        let token = format!("o{}x{:016x}", std::process::id(), rand::random::<u64>());
        let staging = tmp.join(format!("{token}.owner-new"));
        let path = tmp.join(format!("{token}.owner"));
        let file = File::create(&staging).map_err(|e| ChunkError::io("creating", &staging, e))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| ChunkError::io("locking", &staging, e.into()))?;
        fs::rename(&staging, &path).map_err(|e| ChunkError::io("renaming", &path, e))?;
        Ok(Self { token, path, _lock: file })
    }

    /// The prefix of every temp entry this store makes.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Whether the owner file `path` is held by a live store (its lock cannot be taken).
fn owner_alive(path: &Path) -> bool {
    let Ok(file) = File::open(path) else { return false };
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) {
        Ok(()) => false,
        Err(e) => e == rustix::io::Errno::WOULDBLOCK,
    }
}

/// Removes the entries of `tmp` (files or directories) that no live store owns: those of an
/// owner that is gone, and names of any other form (older versions' temp files).
pub(crate) fn remove_stale(tmp: &Path) -> Result<()> {
    let listing = |e| ChunkError::io("listing", tmp, e);
    for entry in fs::read_dir(tmp).map_err(listing)? {
        let entry = entry.map_err(listing)?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let token = name.split(['-', '.']).next().unwrap_or_default();
        if token.starts_with('o') && owner_alive(&tmp.join(format!("{token}.owner"))) {
            continue;
        }
        // An owner file being made right now (locked, not yet renamed into place).
        let young = || entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a.as_secs() < 60));
        if name.ends_with(".owner-new") && young() {
            continue;
        }
        let is_dir = entry.file_type().map_err(|e| ChunkError::io("reading the type of", &path, e))?.is_dir();
        let removed = if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        if let Err(e) = removed
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "could not remove stale temp file");
        }
    }
    Ok(())
}
