//! `Host`: the sailboxes of one machine, the public face of vmm-host. It is made of parts
//! that each own their state (docs/vmm-host.md, "Parts"):
//!
//! - [`crate::runtime::Runtime`]: the shared core: config, state store, chunk backend,
//!   cowfs files, VMM backend, guest kit, images, and the registry of held sailboxes;
//! - [`crate::lifecycle::Lifecycle`]: create, start and stop VMs, terminate;
//! - [`crate::snapshot::Snapshots`]: checkpoint, pause, sleep, resume, fork, restore, upgrade;
//! - [`crate::forkmem::ForkMemory`]: the checkpoints' memory views forks map;
//! - [`crate::exec::Execs`]: durable exec requests;
//! - [`crate::ingress::Ingress`]: the listeners.
//!
//! `Host` wires them together, does what spans parts (waking a sleeper before an exec or a
//! file transfer, [`crate::recover`] at start), and delegates the rest.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::sailbox as pb;
use tokio::sync::mpsc;

use crate::accel::AccelChoice;
use crate::error::{Result, SailboxError};
use crate::exec::Execs;
use crate::forkmem::ForkMemory;
use crate::image::Progress;
use crate::ingress::Ingress;
use crate::lifecycle::Lifecycle;
use crate::model::{self, SailboxRecord, State};
use crate::runtime::{Live, Runtime, Vm};
use crate::snapshot::Snapshots;
use crate::vmfiles::VmFiles;

/// Everything vmm-host needs to start.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// State (`db/`), run directories (`run/`), images (`images/`), cowfs (`cowfs/`).
    pub data_dir: PathBuf,
    /// The chunk directory: images and checkpoints. Several hosts (or a fresh data
    /// directory) pointed at the same one can restore each other's checkpoints.
    pub chunks_dir: PathBuf,
    /// The key checkpoint records stored as chunks are sealed with ([`crate::seal`]); hosts
    /// that restore each other's checkpoints share it. `None`: `<chunks_dir>.record-key`.
    pub record_key: Option<PathBuf>,
    /// Kernel, modules and busybox (scripts/guest-kernel.sh).
    pub guest_dir: PathBuf,
    /// The static `sail-agent`.
    pub agent_binary: PathBuf,
    /// The static `sail-volume-fuse` the initramfs carries for the agent's volume mounts
    /// (left out, with a warning, when missing).
    pub volume_helper_binary: PathBuf,
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
    /// volumed's gRPC endpoint (`http://host:port`): where the volume gateway forwards the
    /// guests' volume calls. `None`: sailboxes cannot mount volumes.
    pub volumed_endpoint: Option<String>,
    /// The key the gateway calls volumed with: an operator key (it acts for each sailbox's
    /// org). `sail up` passes its data directory's; `vmm-host --volumed-key-file`.
    pub volumed_key: Option<tenancy::ApiKey>,
    /// The host's verified chunk cache (every sailbox's volume reads go through it).
    pub chunk_cache_dir: PathBuf,
    /// Its size cap on disk, bytes.
    pub chunk_cache_bytes: u64,
    /// Its in-memory part, bytes.
    pub chunk_memory_bytes: u64,
    /// Largest a VM's console log grows before it is cut down to its last sixteenth
    /// (guest_input::trim_console).
    pub console_max_bytes: u64,
    /// How long finished exec requests (and their results) stay waitable by id after they
    /// started; older ones are deleted at start and then about hourly.
    pub exec_retention: Duration,
}

impl HostConfig {
    /// Defaults for a data directory: chunks under it, guest kit and binaries from their
    /// default places, ingress on 127.0.0.1, accelerator detected.
    pub fn local(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        let accel = std::env::var("SAIL_ACCEL").ok().and_then(|s| s.parse().ok()).unwrap_or_default();
        Self {
            chunks_dir: data_dir.join("chunks"),
            record_key: None,
            chunk_cache_dir: data_dir.join("chunk-cache"),
            data_dir,
            guest_dir: crate::guest::default_guest_dir(),
            agent_binary: crate::guest::default_agent_path(),
            volume_helper_binary: crate::guest::default_volume_helper_path(),
            cowfs_binary: crate::vmfiles::default_binary(),
            ingress_addr: IpAddr::from([127, 0, 0, 1]),
            accel,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            host_name: sysutil::host::hostname(),
            boot_timeout: Duration::from_secs(180),
            volumed_endpoint: None,
            volumed_key: None,
            chunk_cache_bytes: 10 << 30,
            chunk_memory_bytes: 256 << 20,
            console_max_bytes: crate::guest_input::CONSOLE_MAX_BYTES,
            exec_retention: std::env::var("SAIL_EXEC_RETENTION_HOURS")
                .ok()
                .and_then(|h| h.parse::<u64>().ok())
                .map_or(Duration::from_secs(7 * 24 * 3600), |h| Duration::from_secs(h.saturating_mul(3600))),
        }
    }
}

/// How long `get` waits for a guest's mount report.
const MOUNTS_TIMEOUT: Duration = Duration::from_secs(3);

/// The sailboxes of this machine; cheap to clone.
#[derive(Clone)]
pub struct Host {
    pub(crate) rt: Arc<Runtime>,
    pub(crate) memory: Arc<ForkMemory>,
    pub(crate) execs: Arc<Execs>,
    pub(crate) ingress: Arc<Ingress>,
    pub(crate) lifecycle: Arc<Lifecycle>,
    pub(crate) snapshots: Arc<Snapshots>,
}

impl Host {
    /// Opens the state store, starts (or finds) the cowfs daemon, and recovers every
    /// sailbox the store records (see [`crate::recover`]).
    pub async fn open(config: HostConfig) -> Result<Self> {
        let host = Self::assemble(Arc::new(Runtime::open(config).await?));
        host.recover().await?;
        host.execs.prune_old()?;
        Ok(host)
    }

    /// Makes the parts over a runtime and wires them together.
    fn assemble(rt: Arc<Runtime>) -> Self {
        let memory = Arc::new(ForkMemory::new(rt.clone()));
        let execs = Arc::new(Execs::new(rt.clone()));
        let ingress = Arc::new(Ingress::new(rt.clone()));
        let lifecycle = Arc::new(Lifecycle::new(rt.clone(), memory.clone(), execs.clone(), ingress.clone()));
        let snapshots = Arc::new(Snapshots::new(rt.clone(), lifecycle.clone(), memory.clone()));
        ingress.set_waker(Arc::downgrade(&snapshots));
        Self { rt, memory, execs, ingress, lifecycle, snapshots }
    }

    /// The address ingress listeners are bound to, as shown in URLs.
    pub fn ingress_host(&self) -> String {
        self.rt.ingress_host()
    }

    /// The volume gateway's host chunk cache counters (`fetches`: chunks it fetched from the
    /// backend for guests), when volumes are configured.
    pub fn gateway_cache_stats(&self) -> Option<chunkstore::CacheStats> {
        self.rt.gateway.as_ref().map(|g| g.cache_stats())
    }

    /// A running sailbox and its VM; a sleeping one is woken first (exec, file transfers
    /// and ingress wake sleepers; a paused sailbox stays paused).
    pub(crate) async fn awake(&self, id: &str) -> Result<(Arc<Live>, Arc<Vm>)> {
        if let Some(live) = self.rt.live(id)
            && live.snapshot().state == State::Sleeping
        {
            self.snapshots.wake(&live, "an exec or connection").await?;
        }
        self.rt.running(id)
    }

    /// Makes sure an image is built on this host (its chunks in the store).
    pub async fn ensure_image(&self, name: &str, progress: Progress) -> Result<crate::image::LocalImage> {
        self.rt.ensure_image(name, progress).await
    }

    /// The host's image store (builds, layers, contexts).
    pub fn images(&self) -> &crate::image::ImageStore {
        &self.rt.images
    }

    /// Creates a sailbox and returns once its agent answers.
    /// The sailbox belongs to `org` (the caller's).
    pub async fn create(&self, org: &str, req: pb::CreateSailboxRequest) -> Result<pb::Sailbox> {
        self.lifecycle.create(org, req).await
    }

    /// Terminates a sailbox for good (idempotent).
    pub async fn terminate(&self, id: &str) -> Result<pb::Sailbox> {
        self.lifecycle.terminate(id).await
    }

    /// Snapshots memory and writable disk while the sailbox keeps running.
    pub async fn checkpoint(&self, id: &str) -> Result<pb::Checkpoint> {
        self.snapshots.checkpoint(id).await
    }

    /// Checkpoints and powers down until an explicit resume.
    pub async fn pause(&self, id: &str) -> Result<pb::Sailbox> {
        self.snapshots.pause(id).await
    }

    /// Checkpoints and powers down until ingress, an exec, a resume, or (with `call`) the
    /// named external call completing.
    pub async fn sleep(&self, id: &str, call: Option<String>) -> Result<pb::Sailbox> {
        self.snapshots.sleep(id, call).await
    }

    /// Starts a paused or sleeping sailbox again from its last checkpoint (or, with an
    /// upgrade pending, boots it on that checkpoint's disk with the newest agent).
    pub async fn resume(&self, id: &str) -> Result<pb::Sailbox> {
        self.snapshots.resume(id).await
    }

    /// The external call a sleeping sailbox waits on completed: wake it.
    pub async fn complete_call(&self, id: &str, call: &str) -> Result<pb::Sailbox> {
        self.snapshots.complete_call(id, call).await
    }

    /// A new running sailbox from this one's state: a running one is checkpointed first
    /// (it keeps running); a paused or sleeping one's last checkpoint is used without
    /// waking it.
    pub async fn fork(&self, id: &str) -> Result<pb::ForkResponse> {
        self.snapshots.fork(id).await
    }

    /// A new running sailbox from a checkpoint id, on this host (the checkpoint may come
    /// from any host sharing the chunk store).
    pub async fn restore(&self, req: pb::RestoreRequest) -> Result<pb::Sailbox> {
        self.snapshots.restore(req).await
    }

    /// Reboots the sailbox on its same disk onto the newest agent. Returns whether it now
    /// runs it (false: recorded for a paused or sleeping sailbox's next wake).
    pub async fn upgrade(&self, id: &str) -> Result<pb::UpgradeResponse> {
        self.snapshots.upgrade(id).await
    }

    /// Starts a command; returns its durable exec id.
    pub async fn exec(&self, req: pb::ExecRequest) -> Result<pb::ExecHandle> {
        crate::exec::check_request(&req)?;
        let (live, _) = self.awake(&req.sailbox_id).await?;
        self.execs.start(&live, &req).await
    }

    /// The final result of an exec, or the error that ended it; waits while it runs (up to
    /// `timeout`, if given).
    pub async fn wait_exec(&self, id: &str, timeout: Option<Duration>) -> Result<pb::ExecResult> {
        self.execs.wait(id, timeout).await
    }

    /// Output of an exec as it is produced (live from the agent while it runs, from the
    /// record once finished), then its result.
    pub async fn stream_exec(&self, id: &str) -> Result<mpsc::Receiver<Result<pb::ExecOutput, tonic::Status>>> {
        self.execs.stream(id)
    }

    /// The sailbox's listeners with their route status; with a port and `wait`, waits until
    /// that port routes (or the wait ends: then it is reported unrouted).
    pub async fn listeners(&self, id: &str, port: u32, wait: Option<Duration>) -> Result<Vec<pb::Listener>> {
        self.ingress.listeners(id, port, wait).await
    }

    /// Stops this vmm-host's background work (VMM watchers, exec watchers, ingress
    /// listeners) and lets go of the state store, leaving every VM running: what a restart
    /// of vmm-host does, minus the crash. Open the data directory again to re-attach. When no
    /// sailbox has files left on the cowfs mount, the cowfs daemon is stopped and unmounted.
    pub async fn shutdown(&self) {
        for live in self.rt.take_all_live() {
            let mut tasks = live.take_tasks();
            if let Some(vm) = live.set_vm(None) {
                vm.mark_stopping();
                tasks.extend(vm.watcher.lock().take());
            }
            for t in &tasks {
                t.abort();
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        if let Err(e) = self.rt.files.stop_if_unused().await {
            tracing::warn!(error = %e, "could not stop sail-cowfs");
        }
    }

    /// One `Hello` round trip to a running sailbox's agent (what benches use as the
    /// transport's baseline).
    pub async fn agent_hello(&self, id: &str) -> Result<proto::agent::HelloResponse> {
        let (_, vm) = self.rt.running(id)?;
        let req = proto::agent::HelloRequest::default();
        let resp = vm.agent.raw().hello(req).await.map_err(|s| SailboxError::Execution(s.message().to_owned()))?;
        Ok(resp.into_inner())
    }

    /// Counters of a sailbox's memory and disk files (for tests and benches).
    pub async fn file_stats(&self, id: &str) -> Result<(serde_json::Value, serde_json::Value)> {
        let f = &self.rt.files;
        Ok((f.stats(&VmFiles::memory_name(id)).await?, f.stats(&VmFiles::disk_name(id)).await?))
    }

    /// One sailbox; with `connect`, a paused or sleeping one is resumed first.
    pub async fn get(&self, id: &str, connect: bool) -> Result<pb::Sailbox> {
        if connect
            && let Some(live) = self.rt.live(id)
            && matches!(live.snapshot().state, State::Paused | State::Sleeping)
        {
            self.resume(id).await?;
        }
        let mut s = self.rt.to_proto(&self.rt.record(id)?);
        s.mounts = self.mounts(id).await;
        Ok(s)
    }

    /// The volume mounts of a running sailbox: the host's record of them, with what its agent
    /// reports (bounded, see [`crate::guest_input::mounts`]); when the agent does not answer
    /// in time, each recorded mount with state "unknown".
    async fn mounts(&self, id: &str) -> Vec<pb::MountStatus> {
        let Ok((live, vm)) = self.rt.running(id) else { return Vec::new() };
        let recorded = live.snapshot().volumes;
        if recorded.is_empty() {
            return Vec::new();
        }
        let asked = tokio::time::timeout(MOUNTS_TIMEOUT, vm.agent.raw().list_mounts(proto::agent::ListMountsRequest {})).await;
        match asked {
            Ok(Ok(resp)) => crate::guest_input::mounts(&recorded, &resp.into_inner().mounts),
            failed => {
                let why = match failed {
                    Ok(Err(status)) => crate::guest_input::text(status.message(), crate::guest_input::MAX_ERROR),
                    _ => "the agent did not answer in time".to_owned(),
                };
                crate::guest_input::mounts(&recorded, &[])
                    .into_iter()
                    .map(|m| pb::MountStatus { last_error: why.clone(), ..m })
                    .collect()
            }
        }
    }

    /// Sailboxes matching the filter (by default every one not terminated).
    /// Only `org`'s, or every org's with `None` (an operator).
    pub async fn list(&self, org: Option<&str>, req: &pb::ListSailboxesRequest) -> Result<Vec<pb::Sailbox>> {
        let states: Vec<State> = req.states.iter().filter_map(|s| State::from_proto(*s)).collect();
        let mut out: Vec<SailboxRecord> = self
            .rt
            .state
            .sailboxes()?
            .into_iter()
            .map(|r| self.rt.live(&r.id).map(|l| l.snapshot()).unwrap_or(r))
            .filter(|r| org.is_none_or(|o| r.org == o))
            .filter(|r| req.app.is_empty() || r.app == req.app)
            .filter(|r| if states.is_empty() { r.state != State::Terminated } else { states.contains(&r.state) })
            .filter(|r| req.max_guest_schema_version == 0 || r.guest_schema_version <= req.max_guest_schema_version)
            .collect();
        out.sort_by_key(|r| r.created_unix_ms);
        Ok(out.iter().map(|r| self.rt.to_proto(r)).collect())
    }

    /// Finds an app by name, or mints it when `mint_if_missing` (an unknown app otherwise is
    /// `NotFound`).
    pub fn get_app(&self, org: &str, req: &pb::GetAppRequest) -> Result<pb::App> {
        model::check_name("app", &req.name).map_err(|_| {
            SailboxError::invalid(format!(
                "app {:?} must be 1..={} of [A-Za-z0-9._-], starting with a letter or digit",
                req.name,
                model::MAX_NAME
            ))
        })?;
        let minted = match self.rt.state.app(org, &req.name)? {
            Some(_) => false,
            None if req.mint_if_missing => self.rt.state.ensure_app(org, &req.name)?,
            None => return Err(SailboxError::NotFound(format!("app {}", req.name))),
        };
        let created_unix_ms = self.rt.state.app(org, &req.name)?.unwrap_or_default();
        Ok(pb::App { name: req.name.clone(), created_unix_ms, minted })
    }

    /// The org sailbox `id` belongs to (`NotFound` for an unknown id).
    pub fn sailbox_org(&self, id: &str) -> Result<String> {
        Ok(self.rt.record(id)?.org)
    }

    /// The sailbox exec request `id` runs in (`ExecNotFound` for an unknown id).
    pub fn exec_sailbox(&self, id: &str) -> Result<String> {
        match self.rt.state.exec(id)? {
            Some(rec) => Ok(rec.sailbox),
            None => Err(SailboxError::ExecNotFound(id.to_owned())),
        }
    }

    /// The org checkpoint `id` belongs to (`NotFound` for an unknown or unsealed one).
    pub async fn checkpoint_org(&self, id: &str) -> Result<String> {
        Ok(self.rt.load_checkpoint(id).await?.org)
    }

    /// Deletes finished exec requests older than the retention (see
    /// [`HostConfig::exec_retention`]); returns how many. Also runs at start and, about
    /// hourly, when requests start.
    pub fn prune_exec_results(&self) -> Result<usize> {
        self.execs.prune_old()
    }

    /// Exec wait channels held: one per running request at most (waits on finished or
    /// unknown requests leave nothing behind).
    pub fn exec_waiters(&self) -> usize {
        self.execs.channels()
    }

    /// What `sail doctor` shows.
    pub async fn host_info(&self) -> pb::HostInfo {
        let rt = &self.rt;
        let (hv, hv_version) = match &rt.hypervisor {
            Ok(h) => (h.name().to_owned(), h.version()),
            Err(e) => ("unavailable".to_owned(), e.to_string()),
        };
        let kernel = match &rt.kit {
            Ok(k) => format!("{} ({})", k.vmlinux.display(), k.release),
            Err(e) => format!("missing: {e}"),
        };
        let agent = crate::guest::describe_agent(&rt.config.agent_binary);
        pb::HostInfo {
            host: rt.config.host_name.clone(),
            hypervisor: hv,
            hypervisor_version: hv_version,
            accelerator: rt.accel.accel.as_str().to_owned(),
            accelerator_reason: rt.accel.reason.clone(),
            kernel,
            guest_schema_version: agent.as_ref().map(|a| a.guest_schema_version).unwrap_or(0),
            agent_version: match &agent {
                Ok(a) => format!("{} ({})", a.agent_version, rt.config.agent_binary.display()),
                Err(e) => format!("missing: {e}"),
            },
            images: rt.images.list().unwrap_or_default(),
            guest_link: match &rt.hypervisor {
                Ok(h) => format!("{:?}", h.link(Path::new("<run dir>"))),
                Err(_) => String::new(),
            },
            running: rt.running_count() as u32,
        }
    }
}
