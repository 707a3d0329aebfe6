//! `Host`: the sailboxes of one machine. It owns the state store, the images, the VMM
//! backend, the cowfs daemon holding guest memory and disks, and the live sailboxes.
//!
//! The lifecycle lives in [`crate::lifecycle`] (create, start, stop, terminate),
//! [`crate::snapshot`] (checkpoint, pause, sleep, resume, fork, restore, upgrade) and
//! [`crate::recover`] (what a restart of vmm-host does).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chunkstore::{Backend, LocalBackend};
use proto::sailbox as pb;

use crate::accel::{AccelChoice, AccelProbe};
use crate::agent_client::AgentClient;
use crate::error::{Result, SailboxError};
use crate::guest::{GuestKit, Initramfs};
use crate::hypervisor::qemu::Qemu;
use crate::hypervisor::{Hypervisor, Incoming, VmHandle, VmSpec};
use crate::image::{ImageStore, Progress};
use crate::model::{self, SailboxRecord, State};
use crate::store::StateStore;
use crate::vmfiles::VmFiles;

/// Everything vmm-host needs to start.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// State (`db/`), run directories (`run/`), images (`images/`), cowfs (`cowfs/`).
    pub data_dir: PathBuf,
    /// The chunk directory: images and checkpoints. Several hosts (or a fresh data
    /// directory) pointed at the same one can restore each other's checkpoints.
    pub chunks_dir: PathBuf,
    /// Kernel, modules and busybox (scripts/guest-kernel.sh).
    pub guest_dir: PathBuf,
    /// The static `sail-agent`.
    pub agent_binary: PathBuf,
    /// The `sail-cowfs` daemon binary.
    pub cowfs_binary: PathBuf,
    /// Address ingress listeners bind to.
    pub ingress_addr: IpAddr,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// `qemu-system-x86_64`.
    pub qemu_binary: PathBuf,
    /// This host's name, reported in sailbox info.
    pub host_name: String,
    /// Longest a boot may take (VMM launch to the agent's first answer).
    pub boot_timeout: Duration,
}

impl HostConfig {
    /// Defaults for a data directory: chunks under it, guest kit and binaries from their
    /// default places, ingress on 127.0.0.1, accelerator detected.
    pub fn local(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        let accel = std::env::var("SAIL_ACCEL").ok().and_then(|s| s.parse().ok()).unwrap_or_default();
        Self {
            chunks_dir: data_dir.join("chunks"),
            data_dir,
            guest_dir: crate::guest::default_guest_dir(),
            agent_binary: crate::guest::default_agent_path(),
            cowfs_binary: crate::vmfiles::default_binary(),
            ingress_addr: IpAddr::from([127, 0, 0, 1]),
            accel,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            host_name: sysutil::host::hostname(),
            boot_timeout: Duration::from_secs(180),
        }
    }
}

/// A running VM of a sailbox.
pub(crate) struct Vm {
    /// The backend's handle: spec, processes, control.
    pub(crate) handle: Box<dyn VmHandle>,
    /// Its agent.
    pub(crate) agent: AgentClient,
    /// Set before vmm-host itself stops the VMM, so its exit is not taken for a loss.
    pub(crate) stopping: AtomicBool,
    /// The task watching the VMM process.
    pub(crate) watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Vm {
    pub(crate) fn new(handle: Box<dyn VmHandle>, agent: AgentClient) -> Self {
        Self { handle, agent, stopping: AtomicBool::new(false), watcher: Mutex::new(None) }
    }

    /// How it was launched.
    pub(crate) fn spec(&self) -> &VmSpec {
        self.handle.spec()
    }

    pub(crate) fn mark_stopping(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A sailbox this host holds (running, paused or sleeping): its record (mirrored to the
/// store), its VM while one runs, and its listeners.
pub(crate) struct Live {
    pub(crate) record: Mutex<SailboxRecord>,
    pub(crate) vm: Mutex<Option<Arc<Vm>>>,
    /// Serialises lifecycle operations and exec starts on this sailbox.
    pub(crate) op: tokio::sync::Mutex<()>,
    /// Listeners and exec watchers.
    pub(crate) tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Live {
    pub(crate) fn new(rec: SailboxRecord) -> Arc<Self> {
        Arc::new(Self { record: Mutex::new(rec), vm: Mutex::new(None), op: tokio::sync::Mutex::new(()), tasks: Mutex::default() })
    }

    pub(crate) fn snapshot(&self) -> SailboxRecord {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut SailboxRecord)) -> SailboxRecord {
        let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut rec);
        rec.clone()
    }

    pub(crate) fn id(&self) -> String {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).id.clone()
    }

    pub(crate) fn vm(&self) -> Option<Arc<Vm>> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_vm(&self, vm: Option<Arc<Vm>>) -> Option<Arc<Vm>> {
        std::mem::replace(&mut *self.vm.lock().unwrap_or_else(|p| p.into_inner()), vm)
    }

    pub(crate) fn push_task(&self, t: tokio::task::JoinHandle<()>) {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(t);
    }

    /// Aborts the sailbox's background tasks (the calling task excepted).
    pub(crate) fn abort_tasks(&self) {
        let me = tokio::task::try_id();
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            if Some(t.id()) != me {
                t.abort();
            }
        }
    }
}

pub(crate) struct Inner {
    pub(crate) config: HostConfig,
    pub(crate) state: StateStore,
    pub(crate) images: ImageStore,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) files: VmFiles,
    pub(crate) accel: AccelProbe,
    pub(crate) hypervisor: std::result::Result<Arc<dyn Hypervisor>, Arc<SailboxError>>,
    pub(crate) kit: std::result::Result<GuestKit, Arc<SailboxError>>,
    pub(crate) initramfs: tokio::sync::Mutex<Option<Initramfs>>,
    pub(crate) live: Mutex<HashMap<String, Arc<Live>>>,
    /// Which sailboxes' VMs map each checkpoint's memory view (see `forkmem`); held while
    /// a view is created or removed.
    pub(crate) views: tokio::sync::Mutex<HashMap<String, std::collections::BTreeSet<String>>>,
    pub(crate) execs: crate::exec::ExecHub,
}

/// The sailboxes of this machine; cheap to clone.
#[derive(Clone)]
pub struct Host {
    pub(crate) inner: Arc<Inner>,
}

/// A new random id with a prefix.
pub(crate) fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

impl Host {
    /// Opens the state store, starts (or finds) the cowfs daemon, and recovers every
    /// sailbox the store records (see [`crate::recover`]).
    pub async fn open(config: HostConfig) -> Result<Self> {
                for d in ["run", "images", "boot", "cowfs"] {
            std::fs::create_dir_all(config.data_dir.join(d)).map_err(|e| SailboxError::io("creating the data dir", e))?;
        }
        let db = config.data_dir.join("db");
        let state = tokio::task::spawn_blocking(move || StateStore::open(db)).await??;
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::open(&config.chunks_dir)?);
        let files = VmFiles::ensure(&config.data_dir.join("cowfs"), &config.chunks_dir, &config.cowfs_binary).await?;
        let kit = GuestKit::load(&config.guest_dir).map_err(Arc::new);
        let images = ImageStore::new(state.clone(), backend.clone(), config.data_dir.join("images"), kit.clone().ok());
        let accel = crate::accel::detect(config.accel);
        let hypervisor =
            Qemu::new(config.qemu_binary.clone()).map(|q| Arc::new(q) as Arc<dyn Hypervisor>).map_err(Arc::new);
        tracing::info!(accel = accel.accel.as_str(), reason = %accel.reason, hypervisor = ?hypervisor.as_ref().map(|h| h.version()), "vmm-host starting");
        let host = Self {
            inner: Arc::new(Inner {
                config,
                state,
                images,
                backend,
                files,
                accel,
                hypervisor,
                kit,
                initramfs: tokio::sync::Mutex::new(None),
                live: Mutex::default(),
                views: tokio::sync::Mutex::default(),
                execs: crate::exec::ExecHub::default(),
            }),
        };
        host.recover().await?;
        Ok(host)
    }

    pub(crate) fn hypervisor(&self) -> Result<Arc<dyn Hypervisor>> {
        self.inner.hypervisor.clone().map_err(SailboxError::Unavailable)
    }

    pub(crate) fn run_root(&self) -> PathBuf {
        self.inner.config.data_dir.join("run")
    }

    pub(crate) fn run_dir(&self, id: &str) -> PathBuf {
        self.run_root().join(id)
    }

    /// The address ingress listeners are bound to, as shown in URLs.
    pub fn ingress_host(&self) -> String {
        self.inner.config.ingress_addr.to_string()
    }

    pub(crate) fn to_proto(&self, rec: &SailboxRecord) -> pb::Sailbox {
        rec.to_proto(&self.inner.config.host_name, &self.ingress_host())
    }

    pub(crate) fn live(&self, id: &str) -> Option<Arc<Live>> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    pub(crate) fn add_live(&self, live: &Arc<Live>) {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).insert(live.id(), live.clone());
    }

    pub(crate) fn drop_live(&self, id: &str) {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// The record of a sailbox, or a not-found error.
    pub(crate) fn record(&self, id: &str) -> Result<SailboxRecord> {
        if let Some(live) = self.live(id) {
            return Ok(live.snapshot());
        }
        self.inner.state.sailbox(id)?.ok_or_else(|| SailboxError::NotFound(id.to_owned()))
    }

    /// A sailbox this host holds (not final), or the error that says why it is not.
    pub(crate) fn held(&self, id: &str) -> Result<Arc<Live>> {
        if let Some(live) = self.live(id) {
            return Ok(live);
        }
        let rec = self.record(id)?;
        Err(not_running(id, rec.state, &rec.state_reason))
    }

    /// A running sailbox and its VM, or the error that says why it is not running.
    pub(crate) fn running(&self, id: &str) -> Result<(Arc<Live>, Arc<Vm>)> {
        let live = self.held(id)?;
        let rec = live.snapshot();
        match (rec.state, live.vm()) {
            (State::Running, Some(vm)) => Ok((live, vm)),
            (state, _) => Err(not_running(id, state, &rec.state_reason)),
        }
    }

    /// Like [`Host::running`], but a sleeping sailbox is woken first (exec and ingress wake
    /// sleepers; a paused sailbox stays paused).
    pub(crate) async fn awake(&self, id: &str) -> Result<(Arc<Live>, Arc<Vm>)> {
        if let Some(live) = self.live(id)
            && live.snapshot().state == State::Sleeping
        {
            self.wake(&live, "an exec or connection").await?;
        }
        self.running(id)
    }

    /// Builds (or finds) the initramfs for the configured agent.
    pub(crate) async fn initramfs(&self) -> Result<Initramfs> {
        let mut cached = self.inner.initramfs.lock().await;
        if let Some(i) = cached.as_ref() {
            return Ok(i.clone());
        }
        let kit = self.inner.kit.clone().map_err(SailboxError::Unavailable)?;
        let agent = self.inner.config.agent_binary.clone();
        let out = self.inner.config.data_dir.join("boot");
        let built = tokio::task::spawn_blocking(move || kit.initramfs(&agent, &out)).await??;
        *cached = Some(built.clone());
        Ok(built)
    }

    /// Makes sure an image is built on this host (its chunks in the store).
    pub async fn ensure_image(&self, name: &str, progress: Progress) -> Result<crate::image::LocalImage> {
        let name = if name.is_empty() { model::DEFAULT_IMAGE } else { name };
        model::check_name("image", name)?;
        self.inner.images.ensure(name, progress).await
    }

    /// The VM spec for a sailbox's record (its files on the cowfs mount).
    pub(crate) fn vm_spec(&self, rec: &SailboxRecord, initramfs: &Path, incoming: Option<Incoming>) -> Result<VmSpec> {
        let kit = self.inner.kit.clone().map_err(SailboxError::Unavailable)?;
        let hypervisor = self.hypervisor()?;
        let dir = self.run_dir(&rec.id);
        let mut cmdline = String::from("console=ttyS0 quiet loglevel=4 panic=-1 random.trust_cpu=on sail.root=/dev/vda");
        // The agent's log filter, for debugging guests (the kernel hands unknown
        // `key=value` parameters to init as environment).
        if let Ok(filter) = std::env::var("SAIL_GUEST_RUST_LOG")
            && !filter.is_empty()
            && filter.bytes().all(|b| b.is_ascii_alphanumeric() || b"=,_:-".contains(&b))
        {
            cmdline.push_str(&format!(" RUST_LOG={filter}"));
        }
        if self.inner.accel.accel == crate::accel::Accelerator::Tcg {
            // Without it the kernel hangs calibrating the TSC under TCG's microvm.
            cmdline.push_str(" tsc_early_khz=2000000");
        }
        let spec = VmSpec {
            id: rec.id.clone(),
            memory_file: match &rec.memory_base {
                Some(ck) => self.inner.files.path(&VmFiles::view_name(ck)),
                None => self.inner.files.memory_path(&rec.id),
            },
            memory_private: rec.memory_base.is_some(),
            disk: self.inner.files.disk_path(&rec.id),
            disk_format: "raw",
            incoming,
            link: hypervisor.link(&dir),
            dir,
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            kernel: kit.vmlinux,
            initramfs: initramfs.to_path_buf(),
            cmdline,
            accel: self.inner.accel.accel,
        };
        // Unix socket paths are limited to 107 bytes.
        let longest = spec.dir.join("agent.sock.lock");
        if longest.as_os_str().len() > 100 {
            return Err(SailboxError::Creation(format!(
                "data directory path too long for Unix sockets ({}); use a shorter --data-dir",
                longest.display()
            )));
        }
        Ok(spec)
    }

    /// Stops this vmm-host's background work (VMM watchers, exec watchers, ingress
    /// listeners) and lets go of the state store, leaving every VM running: what a restart
    /// of vmm-host does, minus the crash. Open the data directory again to re-attach. When no
    /// sailbox has files left on the cowfs mount, the cowfs daemon is stopped and unmounted.
    pub async fn shutdown(&self) {
        let lives: Vec<Arc<Live>> = self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, l)| l).collect();
        for live in lives {
            let mut tasks: Vec<_> = live.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
            if let Some(vm) = live.set_vm(None) {
                vm.mark_stopping();
                tasks.extend(vm.watcher.lock().unwrap_or_else(|p| p.into_inner()).take());
            }
            for t in &tasks {
                t.abort();
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        if let Err(e) = self.inner.files.stop_if_unused().await {
            tracing::warn!(error = %e, "could not stop sail-cowfs");
        }
    }

    /// One `Hello` round trip to a running sailbox's agent (what benches use as the
    /// transport's baseline).
    pub async fn agent_hello(&self, id: &str) -> Result<proto::agent::HelloResponse> {
        let (_, vm) = self.running(id)?;
        let req = proto::agent::HelloRequest::default();
        let resp = vm.agent.raw().hello(req).await.map_err(|s| SailboxError::Execution(s.message().to_owned()))?;
        Ok(resp.into_inner())
    }

    /// Counters of a sailbox's memory and disk files (for tests and benches).
    pub async fn file_stats(&self, id: &str) -> Result<(serde_json::Value, serde_json::Value)> {
        let f = &self.inner.files;
        Ok((f.stats(&VmFiles::memory_name(id)).await?, f.stats(&VmFiles::disk_name(id)).await?))
    }

    /// One sailbox; with `connect`, a paused or sleeping one is resumed first.
    pub async fn get(&self, id: &str, connect: bool) -> Result<pb::Sailbox> {
        if connect
            && let Some(live) = self.live(id)
            && matches!(live.snapshot().state, State::Paused | State::Sleeping)
        {
            self.resume(id).await?;
        }
        Ok(self.to_proto(&self.record(id)?))
    }

    /// Sailboxes matching the filter (by default every one not terminated).
    pub async fn list(&self, req: &pb::ListSailboxesRequest) -> Result<Vec<pb::Sailbox>> {
        let states: Vec<State> = req.states.iter().filter_map(|s| State::from_proto(*s)).collect();
        let mut out: Vec<SailboxRecord> = self
            .inner
            .state
            .sailboxes()?
            .into_iter()
            .map(|r| self.live(&r.id).map(|l| l.snapshot()).unwrap_or(r))
            .filter(|r| req.app.is_empty() || r.app == req.app)
            .filter(|r| if states.is_empty() { r.state != State::Terminated } else { states.contains(&r.state) })
            .filter(|r| req.max_guest_schema_version == 0 || r.guest_schema_version <= req.max_guest_schema_version)
            .collect();
        out.sort_by_key(|r| r.created_unix_ms);
        Ok(out.iter().map(|r| self.to_proto(r)).collect())
    }

    /// What `sail doctor` shows.
    pub async fn host_info(&self) -> pb::HostInfo {
        let (hv, hv_version) = match &self.inner.hypervisor {
            Ok(h) => (h.name().to_owned(), h.version()),
            Err(e) => ("unavailable".to_owned(), e.to_string()),
        };
        let kernel = match &self.inner.kit {
            Ok(k) => format!("{} ({})", k.vmlinux.display(), k.release),
            Err(e) => format!("missing: {e}"),
        };
        let agent = crate::guest::describe_agent(&self.inner.config.agent_binary);
        let running = self
            .inner
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|l| l.snapshot().state == State::Running)
            .count() as u32;
        pb::HostInfo {
            host: self.inner.config.host_name.clone(),
            hypervisor: hv,
            hypervisor_version: hv_version,
            accelerator: self.inner.accel.accel.as_str().to_owned(),
            accelerator_reason: self.inner.accel.reason.clone(),
            kernel,
            guest_schema_version: agent.as_ref().map(|a| a.guest_schema_version).unwrap_or(0),
            agent_version: match &agent {
                Ok(a) => format!("{} ({})", a.agent_version, self.inner.config.agent_binary.display()),
                Err(e) => format!("missing: {e}"),
            },
            images: self.inner.images.list().unwrap_or_default(),
            guest_link: match &self.inner.hypervisor {
                Ok(h) => format!("{:?}", h.link(Path::new("<run dir>"))),
                Err(_) => String::new(),
            },
            running,
        }
    }
}

pub(crate) fn not_running(id: &str, state: State, reason: &str) -> SailboxError {
    match state {
        State::Terminated => SailboxError::Terminated(id.to_owned()),
        State::Lost => SailboxError::WorkerLost { id: id.to_owned(), reason: reason.to_owned() },
        State::Creating => SailboxError::Execution(format!("sailbox {id} is still being created")),
        State::Paused => SailboxError::Execution(format!("sailbox {id} is paused: resume it first")),
        State::Sleeping => SailboxError::Execution(format!("sailbox {id} is sleeping")),
        State::Running => SailboxError::Execution(format!("sailbox {id} is not reachable")),
    }
}

/// The last lines of a VM's serial console, for error messages.
pub(crate) fn console_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).rev().take(6).collect();
    if lines.is_empty() {
        return "(empty)".into();
    }
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
