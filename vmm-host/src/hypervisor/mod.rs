//! The `Hypervisor` trait: what vmm-host needs from a VMM, sized for both backends.
//!
//! | need | QEMU (this crate) | Cloud Hypervisor |
//! |---|---|---|
//! | launch | command line + QMP socket | `--api-socket`, `vm.create` + `vm.boot` |
//! | file-backed memory | `memory-backend-file,share=on` | `--memory file=,shared=on` |
//! | guest link | virtio-serial port on a chardev socket (migratable) | built-in vsock, hybrid vsock socket |
//! | pause / resume | QMP `stop` / `cont` | `vm.pause` / `vm.resume` |
//! | device state | QMP `migrate` to a file with `x-ignore-shared` | `vm.snapshot` |
//! | forks' private memory | `share=off,readonly=on` + `mapped-ram` saves | `--memory file=,shared=off` + `vm.snapshot` |
//!
//! Only the QEMU backend is implemented: our machines have no hardware KVM, and Cloud
//! Hypervisor needs it. The trait keeps every VMM-specific detail behind it. (On Cloud
//! Hypervisor, `vm.snapshot` writes the memory file too; a backend would point its memory at
//! the same cowfs file and keep only the device state.)

pub mod mapped_ram;
pub mod qemu;
pub mod qmp;

use std::path::PathBuf;

use async_trait::async_trait;

use crate::accel::Accelerator;
use crate::error::Result;
use crate::link::GuestLink;
use crate::model::ProcRef;

/// Everything needed to launch one VM. All paths are inside the sailbox's run directory
/// except the kernel, initramfs and base image.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// The sailbox id (names the VM in process lists).
    pub id: String,
    /// Run directory: sockets, logs, memory file, disk layer.
    pub dir: PathBuf,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// The file that backs guest memory.
    pub memory_file: PathBuf,
    /// Whether memory is a private copy-on-write mapping of `memory_file` (a fork mapping
    /// its checkpoint's memory, shared with the other forks of it) instead of a shared one.
    pub memory_private: bool,
    /// Uncompressed kernel (PVH entry).
    pub kernel: PathBuf,
    /// Initramfs archive.
    pub initramfs: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Root disk image (the sailbox's cowfs disk file).
    pub disk: PathBuf,
    /// Its format ("raw" for cowfs files).
    pub disk_format: &'static str,
    /// Device state to restore from (a checkpoint's); the VM starts stopped when set.
    pub incoming: Option<Incoming>,
    /// How the host reaches the agent (the backend decides the kind; see [`Hypervisor::link`]).
    pub link: GuestLink,
    /// Accelerator.
    pub accel: Accelerator,
}

/// A device-state file to load and how it was saved.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: StateFormat,
}

/// How a checkpoint's device state was saved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateFormat {
    /// A migration stream without RAM (`x-ignore-shared`: the shared memory file is the
    /// RAM). What VMs with their own memory file save.
    #[default]
    IgnoreShared,
    /// A `mapped-ram` migration file with the memory pages cut out and the page bitmap
    /// cleared (see [`mapped_ram`]). What VMs with private memory (forks) save.
    MappedRam,
}

/// What a live save of device state and memory reports.
#[derive(Clone, Copy, Debug)]
pub struct LiveSave {
    /// How long the VMM had the vCPUs stopped until the save completed, ms (its own figure).
    pub downtime_ms: u64,
    /// When the VMM stopped the vCPUs (from its stop event; if it sent none, the last moment
    /// the save was seen still running, so a pause is never under-reported).
    pub stopped_at: std::time::Instant,
}

/// What a VM's process reports about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmStatus {
    /// vCPUs run.
    Running,
    /// vCPUs stopped (paused).
    Paused,
    /// Something else (migrating, shutting down, internal error).
    Other,
}

/// A VMM backend.
#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// "qemu" or "cloud-hypervisor".
    fn name(&self) -> &'static str;

    /// The VMM's version string.
    fn version(&self) -> String;

    /// The guest link this backend gives a VM whose run directory is `dir`.
    fn link(&self, dir: &std::path::Path) -> GuestLink;

    /// Starts the VM's processes (VMM and helpers) detached from vmm-host, returns them once
    /// the VMM's control socket answers. With `spec.incoming`, the device state is loaded and
    /// the VM left stopped (call [`Hypervisor::resume`]). On failure nothing is left running.
    async fn launch(&self, spec: &VmSpec) -> Result<Vec<ProcRef>>;

    /// Saves the device state (no RAM: memory is the file-backed memory itself) of a
    /// stopped VM to `path`.
    async fn save_device_state(&self, spec: &VmSpec, path: &std::path::Path) -> Result<()>;

    /// Saves device state and all of guest memory of a running VM whose memory is private
    /// (`spec.memory_private`) to a `mapped-ram` file at `path`, live: the guest runs while
    /// memory is copied and is stopped for the last pass. When it returns the VM is stopped.
    async fn save_with_memory(&self, spec: &VmSpec, path: &std::path::Path) -> Result<LiveSave>;

    /// Asks a running VM's control socket for its status (also how a restarted vmm-host
    /// checks that a VM it re-attaches to is really the one it started).
    async fn status(&self, spec: &VmSpec) -> Result<VmStatus>;

    /// Stops the vCPUs.
    async fn pause(&self, spec: &VmSpec) -> Result<()>;

    /// Restarts the vCPUs.
    async fn resume(&self, spec: &VmSpec) -> Result<()>;
}
