//! Build contexts: the files an `add_local_file` / `add_local_dir` step adds, packed by the
//! client into a deterministic tar whose BLAKE3 enters the layer id.
//!
//! Entries are sorted by path; each keeps its mode, owner and group (numeric); modification
//! times are fixed at 0 so that touching a file without changing it does not change the image
//! id (the content and metadata do). Symlinks and special files are skipped, as the contract
//! says. `ignore` takes gitignore-style patterns (`*.pyc`, `build/`, `!keep.pyc`, `/top`),
//! matched against paths relative to the added directory.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};

use crate::error::{Result, SailboxError};

/// What to add, as a client names it.
#[derive(Clone, Debug)]
pub enum LocalSource {
    /// One file, placed at `remote` (a file path), with `mode` if given.
    File {
        /// The local file.
        local: PathBuf,
        /// Its path in the image.
        remote: String,
        /// Its mode in the image (else the local file's).
        mode: Option<u32>,
    },
    /// A directory's contents, placed under `remote`.
    Dir {
        /// The local directory.
        local: PathBuf,
        /// The directory in the image.
        remote: String,
        /// gitignore-style patterns.
        ignore: Vec<String>,
        /// A file of more patterns (one per line).
        ignore_file: Option<PathBuf>,
    },
}

/// A packed context: a tar in a temporary file, its hash, and where it goes.
#[derive(Debug)]
pub struct PackedContext {
    /// The tar, rewound.
    pub file: File,
    /// Its size.
    pub size: u64,
    /// BLAKE3 (hex) of its bytes.
    pub hash: String,
    /// The directory in the image its entries land under.
    pub remote_dir: String,
    /// Regular files packed.
    pub files: u64,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SailboxError {
    let what = what.into();
    move |e| SailboxError::ImageDefinition(format!("{what}: {e}"))
}

fn header(meta: &std::fs::Metadata, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode & 0o7777);
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    h.set_mtime(0);
    h
}

impl LocalSource {
    /// Packs the source into a tar in a temporary file.
    pub fn pack(&self) -> Result<PackedContext> {
        let tmp = tempfile::tempfile().map_err(io("creating a temporary file"))?;
        let mut builder = tar::Builder::new(HashingWriter { inner: tmp, hasher: blake3::Hasher::new(), size: 0 });
        let mut files = 0u64;
        let remote_dir = match self {
            Self::File { local, remote, mode } => {
                let meta = std::fs::metadata(local).map_err(io(format!("reading {}", local.display())))?;
                if !meta.is_file() {
                    return Err(SailboxError::ImageDefinition(format!("{} is not a regular file", local.display())));
                }
                let (dir, name) = remote
                    .rsplit_once('/')
                    .filter(|(_, n)| !n.is_empty())
                    .ok_or_else(|| SailboxError::ImageDefinition(format!("remote {remote:?} must be an absolute file path")))?;
                let mut h = header(&meta, tar::EntryType::Regular, meta.len(), mode.unwrap_or(meta.mode()));
                let f = File::open(local).map_err(io(format!("opening {}", local.display())))?;
                builder.append_data(&mut h, name, f).map_err(io("packing"))?;
                files += 1;
                if dir.is_empty() { "/".to_owned() } else { dir.to_owned() }
            }
            Self::Dir { local, remote, ignore, ignore_file } => {
                let matcher = matcher(local, ignore, ignore_file.as_deref())?;
                let meta = std::fs::metadata(local).map_err(io(format!("reading {}", local.display())))?;
                if !meta.is_dir() {
                    return Err(SailboxError::ImageDefinition(format!("{} is not a directory", local.display())));
                }
                let mut stack = vec![PathBuf::new()];
                while let Some(rel) = stack.pop() {
                    let dir = local.join(&rel);
                    let mut entries: Vec<_> = std::fs::read_dir(&dir)
                        .map_err(io(format!("listing {}", dir.display())))?
                        .collect::<std::io::Result<_>>()
                        .map_err(io(format!("listing {}", dir.display())))?;
                    entries.sort_by_key(|e| e.file_name());
                    let mut subdirs = Vec::new();
                    for e in entries {
                        let rel_path = rel.join(e.file_name());
                        let meta = e.metadata().map_err(io(format!("reading {}", e.path().display())))?;
                        let is_dir = meta.is_dir();
                        if matcher.matched_path_or_any_parents(&rel_path, is_dir).is_ignore() {
                            continue;
                        }
                        if is_dir {
                            let mut h = header(&meta, tar::EntryType::Directory, 0, meta.mode());
                            builder.append_data(&mut h, &rel_path, std::io::empty()).map_err(io("packing"))?;
                            subdirs.push(rel_path);
                        } else if meta.is_file() {
                            let mut h = header(&meta, tar::EntryType::Regular, meta.len(), meta.mode());
                            let f = File::open(e.path()).map_err(io(format!("opening {}", e.path().display())))?;
                            builder.append_data(&mut h, &rel_path, f).map_err(io("packing"))?;
                            files += 1;
                        }
                        // Symlinks, sockets, fifos and devices are skipped.
                    }
                    // A directory's entries in name order, then its subdirectories' (a
                    // directory's entry always comes before its contents).
                    stack.extend(subdirs.into_iter().rev());
                }
                remote.clone()
            }
        };
        let w = builder.into_inner().map_err(io("finishing the tar"))?;
        let HashingWriter { inner: mut file, hasher, size } = w;
        file.flush().map_err(io("writing"))?;
        file.seek(SeekFrom::Start(0)).map_err(io("rewinding"))?;
        Ok(PackedContext { file, size, hash: hasher.finalize().to_hex().to_string(), remote_dir, files })
    }
}

impl PackedContext {
    /// The tar as `UploadContext` messages of 1 MiB.
    pub fn into_requests(mut self) -> Result<Vec<proto::sailbox::UploadContextRequest>> {
        use std::io::Read;
        let mut data = Vec::with_capacity(self.size as usize);
        self.file.read_to_end(&mut data).map_err(io("reading the packed context"))?;
        Ok(data.chunks(1 << 20).map(|p| proto::sailbox::UploadContextRequest { data: p.to_vec() }).collect())
    }
}

fn matcher(root: &Path, patterns: &[String], file: Option<&Path>) -> Result<Gitignore> {
    let mut b = GitignoreBuilder::new(root);
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(io(format!("reading ignore file {}", f.display())))?;
        for line in text.lines() {
            b.add_line(Some(f.to_path_buf()), line)
                .map_err(|e| SailboxError::ImageDefinition(format!("ignore pattern {line:?}: {e}")))?;
        }
    }
    for p in patterns {
        b.add_line(None, p).map_err(|e| SailboxError::ImageDefinition(format!("ignore pattern {p:?}: {e}")))?;
    }
    b.build().map_err(|e| SailboxError::ImageDefinition(format!("ignore patterns: {e}")))
}

struct HashingWriter {
    inner: File,
    hasher: blake3::Hasher,
    size: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    fn names(p: &mut PackedContext) -> Vec<(String, u32)> {
        let mut data = Vec::new();
        p.file.read_to_end(&mut data).unwrap();
        let mut a = tar::Archive::new(&data[..]);
        a.entries()
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.path().unwrap().display().to_string(), e.header().mode().unwrap()))
            .collect()
    }

    #[test]
    fn a_directory_packs_deterministically_with_ignores_and_no_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("src");
        std::fs::create_dir_all(root.join("pkg/__pycache__")).unwrap();
        std::fs::create_dir_all(root.join("build")).unwrap();
        std::fs::write(root.join("pkg/a.py"), "a").unwrap();
        std::fs::write(root.join("pkg/a.pyc"), "x").unwrap();
        std::fs::write(root.join("pkg/keep.pyc"), "k").unwrap();
        std::fs::write(root.join("pkg/__pycache__/a.cpython.pyc"), "x").unwrap();
        std::fs::write(root.join("build/out"), "x").unwrap();
        std::fs::write(root.join("run.sh"), "#!/bin/sh").unwrap();
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        std::fs::write(d.path().join("ignores"), "# comment\nbuild/\n").unwrap();
        let src = LocalSource::Dir {
            local: root.clone(),
            remote: "/app".into(),
            ignore: vec!["*.pyc".into(), "!keep.pyc".into(), "__pycache__/".into()],
            ignore_file: Some(d.path().join("ignores")),
        };
        let mut p = src.pack().unwrap();
        assert_eq!(p.files, 3);
        assert_eq!(p.remote_dir, "/app");
        assert_eq!(
            names(&mut p),
            [("pkg".into(), 0o755), ("run.sh".into(), 0o750), ("pkg/a.py".into(), 0o644), ("pkg/keep.pyc".into(), 0o644)]
        );
        // Same content, different mtime: same hash. One byte changed: another.
        let h1 = p.hash.clone();
        std::fs::write(root.join("pkg/a.py"), "a").unwrap();
        assert_eq!(src.pack().unwrap().hash, h1);
        std::fs::write(root.join("pkg/a.py"), "b").unwrap();
        assert_ne!(src.pack().unwrap().hash, h1);
    }

    #[test]
    fn a_file_packs_under_its_remote_name_with_its_mode() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cfg"), "x=1").unwrap();
        let mut p = LocalSource::File { local: d.path().join("cfg"), remote: "/etc/app/app.conf".into(), mode: Some(0o600) }
            .pack()
            .unwrap();
        assert_eq!(p.remote_dir, "/etc/app");
        assert_eq!(names(&mut p), [("app.conf".into(), 0o600)]);
        let e = LocalSource::File { local: d.path().join("missing"), remote: "/x".into(), mode: None }.pack().unwrap_err();
        assert!(matches!(e, SailboxError::ImageDefinition(_)), "{e}");
    }
}
