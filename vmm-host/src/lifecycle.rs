//! Creating sailboxes, starting and stopping their VMs, and ending them.

use std::sync::Arc;
use std::time::Instant;

use proto::sailbox as pb;
use tracing::Instrument;

use crate::agent_client::AgentClient;
use crate::error::{Result, SailboxError};
use crate::host::{Host, Live, Vm, console_tail, random_id};
use crate::hypervisor::{DeviceState, Incoming};
use crate::model::{self, CheckpointRecord, ExecStatus, SailboxRecord, State};
use sysutil::clock::now_ms;

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

impl Host {
    /// Creates a sailbox and returns once its agent answers.
    pub async fn create(&self, req: pb::CreateSailboxRequest) -> Result<pb::Sailbox> {
        let spec = model::validate_create(&req, "default")?;
        if !spec.volumes.is_empty() {
            return Err(SailboxError::Creation("mounting volumes inside sailboxes is not supported by this vmm-host yet".into()));
        }
        self.hypervisor()?;
        let initramfs = self.initramfs().await?;
        let image = self.ensure_image(&spec.image, Arc::new(|m: &str| tracing::info!("{m}"))).await?;
        let disk_manifest = self.inner.images.disk_manifest(&image.manifest, u64::from(spec.disk_gib) << 30).await?;
        self.check_name_free(&spec.app, &spec.name)?;
        self.inner.state.ensure_app(&spec.app)?;
        let rec = SailboxRecord {
            id: random_id("sb"),
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
            hypervisor: self.hypervisor()?.name().to_owned(),
            accelerator: self.inner.accel.accel.as_str().to_owned(),
            ports: spec.ports.clone(),
            ..SailboxRecord::creating()
        };
        let greeting = Greeting { hostname: Some(hostname_for(&rec)), reseed: false };
        self.bring_up(rec, Start::Boot { disk_manifest: Some(disk_manifest) }, greeting).await
    }

    pub(crate) fn check_name_free(&self, app: &str, name: &str) -> Result<()> {
        if name.is_empty() {
            return Ok(());
        }
        let taken = self.inner.state.sailboxes()?.into_iter().any(|r| !r.state.is_final() && r.app == app && r.name == name);
        if taken {
            return Err(SailboxError::InvalidConfig(format!("app {app} already has a sailbox named {name}")));
        }
        Ok(())
    }

    /// Records a new sailbox as creating, starts its VM and listeners; on failure cleans up
    /// and records it terminated with the reason.
    pub(crate) async fn bring_up(&self, rec: SailboxRecord, start: Start<'_>, greeting: Greeting) -> Result<pb::Sailbox> {
        let id = rec.id.clone();
        let span = tracing::info_span!("sailbox", sailbox = %id, app = %rec.app);
        async {
            self.inner.state.put_sailbox(&rec)?;
            let live = Live::new(rec.clone());
            let ports = rec.ports.clone();
            let started = async {
                self.start_vm(&live, start, greeting).await?;
                let listeners = crate::ingress::bind_all(self, &live, &ports, &[]).await?;
                let rec = live.update(|r| {
                    r.listeners = listeners;
                    r.state = State::Running;
                });
                self.inner.state.put_sailbox(&rec)?;
                Ok::<_, SailboxError>(rec)
            }
            .await;
            match started {
                Ok(rec) => {
                    self.add_live(&live);
                    tracing::info!(boot_ms = rec.boot_ms, "sailbox running");
                    Ok(self.to_proto(&rec))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "start failed; cleaning up");
                    self.stop_vm(&live).await;
                    live.abort_tasks();
                    let _ = self.inner.files.remove(&id).await;
                    let _ = std::fs::remove_dir_all(self.run_dir(&id));
                    let failed = live.update(|r| {
                        r.state = State::Terminated;
                        r.state_reason = format!("creation failed: {e}");
                        r.procs.clear();
                    });
                    self.inner.state.put_sailbox(&failed)?;
                    Err(match e {
                        e if e.is_creation() => e,
                        other => SailboxError::CreationFailed(Box::new(other)),
                    })
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Starts the sailbox's VM from `start` and waits for its agent. The record's state is
    /// left to the caller; its processes, versions and boot time are updated and stored.
    pub(crate) async fn start_vm(&self, live: &Arc<Live>, start: Start<'_>, greeting: Greeting) -> Result<Arc<Vm>> {
        let hypervisor = self.hypervisor()?;
        let initramfs = self.initramfs().await?;
        let rec = live.snapshot();
        let dir = self.run_dir(&rec.id);
        std::fs::create_dir_all(&dir).map_err(|e| SailboxError::io("creating the run dir", e))?;
        let files = &self.inner.files;
        let incoming = match &start {
            Start::Boot { disk_manifest: Some(disk) } => {
                files.create_fresh(&rec.id, u64::from(rec.memory_mib) << 20, disk).await?;
                None
            }
            Start::Boot { disk_manifest: None } => {
                // Same disk, fresh memory.
                files.remove_name(&crate::vmfiles::VmFiles::memory_name(&rec.id)).await?;
                files.create_memory(&rec.id, u64::from(rec.memory_mib) << 20).await?;
                None
            }
            Start::CheckpointDisk { record, .. } => {
                files
                    .create_from(&rec.id, &zero_manifest(self, u64::from(rec.memory_mib) << 20).await?, &record.disk_manifest)
                    .await?;
                None
            }
            Start::Checkpoint { id, record } | Start::Fork { id, record } => {
                if matches!(start, Start::Fork { .. }) {
                    files.create_disk(&rec.id, &record.disk_manifest).await?;
                    self.map_view(live, id, &record.memory_manifest).await?;
                } else {
                    let reuse = rec.files_at.as_deref() == Some(*id) && files.exist(&rec.id, None).await;
                    if !reuse {
                        files.create_from(&rec.id, &record.memory_manifest, &record.disk_manifest).await?;
                    }
                }
                Some(self.device_state_file(&dir, record).await?)
            }
        };
        // From here the files diverge from any checkpoint.
        let rec = live.update(|r| r.files_at = None);
        self.inner.state.put_sailbox(&rec)?;
        let spec = self.vm_spec(&rec, &initramfs.path, incoming)?;
        let started = Instant::now();
        let agent = AgentClient::for_boot(&spec.link, self.inner.config.boot_timeout);
        let handle = hypervisor.launch(spec).await?;
        let rec = live.update(|r| r.procs = handle.procs().to_vec());
        self.inner.state.put_sailbox(&rec)?;
        let vm = Arc::new(Vm::new(handle, agent));
        live.set_vm(Some(vm.clone()));
        let outcome = async {
            if vm.spec().incoming.is_some() {
                vm.handle.resume().await?;
            }
            let deadline = Instant::now() + self.inner.config.boot_timeout;
            vm.agent
                .wait_ready(greeting.request(), deadline, || vm.handle.alive())
                .await
                .map_err(|why| SailboxError::Creation(format!("{why}; console: {}", console_tail(&vm.spec().dir))))
        }
        .await;
        let hello = match outcome {
            Ok(h) => h,
            Err(e) => {
                self.stop_vm(live).await;
                return Err(e);
            }
        };
        vm.agent.set_handshake_timeout(AgentClient::RUNNING_HANDSHAKE);
        let rec = live.update(|r| {
            r.boot_ms = started.elapsed().as_millis() as u64;
            r.guest_schema_version = hello.guest_schema_version;
            r.agent_version = hello.agent_version.clone();
        });
        self.inner.state.put_sailbox(&rec)?;
        self.watch_vmm(live, &vm);
        Ok(vm)
    }

    /// Kills the sailbox's VM (if any) and waits until it is gone. Its files stay.
    pub(crate) async fn stop_vm(&self, live: &Arc<Live>) {
        if let Some(vm) = live.set_vm(None) {
            vm.mark_stopping();
            if let Some(w) = vm.watcher.lock().unwrap_or_else(|p| p.into_inner()).take() {
                w.abort();
            }
            vm.handle.kill().await;
            let rec = live.update(|r| r.procs.clear());
            let _ = self.inner.state.put_sailbox(&rec);
        }
        // Also when the VM never started (a fork whose launch failed maps no view any more).
        self.unmap_view(live).await;
    }

    /// Writes a checkpoint's device state to the run directory `dir` as the VMM loads it.
    async fn device_state_file(&self, dir: &std::path::Path, record: &CheckpointRecord) -> Result<Incoming> {
        let chunk =
            record.device_state.parse::<chunkstore::ChunkId>().map_err(|source| SailboxError::BadChunkId { what: "checkpoint: device state".into(), source })?;
        let bytes = self.inner.backend.get(chunk).await?;
        let state = DeviceState { bytes: bytes.to_vec(), format: record.device_state_format };
        self.hypervisor()?.stage_device_state(&state, &dir.join("devstate"))
    }

    /// Watches the VMM process: an exit vmm-host did not ask for restarts the sailbox from
    /// its last checkpoint (commands after it are not replayed), or marks it lost.
    pub(crate) fn watch_vmm(&self, live: &Arc<Live>, vm: &Arc<Vm>) {
        let host = self.clone();
        let exited = vm.handle.exited();
        let (weak_live, weak_vm) = (Arc::downgrade(live), Arc::downgrade(vm));
        let task = tokio::spawn(async move {
            exited.await;
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
            host.stop_vm(&live).await;
            if let Err(e) = host.restart_or_lose(&live, &reason).await {
                tracing::error!(error = %e, "recording a lost sailbox failed");
            }
        });
        *vm.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// After its VM died: start the sailbox again from its last checkpoint, or, without
    /// one, record it lost. The caller holds the op lock.
    pub(crate) async fn restart_or_lose(&self, live: &Arc<Live>, reason: &str) -> Result<()> {
        let rec = live.snapshot();
        if let Some(ck_id) = rec.last_checkpoint.clone()
            && let Ok(ck) = self.load_checkpoint(&ck_id).await
        {
            match self.start_vm(live, Start::Checkpoint { id: &ck_id, record: &ck }, Greeting::plain()).await {
                Ok(_) => {
                    let rec = live.update(|r| {
                        r.state = State::Running;
                        r.state_reason = format!("restored from checkpoint {ck_id} ({reason})");
                    });
                    self.inner.state.put_sailbox(&rec)?;
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
        self.inner.execs.fail_active(self, &before, exec_status)?;
        self.inner.state.put_sailbox(&rec)?;
        live.abort_tasks();
        self.drop_live(&rec.id);
        self.stop_vm(live).await;
        let _ = self.inner.files.remove(&rec.id).await;
        let _ = std::fs::remove_dir_all(self.run_dir(&rec.id));
        Ok(live.snapshot())
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
}

/// A stored all-zero memory manifest of `size` bytes.
async fn zero_manifest(host: &Host, size: u64) -> Result<String> {
    let m = cowfs::Manifest::zeros(size).map_err(|source| SailboxError::Manifest { what: "zeroed memory".into(), source })?;
    let bytes = bytes::Bytes::from(m.encode());
    let id = chunkstore::ChunkId::of(&bytes);
    host.inner.backend.put(id, bytes).await?;
    Ok(id.to_hex())
}
