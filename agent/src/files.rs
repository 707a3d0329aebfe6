//! File transfer: streamed writes that appear atomically (temporary file, fsync, rename) and
//! streamed reads of regular files. Neither holds more than one message in memory.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Bytes per `FileData` message of a read.
pub const READ_PIECE: usize = 1 << 20;

/// Why a file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Bad path or header.
    #[error("{0}")]
    Invalid(String),
    /// Not there.
    #[error("{0}: no such file")]
    NotFound(String),
    /// Exists but is not a regular file, or is too large.
    #[error("{0}")]
    Precondition(String),
    /// The guest's file system failed (full disk, permissions, ...).
    #[error("{path}: {source}")]
    Io {
        /// The path being read or written.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io(path: &Path, source: std::io::Error) -> FileError {
    if source.kind() == std::io::ErrorKind::NotFound {
        return FileError::NotFound(path.display().to_string());
    }
    FileError::Io { path: path.display().to_string(), source }
}

/// Checks that `path` is absolute, normalised (no `.`, `..`, empty components) and not `/`.
pub fn check_path(path: &str) -> Result<PathBuf, FileError> {
    if !path.starts_with('/') {
        return Err(FileError::Invalid(format!("path {path:?} must be absolute")));
    }
    if path.contains('\0') || path.len() > 4096 {
        return Err(FileError::Invalid("path must not contain NUL or exceed 4096 bytes".into()));
    }
    if path == "/" || path[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(FileError::Invalid(format!("path {path:?} must name a file without empty, . or .. components")));
    }
    Ok(PathBuf::from(path))
}

/// A write in progress: data goes to a temporary file beside the target.
pub struct FileWriter {
    target: PathBuf,
    tmp: PathBuf,
    file: std::fs::File,
    expected: u64,
    written: u64,
    done: bool,
}

impl FileWriter {
    /// Creates the temporary file (and, if asked, the parent directories).
    pub fn create(path: &str, mode: u32, expected: u64, make_parents: bool) -> Result<Self, FileError> {
        let target = check_path(path)?;
        let parent = target.parent().unwrap_or(Path::new("/"));
        if make_parents {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        if target.is_dir() {
            return Err(FileError::Precondition(format!("{path} is a directory")));
        }
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = parent.join(format!(".{name}.sail-{:08x}", rand_u32()));
        let mode = if mode == 0 { 0o644 } else { mode & 0o7777 };
        let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(|e| io(&tmp, e))?;
        // The umask must not narrow the mode the caller asked for.
        file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| io(&tmp, e))?;
        Ok(Self { target, tmp, file, expected, written: 0, done: false })
    }

    /// Appends data.
    pub fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        if self.written + data.len() as u64 > self.expected {
            return Err(FileError::Invalid(format!("more data than the announced {} bytes", self.expected)));
        }
        self.file.write_all(data).map_err(|e| io(&self.tmp, e))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Checks the size, makes the bytes durable and renames the file into place.
    pub fn finish(mut self) -> Result<u64, FileError> {
        if self.written != self.expected {
            return Err(FileError::Invalid(format!("got {} bytes, announced {}", self.written, self.expected)));
        }
        self.file.sync_all().map_err(|e| io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.target).map_err(|e| io(&self.target, e))?;
        if let Some(dir) = self.target.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        self.done = true;
        Ok(self.written)
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Opens a regular file for a streamed read; returns it with its size.
pub fn open_for_read(path: &str, max_bytes: u64) -> Result<(std::fs::File, u64), FileError> {
    let p = check_path(path)?;
    let file = std::fs::File::open(&p).map_err(|e| io(&p, e))?;
    let meta = file.metadata().map_err(|e| io(&p, e))?;
    if !meta.is_file() {
        return Err(FileError::Precondition(format!("{path} is not a regular file")));
    }
    if max_bytes > 0 && meta.len() > max_bytes {
        return Err(FileError::Precondition(format!("{path} is {} bytes, over the limit of {max_bytes}", meta.len())));
    }
    Ok((file, meta.len()))
}

/// A name suffix unique among concurrent writers of this agent.
fn rand_u32() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9) ^ nanos
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert!(check_path("relative").is_err());
        assert!(check_path("/").is_err());
        assert!(check_path("/a/../b").is_err());
        assert!(check_path("/a/./b").is_err());
        assert!(check_path("/a\0b").is_err());
        assert!(check_path("/a/b").is_ok());
    }

    #[test]
    fn writes_appear_atomically_with_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("x/y/file");
        let path = target.to_str().unwrap();
        let mut w = FileWriter::create(path, 0o750, 6, true).unwrap();
        w.write(b"abc").unwrap();
        assert!(!target.exists(), "visible before finish");
        w.write(b"def").unwrap();
        assert!(w.write(b"!").is_err(), "more than announced");
        assert_eq!(w.finish().unwrap(), 6);
        assert_eq!(std::fs::read(&target).unwrap(), b"abcdef");
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777, 0o750);
        // A short write leaves nothing behind.
        let mut w = FileWriter::create(path, 0, 10, false).unwrap();
        w.write(b"12").unwrap();
        assert!(w.finish().is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"abcdef");
        assert_eq!(std::fs::read_dir(target.parent().unwrap()).unwrap().count(), 1);
    }
}
