//! Building a definition: layers cached by id, steps run in the sandbox on the parent
//! layer's file system, each result stored as chunks.
//!
//! A build finds the longest prefix of its layers that exists (a layer's id covers its
//! parent's, so an existing layer k means 1..k exist too, unless one was deleted: the scan
//! goes from the end), assembles that layer's image file once, then for each remaining step:
//! grows the file system when less than [`MIN_FREE`] is free, runs the step in the
//! [`super::sandbox`], cuts the file into chunks (only chunks the backend lacks are stored:
//! what the step changed) and records the layer. The working file is deleted at the end;
//! layers live only as chunks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use super::definition::{ImageDefinition, Step};
use super::{ImageManifest, ImageStore, LocalImage, Progress, sandbox};
use crate::error::{Result, SailboxError};

/// Free space a step starts with, at least (the file system is grown before it otherwise).
pub const MIN_FREE: u64 = 1 << 30;
/// How much the file system grows by when it must.
const GROW_BY: u64 = 2 << 30;
/// Largest build context accepted.
pub const MAX_CONTEXT_BYTES: u64 = 4 << 30;

/// What a build reports as it goes.
#[derive(Clone, Debug)]
pub enum BuildEvent {
    /// A line of a step's output, or a message of the builder.
    Log(String),
    /// The build starts; it makes image `id`.
    Planned {
        /// The image id the definition names.
        id: String,
    },
    /// Step `step` of `steps` starts (`cached`: its layer exists, nothing runs).
    Step {
        /// 1-based.
        step: usize,
        /// Steps in the definition.
        steps: usize,
        /// The layer it makes.
        id: String,
        /// The step, described.
        what: String,
        /// Its layer exists.
        cached: bool,
    },
    /// A step's layer is stored.
    Layer {
        /// 1-based.
        step: usize,
        /// The layer's id.
        id: String,
        /// Its size.
        size: u64,
        /// Bytes of chunks it added to the store.
        stored_bytes: u64,
        /// How long the step ran, ms.
        run_ms: u64,
    },
}

/// Receives [`BuildEvent`]s.
pub type BuildReport = Arc<dyn Fn(BuildEvent) + Send + Sync>;

fn err_io(what: &str) -> impl FnOnce(std::io::Error) -> SailboxError + '_ {
    move |e| SailboxError::io(what.to_owned(), e)
}

impl ImageStore {
    fn contexts_dir(&self) -> PathBuf {
        self.dir.join("contexts")
    }

    /// Where the context with BLAKE3 `hash` is kept.
    fn context_path(&self, hash: &str) -> PathBuf {
        self.contexts_dir().join(format!("{hash}.tar"))
    }

    /// Stores an uploaded build context from `parts` (at most [`MAX_CONTEXT_BYTES`]);
    /// returns its BLAKE3 (hex) and size.
    pub async fn put_context<S, E>(&self, mut parts: S) -> Result<(String, u64)>
    where
        S: futures::Stream<Item = std::result::Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        use futures::StreamExt;
        let dir = self.contexts_dir();
        tokio::fs::create_dir_all(&dir).await.map_err(err_io("creating the contexts directory"))?;
        let tmp = dir.join(format!(".upload-{:016x}", rand::random::<u64>()));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(err_io("creating a context file"))?;
            let mut hasher = blake3::Hasher::new();
            let mut size = 0u64;
            while let Some(part) = parts.next().await {
                let part = part.map_err(|e| SailboxError::invalid(format!("receiving the context: {e}")))?;
                size += part.len() as u64;
                if size > MAX_CONTEXT_BYTES {
                    return Err(SailboxError::ImageDefinition(format!(
                        "the build context is larger than {} GiB",
                        MAX_CONTEXT_BYTES >> 30
                    )));
                }
                hasher.update(&part);
                file.write_all(&part).await.map_err(err_io("writing a context file"))?;
            }
            let hash = hasher.finalize().to_hex().to_string();
            let path = self.context_path(&hash);
            if path.is_file() {
                // Uploaded before (every build uploads its contexts): nothing to keep, and no
                // fsync on the path of an unchanged rebuild.
                drop(file);
                let _ = tokio::fs::remove_file(&tmp).await;
                return Ok((hash, size));
            }
            // Durable before it gets its name: a name always holds its whole content.
            file.sync_all().await.map_err(err_io("syncing a context file"))?;
            tokio::fs::rename(&tmp, path).await.map_err(err_io("storing a context"))?;
            Ok((hash, size))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    /// Whether the context with BLAKE3 `hash` is stored.
    pub fn has_context(&self, hash: &str) -> bool {
        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) && self.context_path(hash).is_file()
    }

    /// Builds `def` (or finds it built) within `timeout`, reporting as it goes.
    pub async fn build_definition(&self, def: &ImageDefinition, timeout: Duration, report: BuildReport) -> Result<LocalImage> {
        let started = Instant::now();
        let deadline = started + timeout;
        let base_name = def.validate()?;
        let progress: Progress = {
            let report = report.clone();
            Arc::new(move |m: &str| report(BuildEvent::Log(m.to_owned())))
        };
        let base = tokio::time::timeout(timeout, self.ensure(base_name, progress)).await.map_err(|_| {
            SailboxError::ImageStepFailed {
                step: 0,
                what: format!("base {}", def.base),
                reason: format!("not built within {} s", timeout.as_secs()),
                log_tail: String::new(),
                timed_out: true,
            }
        })??;
        let ids = def.layer_ids(&base.id);
        let Some(final_id) = ids.last().cloned() else { return Ok(base) };
        if let Some(manifest) = self.manifest(&final_id)? {
            report(BuildEvent::Planned { id: final_id.clone() });
            for (i, (step, id)) in def.steps.iter().zip(&ids).enumerate() {
                report(BuildEvent::Step { step: i + 1, steps: ids.len(), id: id.clone(), what: step.describe(), cached: true });
            }
            let size = manifest.size;
            return Ok(LocalImage { id: final_id, manifest, size });
        }
        // Every context must be here before anything runs.
        for step in &def.steps {
            if let Step::AddFiles { context, .. } = step
                && !self.has_context(context)
            {
                return Err(SailboxError::ImageDefinition(format!(
                    "build context {context} was not uploaded (UploadContext first)"
                )));
            }
        }
        // Entered in the build table before the id is announced: a caller polling GetImage
        // with it sees `building` from the start.
        let lock = self.lock_for(&final_id);
        report(BuildEvent::Planned { id: final_id.clone() });
        let manifest = self
            .coalesced(&final_id, lock, Some(deadline.into()), async {
                if let Some(m) = self.manifest(&final_id)? {
                    return Ok(m);
                }
                let work = self.dir.join(format!(".build-{final_id}"));
                let _ = std::fs::remove_dir_all(&work);
                std::fs::create_dir_all(&work).map_err(err_io("creating the build directory"))?;
                let r = self.build_layers(def, &base.manifest, &ids, &work, deadline, &report).await;
                let _ = std::fs::remove_dir_all(&work);
                r
            })
            .await?;
        let size = manifest.size;
        Ok(LocalImage { id: final_id, manifest, size })
    }

    async fn build_layers(
        &self,
        def: &ImageDefinition,
        base: &ImageManifest,
        ids: &[String],
        work: &Path,
        deadline: Instant,
        report: &BuildReport,
    ) -> Result<ImageManifest> {
        let steps = ids.len();
        // The last layer that exists.
        let mut start = 0;
        let mut parent = base.clone();
        for k in (0..steps).rev() {
            if let Some(m) = self.manifest(&ids[k])? {
                start = k + 1;
                parent = m;
                break;
            }
        }
        for (i, step) in def.steps.iter().enumerate().take(start) {
            report(BuildEvent::Step { step: i + 1, steps, id: ids[i].clone(), what: step.describe(), cached: true });
        }
        let raw = work.join("image.raw");
        report(BuildEvent::Log(format!("assembling layer {} ({} MiB)", parent.id, parent.size >> 20)));
        self.assemble(&parent, &raw).await?;
        for (i, step) in def.steps.iter().enumerate().skip(start) {
            let n = i + 1;
            let what = step.describe();
            report(BuildEvent::Step { step: n, steps, id: ids[i].clone(), what: what.clone(), cached: false });
            let t0 = Instant::now();
            let (raw2, work2) = (raw.clone(), work.to_path_buf());
            let raw3 = raw.clone();
            tokio::task::spawn_blocking(move || ensure_free(&raw3, MIN_FREE)).await??;
            let env = def.env_after(n);
            let script = step.script(&env);
            let stdin = match step {
                Step::AddFiles { context, .. } => {
                    Some(std::fs::File::open(self.context_path(context)).map_err(err_io("opening the build context"))?)
                }
                _ => None,
            };
            let log_report = report.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                let log = move |line: &str| log_report(BuildEvent::Log(line.to_owned()));
                sandbox::run_step(&raw2, &work2, &script, &env, stdin, deadline, &log)
            })
            .await??;
            if !outcome.ok() {
                let reason = match outcome.code {
                    None => "the build ran out of time".to_owned(),
                    Some(c) => format!("exit status {c}"),
                };
                return Err(SailboxError::ImageStepFailed {
                    step: n,
                    what,
                    reason,
                    log_tail: outcome.tail.join("\n"),
                    timed_out: outcome.code.is_none(),
                });
            }
            let run_ms = t0.elapsed().as_millis() as u64;
            let raw3 = raw.clone();
            tokio::task::spawn_blocking(move || zero_journal(&raw3)).await??;
            let (size, chunks, stored_bytes) = self.chunk_file(&raw).await?;
            let manifest = ImageManifest {
                id: ids[i].clone(),
                name: def.base.clone(),
                definition: serde_json::to_string(step).unwrap_or_default(),
                size,
                chunk_size: super::IMAGE_CHUNK,
                chunks,
                created_unix_ms: sysutil::clock::now_ms(),
                parent: Some(parent.id.clone()),
                step: Some(what),
                stored_bytes,
            };
            self.record(&manifest).await?;
            report(BuildEvent::Layer { step: n, id: manifest.id.clone(), size, stored_bytes, run_ms });
            parent = manifest;
        }
        Ok(parent)
    }
}

/// Free blocks and block size of the ext4 file system in `raw`.
fn fs_blocks(raw: &Path) -> Result<(u64, u64)> {
    let out = Command::new("dumpe2fs").arg("-h").arg(raw).output().map_err(err_io("running dumpe2fs"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<u64>().ok())).flatten();
    match (field("Free blocks:"), field("Block size:")) {
        (Some(free), Some(block)) => Ok((free, block)),
        _ => Err(SailboxError::ImageBuild(format!("dumpe2fs could not read {}", raw.display()))),
    }
}

/// Zeroes (punches out) the journal of the cleanly unmounted file system in `raw`, all but
/// its superblock: after a clean unmount the log holds nothing a mount replays, and left as
/// it is, every layer would store the journal blocks its step happened to write. Zeros are
/// not stored at all.
fn zero_journal(raw: &Path) -> Result<()> {
    let (_, block) = fs_blocks(raw)?;
    let out = Command::new("debugfs").args(["-R", "stat <8>"]).arg(raw).output().map_err(err_io("running debugfs"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(extents) = text.split("EXTENTS:").nth(1) else {
        return Ok(()); // no extent-mapped journal: nothing to do
    };
    let file = std::fs::OpenOptions::new().write(true).open(raw).map_err(err_io("opening the image"))?;
    for item in extents.split([',', '\n']).map(str::trim).filter(|s| !s.is_empty()) {
        // "(l0-l1):p0-p1" or "(l):p"
        let Some((logical, physical)) = item.split_once("):") else { continue };
        let first_logical = logical.trim_start_matches('(').split('-').next().and_then(|v| v.parse::<u64>().ok());
        let mut range = physical.split('-').map(|v| v.trim().parse::<u64>().ok());
        let (Some(Some(p0)), end) = (range.next(), range.next()) else { continue };
        let p1 = end.flatten().unwrap_or(p0);
        let start = if first_logical == Some(0) { p0 + 1 } else { p0 };
        if p1 < start {
            continue;
        }
        rustix::fs::fallocate(
            &file,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            start * block,
            (p1 + 1 - start) * block,
        )
        .map_err(|e| SailboxError::io("zeroing the journal", e.into()))?;
    }
    Ok(())
}

/// Grows the ext4 file system in `raw` (offline) when less than `min_free` bytes are free.
fn ensure_free(raw: &Path, min_free: u64) -> Result<()> {
    let (free, block) = fs_blocks(raw)?;
    if free * block >= min_free {
        return Ok(());
    }
    let size = std::fs::metadata(raw).map_err(err_io("stat image"))?.len();
    let file = std::fs::OpenOptions::new().write(true).open(raw).map_err(err_io("opening the image"))?;
    file.set_len(size + GROW_BY).map_err(err_io("growing the image"))?;
    // resize2fs wants a freshly checked file system; e2fsck exits 1 when it fixed something.
    let fsck = Command::new("e2fsck").args(["-f", "-y"]).arg(raw).output().map_err(err_io("running e2fsck"))?;
    if fsck.status.code().is_none_or(|c| c > 1) {
        return Err(SailboxError::ImageBuild(format!(
            "e2fsck ({}): {}{}",
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout).trim(),
            String::from_utf8_lossy(&fsck.stderr).trim()
        )));
    }
    let r = Command::new("resize2fs").arg(raw).output().map_err(err_io("running resize2fs"))?;
    if !r.status.success() {
        return Err(SailboxError::ImageBuild(format!("resize2fs: {}", String::from_utf8_lossy(&r.stderr).trim())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn zeroing_the_journal_keeps_the_file_system_valid() {
        let dir = tempfile::tempdir().unwrap();
        let (root, raw) = (dir.path().join("root"), dir.path().join("fs.raw"));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hello"), "hi").unwrap();
        let ok = Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
            .arg(&root)
            .arg(&raw)
            .arg("256M")
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("mke2fs unavailable: skipped");
            return;
        }
        // The journal's blocks, as a used journal leaves them: not zero.
        let out = Command::new("debugfs").args(["-R", "stat <8>"]).arg(&raw).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let ext = text.split("EXTENTS:").nth(1).unwrap().trim().to_owned();
        let (_, phys) = ext.split_once("):").unwrap();
        let (p0, p1) = phys.split_once('-').unwrap();
        let (p0, p1): (u64, u64) = (p0.parse().unwrap(), p1.trim().parse().unwrap());
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&raw).unwrap();
        let mut sb = vec![0u8; 4096];
        f.read_exact_at(&mut sb, p0 * 4096).unwrap();
        for b in (p0 + 1)..=p1.min(p0 + 64) {
            f.write_all_at(&[0xa5; 4096], b * 4096).unwrap();
        }
        zero_journal(&raw).unwrap();
        let mut after = vec![0u8; 4096];
        f.read_exact_at(&mut after, p0 * 4096).unwrap();
        assert_eq!(after, sb, "the journal superblock is kept");
        let mut block = vec![1u8; 4096];
        f.read_exact_at(&mut block, (p0 + 1) * 4096).unwrap();
        assert!(block.iter().all(|&b| b == 0), "the log is zeroed");
        let fsck = Command::new("e2fsck").args(["-f", "-n"]).arg(&raw).output().unwrap();
        assert_eq!(fsck.status.code(), Some(0), "{}", String::from_utf8_lossy(&fsck.stdout));
    }
}
