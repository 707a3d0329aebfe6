//! Checkpoints and everything built on them: pause, sleep, resume, fork, restore, upgrade.
//!
//! A checkpoint: flush the guest's dirty memory pages to cowfs while it runs (so the pause
//! has little left to flush), stop the vCPUs, flush again, save the device state (QEMU
//! migration with x-ignore-shared: no RAM, the memory file is the RAM), freeze the memory
//! and disk files (the regions written since the last checkpoint), and either resume the
//! guest (checkpoint, fork) or kill the VMM (pause, sleep). Then, with the guest running
//! again, export the frozen regions as chunks, store the device state and the record as
//! chunks, and record the checkpoint durably. The pause covers only the flush of what changed
//! and the device state.
//!
//! A fork runs on a private mapping of its checkpoint's memory (shared with the other forks,
//! see `forkmem`), which no cowfs file tracks: its checkpoints save all of memory live with
//! QEMU's mapped-ram (the guest stops only for the last pass) and upload the regions the
//! store lacks. Woken from its own checkpoint, it has its own memory file again.
//!
//! [`Snapshots`] is the part of a host that does all of this. It calls the lifecycle part to
//! stop and start VMs (and to bring up forks and restores as new sailboxes) and the fork
//! memory part to store the RAM image of a VM on a private mapping.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chunkstore::ChunkId;
use proto::sailbox as pb;

use cowfs::Exported;

use crate::error::{Result, SailboxError};
use crate::forkmem::ForkMemory;
use crate::hypervisor::DeviceState;
use crate::lifecycle::{Greeting, Lifecycle, Start, hostname_for};
use crate::model::{CheckpointRecord, SailboxRecord, State};
use crate::runtime::{Live, Runtime, Vm, not_running, random_id};
use sysutil::clock::now_ms;

/// Agents older than this are upgraded at their next wake instead of resumed.
pub const MIN_RESUMABLE_SCHEMA: u32 = 1;

/// What to do with the guest after the freeze.
#[derive(Clone, Copy, PartialEq, Eq)]
enum After {
    /// Keep it running (checkpoint, fork).
    Run,
    /// Power it down (pause, sleep).
    PowerDown,
}

/// What a capture of a VM produced.
struct Captured {
    /// Guest stopped, ms.
    pause_ms: u64,
    /// The device state as the VMM loads it.
    device_state: DeviceState,
    /// The memory export.
    memory: Exported,
    /// The disk export.
    disk: Exported,
}

fn ck_id(chunk: ChunkId) -> String {
    format!("ck-{}", chunk.to_hex())
}

fn creation(e: SailboxError) -> SailboxError {
    match e {
        e @ (SailboxError::Creation(_)
        | SailboxError::CreationFailed(_)
        | SailboxError::CheckpointFailed(_)
        | SailboxError::Unavailable(_)
        | SailboxError::InvalidArgument(_)
        | SailboxError::Terminated(_)
        | SailboxError::WorkerLost { .. }) => e,
        other => SailboxError::CheckpointFailed(Box::new(other)),
    }
}

/// Checkpoints, and the pauses, sleeps, wakes, forks, restores and upgrades built on them.
pub(crate) struct Snapshots {
    rt: Arc<Runtime>,
    lifecycle: Arc<Lifecycle>,
    memory: Arc<ForkMemory>,
}

impl Snapshots {
    pub(crate) fn new(rt: Arc<Runtime>, lifecycle: Arc<Lifecycle>, memory: Arc<ForkMemory>) -> Self {
        Self { rt, lifecycle, memory }
    }

    /// Takes a checkpoint of a running sailbox. The caller holds the op lock.
    async fn take_checkpoint(&self, live: &Arc<Live>, vm: &Arc<Vm>, after: After) -> Result<(String, CheckpointRecord)> {
        let rec = live.snapshot();
        let started = Instant::now();
        let captured = if vm.spec().memory_private {
            self.capture_private(live, vm, after).await?
        } else {
            self.capture_shared(live, vm, after).await?
        };
        let Captured { pause_ms, device_state, memory, disk } = captured;
        let format = device_state.format;
        let state_bytes = Bytes::from(device_state.bytes);
        let state_chunk = ChunkId::of(&state_bytes);
        self.rt.backend.put(state_chunk, state_bytes).await?;
        let ck = CheckpointRecord {
            sailbox: rec.id.clone(),
            org: rec.org.clone(),
            app: rec.app.clone(),
            name: rec.name.clone(),
            image: rec.image.clone(),
            cpu: rec.cpu,
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            disk_gib: rec.disk_gib,
            ports: rec.ports.clone(),
            volumes: rec.volumes.clone(),
            network: rec.network,
            memory_manifest: memory.manifest.clone(),
            disk_manifest: disk.manifest.clone(),
            device_state: state_chunk.to_hex(),
            device_state_format: format,
            hypervisor: rec.hypervisor.clone(),
            accelerator: rec.accelerator.clone(),
            guest_schema_version: rec.guest_schema_version,
            agent_version: rec.agent_version.clone(),
            parent: rec.last_checkpoint.clone().or(rec.forked_from.clone()),
            created_unix_ms: now_ms(),
            pause_ms,
            total_ms: started.elapsed().as_millis() as u64,
            memory_bytes_changed: memory.bytes_frozen,
            memory_bytes_uploaded: memory.bytes_uploaded,
            disk_bytes_changed: disk.bytes_frozen,
            disk_bytes_uploaded: disk.bytes_uploaded,
        };
        let json = Bytes::from(
            serde_json::to_vec(&ck).map_err(|source| SailboxError::Encode { what: "a checkpoint record".into(), source })?,
        );
        let sealed = self.rt.record_key.seal(&json);
        let record_chunk = ChunkId::of(&sealed);
        self.rt.backend.put(record_chunk, sealed).await?;
        let id = ck_id(record_chunk);
        let rec = live.update(|r| {
            r.last_checkpoint = Some(id.clone());
            if after == After::PowerDown {
                r.files_at = Some(id.clone());
            }
        });
        let st = &self.rt.state;
        st.commit(st.changes().checkpoint(st, &id, &ck).sailbox(st, &rec))?;
        tracing::info!(
            sailbox = %rec.id, checkpoint = %id, pause_ms, total_ms = ck.total_ms,
            memory_changed = ck.memory_bytes_changed, memory_uploaded = ck.memory_bytes_uploaded,
            disk_changed = ck.disk_bytes_changed, "checkpoint"
        );
        Ok((id, ck))
    }

    /// Captures a VM with its own memory file: flush memory and disk to cowfs while the
    /// guest runs, stop it, flush the rest, save the device state without RAM, freeze both
    /// files; then export the frozen regions (see [`Snapshots::release_guest`] for the order).
    async fn capture_shared(&self, live: &Arc<Live>, vm: &Arc<Vm>, after: After) -> Result<Captured> {
        let files = &self.rt.files;
        let id = live.id();
        files.flush(&id, true).await?;
        let paused_at = Instant::now();
        vm.handle.pause().await?;
        let frozen = async {
            files.flush(&id, true).await?;
            let state = vm.handle.save_device_state(&vm.spec().dir.join("devstate.new")).await?;
            files.freeze(&id, true).await?;
            Ok(state)
        }
        .await;
        let (pause_ms, device_state, exports) = self.release_guest(live, vm, after, paused_at, frozen, files.export(&id)).await?;
        Ok(Captured { pause_ms, device_state, memory: exports.memory, disk: exports.disk })
    }

    /// Captures a VM on a private mapping of a checkpoint's memory view: a live mapped-ram
    /// save of device state and all of memory (the guest runs until the last pass), then
    /// with the VM stopped the disk is flushed and frozen. The RAM image is split from the
    /// device state and stored as chunks (see [`Snapshots::release_guest`] for the order).
    async fn capture_private(&self, live: &Arc<Live>, vm: &Arc<Vm>, after: After) -> Result<Captured> {
        let files = &self.rt.files;
        let rec = live.snapshot();
        let size = u64::from(rec.memory_mib) << 20;
        files.flush(&rec.id, false).await?;
        let ram = crate::forkmem::ram_save_path(&rec.id, &vm.spec().dir, size);
        let saved = vm.handle.save_with_memory(&ram).await;
        // The pause counts from the VMM's own stop (the last pass), not from when its end was
        // seen, so it includes the VMM's downtime.
        let stopped_at = saved.as_ref().map_or_else(|_| Instant::now(), |s| s.stopped_at);
        let frozen = async {
            let saved = saved?;
            files.flush(&rec.id, false).await?;
            files.freeze(&rec.id, false).await?;
            Ok::<_, SailboxError>(saved)
        }
        .await;
        let store = async {
            let (image, device_state) = vm.handle.split_memory_save(&ram).await?;
            let base = match &rec.memory_base {
                Some(ck) => {
                    let manifest: ChunkId = self.rt.load_checkpoint(ck).await?.memory_manifest.parse().map_err(|source| {
                        SailboxError::BadChunkId { what: format!("checkpoint {ck}: memory manifest"), source }
                    })?;
                    cowfs::Manifest::decode(&self.rt.backend.get(manifest).await?)
                        .map_err(|source| SailboxError::Manifest { what: format!("checkpoint {ck}: memory manifest"), source })?
                }
                None => cowfs::Manifest::zeros(size)
                    .map_err(|source| SailboxError::Manifest { what: "zeroed memory".into(), source })?,
            };
            let (memory, disk) = tokio::join!(self.memory.import_memory(&image, &base), files.export_disk(&rec.id));
            Ok((device_state, memory?, disk?))
        };
        let released = self.release_guest(live, vm, after, stopped_at, frozen, store).await;
        let _ = std::fs::remove_file(&ram);
        let (pause_ms, saved, (device_state, memory, disk)) = released?;
        tracing::debug!(sailbox = %rec.id, pause_ms, downtime_ms = saved.downtime_ms, path = %ram.display(), "live save of private memory");
        Ok(Captured { pause_ms, device_state, memory, disk })
    }

    /// Ends a capture whose guest has been stopped since `stopped_at`: `captured` is what
    /// was taken while stopped, `store` stores the rest (the frozen regions, the RAM image).
    /// `After::Run` resumes the guest first, so it does not wait for the store.
    /// `After::PowerDown` stores first and powers the guest down only once that succeeded;
    /// if anything fails the guest is resumed, so a failed sleep or pause loses nothing.
    /// Returns the pause (ms), what was captured and what the store returned.
    async fn release_guest<C, T>(
        &self,
        live: &Arc<Live>,
        vm: &Arc<Vm>,
        after: After,
        stopped_at: Instant,
        captured: Result<C>,
        store: impl std::future::Future<Output = Result<T>>,
    ) -> Result<(u64, C, T)> {
        let captured = match captured {
            Ok(c) => c,
            Err(e) => {
                let _ = vm.handle.resume().await;
                return Err(e);
            }
        };
        match after {
            After::Run => {
                let resumed = vm.handle.resume().await;
                let pause_ms = stopped_at.elapsed().as_millis() as u64;
                resumed?;
                Ok((pause_ms, captured, store.await?))
            }
            After::PowerDown => match store.await {
                Ok(stored) => {
                    let pause_ms = stopped_at.elapsed().as_millis() as u64;
                    self.lifecycle.stop_vm(live).await;
                    Ok((pause_ms, captured, stored))
                }
                Err(e) => {
                    let _ = vm.handle.resume().await;
                    Err(e)
                }
            },
        }
    }

    /// Snapshots memory and writable disk while the sailbox keeps running.
    pub(crate) async fn checkpoint(&self, id: &str) -> Result<pb::Checkpoint> {
        let (live, _) = self.rt.running(id)?;
        let _op = live.op.lock().await;
        let (live, vm) = self.rt.running(id)?;
        let (ck, rec) = self.take_checkpoint(&live, &vm, After::Run).await.map_err(creation)?;
        Ok(rec.to_proto(&ck))
    }

    /// Checkpoints and powers down: until `resume` (paused) or until ingress, an exec,
    /// `resume` or the named call completing (sleeping).
    async fn power_down(&self, id: &str, state: State, call: Option<String>) -> Result<pb::Sailbox> {
        let live = self.rt.held(id)?;
        let _op = live.op.lock().await;
        let current = live.snapshot().state;
        if current == state && (state != State::Sleeping || call.is_none()) {
            return Ok(self.rt.to_proto(&live.snapshot()));
        }
        if matches!(current, State::Paused | State::Sleeping) {
            // Already down at its checkpoint: only the state changes.
            let rec = live.update(|r| {
                r.state = state;
                r.sleep_call = call;
            });
            self.rt.state.put_sailbox(&rec)?;
            return Ok(self.rt.to_proto(&rec));
        }
        let (live, vm) = self.rt.running(id)?;
        self.take_checkpoint(&live, &vm, After::PowerDown).await.map_err(creation)?;
        let rec = live.update(|r| {
            r.state = state;
            r.sleep_call = call;
            r.state_reason = String::new();
        });
        self.rt.state.put_sailbox(&rec)?;
        tracing::info!(sailbox = %id, ?state, "powered down");
        Ok(self.rt.to_proto(&rec))
    }

    /// Checkpoints and powers down until an explicit resume.
    pub(crate) async fn pause(&self, id: &str) -> Result<pb::Sailbox> {
        self.power_down(id, State::Paused, None).await
    }

    /// Checkpoints and powers down until ingress, an exec, a resume, or (with `call`) the
    /// named external call completing.
    pub(crate) async fn sleep(&self, id: &str, call: Option<String>) -> Result<pb::Sailbox> {
        if let Some(c) = &call {
            crate::model::check_name("call", c).map_err(|e| SailboxError::InvalidArgument(e.to_string()))?;
        }
        self.power_down(id, State::Sleeping, call).await
    }

    /// Starts a paused or sleeping sailbox again from its last checkpoint (or, with an
    /// upgrade pending, boots it on that checkpoint's disk with the newest agent).
    pub(crate) async fn resume(&self, id: &str) -> Result<pb::Sailbox> {
        let live = self.rt.held(id)?;
        self.wake(&live, "resume").await?;
        Ok(self.rt.to_proto(&live.snapshot()))
    }

    /// Wakes a paused or sleeping sailbox (no-op when it runs).
    pub(crate) async fn wake(&self, live: &Arc<Live>, why: &str) -> Result<()> {
        let _op = live.op.lock().await;
        let rec = live.snapshot();
        if rec.state == State::Running && live.vm().is_some() {
            return Ok(());
        }
        if !matches!(rec.state, State::Paused | State::Sleeping) {
            return Err(not_running(&rec.id, rec.state, &rec.state_reason));
        }
        let ck_id = rec.last_checkpoint.clone().ok_or_else(|| SailboxError::Creation("no checkpoint to resume from".into()))?;
        let ck = self.rt.load_checkpoint(&ck_id).await?;
        let started = Instant::now();
        let current = self.rt.initramfs().await?.agent.guest_schema_version;
        let upgrade =
            rec.pending_upgrade || (ck.guest_schema_version < MIN_RESUMABLE_SCHEMA && ck.guest_schema_version < current);
        let start = if upgrade { Start::CheckpointDisk { record: &ck } } else { Start::Checkpoint { id: &ck_id, record: &ck } };
        self.lifecycle.start_vm(live, start, Greeting::plain()).await.map_err(creation)?;
        let rec = live.update(|r| {
            r.state = State::Running;
            r.sleep_call = None;
            if upgrade {
                r.pending_upgrade = false;
            }
        });
        self.rt.state.put_sailbox(&rec)?;
        tracing::info!(sailbox = %rec.id, why, upgrade, ms = started.elapsed().as_millis() as u64, "woken");
        Ok(())
    }

    /// The external call a sleeping sailbox waits on completed: wake it.
    pub(crate) async fn complete_call(&self, id: &str, call: &str) -> Result<pb::Sailbox> {
        let live = self.rt.held(id)?;
        let rec = live.snapshot();
        match (rec.state, rec.sleep_call.as_deref()) {
            (State::Sleeping, Some(c)) if c == call => self.wake(&live, "call completed").await?,
            (State::Running, _) => {}
            _ => {
                return Err(SailboxError::invalid(format!("sailbox {id} is not sleeping on a call named {call:?}")));
            }
        }
        Ok(self.rt.to_proto(&live.snapshot()))
    }

    /// A new running sailbox from this one's state: a running one is checkpointed first
    /// (it keeps running); a paused or sleeping one's last checkpoint is used without
    /// waking it.
    pub(crate) async fn fork(&self, id: &str) -> Result<pb::ForkResponse> {
        let live = self.rt.held(id)?;
        let (ck_id, ck) = {
            let _op = live.op.lock().await;
            let rec = live.snapshot();
            match rec.state {
                State::Running => {
                    let (live, vm) = self.rt.running(id)?;
                    self.take_checkpoint(&live, &vm, After::Run).await.map_err(creation)?
                }
                State::Paused | State::Sleeping => {
                    let ck_id =
                        rec.last_checkpoint.clone().ok_or_else(|| SailboxError::Creation("no checkpoint to fork from".into()))?;
                    let ck = self.rt.load_checkpoint(&ck_id).await?;
                    (ck_id, ck)
                }
                other => return Err(not_running(id, other, &rec.state_reason)),
            }
        };
        let child = self.start_from_checkpoint(&ck_id, &ck, String::new(), String::new(), None).await?;
        Ok(pb::ForkResponse { child: Some(child), checkpoint: Some(ck.to_proto(&ck_id)) })
    }

    /// A new running sailbox from a checkpoint id, on this host (the checkpoint may come
    /// from any host sharing the chunk store).
    pub(crate) async fn restore(&self, req: pb::RestoreRequest) -> Result<pb::Sailbox> {
        let ck = self.rt.load_checkpoint(&req.checkpoint_id).await?;
        if ck.accelerator != self.rt.accel.accel.as_str() {
            return Err(SailboxError::Creation(format!(
                "checkpoint {} was taken under {}; this host runs {}",
                req.checkpoint_id,
                ck.accelerator,
                self.rt.accel.accel.as_str()
            )));
        }
        // The ports a restore asks for get create's checks (range, reserved, twice, how many).
        let ports = if req.ingress_ports.is_empty() { None } else { Some(crate::model::check_ports(&req.ingress_ports)?) };
        self.start_from_checkpoint(&req.checkpoint_id, &ck, req.app, req.name, ports).await
    }

    async fn start_from_checkpoint(
        &self,
        ck_id: &str,
        ck: &CheckpointRecord,
        app: String,
        name: String,
        ports: Option<Vec<u32>>,
    ) -> Result<pb::Sailbox> {
        let app = if app.is_empty() { ck.app.clone() } else { app };
        crate::model::check_name("app", &app)?;
        if !name.is_empty() {
            crate::model::check_name("name", &name)?;
        }
        self.lifecycle.check_name_free(&ck.org, &app, &name)?;
        self.rt.state.ensure_app(&ck.org, &app)?;
        let rec = SailboxRecord {
            id: random_id("sb"),
            app,
            name,
            image: ck.image.clone(),
            cpu: ck.cpu,
            vcpus: ck.vcpus,
            memory_mib: ck.memory_mib,
            disk_gib: ck.disk_gib,
            guest_schema_version: ck.guest_schema_version,
            agent_version: ck.agent_version.clone(),
            hypervisor: ck.hypervisor.clone(),
            accelerator: ck.accelerator.clone(),
            org: ck.org.clone(),
            forked_from: Some(ck_id.to_owned()),
            ports: ports.unwrap_or_else(|| ck.ports.clone()),
            volumes: ck.volumes.clone(),
            network: ck.network,
            ..SailboxRecord::creating()
        };
        // A child is its own machine: own hostname, fresh randomness.
        let greeting = Greeting { hostname: Some(hostname_for(&rec)), reseed: true };
        self.lifecycle.bring_up(rec, Start::Fork { id: ck_id, record: ck }, greeting).await
    }

    /// Reboots the sailbox on its same disk onto the newest agent. Returns whether it now
    /// runs it (false: recorded for a paused or sleeping sailbox's next wake).
    pub(crate) async fn upgrade(&self, id: &str) -> Result<pb::UpgradeResponse> {
        let live = self.rt.held(id)?;
        let newest = self.rt.initramfs().await?.agent.guest_schema_version;
        let _op = live.op.lock().await;
        let rec = live.snapshot();
        match rec.state {
            State::Paused | State::Sleeping => {
                let rec = live.update(|r| r.pending_upgrade = true);
                self.rt.state.put_sailbox(&rec)?;
                Ok(pb::UpgradeResponse { sailbox: Some(self.rt.to_proto(&rec)), applied: false })
            }
            State::Running => {
                // The initramfs is rebuilt from the current agent binary: a newer agent
                // has a newer schema version (or the same one: nothing to do).
                self.rt.forget_initramfs().await;
                let newest = self.rt.initramfs().await?.agent.guest_schema_version.max(newest);
                if rec.guest_schema_version >= newest && !rec.pending_upgrade {
                    return Ok(pb::UpgradeResponse { sailbox: Some(self.rt.to_proto(&rec)), applied: true });
                }
                let (live, vm) = self.rt.running(id)?;
                // A clean power-off flushes the guest's file systems; then boot again.
                vm.mark_stopping();
                let _ = vm.agent.raw().power_off(proto::agent::PowerOffRequest { reboot: false }).await;
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), vm.handle.exited()).await;
                self.lifecycle.stop_vm(&live).await;
                self.lifecycle.start_vm(&live, Start::Boot { disk_manifest: None }, Greeting::plain()).await.map_err(creation)?;
                let rec = live.update(|r| {
                    r.pending_upgrade = false;
                    r.state = State::Running;
                });
                self.rt.state.put_sailbox(&rec)?;
                tracing::info!(sailbox = %id, schema = rec.guest_schema_version, "upgraded");
                Ok(pb::UpgradeResponse { sailbox: Some(self.rt.to_proto(&rec)), applied: true })
            }
            other => Err(not_running(id, other, &rec.state_reason)),
        }
    }
}
