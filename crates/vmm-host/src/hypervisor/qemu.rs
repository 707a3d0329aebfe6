//! The QEMU backend: a `microvm` machine booting the PVH kernel directly, file-backed shared
//! guest memory, the root disk as virtio-blk, and the agent's link as a virtio-serial port
//! on a chardev socket. Every device is migratable, so device state can be saved for
//! snapshots (vhost-user-vsock, the other way to reach a guest without host vhost modules,
//! blocks migration in QEMU).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;

use super::qmp::Qmp;
use super::{Hypervisor, VmSpec, VmStatus};
use crate::accel::Accelerator;
use crate::error::{Result, SailboxError};
use crate::link::GuestLink;
use crate::model::ProcRef;
use crate::procs;

/// How long a VMM may take to open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long saving or loading device state may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);

/// The QEMU backend.
pub struct Qemu {
    qemu: PathBuf,
    firmware: PathBuf,
    version: String,
}

fn qmp_socket(spec: &VmSpec) -> PathBuf {
    spec.dir.join("qmp.sock")
}

/// The agent's chardev socket in a run directory.
pub fn agent_socket(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}

impl Qemu {
    /// Finds `qemu-system-x86_64` and its qboot firmware.
    pub fn new(qemu: PathBuf) -> Result<Self> {
        let out = Command::new(&qemu).arg("--version").output().map_err(|e| {
            SailboxError::Host(format!(
                "{} not runnable ({e}): run `bash scripts/setup.sh vm` (installs qemu-system-x86)",
                qemu.display()
            ))
        })?;
        let version = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_owned();
        let firmware = PathBuf::from("/usr/share/qemu/qboot.rom");
        if !firmware.is_file() {
            return Err(SailboxError::Host(format!("{} missing (Debian's qemu-system-data)", firmware.display())));
        }
        Ok(Self { qemu, firmware, version })
    }

    /// The command line for `spec` (public for docs and tests).
    pub fn command(&self, spec: &VmSpec) -> Command {
        let mut cmd = Command::new(&self.qemu);
        let mem = format!("{}M", spec.memory_mib);
        let (accel, cpu) = match spec.accel {
            Accelerator::Kvm => ("kvm", "host"),
            Accelerator::Tcg => ("tcg", "max"),
        };
        cmd.arg("-name").arg(format!("sail-{},debug-threads=on", spec.id));
        cmd.args(["-machine", "microvm,memory-backend=mem,rtc=on", "-accel", accel, "-cpu", cpu]);
        cmd.arg("-smp").arg(spec.vcpus.to_string()).arg("-m").arg(&mem);
        cmd.arg("-object")
            .arg(format!("memory-backend-file,id=mem,size={mem},mem-path={},share=on,prealloc=off", spec.memory_file.display()));
        cmd.arg("-bios").arg(&self.firmware);
        cmd.arg("-kernel").arg(&spec.kernel).arg("-initrd").arg(&spec.initramfs).arg("-append").arg(&spec.cmdline);
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        cmd.arg("-serial").arg(format!("file:{}", spec.dir.join("console.log").display()));
        // Buffered I/O: every write reaches cowfs as it happens (FUSE writes through), reads
        // use the host page cache; discards are not passed on (cowfs keeps fixed sizes).
        cmd.arg("-drive").arg(format!(
            "id=root,file={},format={},if=none,cache=writeback,aio=threads,discard=ignore",
            spec.disk.display(),
            spec.disk_format
        ));
        cmd.args(["-device", "virtio-blk-device,drive=root"]);
        cmd.args(["-device", "virtio-serial-device,max_ports=2"]);
        cmd.arg("-chardev").arg(format!("socket,id=agent,path={},server=on,wait=off", spec.link.socket().display()));
        cmd.args(["-device", "virtserialport,chardev=agent,name=sail.agent"]);
        cmd.args(["-device", "virtio-rng-device"]);
        cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp_socket(spec).display()));
        if spec.incoming.is_some() {
            cmd.args(["-incoming", "defer"]);
        }
        cmd
    }

    /// Runs a migration (`migrate` or `migrate-incoming` to/from `uri`) with x-ignore-shared
    /// (RAM that is a shared file is skipped: it is the memory file) and waits for it.
    async fn migrate(&self, spec: &VmSpec, command: &str, uri: String) -> Result<()> {
        let err = |e: super::qmp::QmpError| SailboxError::host(format!("sailbox {}", spec.id), e);
        let mut qmp = Qmp::connect(&qmp_socket(spec), QMP_TIMEOUT).await.map_err(err)?;
        let caps = json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
        qmp.execute("migrate-set-capabilities", caps, QMP_TIMEOUT).await.map_err(err)?;
        qmp.execute(command, json!({"uri": uri}), QMP_TIMEOUT).await.map_err(err)?;
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        loop {
            let st = qmp.execute("query-migrate", json!({}), QMP_TIMEOUT).await.map_err(err)?;
            match st.get("status").and_then(|s| s.as_str()) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    let why = st.get("error-desc").and_then(|d| d.as_str()).unwrap_or("no reason given");
                    return Err(SailboxError::Host(format!("{command} failed: {why}")));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(SailboxError::Host(format!("{command} did not finish in time")));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn launch_inner(&self, spec: &VmSpec, procs: &mut Vec<ProcRef>) -> Result<()> {
        let log = spec.dir.join("vmm.log");
        let vmm = procs::spawn(self.command(spec), &log)?;
        procs.push(vmm.clone());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !procs::alive(&vmm) {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                return Err(SailboxError::Creation(format!(
                    "QEMU exited at start: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )));
            }
            if let Ok(mut qmp) = Qmp::connect(&qmp_socket(spec), QMP_TIMEOUT).await
                && qmp.execute("query-status", json!({}), QMP_TIMEOUT).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SailboxError::Creation("QEMU did not open its QMP socket in time".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn qmp(&self, spec: &VmSpec, command: &str) -> Result<serde_json::Value> {
        let mut qmp = Qmp::connect(&qmp_socket(spec), QMP_TIMEOUT)
            .await
            .map_err(|e| SailboxError::host(format!("sailbox {}", spec.id), e))?;
        qmp.execute(command, json!({}), QMP_TIMEOUT).await.map_err(|e| SailboxError::host(format!("sailbox {}", spec.id), e))
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    fn link(&self, dir: &Path) -> GuestLink {
        GuestLink::Serial(agent_socket(dir))
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Vec<ProcRef>> {
        let mut procs = Vec::new();
        let mut started = self.launch_inner(spec, &mut procs).await;
        if started.is_ok()
            && let Some(state) = &spec.incoming
        {
            started = self.migrate(spec, "migrate-incoming", format!("file:{}", state.display())).await;
        }
        match started {
            Ok(()) => Ok(procs),
            Err(e) => {
                for p in procs.iter().rev() {
                    procs::kill(p).await;
                }
                Err(e)
            }
        }
    }

    async fn save_device_state(&self, spec: &VmSpec, path: &Path) -> Result<()> {
        self.migrate(spec, "migrate", format!("file:{}", path.display())).await
    }

    async fn status(&self, spec: &VmSpec) -> Result<VmStatus> {
        let v = self.qmp(spec, "query-status").await?;
        Ok(match v.get("status").and_then(|s| s.as_str()) {
            Some("running") => VmStatus::Running,
            Some("paused") => VmStatus::Paused,
            _ => VmStatus::Other,
        })
    }

    async fn pause(&self, spec: &VmSpec) -> Result<()> {
        self.qmp(spec, "stop").await.map(|_| ())
    }

    async fn resume(&self, spec: &VmSpec) -> Result<()> {
        self.qmp(spec, "cont").await.map(|_| ())
    }
}
