//! A 32-byte secret kept in a file (URL-signing and MAC keys): read it if it exists, else
//! write a new one atomically with mode 0600 and fsync it, so a restart keeps the key and the
//! URLs signed with it stay valid.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Why a key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading or writing it failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// "reading" or "writing".
        what: &'static str,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It exists but does not hold exactly 32 bytes.
    #[error("{0} is not a 32-byte key")]
    BadLength(String),
}

/// The key in `path`, or a new one from `make` written there (0600, fsynced, renamed into
/// place) when the file does not exist.
pub fn load_or_create(path: &Path, make: impl FnOnce() -> [u8; 32]) -> Result<[u8; 32], KeyFileError> {
    let shown = || path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => return bytes.as_slice().try_into().map_err(|_| KeyFileError::BadLength(shown())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(KeyFileError::Io { what: "reading", path: shown(), source }),
    }
    let key = make();
    write_private(path, &key).map_err(|source| KeyFileError::Io { what: "writing", path: shown(), source })?;
    Ok(key)
}

/// Replaces `path` with `bytes` atomically: written to a temp file of its own beside it
/// (mode 0600), fsynced, renamed into place; the temp file is removed if any step fails.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("key");
    let tmp = path.with_file_name(format!(".{name}.{:016x}.tmp", rand_u64()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A temp-name suffix: the clock's nanoseconds mixed with the process id (no rand dependency).
fn rand_u64() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn made_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let a = load_or_create(&p, || [7; 32]).unwrap();
        let b = load_or_create(&p, || [9; 32]).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&p, b"short").unwrap();
        assert!(matches!(load_or_create(&p, || [1; 32]), Err(KeyFileError::BadLength(_))));
    }
}
