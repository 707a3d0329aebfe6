//! Creating sailboxes, starting and stopping their VMs, and ending them.
//!
//! [`Lifecycle`] is the part of a host that does it. It calls the fork memory part (a VM
//! started from a checkpoint maps its view; a stopped one unmaps it), the ingress part (a
//! new sailbox's listeners) and the exec part (an ending sailbox fails its active request).

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::sailbox as pb;
use tracing::Instrument;

use crate::agent_client::AgentClient;
use crate::error::{Result, SailboxError};
use crate::exec::Execs;
use crate::forkmem::ForkMemory;
use crate::guest_input::{self, console_tail};
use crate::hypervisor::{DeviceState, Incoming};
use crate::ingress::Ingress;
use crate::model::{self, CheckpointRecord, ExecStatus, SailboxRecord, State};
use crate::runtime::{Live, Runtime, Vm, random_id};
use crate::vmfiles::VmFiles;
use sysutil::clock::now_ms;

/// How often a VM's console log size is checked.
const CONSOLE_CHECK: Duration = Duration::from_secs(5);

/// What a VM starts from.
pub(crate) enum Start<'a> {
    /// A fresh boot: zeroed memory; the disk is the image (`Some(manifest)`) or the files'
    /// current disk (`None`: an upgrade reboots on the same disk).
    Boot { disk_manifest: Option<String> },
    /// A checkpoint's memory, disk and device state, the memory in a file of its own (a
    /// sailbox woken or restarted from its own checkpoint).
    Checkpoint { id: &'a str, record: &'a CheckpointRecord },
    /// A checkpoint's disk and device state with its memory mapped privately from the
    /// checkpoint's shared view (a new sailbox: fork or restore; see `forkmem`).
    Fork { id: &'a str, record: &'a CheckpointRecord },
    /// A checkpoint's disk with fresh memory (an upgrade applied at wake).
    CheckpointDisk { record: &'a CheckpointRecord },
}

/// What the agent is told when a VM (re)starts.
pub(crate) struct Greeting {
    /// New hostname (forks and restores get their own).
    pub(crate) hostname: Option<String>,
    /// Whether to reseed the guest RNG (forks and restores must not share randomness).
    pub(crate) reseed: bool,
}

impl Greeting {
    pub(crate) fn plain() -> Self {
        Self { hostname: None, reseed: false }
    }

    fn request(&self) -> proto::agent::HelloRequest {
        let entropy = if self.reseed { (0..64).map(|_| rand::random::<u8>()).collect() } else { Vec::new() };
        proto::agent::HelloRequest { host_unix_ms: now_ms(), hostname: self.hostname.clone().unwrap_or_default(), entropy }
    }
}

/// A hostname for a sailbox: its name, else its id.
pub(crate) fn hostname_for(rec: &SailboxRecord) -> String {
    if rec.name.is_empty() { rec.id.clone() } else { rec.name.replace(['.', '_'], "-") }
}

/// Creates sailboxes, starts and stops their VMs, ends them.
pub(crate) struct Lifecycle {
    rt: Arc<Runtime>,
    memory: Arc<ForkMemory>,
    execs: Arc<Execs>,
    ingress: Arc<Ingress>,
}

impl Lifecycle {
    pub(crate) fn new(rt: Arc<Runtime>, memory: Arc<ForkMemory>, execs: Arc<Execs>, ingress: Arc<Ingress>) -> Self {
        Self { rt, memory, execs, ingress }
    }

    /// Creates a sailbox and returns once its agent answers.
    pub(crate) async fn create(self: &Arc<Self>, org: &str, req: pb::CreateSailboxRequest) -> Result<pb::Sailbox> {
        model::check_name("org", org)?;
        let spec = model::validate_create(&req, org)?;
        self.resolve_volumes(org, &spec).await?;
        let hypervisor = self.rt.hypervisor()?;
        let initramfs = self.rt.initramfs().await?;
        let image = self.rt.ensure_image(&spec.image, Arc::new(|m: &str| tracing::info!("{m}"))).await?;
        let disk_manifest = self.rt.images.disk_manifest(&image.manifest, u64::from(spec.disk_gib) << 30).await?;
        self.check_name_free(org, &spec.app, &spec.name)?;
        self.rt.state.ensure_app(org, &spec.app)?;
        let rec = SailboxRecord {
            id: random_id("sb"),
            org: org.to_owned(),
            app: spec.app.clone(),
            name: spec.name.clone(),
            image: image.id.clone(),
            cpu: spec.cpu,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_gib: spec.disk_gib,
            volumes: spec.volumes.clone(),
            guest_schema_version: initramfs.agent.guest_schema_version,
            agent_version: initramfs.agent.agent_version.clone(),
            hypervisor: hypervisor.name().to_owned(),
            accelerator: self.rt.accel.accel.as_str().to_owned(),
            ports: spec.ports.clone(),
            network: spec.network,
            ..SailboxRecord::creating()
        };
        let greeting = Greeting { hostname: Some(hostname_for(&rec)), reseed: false };
        self.bring_up(rec, Start::Boot { disk_manifest: Some(disk_manifest) }, greeting).await
    }

    /// Checks that every volume to mount exists, minting those asked for, before anything
    /// of the sailbox is made.
    async fn resolve_volumes(&self, org: &str, spec: &model::CreateSpec) -> Result<()> {
        if spec.volumes.is_empty() {
            return Ok(());
        }
        let gateway = self.rt.gateway.as_ref().ok_or_else(|| {
            SailboxError::Creation(
                "this vmm-host has no volume service configured, so it cannot mount volumes (vmm-host --volumed URL)".into(),
            )
        })?;
        for (path, v) in &spec.volumes {
            if v.org != org {
                return Err(SailboxError::InvalidConfig(format!(
                    "volume {} at {path}: org {:?} is not this request's org",
                    v.volume, v.org
                )));
            }
            gateway.resolve(&v.org, &v.volume, spec.mint.contains(path)).await?;
        }
        Ok(())
    }

    pub(crate) fn check_name_free(&self, org: &str, app: &str, name: &str) -> Result<()> {
        if name.is_empty() {
            return Ok(());
        }
        let taken =
            self.rt.state.sailboxes()?.into_iter().any(|r| !r.state.is_final() && r.org == org && r.app == app && r.name == name);
        if taken {
            return Err(SailboxError::InvalidConfig(format!("app {app} already has a sailbox named {name}")));
        }
        Ok(())
    }

    /// Records a new sailbox as creating, starts its VM and listeners; on failure cleans up
    /// and records it terminated with the reason.
    pub(crate) async fn bring_up(
        self: &Arc<Self>,
        rec: SailboxRecord,
        start: Start<'_>,
        greeting: Greeting,
    ) -> Result<pb::Sailbox> {
        let span = tracing::info_span!("sailbox", sailbox = %rec.id, app = %rec.app);
        async {
            self.rt.state.put_sailbox(&rec)?;
            let live = Live::new(rec);
            match self.start_new(&live, start, greeting).await {
                Ok(rec) => {
                    self.rt.add_live(&live);
                    tracing::info!(boot_ms = rec.boot_ms, "sailbox running");
                    Ok(self.rt.to_proto(&rec))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "start failed; cleaning up");
                    self.discard(&live, &e).await?;
                    Err(if e.is_creation() { e } else { SailboxError::CreationFailed(Box::new(e)) })
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Starts a new sailbox's VM and listeners and records it running.
    async fn start_new(self: &Arc<Self>, live: &Arc<Live>, start: Start<'_>, greeting: Greeting) -> Result<SailboxRecord> {
        let ports = live.snapshot().ports;
        self.rt.bind_gateway(live)?;
        self.start_vm(live, start, greeting).await?;
        let listeners = self.ingress.bind_all(live, &ports, &[]).await?;
        let rec = live.update(|r| {
            r.listeners = listeners;
            r.state = State::Running;
        });
        self.rt.state.put_sailbox(&rec)?;
        Ok(rec)
    }

    /// Tears down a sailbox whose start failed with `e` and records it terminated.
    async fn discard(&self, live: &Arc<Live>, e: &SailboxError) -> Result<()> {
        let id = live.id();
        self.stop_vm(live).await;
        live.abort_tasks();
        let _ = self.rt.files.remove(&id).await;
        let _ = std::fs::remove_dir_all(self.rt.run_dir(&id));
        self.rt.forget_host_nic(&id);
        let failed = live.update(|r| {
            r.state = State::Terminated;
            r.state_reason = format!("creation failed: {e}");
            r.procs.clear();
        });
        self.rt.state.put_sailbox(&failed)
    }

    /// Makes the sailbox's memory and disk files for `start`; returns the device state to
    /// load, if it starts from one.
    async fn prepare_files(&self, live: &Arc<Live>, start: &Start<'_>, dir: &std::path::Path) -> Result<Option<Incoming>> {
        let rec = live.snapshot();
        let files = &self.rt.files;
        let memory_bytes = u64::from(rec.memory_mib) << 20;
        match start {
            Start::Boot { disk_manifest: Some(disk) } => {
                files.create_fresh(&rec.id, memory_bytes, disk).await?;
                Ok(None)
            }
            Start::Boot { disk_manifest: None } => {
                // Same disk, fresh memory.
                files.remove_name(&VmFiles::memory_name(&rec.id)).await?;
                files.create_memory(&rec.id, memory_bytes).await?;
                Ok(None)
            }
            Start::CheckpointDisk { record, .. } => {
                files.create_from(&rec.id, &self.zero_manifest(memory_bytes).await?, &record.disk_manifest).await?;
                Ok(None)
            }
            Start::Fork { id, record } => {
                files.create_disk(&rec.id, &record.disk_manifest).await?;
                self.memory.map_view(live, id, &record.memory_manifest).await?;
                Ok(Some(self.device_state_file(dir, record).await?))
            }
            Start::Checkpoint { id, record } => {
                let reuse = rec.files_at.as_deref() == Some(*id) && files.exist(&rec.id, None).await;
                if !reuse {
                    files.create_from(&rec.id, &record.memory_manifest, &record.disk_manifest).await?;
                }
                Ok(Some(self.device_state_file(dir, record).await?))
            }
        }
    }

    /// Starts the sailbox's VM from `start` and waits for its agent. The record's state is
    /// left to the caller; its processes, versions and boot time are updated and stored.
    pub(crate) async fn start_vm(self: &Arc<Self>, live: &Arc<Live>, start: Start<'_>, greeting: Greeting) -> Result<Arc<Vm>> {
        let hypervisor = self.rt.hypervisor()?;
        let initramfs = self.rt.initramfs().await?;
        // A guest that boots (rather than resuming saved memory) has no volume helpers yet.
        let fresh_memory = matches!(start, Start::Boot { .. } | Start::CheckpointDisk { .. });
        let dir = self.rt.run_dir(&live.id());
        std::fs::create_dir_all(&dir).map_err(|e| SailboxError::io("creating the run dir", e))?;
        let incoming = self.prepare_files(live, &start, &dir).await?;
        // From here the files diverge from any checkpoint.
        let rec = live.update(|r| r.files_at = None);
        self.rt.state.put_sailbox(&rec)?;
        let spec = self.rt.vm_spec(&rec, &initramfs.path, incoming)?;
        let started = Instant::now();
        let agent = AgentClient::for_boot(&spec.link, self.rt.config.boot_timeout);
        let handle = hypervisor.launch(spec).await?;
        let rec = live.update(|r| r.procs = handle.procs().to_vec());
        self.rt.state.put_sailbox(&rec)?;
        let vm = Arc::new(Vm::new(handle, agent));
        live.set_vm(Some(vm.clone()));
        let hello = match self.greet(&vm, &greeting).await {
            Ok(h) => h,
            Err(e) => {
                self.stop_vm(live).await;
                return Err(e);
            }
        };
        vm.agent.set_handshake_timeout(AgentClient::RUNNING_HANDSHAKE);
        if fresh_memory && let Err(e) = self.mount_volumes(live, &vm).await {
            self.stop_vm(live).await;
            return Err(e);
        }
        let rec = live.update(|r| {
            r.boot_ms = started.elapsed().as_millis() as u64;
            r.guest_schema_version = hello.guest_schema_version;
            r.agent_version = guest_input::agent_version(&hello.agent_version);
        });
        self.rt.state.put_sailbox(&rec)?;
        self.watch_vmm(live, &vm);
        Ok(vm)
    }

    /// Mounts the sailbox's volumes in a guest that just booted; returns once every mount
    /// answers (the agent starts and supervises one helper per mount).
    async fn mount_volumes(&self, live: &Arc<Live>, vm: &Vm) -> Result<()> {
        for (path, v) in &live.snapshot().volumes {
            let span = tracing::info_span!("mount", volume = %v.volume, path = %path);
            let req = proto::agent::MountRequest {
                path: path.clone(),
                volume: v.volume.clone(),
                org: v.org.clone(),
                endpoint: crate::gateway::guest_endpoint(),
                // The gateway verifies every chunk on the host before a guest gets it.
                trusted_endpoint: true,
            };
            vm.agent
                .raw()
                .mount(req)
                .instrument(span)
                .await
                .map_err(|e| SailboxError::Creation(format!("mounting volume {} at {path}: {}", v.volume, e.message())))?;
        }
        Ok(())
    }

    /// Lets a launched VM run (one loading device state starts stopped) and waits for its
    /// agent's first answer.
    async fn greet(&self, vm: &Arc<Vm>, greeting: &Greeting) -> Result<proto::agent::HelloResponse> {
        if vm.spec().incoming.is_some() {
            vm.handle.resume().await?;
        }
        let deadline = Instant::now() + self.rt.config.boot_timeout;
        vm.agent
            .wait_ready(greeting.request(), deadline, || vm.handle.alive())
            .await
            .map_err(|why| SailboxError::Creation(format!("{why}; console: {}", console_tail(&vm.spec().dir))))
    }

    /// Kills the sailbox's VM (if any) and waits until it is gone. Its files stay.
    pub(crate) async fn stop_vm(&self, live: &Arc<Live>) {
        if let Some(vm) = live.set_vm(None) {
            vm.mark_stopping();
            if let Some(w) = vm.watcher.lock().take() {
                // Not when the watcher itself calls this (its VMM died): an aborted task is
                // cancelled at its next await, and killing the VM's other processes (passt)
                // awaits their exit, so the sailbox would never be restarted or recorded lost.
                if Some(w.id()) != tokio::task::try_id() {
                    w.abort();
                }
            }
            vm.handle.kill().await;
            let rec = live.update(|r| r.procs.clear());
            self.rt.put_quietly(&rec);
        }
        // Also when the VM never started (a fork whose launch failed maps no view any more).
        self.memory.unmap_view(live).await;
    }

    /// Writes a checkpoint's device state to the run directory `dir` as the VMM loads it.
    async fn device_state_file(&self, dir: &std::path::Path, record: &CheckpointRecord) -> Result<Incoming> {
        let chunk = record
            .device_state
            .parse::<chunkstore::ChunkId>()
            .map_err(|source| SailboxError::BadChunkId { what: "checkpoint: device state".into(), source })?;
        let bytes = self.rt.backend.get(chunk).await?;
        let state = DeviceState { bytes: bytes.to_vec(), format: record.device_state_format };
        self.rt.hypervisor()?.stage_device_state(&state, &dir.join("devstate"))
    }

    /// Watches the VMM process: an exit vmm-host did not ask for restarts the sailbox from
    /// its last checkpoint (commands after it are not replayed), or marks it lost. Until
    /// then it keeps the console log bounded.
    pub(crate) fn watch_vmm(self: &Arc<Self>, live: &Arc<Live>, vm: &Arc<Vm>) {
        let lifecycle = self.clone();
        let exited = vm.handle.exited();
        let (weak_live, weak_vm) = (Arc::downgrade(live), Arc::downgrade(vm));
        let dir = vm.spec().dir.clone();
        let console_max = self.rt.config.console_max_bytes;
        let task = tokio::spawn(async move {
            // Meanwhile, keep the console log bounded (guest_input::trim_console).
            let mut exited = std::pin::pin!(exited);
            let mut tick = tokio::time::interval(CONSOLE_CHECK);
            loop {
                tokio::select! {
                    () = &mut exited => break,
                    _ = tick.tick() => {
                        let d = dir.clone();
                        let trim = move || guest_input::trim_console(&d, console_max, console_max / 16);
                        if let Ok(Err(e)) = tokio::task::spawn_blocking(trim).await {
                            tracing::warn!(error = %e, "trimming the console log failed");
                        }
                    }
                }
            }
            let (Some(live), Some(vm)) = (weak_live.upgrade(), weak_vm.upgrade()) else { return };
            if vm.is_stopping() {
                return;
            }
            let _op = live.op.lock().await;
            if vm.is_stopping() {
                return;
            }
            let reason = format!("the VMM exited unexpectedly; console: {}", console_tail(&vm.spec().dir));
            tracing::warn!(sailbox = %live.id(), %reason, "VMM gone");
            lifecycle.stop_vm(&live).await;
            if let Err(e) = lifecycle.restart_or_lose(&live, &reason).await {
                tracing::error!(error = %e, "recording a lost sailbox failed");
            }
        });
        *vm.watcher.lock() = Some(task);
    }

    /// After its VM died: start the sailbox again from its last checkpoint, or, without
    /// one, record it lost. The caller holds the op lock.
    pub(crate) async fn restart_or_lose(self: &Arc<Self>, live: &Arc<Live>, reason: &str) -> Result<()> {
        let rec = live.snapshot();
        if let Some(ck_id) = rec.last_checkpoint.clone()
            && let Ok(ck) = self.rt.load_checkpoint(&ck_id).await
        {
            match self.start_vm(live, Start::Checkpoint { id: &ck_id, record: &ck }, Greeting::plain()).await {
                Ok(_) => {
                    let rec = live.update(|r| {
                        r.state = State::Running;
                        r.state_reason = format!("restored from checkpoint {ck_id} ({reason})");
                    });
                    self.rt.state.put_sailbox(&rec)?;
                    tracing::warn!(sailbox = %rec.id, checkpoint = %ck_id, "restored from the last checkpoint");
                    return Ok(());
                }
                Err(e) => tracing::error!(error = %e, "restore from the last checkpoint failed"),
            }
        }
        self.finish(live, State::Lost, reason).await.map(|_| ())
    }

    /// Records a final state durably, then tears the VM, files and listeners down. The
    /// caller holds the op lock.
    pub(crate) async fn finish(&self, live: &Arc<Live>, state: State, reason: &str) -> Result<SailboxRecord> {
        let before = live.snapshot();
        let rec = live.update(|r| {
            r.state = state;
            r.state_reason = reason.to_owned();
            r.active_exec = None;
        });
        let exec_status = if state == State::Lost { ExecStatus::Lost(reason.to_owned()) } else { ExecStatus::Terminated };
        self.execs.fail_active(&before, exec_status)?;
        self.rt.state.put_sailbox(&rec)?;
        live.abort_tasks();
        self.rt.drop_live(&rec.id);
        self.stop_vm(live).await;
        let _ = self.rt.files.remove(&rec.id).await;
        let _ = std::fs::remove_dir_all(self.rt.run_dir(&rec.id));
        self.rt.forget_host_nic(&rec.id);
        Ok(live.snapshot())
    }

    /// Terminates a sailbox for good (idempotent).
    pub(crate) async fn terminate(&self, id: &str) -> Result<pb::Sailbox> {
        let Some(live) = self.rt.live(id) else {
            return Ok(self.rt.to_proto(&self.rt.record(id)?));
        };
        let _op = live.op.lock().await;
        if live.snapshot().state.is_final() {
            return Ok(self.rt.to_proto(&live.snapshot()));
        }
        let rec = self.finish(&live, State::Terminated, "terminated").await?;
        tracing::info!(sailbox = %id, "terminated");
        Ok(self.rt.to_proto(&rec))
    }

    /// A stored all-zero memory manifest of `size` bytes.
    async fn zero_manifest(&self, size: u64) -> Result<String> {
        let m = cowfs::Manifest::zeros(size).map_err(|source| SailboxError::Manifest { what: "zeroed memory".into(), source })?;
        let bytes = bytes::Bytes::from(m.encode());
        let id = chunkstore::ChunkId::of(&bytes);
        self.rt.backend.put(id, bytes).await?;
        Ok(id.to_hex())
    }
}
