//! Base images: ext4 root file systems stored as chunks and assembled per host.
//!
//! An image is built once (the `minimal` busybox image in a second, the `debian` image with
//! debootstrap in about a minute), cut into [`IMAGE_CHUNK`] chunks (all-zero chunks are elided), stored
//! in the chunk backend, and described by a manifest (JSON in the state store, and itself
//! stored as a chunk so other hosts can fetch it by id). A sailbox's disk is a cowfs file over
//! the image's chunks ([`ImageStore::disk_manifest`]): nothing is copied, per sailbox or per
//! host; regions load on first read.
//!
//! The image id is derived from the image's definition (builder version, packages, and the
//! hash of every input file), so an unchanged definition is never rebuilt and any change
//! gives a new image.
//!
//! Built images ([`definition`]) are chains of layers on a base: each step runs in a
//! [`sandbox`] on the parent layer's ext4 file system, modified in place, and the result is
//! stored like any image. Chunks are 1 MiB and content-addressed, so a layer stores only the
//! chunks its step changed; the rest are the parent's ([`builder`]).

mod builder;
pub mod context;
pub mod definition;
mod sandbox;

pub use builder::{BuildEvent, BuildReport};

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use chunkstore::{Backend, ChunkId};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{Result, SailboxError};
use crate::guest::GuestKit;
use crate::store::StateStore;

/// Chunk size of image files: small enough that a layer stores little more than what its
/// step wrote (a 1 GiB base is 1,024 chunks), a multiple of cowfs's region.
pub const IMAGE_CHUNK: u64 = 1 << 20;
/// Chunk transfers in flight while storing or assembling an image.
const TRANSFERS: usize = 4;
/// Bump to rebuild every image (changes every id).
const BUILDER_VERSION: u32 = 2;

/// The Debian suite of the `debian` image.
pub const DEBIAN_SUITE: &str = "bookworm";
/// Packages added to the minimal Debian base.
pub const DEBIAN_PACKAGES: &[&str] = &["python3", "ca-certificates", "procps", "iproute2", "netbase", "less"];

/// The description of a stored image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageManifest {
    /// `im-` + 24 hex digits of BLAKE3(definition).
    pub id: String,
    /// The name it was built under ("minimal", "debian").
    pub name: String,
    /// What it was built from (hashed into the id).
    pub definition: String,
    /// Size of the raw image, bytes.
    pub size: u64,
    /// Chunk size, bytes.
    pub chunk_size: u64,
    /// One entry per chunk: the chunk id (hex), or `None` for an all-zero chunk.
    pub chunks: Vec<Option<String>>,
    /// Build time, Unix ms.
    pub created_unix_ms: u64,
    /// The layer this one was built on (built images only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The step that made it from its parent, as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Bytes of new chunks this image stored (the rest it shares).
    #[serde(default)]
    pub stored_bytes: u64,
}

/// An image ready to back disks.
#[derive(Clone, Debug)]
pub struct LocalImage {
    /// The image id.
    pub id: String,
    /// Its manifest.
    pub manifest: ImageManifest,
    /// Its size.
    pub size: u64,
}

/// Progress of an image build or assembly, for the CLI.
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

/// Builds, stores and assembles images.
#[derive(Clone)]
pub struct ImageStore {
    state: StateStore,
    backend: Arc<dyn Backend>,
    dir: PathBuf,
    kit: Option<GuestKit>,
    debian_mirror: String,
    locks: Arc<parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

fn image_id(definition: &str) -> String {
    format!("im-{}", &blake3::hash(definition.as_bytes()).to_hex()[..24])
}

fn file_hash(path: &Path) -> Result<String> {
    let data = std::fs::read(path).map_err(|e| SailboxError::io(format!("reading {}", path.display()), e))?;
    Ok(blake3::hash(&data).to_hex().to_string())
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| SailboxError::ImageBuildStep { what: format!("{what}: cannot run"), source: e.into() })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        return Err(SailboxError::ImageBuild(format!(
            "{what} failed ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )));
    }
    Ok(())
}

impl ImageStore {
    /// An image store keeping assembled images in `dir`.
    pub fn new(state: StateStore, backend: Arc<dyn Backend>, dir: PathBuf, kit: Option<GuestKit>) -> Self {
        let debian_mirror = std::env::var("SAIL_DEBIAN_MIRROR").unwrap_or_else(|_| "http://deb.debian.org/debian".to_owned());
        Self { state, backend, dir, kit, debian_mirror, locks: Arc::default() }
    }

    /// The definition of a named image, or `None` for an unknown name.
    fn definition(&self, name: &str) -> Result<Option<String>> {
        let kit = || {
            self.kit
                .as_ref()
                .ok_or_else(|| SailboxError::Setup("the guest kit is missing: run `bash scripts/setup.sh vm`".into()))
        };
        Ok(match name {
            "minimal" => Some(format!("minimal v{BUILDER_VERSION} busybox={}", file_hash(&kit()?.busybox)?)),
            "debian" => Some(format!(
                "debian v{BUILDER_VERSION} suite={DEBIAN_SUITE} variant=minbase include={}",
                DEBIAN_PACKAGES.join(",")
            )),
            _ => None,
        })
    }

    /// Ids of every image stored.
    pub fn list(&self) -> Result<Vec<String>> {
        self.state.image_ids()
    }

    /// Resolves an image name ("minimal", "debian") or id to an assembled local image,
    /// building and storing it first if it was never built.
    pub async fn ensure(&self, name_or_id: &str, progress: Progress) -> Result<LocalImage> {
        let (id, definition) = if name_or_id.starts_with("im-") {
            (name_or_id.to_owned(), None)
        } else {
            match self.definition(name_or_id)? {
                Some(def) => (image_id(&def), Some(def)),
                None => {
                    return Err(SailboxError::InvalidConfig(format!(
                        "unknown image {name_or_id:?}: use \"debian\", \"minimal\" or an image id"
                    )));
                }
            }
        };
        if let Some(manifest) = self.manifest(&id)? {
            let size = manifest.size;
            return Ok(LocalImage { id, manifest, size });
        }
        let Some(definition) = definition else {
            return Err(SailboxError::InvalidConfig(format!("image {id} is not known on this host")));
        };
        let manifest = self
            .coalesced(&id, self.lock_for(&id), None, async {
                if let Some(manifest) = self.manifest(&id)? {
                    return Ok(manifest);
                }
                progress(&format!("building image {name_or_id} ({id}); this happens once per host"));
                let manifest = self.build(name_or_id, &id, &definition, &progress).await?;
                progress(&format!(
                    "image {id} ready: {} MiB, {} chunks",
                    manifest.size >> 20,
                    manifest.chunks.iter().flatten().count()
                ));
                Ok(manifest)
            })
            .await?;
        let size = manifest.size;
        Ok(LocalImage { id, manifest, size })
    }

    /// Runs `work` while holding the build lock of `id`: one build per image at a time, later
    /// callers wait (and then find the manifest). The lock table holds only builds in progress
    /// (callers choose the ids they ask for, so an entry per id ever asked would grow without
    /// bound).
    ///
    /// A caller that waits for another's build gives up at `deadline` (the build goes on for
    /// the caller running it).
    ///
    /// `lock` comes from [`Self::lock_for`] (taken before, so that [`Self::building`] is true
    /// from then on); this call removes the table's entry when nobody else holds it.
    async fn coalesced<T>(
        &self,
        id: &str,
        lock: Arc<tokio::sync::Mutex<()>>,
        deadline: Option<tokio::time::Instant>,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let result = async {
            let _guard = match deadline {
                Some(at) => tokio::time::timeout_at(at, lock.lock()).await.map_err(|_| SailboxError::ImageStepFailed {
                    step: 0,
                    what: format!("waiting for another build of {id}"),
                    reason: "it did not finish in time".into(),
                    log_tail: String::new(),
                    timed_out: true,
                })?,
                None => lock.lock().await,
            };
            work.await
        }
        .await;
        drop(lock);
        let mut locks = self.locks.lock();
        if locks.get(id).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(id);
        }
        result
    }

    /// The build lock of `id`, entered in the table (pass it to [`Self::coalesced`], which
    /// removes the entry).
    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().entry(id.to_owned()).or_default().clone()
    }

    /// Whether a build of `id` runs now.
    pub fn building(&self, id: &str) -> bool {
        self.locks.lock().contains_key(id)
    }

    /// Builds in progress or waited on (for tests of the lock table's bound).
    pub fn locks_held(&self) -> usize {
        self.locks.lock().len()
    }

    /// A cowfs manifest for a disk of `disk_bytes` over the image: its regions point into
    /// the image's chunks; past the image, zeros. Stored as a chunk; returns its id.
    pub async fn disk_manifest(&self, image: &ImageManifest, disk_bytes: u64) -> Result<String> {
        if image.size > disk_bytes {
            return Err(SailboxError::InvalidConfig(format!(
                "image {} ({} MiB) does not fit a {} MiB disk",
                image.id,
                image.size >> 20,
                disk_bytes >> 20
            )));
        }
        let mut m = cowfs::Manifest::zeros(disk_bytes).map_err(|e| SailboxError::InvalidConfig(e.to_string()))?;
        let region = m.region_size;
        let per_chunk = image.chunk_size / region;
        for (r, slot) in m.regions.iter_mut().enumerate() {
            let start = r as u64 * region;
            if start >= image.size || per_chunk == 0 {
                break;
            }
            let idx = (r as u64 / per_chunk) as usize;
            let Some(Some(hex)) = image.chunks.get(idx) else { continue };
            let chunk = hex
                .parse::<ChunkId>()
                .map_err(|source| SailboxError::BadChunkId { what: format!("image {}", image.id), source })?;
            let offset = start - idx as u64 * image.chunk_size;
            let chunk_len = image.chunk_size.min(image.size - idx as u64 * image.chunk_size);
            let len = region.min(chunk_len.saturating_sub(offset));
            if len > 0 {
                *slot = Some(cowfs::RegionRef { chunk, offset: offset as u32, len: len as u32 });
            }
        }
        let bytes = Bytes::from(m.encode());
        let id = ChunkId::of(&bytes);
        self.backend.put(id, bytes).await?;
        Ok(id.to_hex())
    }

    /// Forgets an image or layer: later builds that need it build it again (its chunks stay
    /// in the store until garbage collection, so that costs the step's time, not storage).
    /// Sailboxes made from it are unaffected: their disks name chunks, not the image.
    pub fn remove(&self, id: &str) -> Result<ImageManifest> {
        let manifest = self.manifest(id)?.ok_or_else(|| SailboxError::ImageNotFound(id.to_owned()))?;
        if self.building(id) {
            return Err(SailboxError::invalid(format!("image {id} is being built")));
        }
        self.state.delete_image(id)?;
        Ok(manifest)
    }

    /// The manifest of a stored image.
    pub fn manifest(&self, id: &str) -> Result<Option<ImageManifest>> {
        let Some(bytes) = self.state.image(id)? else { return Ok(None) };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| SailboxError::CorruptRecord { what: format!("image manifest {id}"), source })
    }

    async fn build(&self, name: &str, id: &str, definition: &str, progress: &Progress) -> Result<ImageManifest> {
        let work = self.dir.join(format!(".build-{id}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(|e| SailboxError::io("creating the build dir", e))?;
        let result = self.build_in(name, id, definition, &work, progress).await;
        let _ = std::fs::remove_dir_all(&work);
        result
    }

    async fn build_in(&self, name: &str, id: &str, definition: &str, work: &Path, progress: &Progress) -> Result<ImageManifest> {
        let root = work.join("root");
        let image = work.join("image.raw");
        let kit = self.kit.clone();
        let mirror = self.debian_mirror.clone();
        let name_owned = name.to_owned();
        let (root2, image2, p2) = (root.clone(), image.clone(), progress.clone());
        tokio::task::spawn_blocking(move || -> Result<()> {
            match name_owned.as_str() {
                "minimal" => {
                    let kit = kit.ok_or_else(|| SailboxError::ImageBuild("guest kit missing".into()))?;
                    minimal_root(&root2, &kit.busybox)?
                }
                _ => {
                    p2(&format!("debootstrap {DEBIAN_SUITE} from {mirror} (a few minutes)"));
                    debian_root(&root2, &mirror)?
                }
            }
            p2("making the ext4 file system");
            make_ext4(&root2, &image2)
        })
        .await
        .map_err(|e| SailboxError::ImageBuildStep { what: "the build task".into(), source: e.into() })??;
        progress("storing the image as chunks");
        self.store_chunks(id, name, definition, &image).await
    }

    /// Cuts a raw image into chunks, stores those the backend lacks, and records the manifest.
    async fn store_chunks(&self, id: &str, name: &str, definition: &str, image: &Path) -> Result<ImageManifest> {
        let (size, chunks, stored_bytes) = self.chunk_file(image).await?;
        let manifest = ImageManifest {
            id: id.to_owned(),
            name: name.to_owned(),
            definition: definition.to_owned(),
            size,
            chunk_size: IMAGE_CHUNK,
            chunks,
            created_unix_ms: sysutil::clock::now_ms(),
            parent: None,
            step: None,
            stored_bytes,
        };
        self.record(&manifest).await?;
        Ok(manifest)
    }

    /// Cuts a file into [`IMAGE_CHUNK`]s and stores those the backend lacks; returns its
    /// size, the chunk list (`None` for all-zero chunks) and the bytes newly stored.
    async fn chunk_file(&self, image: &Path) -> Result<(u64, Vec<Option<String>>, u64)> {
        let file = Arc::new(std::fs::File::open(image).map_err(|e| SailboxError::io("opening the image", e))?);
        let size = file.metadata().map_err(|e| SailboxError::io("stat image", e))?.len();
        let count = size.div_ceil(IMAGE_CHUNK);
        let backend = self.backend.clone();
        let chunks: Vec<Result<(Option<String>, u64)>> = futures::stream::iter(0..count)
            .map(|i| {
                let (file, backend) = (file.clone(), backend.clone());
                async move {
                    let len = IMAGE_CHUNK.min(size - i * IMAGE_CHUNK) as usize;
                    let data = tokio::task::spawn_blocking(move || {
                        // A chunk inside a hole is zeros without reading it (built layers are
                        // mostly holes: the grown tail, blocks a step discarded).
                        if in_hole(&file, i * IMAGE_CHUNK, len as u64) {
                            return Ok(None);
                        }
                        let mut buf = vec![0u8; len];
                        file.read_exact_at(&mut buf, i * IMAGE_CHUNK).map(|_| Some(buf))
                    })
                    .await?
                    .map_err(|e| SailboxError::io("reading the image", e))?;
                    let Some(data) = data.filter(|d| d.iter().any(|&b| b != 0)) else {
                        return Ok((None, 0));
                    };
                    let data = Bytes::from(data);
                    let cid = ChunkId::of(&data);
                    let mut stored = 0;
                    if !backend.exists(cid).await? {
                        stored = data.len() as u64;
                        backend.put(cid, data).await?;
                    }
                    Ok((Some(cid.to_hex()), stored))
                }
            })
            .buffered(TRANSFERS)
            .collect()
            .await;
        let mut list = Vec::with_capacity(chunks.len());
        let mut stored = 0;
        for c in chunks {
            let (cid, n) = c?;
            list.push(cid);
            stored += n;
        }
        Ok((size, list, stored))
    }

    /// Records a manifest: in the state store, and as a chunk so another host can fetch the
    /// image by its id.
    async fn record(&self, manifest: &ImageManifest) -> Result<()> {
        let id = &manifest.id;
        let json = serde_json::to_vec(manifest)
            .map_err(|source| SailboxError::Encode { what: format!("image manifest {id}"), source })?;
        let json = Bytes::from(json);
        self.backend.put(ChunkId::of(&json), json.clone()).await?;
        self.state.put_image(id, &json)
    }

    /// Writes an image's content to `path` (all-zero chunks left as holes), verifying every
    /// chunk against its id.
    async fn assemble(&self, manifest: &ImageManifest, path: &Path) -> Result<()> {
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(path)
                .map_err(|e| SailboxError::io(format!("creating {}", path.display()), e))?,
        );
        file.set_len(manifest.size).map_err(|e| SailboxError::io("sizing the image", e))?;
        let present: Vec<(usize, String)> =
            manifest.chunks.iter().enumerate().filter_map(|(i, c)| c.clone().map(|hex| (i, hex))).collect();
        let results: Vec<Result<()>> = futures::stream::iter(present)
            .map(|(i, hex)| {
                let (file, backend, chunk_size) = (file.clone(), self.backend.clone(), manifest.chunk_size);
                let what = format!("image {}", manifest.id);
                async move {
                    let cid = hex.parse::<ChunkId>().map_err(|source| SailboxError::BadChunkId { what, source })?;
                    let data = backend.get(cid).await?;
                    if ChunkId::of(&data) != cid {
                        return Err(SailboxError::ImageBuild(format!("chunk {hex} of the parent image fails verification")));
                    }
                    tokio::task::spawn_blocking(move || file.write_all_at(&data, i as u64 * chunk_size))
                        .await?
                        .map_err(|e| SailboxError::io("writing the image", e))
                }
            })
            .buffer_unordered(TRANSFERS)
            .collect()
            .await;
        results.into_iter().collect()
    }
}

/// Whether `[offset, offset + len)` of `file` lies entirely in a hole (`SEEK_DATA` finds no
/// data before its end). False when the file system cannot tell.
fn in_hole(file: &std::fs::File, offset: u64, len: u64) -> bool {
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset)) {
        Ok(next) => next >= offset + len,
        // ENXIO: no data at or after `offset`.
        Err(e) => e == rustix::io::Errno::NXIO,
    }
}

/// A busybox root: every applet linked, a root user, and the directories a shell expects.
fn minimal_root(root: &Path, busybox: &Path) -> Result<()> {
    let mk = |p: &str| std::fs::create_dir_all(root.join(p)).map_err(|e| SailboxError::io(format!("mkdir {p}"), e));
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "run", "proc", "sys", "dev", "var/tmp", "home"] {
        mk(d)?;
    }
    std::fs::copy(busybox, root.join("bin/busybox")).map_err(|e| SailboxError::io("copying busybox", e))?;
    std::fs::set_permissions(root.join("bin/busybox"), std::fs::Permissions::from_mode(0o755))
        .map_err(|e| SailboxError::io("chmod busybox", e))?;
    let list = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| SailboxError::ImageBuildStep { what: "busybox --list-full".into(), source: e.into() })?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" || applet.contains("..") {
            continue;
        }
        let depth = applet.matches('/').count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        let _ = std::os::unix::fs::symlink(target, root.join(applet));
    }
    let files = [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hostname", "sailbox\n"),
        ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
        ("etc/os-release", "NAME=\"sail minimal\"\nID=sail-minimal\nPRETTY_NAME=\"sail minimal (busybox)\"\n"),
    ];
    for (p, text) in files {
        std::fs::write(root.join(p), text).map_err(|e| SailboxError::io(format!("writing {p}"), e))?;
    }
    for p in ["tmp", "var/tmp"] {
        std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(0o1777))
            .map_err(|e| SailboxError::io("chmod", e))?;
    }
    Ok(())
}

/// A Debian root from debootstrap (minbase + python3 and friends), with caches dropped.
fn debian_root(root: &Path, mirror: &str) -> Result<()> {
    run(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", DEBIAN_PACKAGES.join(",")))
            .arg(DEBIAN_SUITE)
            .arg(root)
            .arg(mirror),
        "debootstrap",
    )?;
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            for e in entries.flatten() {
                if e.path().is_file() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    std::fs::write(root.join("etc/hostname"), "sailbox\n").map_err(|e| SailboxError::io("hostname", e))?;
    std::fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n::1 localhost\n").map_err(|e| SailboxError::io("hosts", e))?;
    Ok(())
}

/// `mke2fs -d`: an ext4 image holding `root`, sized to its content plus room to grow (the
/// guest grows it to the sailbox's disk at boot).
fn make_ext4(root: &Path, image: &Path) -> Result<()> {
    let used = dir_size(root);
    let size_mib = ((used * 13 / 10) >> 20) + 256;
    let size_mib = size_mib.div_ceil(64) * 64;
    run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-L", "sailroot", "-E", "root_owner=0:0", "-d"])
            .arg(root)
            .arg(image)
            .arg(format!("{size_mib}M")),
        "mke2fs",
    )
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&p) else { continue };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.len().div_ceil(4096) * 4096;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_build_lock_table_holds_only_builds_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateStore::open(dir.path().join("state")).unwrap();
        let backend: Arc<dyn Backend> = Arc::new(chunkstore::LocalBackend::open(dir.path().join("chunks")).unwrap());
        let images = ImageStore::new(state, backend, dir.path().join("images"), None);
        let quiet: Progress = Arc::new(|_: &str| {});
        // Ids a caller makes up: refused, and nothing is kept per id.
        for i in 0..1000 {
            let e = images.ensure(&format!("im-{i:024x}"), quiet.clone()).await.unwrap_err();
            assert!(e.to_string().contains("not known"), "{e}");
        }
        assert_eq!(images.locks_held(), 0);
        // A build that fails (no guest kit here) leaves no entry either.
        assert!(images.ensure("minimal", quiet.clone()).await.is_err());
        assert_eq!(images.locks_held(), 0);
    }
}
