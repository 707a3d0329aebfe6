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
//!
//! The shape follows cloud-hypervisor's and rust-vmm's: a backend ([`Hypervisor`]) launches
//! or re-attaches to a VM and hands back a per-VM handle ([`VmHandle`]) that carries what the
//! backend needs for that VM (its spec, its processes, its control socket) and has the per-VM
//! operations as methods, so no caller passes a spec back in. Saved state crosses the
//! boundary in VMM-neutral shapes: [`DeviceState`] (opaque bytes and a format tag the same
//! backend loads them with, see [`Hypervisor::stage_device_state`]) and [`RamImage`] (where
//! guest memory's bytes are in a live save). QEMU's `mapped-ram` file format is known only
//! to [`qemu`].

pub mod qemu;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures::future::BoxFuture;

use crate::accel::Accelerator;
use crate::error::Result;
use crate::link::GuestLink;
use crate::model::{Network, ProcRef};

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
    /// Whether the VM gets the outbound network device (it always gets the host one).
    pub network: Network,
    /// The sailbox's host-NIC namespace, where the VM's host-NIC passt runs.
    pub host_nic: std::sync::Arc<crate::host_nic::HostNic>,
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
    /// cleared (see [`qemu::mapped_ram`]). What VMs with private memory (forks) save.
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

/// A VM's device state as its backend saved it: stored as one opaque blob (a checkpoint's
/// `device_state` chunk) and loaded by the same backend.
#[derive(Clone, Debug)]
pub struct DeviceState {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// How the backend loads them.
    pub format: StateFormat,
}

/// Guest memory inside a live save (see [`VmHandle::save_with_memory`]): byte `i` of guest
/// memory is at offset `offset + i` of the file at `path`; pages the guest never wrote are
/// holes (they read as zeros, and `SEEK_DATA` skips them).
#[derive(Clone, Debug)]
pub struct RamImage {
    /// The save file.
    pub path: PathBuf,
    /// Where guest memory starts in it.
    pub offset: u64,
    /// Guest memory, bytes.
    pub size: u64,
}

/// A VMM backend: launches VMs, or re-attaches to the ones a previous vmm-host launched.
#[async_trait]
pub trait Hypervisor: Send + Sync + 'static {
    /// "qemu" or "cloud-hypervisor".
    fn name(&self) -> &'static str;

    /// The VMM's version string.
    fn version(&self) -> String;

    /// The guest link this backend gives a VM whose run directory is `dir`.
    fn link(&self, dir: &Path) -> GuestLink;

    /// Starts the VM's processes (VMM and helpers) detached from vmm-host, returns its
    /// handle once the VMM's control socket answers. With `spec.incoming`, the device state
    /// is loaded and the VM left stopped (call [`VmHandle::resume`]). On failure nothing is
    /// left running.
    async fn launch(&self, spec: VmSpec) -> Result<Box<dyn VmHandle>>;

    /// The handle of a VM launched earlier (by a vmm-host before a restart) whose processes
    /// are `procs`, once its control socket answers (so it is really the VM that was started).
    async fn attach(&self, spec: VmSpec, procs: Vec<ProcRef>) -> Result<Box<dyn VmHandle>>;

    /// Writes saved device state to `path` as this backend loads it at launch.
    fn stage_device_state(&self, state: &DeviceState, path: &Path) -> Result<Incoming>;
}

/// One VM of a backend: its spec, its processes, and what can be done to it.
#[async_trait]
pub trait VmHandle: Send + Sync + 'static {
    /// How it was launched.
    fn spec(&self) -> &VmSpec;

    /// Its processes (the VMM last).
    fn procs(&self) -> &[ProcRef];

    /// Whether the VMM process still runs.
    fn alive(&self) -> bool;

    /// Asks the VMM for the VM's status.
    async fn status(&self) -> Result<VmStatus>;

    /// Stops the vCPUs.
    async fn pause(&self) -> Result<()>;

    /// Restarts the vCPUs.
    async fn resume(&self) -> Result<()>;

    /// Saves the device state (no RAM: memory is the shared memory file itself) of a
    /// stopped VM, through the file `path` (left behind).
    async fn save_device_state(&self, path: &Path) -> Result<DeviceState>;

    /// Saves device state and all of guest memory of a running VM whose memory is private
    /// (`spec.memory_private`) to the file `path`, live: the guest runs while memory is
    /// copied and is stopped for the last pass. When it returns the VM is stopped. Split the
    /// file with [`VmHandle::split_memory_save`].
    async fn save_with_memory(&self, path: &Path) -> Result<LiveSave>;

    /// Splits a save of [`VmHandle::save_with_memory`] into guest memory (left in the file,
    /// which must live while the image is read) and the device state without it.
    async fn split_memory_save(&self, path: &Path) -> Result<(RamImage, DeviceState)>;

    /// A future that resolves when the VMM process exits (at once if it is gone); it does
    /// not borrow the handle, so a watcher can wait without keeping the VM alive.
    fn exited(&self) -> BoxFuture<'static, ()>;

    /// Kills the VM's processes and waits until they are gone.
    async fn kill(&self);
}
