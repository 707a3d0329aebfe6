//! `Host`: the sailboxes of one machine. It owns the state store, the images, the VMM
//! backend and the live VMs, and implements the lifecycle: create, get, list, terminate,
//! and recovery when vmm-host restarts (re-attach to live VMMs, mark dead ones lost, kill
//! orphans, remove leftovers).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chunkstore::{Backend, LocalBackend};
use proto::sailbox as pb;
use tracing::Instrument;

use crate::accel::{AccelChoice, AccelProbe};
use crate::agent_client::AgentClient;
use crate::error::{Result, SailboxError};
use crate::guest::{GuestKit, Initramfs};
use crate::hypervisor::qemu::Qemu;
use crate::hypervisor::{Hypervisor, VmSpec};
use crate::image::{ImageStore, Progress};
use crate::model::{self, ExecStatus, SailboxRecord, State};
use crate::store::StateStore;
use crate::{now_ms, procs};

/// Everything vmm-host needs to start.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// State (`db/`), run directories (`run/`), images (`images/`), chunks (`chunks/`).
    pub data_dir: PathBuf,
    /// Kernel, modules and busybox (scripts/guest-kernel.sh).
    pub guest_dir: PathBuf,
    /// The static `sail-agent`.
    pub agent_binary: PathBuf,
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
    /// Defaults for a data directory: guest kit and agent from their default places,
    /// ingress on 127.0.0.1, accelerator detected, binaries from PATH.
    pub fn local(data_dir: impl Into<PathBuf>) -> Self {
        let accel = std::env::var("SAIL_ACCEL").ok().and_then(|s| s.parse().ok()).unwrap_or_default();
        Self {
            data_dir: data_dir.into(),
            guest_dir: crate::guest::default_guest_dir(),
            agent_binary: crate::guest::default_agent_path(),
            ingress_addr: IpAddr::from([127, 0, 0, 1]),
            accel,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            host_name: crate::hostname(),
            boot_timeout: Duration::from_secs(180),
        }
    }
}

/// A running sailbox: its record (mirrored to the store), VM spec and agent client.
pub(crate) struct Live {
    pub(crate) record: Mutex<SailboxRecord>,
    pub(crate) spec: VmSpec,
    pub(crate) agent: AgentClient,
    /// Serialises lifecycle operations and exec starts on this sailbox.
    pub(crate) op: tokio::sync::Mutex<()>,
    /// Set before vmm-host itself stops the VMM, so its exit is not taken for a loss.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    pub(crate) tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Live {
    pub(crate) fn snapshot(&self) -> SailboxRecord {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut SailboxRecord)) -> SailboxRecord {
        let mut rec = self.record.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut rec);
        rec.clone()
    }

    /// Aborts the sailbox's background tasks (the calling task excepted: the VMM watcher
    /// calls this while it records a loss).
    fn abort_tasks(&self) {
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
    pub(crate) accel: AccelProbe,
    pub(crate) hypervisor: std::result::Result<Arc<dyn Hypervisor>, String>,
    pub(crate) kit: std::result::Result<GuestKit, String>,
    pub(crate) initramfs: tokio::sync::Mutex<Option<Initramfs>>,
    pub(crate) live: Mutex<HashMap<String, Arc<Live>>>,
    pub(crate) execs: crate::exec::ExecHub,
}

/// The sailboxes of this machine; cheap to clone.
#[derive(Clone)]
pub struct Host {
    pub(crate) inner: Arc<Inner>,
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

impl Host {
    /// Opens the state store and recovers every sailbox it records (see the module docs).
    pub async fn open(config: HostConfig) -> Result<Self> {
        let io = |what: &str, e: std::io::Error| SailboxError::host(what, e);
        for d in ["run", "images", "boot"] {
            std::fs::create_dir_all(config.data_dir.join(d)).map_err(|e| io("creating the data dir", e))?;
        }
        let db = config.data_dir.join("db");
        let state = tokio::task::spawn_blocking(move || StateStore::open(db))
            .await
            .map_err(|e| SailboxError::Storage(e.to_string()))??;
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::open(config.data_dir.join("chunks"))?);
        let kit = GuestKit::load(&config.guest_dir).map_err(|e| e.to_string());
        let images = ImageStore::new(state.clone(), backend, config.data_dir.join("images"), kit.clone().ok());
        let accel = crate::accel::detect(config.accel);
        let hypervisor = Qemu::new(config.qemu_binary.clone())
            .map(|q| Arc::new(q) as Arc<dyn Hypervisor>)
            .map_err(|e| e.to_string());
        tracing::info!(accel = accel.accel.as_str(), reason = %accel.reason, hypervisor = ?hypervisor.as_ref().map(|h| h.version()), "vmm-host starting");
        let host = Self {
            inner: Arc::new(Inner {
                config,
                state,
                images,
                accel,
                hypervisor,
                kit,
                initramfs: tokio::sync::Mutex::new(None),
                live: Mutex::default(),
                execs: crate::exec::ExecHub::default(),
            }),
        };
        host.recover().await?;
        Ok(host)
    }

    pub(crate) fn hypervisor(&self) -> Result<Arc<dyn Hypervisor>> {
        self.inner.hypervisor.clone().map_err(SailboxError::Creation)
    }

    fn run_root(&self) -> PathBuf {
        self.inner.config.data_dir.join("run")
    }

    fn run_dir(&self, id: &str) -> PathBuf {
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

    /// The record of a sailbox, or a not-found error.
    pub(crate) fn record(&self, id: &str) -> Result<SailboxRecord> {
        if let Some(live) = self.live(id) {
            return Ok(live.snapshot());
        }
        self.inner.state.sailbox(id)?.ok_or_else(|| SailboxError::NotFound(id.to_owned()))
    }

    /// A running sailbox, or the error that says why it is not running.
    pub(crate) fn running(&self, id: &str) -> Result<Arc<Live>> {
        if let Some(live) = self.live(id) {
            let state = live.snapshot().state;
            if state == State::Running {
                return Ok(live);
            }
            return Err(not_running(id, state, &live.snapshot().state_reason));
        }
        let rec = self.record(id)?;
        Err(not_running(id, rec.state, &rec.state_reason))
    }

    /// Builds (or finds) the initramfs for the configured agent.
    async fn initramfs(&self) -> Result<Initramfs> {
        let mut cached = self.inner.initramfs.lock().await;
        if let Some(i) = cached.as_ref() {
            return Ok(i.clone());
        }
        let kit = self.inner.kit.clone().map_err(SailboxError::Creation)?;
        let agent = self.inner.config.agent_binary.clone();
        let out = self.inner.config.data_dir.join("boot");
        let built = tokio::task::spawn_blocking(move || kit.initramfs(&agent, &out))
            .await
            .map_err(|e| SailboxError::Host(e.to_string()))??;
        *cached = Some(built.clone());
        Ok(built)
    }

    /// Makes sure an image is built and assembled on this host.
    pub async fn ensure_image(&self, name: &str, progress: Progress) -> Result<crate::image::LocalImage> {
        let name = if name.is_empty() { model::DEFAULT_IMAGE } else { name };
        model::check_name("image", name)?;
        self.inner.images.ensure(name, progress).await
    }

    /// Creates a sailbox and returns once its agent answers.
    pub async fn create(&self, req: pb::CreateSailboxRequest) -> Result<pb::Sailbox> {
        let spec = model::validate_create(&req, "default")?;
        if !spec.volumes.is_empty() {
            return Err(SailboxError::Creation(
                "mounting volumes inside sailboxes is not supported by this vmm-host yet".into(),
            ));
        }
        let hypervisor = self.hypervisor()?;
        let initramfs = self.initramfs().await?;
        let image = self.ensure_image(&spec.image, Arc::new(|m: &str| tracing::info!("{m}"))).await?;
        if image.size > u64::from(spec.disk_gib) << 30 {
            return Err(SailboxError::InvalidConfig(format!(
                "image {} ({} MiB) does not fit a {} GiB disk",
                image.id,
                image.size >> 20,
                spec.disk_gib
            )));
        }
        if !spec.name.is_empty() {
            let taken = self.inner.state.sailboxes()?.into_iter().any(|r| {
                !r.state.is_final() && r.app == spec.app && r.name == spec.name
            });
            if taken {
                return Err(SailboxError::InvalidConfig(format!("app {} already has a sailbox named {}", spec.app, spec.name)));
            }
        }
        self.inner.state.ensure_app(&spec.app)?;
        let id = random_id("sb");
        let span = tracing::info_span!("sailbox", sailbox = %id, app = %spec.app);
        async {
            let rec = SailboxRecord {
                id: id.clone(),
                app: spec.app.clone(),
                name: spec.name.clone(),
                image: image.id.clone(),
                state: State::Creating,
                state_reason: String::new(),
                cpu: spec.cpu,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                disk_gib: spec.disk_gib,
                listeners: Vec::new(),
                volumes: spec.volumes.clone(),
                created_unix_ms: now_ms(),
                guest_schema_version: initramfs.agent.guest_schema_version,
                agent_version: initramfs.agent.agent_version.clone(),
                hypervisor: hypervisor.name().to_owned(),
                accelerator: self.inner.accel.accel.as_str().to_owned(),
                boot_ms: 0,
                procs: Vec::new(),
                active_exec: None,
            };
            self.inner.state.put_sailbox(&rec)?;
            match self.boot(rec.clone(), &image.raw, &initramfs, &spec.ports, hypervisor).await {
                Ok(live) => Ok(self.to_proto(&live.snapshot())),
                Err(e) => {
                    tracing::warn!(error = %e, "create failed; cleaning up");
                    let mut failed = rec;
                    failed.state = State::Terminated;
                    failed.state_reason = format!("creation failed: {e}");
                    self.inner.state.put_sailbox(&failed)?;
                    let _ = std::fs::remove_dir_all(self.run_dir(&id));
                    Err(match e {
                        e @ (SailboxError::InvalidConfig(_) | SailboxError::Creation(_)) => e,
                        other => SailboxError::Creation(other.to_string()),
                    })
                }
            }
        }
        .instrument(span)
        .await
    }

    fn vm_spec(&self, rec: &SailboxRecord, initramfs: &Path) -> Result<VmSpec> {
        let kit = self.inner.kit.clone().map_err(SailboxError::Creation)?;
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
            memory_file: dir.join("memory"),
            disk: dir.join("disk.qcow2"),
            disk_format: "qcow2",
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

    /// Prepares the run directory, launches the VM, waits for the agent, starts ingress.
    async fn boot(
        &self,
        mut rec: SailboxRecord,
        base: &Path,
        initramfs: &Initramfs,
        ports: &[u32],
        hypervisor: Arc<dyn Hypervisor>,
    ) -> Result<Arc<Live>> {
        let spec = self.vm_spec(&rec, &initramfs.path)?;
        std::fs::create_dir_all(&spec.dir).map_err(|e| SailboxError::host("creating the run dir", e))?;
        crate::disk::create_layer(base, &spec.disk, rec.disk_gib).await?;
        let started = Instant::now();
        let procs = hypervisor.launch(&spec).await?;
        rec.procs = procs.clone();
        self.inner.state.put_sailbox(&rec)?;
        let agent = AgentClient::for_boot(&spec.link, self.inner.config.boot_timeout);
        let vmm = procs.last().cloned();
        let hello = pb_hello(&rec);
        let deadline = Instant::now() + self.inner.config.boot_timeout;
        let ready = agent.wait_ready(hello, deadline, || vmm.as_ref().is_some_and(procs::alive)).await;
        let hello = match ready {
            Ok(h) => h,
            Err(why) => {
                for p in procs.iter().rev() {
                    procs::kill(p).await;
                }
                let console = console_tail(&spec.dir);
                return Err(SailboxError::Creation(format!("{why}; console: {console}")));
            }
        };
        rec.boot_ms = started.elapsed().as_millis() as u64;
        // Booted: later handshakes must be quick (a hung guest fails calls, not stalls them).
        agent.set_handshake_timeout(AgentClient::RUNNING_HANDSHAKE);
        rec.guest_schema_version = hello.guest_schema_version;
        rec.agent_version = hello.agent_version;
        let live = Arc::new(Live {
            record: Mutex::new(rec.clone()),
            spec,
            agent,
            op: tokio::sync::Mutex::new(()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            tasks: Mutex::default(),
        });
        let listeners = match crate::ingress::bind_all(self, &live, ports, &[]).await {
            Ok(l) => l,
            Err(e) => {
                for p in procs.iter().rev() {
                    procs::kill(p).await;
                }
                return Err(e);
            }
        };
        let rec = live.update(|r| {
            r.listeners = listeners;
            r.state = State::Running;
        });
        self.inner.state.put_sailbox(&rec)?;
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).insert(rec.id.clone(), live.clone());
        self.watch_vmm(&live);
        tracing::info!(boot_ms = rec.boot_ms, "sailbox running");
        Ok(live)
    }

    /// Marks the sailbox lost when its VMM exits without vmm-host asking it to.
    fn watch_vmm(&self, live: &Arc<Live>) {
        let Some(vmm) = live.snapshot().procs.last().cloned() else { return };
        let host = self.clone();
        let weak = Arc::downgrade(live);
        let task = tokio::spawn(async move {
            procs::wait_exit(vmm).await;
            let Some(live) = weak.upgrade() else { return };
            if live.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let reason = format!("the VMM exited unexpectedly; console: {}", console_tail(&live.spec.dir));
            tracing::warn!(sailbox = %live.spec.id, %reason, "sailbox lost");
            let _op = live.op.lock().await;
            if let Err(e) = host.finish(&live, State::Lost, &reason).await {
                tracing::error!(error = %e, "recording a lost sailbox failed");
            }
        });
        live.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(task);
    }

    /// Records a final state durably, then tears the VM and its files down. The caller holds
    /// the sailbox's op lock.
    async fn finish(&self, live: &Arc<Live>, state: State, reason: &str) -> Result<SailboxRecord> {
        live.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        let before = live.snapshot();
        let rec = live.update(|r| {
            r.state = state;
            r.state_reason = reason.to_owned();
            r.active_exec = None;
        });
        let exec_status = if state == State::Lost { ExecStatus::Lost(reason.to_owned()) } else { ExecStatus::Terminated };
        self.inner.execs.fail_active(self, &before, exec_status)?;
        self.inner.state.put_sailbox(&rec)?;
        live.abort_tasks();
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&rec.id);
        for p in before.procs.iter().rev() {
            procs::kill(p).await;
        }
        let _ = std::fs::remove_dir_all(&live.spec.dir);
        let mut rec = rec;
        rec.procs.clear();
        self.inner.state.put_sailbox(&rec)?;
        Ok(rec)
    }

    /// Terminates a sailbox for good (idempotent).
    pub async fn terminate(&self, id: &str) -> Result<pb::Sailbox> {
        let Some(live) = self.live(id) else {
            return Ok(self.to_proto(&self.record(id)?));
        };
        let _op = live.op.lock().await;
        if live.snapshot().state.is_final() {
            return Ok(self.to_proto(&live.snapshot()));
        }
        let rec = self.finish(&live, State::Terminated, "terminated").await?;
        tracing::info!(sailbox = %id, "terminated");
        Ok(self.to_proto(&rec))
    }

    /// Stops this vmm-host's background work (VMM watchers, exec watchers, ingress
    /// listeners) and lets go of the state store, leaving every VM running: what a restart
    /// of vmm-host does, minus the crash. Open the data directory again to re-attach.
    pub async fn shutdown(&self) {
        let lives: Vec<Arc<Live>> = self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, l)| l).collect();
        for live in lives {
            live.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
            let tasks: Vec<_> = live.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
            for t in &tasks {
                t.abort();
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }

    /// One `Hello` round trip to a running sailbox's agent (what benches use as the
    /// transport's baseline).
    pub async fn agent_hello(&self, id: &str) -> Result<proto::agent::HelloResponse> {
        let live = self.running(id)?;
        let req = proto::agent::HelloRequest::default();
        let resp = live.agent.raw().hello(req).await.map_err(|s| SailboxError::Execution(s.message().to_owned()))?;
        Ok(resp.into_inner())
    }

    /// One sailbox (`connect`: it must run on this host).
    pub async fn get(&self, id: &str) -> Result<pb::Sailbox> {
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
            Err(e) => ("unavailable".to_owned(), e.clone()),
        };
        let kernel = match &self.inner.kit {
            Ok(k) => format!("{} ({})", k.vmlinux.display(), k.release),
            Err(e) => format!("missing: {e}"),
        };
        let agent = crate::guest::describe_agent(&self.inner.config.agent_binary);
        let running = self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).len() as u32;
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

    /// Recovery at start: re-attach live VMs, mark dead ones lost, finish interrupted
    /// creates, kill orphaned processes and remove leftover run directories.
    async fn recover(&self) -> Result<()> {
        let mut keep = Vec::new();
        for rec in self.inner.state.sailboxes()? {
            if rec.state.is_final() {
                continue;
            }
            let span = tracing::info_span!("sailbox", sailbox = %rec.id);
            let kept = self.recover_one(rec).instrument(span).await?;
            keep.extend(kept);
        }
        let root = self.run_root();
        let needle = format!("{}/", root.display());
        for p in procs::find_by_cmdline(&needle) {
            if !keep.contains(&p) {
                tracing::warn!(pid = p.pid, "killing an orphaned VMM process");
                procs::kill(&p).await;
            }
        }
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if self.live(&name).is_none() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        // Exec requests of sailboxes that are gone can never finish.
        for exec in self.inner.state.running_execs()? {
            if self.live(&exec.sailbox).is_none() {
                let why = ExecStatus::Lost("vmm-host restarted and the sailbox is gone".into());
                self.inner.execs.set_status(self, &exec, why)?;
            }
        }
        Ok(())
    }

    async fn recover_one(&self, mut rec: SailboxRecord) -> Result<Vec<crate::model::ProcRef>> {
        let alive = !rec.procs.is_empty() && rec.procs.iter().all(procs::alive);
        if rec.state == State::Running && alive {
            match self.reattach(rec.clone()).await {
                Ok(()) => return Ok(rec.procs),
                Err(e) => tracing::warn!(error = %e, "re-attach failed"),
            }
        }
        for p in rec.procs.iter().rev() {
            procs::kill(p).await;
        }
        let (state, reason) = match rec.state {
            State::Creating => (State::Terminated, "vmm-host restarted while the sailbox was being created".to_owned()),
            _ => (State::Lost, "the VMM was gone when vmm-host restarted".to_owned()),
        };
        tracing::warn!(?state, %reason, "sailbox not recovered");
        rec.state = state;
        rec.state_reason = reason;
        rec.procs.clear();
        rec.active_exec = None;
        self.inner.state.put_sailbox(&rec)?;
        let _ = std::fs::remove_dir_all(self.run_dir(&rec.id));
        Ok(Vec::new())
    }

    async fn reattach(&self, rec: SailboxRecord) -> Result<()> {
        let hypervisor = self.hypervisor()?;
        let dir = self.run_dir(&rec.id);
        let initramfs = dir.join("initramfs"); // only named in the spec; the VM already booted
        let spec = self.vm_spec(&rec, &initramfs)?;
        hypervisor.status(&spec).await?;
        let agent = AgentClient::new(&spec.link);
        let hello = agent
            .wait_ready(pb_hello_keep(), Instant::now() + Duration::from_secs(20), || true)
            .await
            .map_err(SailboxError::Host)?;
        let live = Arc::new(Live {
            record: Mutex::new(rec.clone()),
            spec,
            agent,
            op: tokio::sync::Mutex::new(()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            tasks: Mutex::default(),
        });
        let ports: Vec<u32> = rec.listeners.iter().map(|l| l.port).collect();
        let listeners = crate::ingress::bind_all(self, &live, &ports, &rec.listeners).await?;
        let rec = live.update(|r| {
            r.listeners = listeners;
            r.guest_schema_version = hello.guest_schema_version;
            r.agent_version = hello.agent_version;
        });
        self.inner.state.put_sailbox(&rec)?;
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner()).insert(rec.id.clone(), live.clone());
        self.watch_vmm(&live);
        for exec in self.inner.state.running_execs()?.into_iter().filter(|e| e.sailbox == rec.id) {
            self.inner.execs.watch(self, &live, exec.id.clone());
        }
        tracing::info!("re-attached to a running sailbox");
        Ok(())
    }
}

fn pb_hello(rec: &SailboxRecord) -> proto::agent::HelloRequest {
    let hostname = if rec.name.is_empty() { rec.id.clone() } else { rec.name.replace(['.', '_'], "-") };
    proto::agent::HelloRequest { host_unix_ms: now_ms(), hostname }
}

fn pb_hello_keep() -> proto::agent::HelloRequest {
    proto::agent::HelloRequest { host_unix_ms: now_ms(), hostname: String::new() }
}

fn not_running(id: &str, state: State, reason: &str) -> SailboxError {
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
