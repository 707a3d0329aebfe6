//! A sailbox's memory and disk: two files of the host's cowfs mount (`sail-cowfs`, one daemon
//! per host, in its own session so it outlives vmm-host restarts). QEMU maps `<id>.mem` as
//! shared guest memory and opens `<id>.disk` as a raw disk; both are copy-on-write over chunk
//! manifests (an image, or a checkpoint) and track the regions written since the last
//! checkpoint. A fork has no memory file of its own: it maps `<checkpoint>.mem`, the view
//! of its checkpoint's memory that all forks of it share, privately (see `forkmem`). See
//! the `cowfs` crate.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cowfs::{CowClient, ErrorKind, Exported};

use crate::error::{Result, SailboxError};
use crate::procs;

/// The host's cowfs daemon and its mount.
#[derive(Clone, Debug)]
pub struct VmFiles {
    client: CowClient,
    mount: PathBuf,
}

/// Both files' exports of one checkpoint.
#[derive(Clone, Debug)]
pub struct Exports {
    /// Memory.
    pub memory: Exported,
    /// Disk.
    pub disk: Exported,
}

/// Where `sail-cowfs` is looked for: `$SAIL_COWFS_BIN`, then beside (or above) the running
/// executable.
pub fn default_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SAIL_COWFS_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("sail-cowfs"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("sail-cowfs"))
}

impl VmFiles {
    /// Connects to the daemon under `dir` (`mnt/`, `control.sock`, `store/`), starting it
    /// with `binary` on the chunk directory `chunks` if it does not answer.
    pub async fn ensure(dir: &Path, chunks: &Path, binary: &Path) -> Result<Self> {
        let mount = dir.join("mnt");
        let control = dir.join("control.sock");
        let client = CowClient::new(&control);
        if client.ping().await {
            return Ok(Self { client, mount });
        }
        sysutil::mount::clean_dead_mount(&mount);
        std::fs::create_dir_all(dir).map_err(|e| SailboxError::io("creating the cowfs dir", e))?;
        let mut cmd = Command::new(binary);
        cmd.arg("--mount").arg(&mount).arg("--control").arg(&control).arg("--store").arg(dir.join("store"));
        cmd.arg("--chunks").arg(chunks);
        let proc = procs::spawn(cmd, &dir.join("cowfs.log")).map_err(|e| match e {
            SailboxError::Io { op, source } => {
                SailboxError::Io { op: format!("{op} (build it with cargo build --release)"), source }
            }
            other => other,
        })?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !client.ping().await {
            if !procs::alive(&proc) {
                let log = std::fs::read_to_string(dir.join("cowfs.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                return Err(SailboxError::CowfsStart(format!("sail-cowfs exited at start: {}", tail.join(" | "))));
            }
            if Instant::now() > deadline {
                return Err(SailboxError::CowfsStart("sail-cowfs did not answer in time".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(pid = proc.pid, mount = %mount.display(), "started sail-cowfs");
        Ok(Self { client, mount })
    }

    /// Stops the daemon and waits for its mount to go, if no sailbox has files on it (the
    /// end of a `sail up` that ran none, or whose sailboxes were all terminated). Returns
    /// whether it stopped; with files left it keeps serving them (vmm-host re-attaches).
    pub async fn stop_if_unused(&self) -> Result<bool> {
        if !self.client.stop_if_unused().await.map_err(SailboxError::from)? {
            return Ok(false);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.client.ping().await && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(mount = %self.mount.display(), "sail-cowfs stopped (no files left)");
        Ok(true)
    }

    /// The memory file's name.
    pub fn memory_name(id: &str) -> String {
        format!("{id}.mem")
    }

    /// The disk file's name.
    pub fn disk_name(id: &str) -> String {
        format!("{id}.disk")
    }

    /// The shared memory view of a checkpoint (`ck-…`).
    pub fn view_name(checkpoint: &str) -> String {
        format!("{checkpoint}.mem")
    }

    /// The names of a sailbox's files: its disk, and its memory unless it maps a view.
    fn names_of(id: &str, with_memory: bool) -> Vec<String> {
        let mut names = vec![Self::disk_name(id)];
        if with_memory {
            names.push(Self::memory_name(id));
        }
        names
    }

    /// Path of a file on the mount.
    pub fn path(&self, name: &str) -> PathBuf {
        self.mount.join(name)
    }

    /// The memory file of a sailbox.
    pub fn memory_path(&self, id: &str) -> PathBuf {
        self.path(&Self::memory_name(id))
    }

    /// The disk file of a sailbox.
    pub fn disk_path(&self, id: &str) -> PathBuf {
        self.path(&Self::disk_name(id))
    }

    /// Fresh files: zeroed memory, and a disk over `disk_manifest` (an image's regions).
    pub async fn create_fresh(&self, id: &str, memory_bytes: u64, disk_manifest: &str) -> Result<()> {
        self.remove(id).await?;
        self.client.create_zeros(&Self::memory_name(id), memory_bytes).await.map_err(SailboxError::from)?;
        self.client.create_from(&Self::disk_name(id), disk_manifest).await.map_err(SailboxError::from)
    }

    /// A fresh (zeroed) memory file.
    pub async fn create_memory(&self, id: &str, memory_bytes: u64) -> Result<()> {
        self.client.create_zeros(&Self::memory_name(id), memory_bytes).await.map_err(SailboxError::from)
    }

    /// Files over a checkpoint's manifests (nothing is copied: regions load on first use).
    pub async fn create_from(&self, id: &str, memory_manifest: &str, disk_manifest: &str) -> Result<()> {
        self.create_disk(id, disk_manifest).await?;
        self.client.create_from(&Self::memory_name(id), memory_manifest).await.map_err(SailboxError::from)
    }

    /// Replaces the sailbox's files with a disk over `disk_manifest` alone (a fork maps a view
    /// for memory; `create_from` adds a memory file).
    pub async fn create_disk(&self, id: &str, disk_manifest: &str) -> Result<()> {
        self.remove(id).await?;
        self.client.create_from(&Self::disk_name(id), disk_manifest).await.map_err(SailboxError::from)
    }

    /// Makes sure a checkpoint's memory view exists (over its memory manifest, read-only).
    pub async fn ensure_view(&self, checkpoint: &str, memory_manifest: &str) -> Result<()> {
        match self.client.create_readonly(&Self::view_name(checkpoint), memory_manifest).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == Some(ErrorKind::Exists) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a sailbox's files exist: its disk, and its memory file or (`memory_base`) the
    /// view it maps.
    pub async fn exist(&self, id: &str, memory_base: Option<&str>) -> bool {
        let names = self.client.list().await.unwrap_or_default();
        let memory = match memory_base {
            Some(ck) => Self::view_name(ck),
            None => Self::memory_name(id),
        };
        names.contains(&memory) && names.contains(&Self::disk_name(id))
    }

    /// Removes both files (missing ones are fine).
    pub async fn remove(&self, id: &str) -> Result<()> {
        self.client.remove(&Self::memory_name(id)).await.map_err(SailboxError::from)?;
        self.client.remove(&Self::disk_name(id)).await.map_err(SailboxError::from)
    }

    /// Names of every file on the mount.
    pub async fn names(&self) -> Result<Vec<String>> {
        self.client.list().await.map_err(SailboxError::from)
    }

    /// Removes a file by name.
    pub async fn remove_name(&self, name: &str) -> Result<()> {
        self.client.remove(name).await.map_err(SailboxError::from)
    }

    /// Writes back every page of memory dirty in the host page cache (and the disk's), so
    /// the daemon holds the guest's bytes. Before a pause it shrinks what the pause flushes.
    /// Without `with_memory` (a VM mapping a view privately), the disk only.
    pub async fn flush(&self, id: &str, with_memory: bool) -> Result<()> {
        let paths: Vec<PathBuf> = Self::names_of(id, with_memory).iter().map(|n| self.path(n)).collect();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            for p in paths {
                std::fs::OpenOptions::new().read(true).write(true).open(&p)?.sync_all()?;
            }
            Ok(())
        })
        .await?
        .map_err(|e| SailboxError::io("flushing guest memory and disk", e))
    }

    /// Freezes the files (the VM must be stopped and flushed); see [`VmFiles::flush`].
    pub async fn freeze(&self, id: &str, with_memory: bool) -> Result<()> {
        for name in Self::names_of(id, with_memory) {
            self.client.freeze(&name).await.map_err(SailboxError::from)?;
        }
        Ok(())
    }

    /// Stores both files' frozen regions; returns the new manifests.
    pub async fn export(&self, id: &str) -> Result<Exports> {
        let (mem, disk) = (Self::memory_name(id), Self::disk_name(id));
        let (m, d) = tokio::join!(self.client.export(&mem), self.client.export(&disk));
        Ok(Exports { memory: m.map_err(SailboxError::from)?, disk: d.map_err(SailboxError::from)? })
    }

    /// Stores the disk's frozen regions; returns its new manifest.
    pub async fn export_disk(&self, id: &str) -> Result<Exported> {
        self.client.export(&Self::disk_name(id)).await.map_err(SailboxError::from)
    }

    /// A file's counters (for tests and benches).
    pub async fn stats(&self, name: &str) -> Result<serde_json::Value> {
        self.client.stats(name).await.map_err(SailboxError::from)
    }
}
