//! What vmm-host does when it starts on a data directory that records sailboxes:
//!
//! - running, VMM alive (same pid and start time, QMP and the agent answer): re-attach;
//! - running, VMM gone (host failure): start it again from its last checkpoint (commands
//!   after that checkpoint are not replayed), or record it lost when it has none;
//! - paused or sleeping: keep it so, with its listeners bound (a sleeper wakes on ingress);
//! - creating: the create was interrupted: terminated.
//!
//! Then orphans are removed: VMM processes under the run directory that no sailbox owns,
//! run directories and cowfs files of sailboxes that are gone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::agent_client::AgentClient;
use crate::error::{Result, SailboxError};
use crate::host::Host;
use crate::model::{ExecStatus, ProcRef, SailboxRecord, State};
use crate::procs;
use crate::runtime::{Live, Vm};

impl Host {
    /// Recovery at start (see the module docs).
    pub(crate) async fn recover(&self) -> Result<()> {
        let mut keep: Vec<ProcRef> = Vec::new();
        for rec in self.rt.state.sailboxes()? {
            if rec.state.is_final() {
                continue;
            }
            crate::forkmem::remove_stale_ram_save(&rec.id);
            let span = tracing::info_span!("sailbox", sailbox = %rec.id);
            keep.extend(self.recover_one(rec).instrument(span).await?);
        }
        let needle = format!("{}/", self.rt.run_root().display());
        for p in procs::find_by_cmdline(&needle) {
            if !keep.contains(&p) {
                tracing::warn!(pid = p.pid, "killing an orphaned VMM process");
                procs::kill(&p).await;
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.rt.run_root()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if self.rt.live(&name).is_none() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        for name in self.rt.files.names().await.unwrap_or_default() {
            // `<sailbox>.mem|.disk`, or `<checkpoint>.mem`: a view some sailbox's VM maps.
            let owner = name.rsplit_once('.').map(|(id, _)| id.to_owned()).unwrap_or_default();
            if self.rt.live(&owner).is_none() && !self.memory.view_in_use(&owner).await {
                let _ = self.rt.files.remove_name(&name).await;
            }
        }
        // Exec requests of sailboxes that are gone can never finish.
        for exec in self.rt.state.running_execs()? {
            if self.rt.live(&exec.sailbox).is_none() {
                let why = ExecStatus::Lost("vmm-host restarted and the sailbox is gone".into());
                self.execs.set_status(&exec, why)?;
            }
        }
        Ok(())
    }

    async fn recover_one(&self, rec: SailboxRecord) -> Result<Vec<ProcRef>> {
        let live = Live::new(rec.clone());
        match rec.state {
            State::Running => {
                let alive = !rec.procs.is_empty() && rec.procs.iter().all(procs::alive);
                if alive {
                    match self.reattach(&live).await {
                        Ok(()) => return Ok(rec.procs),
                        Err(e) => tracing::warn!(error = %e, "re-attach failed"),
                    }
                }
                for p in rec.procs.iter().rev() {
                    procs::kill(p).await;
                }
                live.update(|r| {
                    r.procs.clear();
                    r.memory_base = None;
                });
                let ports = rec.ports.clone();
                self.rt.bind_gateway(&live)?;
                let listeners = self.ingress.bind_all(&live, &ports, &rec.listeners).await?;
                live.update(|r| r.listeners = listeners);
                self.rt.add_live(&live);
                let _op = live.op.lock().await;
                self.lifecycle.restart_or_lose(&live, "the VMM was gone when vmm-host restarted").await?;
                self.execs.watch_running(&live)?;
                Ok(live.vm().map(|vm| vm.handle.procs().to_vec()).unwrap_or_default())
            }
            State::Paused | State::Sleeping => {
                for p in rec.procs.iter().rev() {
                    procs::kill(p).await;
                }
                self.rt.bind_gateway(&live)?;
                let listeners = self.ingress.bind_all(&live, &rec.ports, &rec.listeners).await?;
                let rec = live.update(|r| {
                    r.listeners = listeners;
                    r.procs.clear();
                    r.memory_base = None;
                });
                self.rt.state.put_sailbox(&rec)?;
                self.rt.add_live(&live);
                self.execs.watch_running(&live)?;
                Ok(Vec::new())
            }
            State::Creating | State::Terminated | State::Lost => {
                for p in rec.procs.iter().rev() {
                    procs::kill(p).await;
                }
                let rec = live.update(|r| {
                    if r.state == State::Creating {
                        r.state = State::Terminated;
                        r.state_reason = "vmm-host restarted while the sailbox was being created".into();
                    }
                    r.procs.clear();
                    r.memory_base = None;
                    r.active_exec = None;
                });
                self.rt.state.put_sailbox(&rec)?;
                let _ = self.rt.files.remove(&rec.id).await;
                let _ = std::fs::remove_dir_all(self.rt.run_dir(&rec.id));
                self.rt.forget_host_nic(&rec.id);
                Ok(Vec::new())
            }
        }
    }

    async fn reattach(&self, live: &Arc<Live>) -> Result<()> {
        let rec = live.snapshot();
        let hypervisor = self.rt.hypervisor()?;
        if !self.rt.files.exist(&rec.id, rec.memory_base.as_deref()).await {
            return Err(SailboxError::Setup("its memory and disk files are gone (cowfs restarted)".into()));
        }
        let initramfs = self.rt.run_dir(&rec.id).join("initramfs"); // only named: the VM already booted
        let spec = self.rt.vm_spec(&rec, &initramfs, None)?;
        let agent = AgentClient::new(&spec.link);
        let handle = hypervisor.attach(spec, rec.procs.clone()).await?;
        let hello_req = proto::agent::HelloRequest { host_unix_ms: sysutil::clock::now_ms(), ..Default::default() };
        let hello = agent
            .wait_ready(hello_req, Instant::now() + Duration::from_secs(20), || true)
            .await
            .map_err(SailboxError::AgentUnreachable)?;
        let vm = Arc::new(Vm::new(handle, agent));
        live.set_vm(Some(vm.clone()));
        self.rt.bind_gateway(live)?;
        let listeners = self.ingress.bind_all(live, &rec.ports, &rec.listeners).await?;
        let rec = live.update(|r| {
            r.listeners = listeners;
            r.guest_schema_version = hello.guest_schema_version;
            r.agent_version = crate::guest_input::agent_version(&hello.agent_version);
        });
        self.rt.state.put_sailbox(&rec)?;
        self.rt.add_live(live);
        self.memory.adopt_view(&rec).await;
        self.lifecycle.watch_vmm(live, &vm);
        self.execs.watch_running(live)?;
        tracing::info!("re-attached to a running sailbox");
        Ok(())
    }
}
