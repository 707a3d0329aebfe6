//! The QEMU backend: a `microvm` machine booting the PVH kernel directly, file-backed guest
//! memory (shared, or for a fork a private mapping of its checkpoint's view), the root disk
//! as virtio-blk, and the agent's link as a virtio-serial port on a chardev socket. Every device is migratable, so device state can be saved for
//! snapshots (vhost-user-vsock, the other way to reach a guest without host vhost modules,
//! blocks migration in QEMU).
//!
//! Networking (docs/networking.md): every VM has the host NIC, backed by a `passt` running
//! in the sailbox's own network namespace ([`crate::host_nic`]), where the only thing to
//! reach is the volume gateway ([`crate::gateway::GUEST_ADDR`]); a VM with
//! [`Network::Outbound`] also has the outbound NIC, backed by a second `passt` in the host's
//! namespace. Each passt is one of the VM's processes, started before QEMU and handed one end
//! of a socket pair, QEMU the other. The guest's init finds each NIC by its MAC.
//!
//! [`Qemu`] launches a VM and returns a [`QemuVm`], its handle: the spec, the processes and
//! the QMP socket. The handle opens a QMP session per operation rather than holding one: a
//! QMP socket serves one client at a time, and a session left open would lock out a vmm-host
//! re-attaching after a restart (and an operator's `socat`). Forks' live saves are
//! `mapped-ram` migration files ([`mapped_ram`]), split here into the RAM image and the
//! device state, so the format stays inside this backend.

pub mod mapped_ram;
pub mod qmp;

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures::future::BoxFuture;
use serde_json::json;

use self::mapped_ram::RamLayout;
use self::qmp::Qmp;
use super::{DeviceState, Hypervisor, Incoming, LiveSave, RamImage, StateFormat, VmHandle, VmSpec, VmStatus};
use crate::accel::Accelerator;
use crate::error::{Result, SailboxError};
use crate::link::GuestLink;
use crate::model::{Network, ProcRef};
use crate::procs;

/// How long a VMM may take to open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long saving or loading device state may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a live save of all memory may take (it copies the whole of guest RAM).
const LIVE_SAVE_TIMEOUT: Duration = Duration::from_secs(600);
/// The longest the guest may be stopped for the last pass of a live save, ms.
const LIVE_SAVE_DOWNTIME_MS: u64 = 50;

/// The QEMU backend.
pub struct Qemu {
    qemu: PathBuf,
    firmware: PathBuf,
    version: String,
    /// The outbound network's user-mode stack.
    passt: PathBuf,
}

fn qmp_socket(spec: &VmSpec) -> PathBuf {
    spec.dir.join("qmp.sock")
}

/// A VM QEMU runs: its spec, its processes (the VMM last) and its QMP socket.
pub struct QemuVm {
    spec: VmSpec,
    procs: Vec<ProcRef>,
    qmp: PathBuf,
}

/// The agent's chardev socket in a run directory.
pub fn agent_socket(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}

/// MAC of the outbound NIC (passt); the guest's init finds the NIC by it.
pub const OUTBOUND_MAC: &str = "52:54:00:5a:11:01";
/// MAC of the host NIC (passt in the sailbox's host-NIC namespace: the gateway only).
pub const HOST_MAC: &str = "52:54:00:5a:11:02";

/// The `passt` command line for a VM, its end of the socket pair being `fd`: IPv4 only, the
/// guest at 10.0.2.15/24 behind gateway 10.0.2.2, which is NOT the host (`--no-map-gw`:
/// the host's loopback stays out of reach), DNS queries to 10.0.2.3 forwarded to the host's
/// resolver, no inbound port forwards. It drops to `nobody`; the log file's path also names
/// the run directory, so orphans are found by it.
pub fn passt_command(passt: &Path, dir: &Path, fd: RawFd) -> Command {
    let mut cmd = Command::new(passt);
    cmd.args(["--foreground", "--quiet", "--ipv4-only", "--no-map-gw"]);
    cmd.args(["--address", "10.0.2.15", "--netmask", "24", "--gateway", "10.0.2.2"]);
    cmd.args(["--dns-forward", "10.0.2.3", "--dns", "10.0.2.3", "--tcp-ports", "none", "--udp-ports", "none"]);
    cmd.arg("--log-file").arg(dir.join("passt.log"));
    cmd.arg("--fd").arg(fd.to_string());
    inherit_fd(&mut cmd, fd);
    cmd
}

/// The host NIC's `passt` command line (run inside the sailbox's host-NIC namespace, see
/// [`crate::host_nic`]): the guest at 10.0.3.15/24 behind gateway 10.0.3.2, which passt
/// maps to the namespace's loopback, where the volume gateway listens; IPv4 TCP only (no
/// UDP, ICMP, DHCP or DNS: the guest's init configures the NIC), no inbound forwards. Its
/// log file names the run directory (how [`crate::host_nic::HostNic::of_running_vm`] tells it
/// is this VM's).
pub fn host_passt_command(passt: &Path, dir: &Path, fd: RawFd) -> Command {
    let mut cmd = Command::new(passt);
    cmd.args(["--foreground", "--quiet", "--ipv4-only", "--no-udp", "--no-icmp", "--no-dhcp"]);
    cmd.args(["--address", "10.0.3.15", "--netmask", "24", "--gateway", "10.0.3.2"]);
    cmd.args(["--tcp-ports", "none"]);
    cmd.arg("--log-file").arg(dir.join("host-nic.log"));
    cmd.arg("--fd").arg(fd.to_string());
    inherit_fd(&mut cmd, fd);
    cmd
}

/// Lets the child of `cmd` inherit descriptor `fd` under the same number (Rust opens every
/// descriptor close-on-exec; the flag is cleared in the child only, after the fork, so no
/// other child started meanwhile gets it).
fn inherit_fd(cmd: &mut Command, fd: RawFd) {
    // SAFETY: fcntl is async-signal-safe and changes only the child's descriptor table; the
    // descriptor stays open in the parent until the child has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            let fd = BorrowedFd::borrow_raw(fd);
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty()).map_err(std::io::Error::from)
        });
    }
}

/// Socket buffer size of each end of the passt socket pair.
const NET_SOCKET_BUFFER: usize = 8 << 20;

/// Gives a passt socket-pair end large buffers, as passt does itself for a QEMU connection
/// it accepts (not for one handed over with `--fd`). With the default ~208 KiB, a download
/// through passt ran at a fraction of QEMU user networking's speed (docs/networking.md).
/// Root may exceed `net.core.[rw]mem_max` (the `FORCE` options); otherwise the capped size.
fn enlarge_buffers(end: &std::os::unix::net::UnixStream) {
    use rustix::net::sockopt;
    if sockopt::set_socket_send_buffer_size_force(end, NET_SOCKET_BUFFER).is_err() {
        let _ = sockopt::set_socket_send_buffer_size(end, NET_SOCKET_BUFFER);
    }
    if sockopt::set_socket_recv_buffer_size_force(end, NET_SOCKET_BUFFER).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(end, NET_SOCKET_BUFFER);
    }
}

impl Qemu {
    /// Finds `qemu-system-x86_64` and its qboot firmware.
    pub fn new(qemu: PathBuf) -> Result<Self> {
        let out = Command::new(&qemu).arg("--version").output().map_err(|e| {
            SailboxError::io(
                format!("{} not runnable (run `bash scripts/setup.sh vm`: it installs qemu-system-x86)", qemu.display()),
                e,
            )
        })?;
        let version = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_owned();
        let firmware = PathBuf::from("/usr/share/qemu/qboot.rom");
        if !firmware.is_file() {
            return Err(SailboxError::Setup(format!("{} missing (Debian's qemu-system-data)", firmware.display())));
        }
        Ok(Self { qemu, firmware, version, passt: PathBuf::from("passt") })
    }

    /// The command line for `spec` (public for docs and tests). `host` is QEMU's end of the
    /// socket pair to the host NIC's passt; `outbound` its end of the one to the outbound
    /// NIC's, given exactly when `spec.network` is outbound.
    pub fn command(&self, spec: &VmSpec, host: RawFd, outbound: Option<RawFd>) -> Command {
        let mut cmd = Command::new(&self.qemu);
        let mem = format!("{}M", spec.memory_mib);
        let (accel, cpu) = match spec.accel {
            Accelerator::Kvm => ("kvm", "host"),
            Accelerator::Tcg => ("tcg", "max"),
        };
        cmd.arg("-name").arg(format!("sail-{},debug-threads=on", spec.id));
        cmd.args(["-machine", "microvm,memory-backend=mem,rtc=on", "-accel", accel, "-cpu", cpu]);
        cmd.arg("-smp").arg(spec.vcpus.to_string()).arg("-m").arg(&mem);
        // Shared: the file is the sailbox's own memory. Private: the file is a checkpoint's
        // memory, shared read-only by every fork of it; pages the guest writes are
        // copied on write into this process (QEMU opens the file read-only).
        let sharing = if spec.memory_private { "share=off,readonly=on,rom=off" } else { "share=on" };
        cmd.arg("-object").arg(format!(
            "memory-backend-file,id={},size={mem},mem-path={},{sharing},prealloc=off",
            mapped_ram::MEMORY_BLOCK,
            spec.memory_file.display()
        ));
        cmd.arg("-bios").arg(&self.firmware);
        cmd.arg("-kernel").arg(&spec.kernel).arg("-initrd").arg(&spec.initramfs).arg("-append").arg(&spec.cmdline);
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        // The console in append mode, so vmm-host can cut it down while QEMU writes
        // (guest_input::trim_console): a guest may print without end.
        cmd.arg("-chardev").arg(format!("file,id=console,path={},append=on", spec.dir.join("console.log").display()));
        cmd.arg("-serial").arg("chardev:console");
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
        // The NICs come after the other devices (each takes the next virtio-mmio transport,
        // so the others keep theirs), the host NIC first: it is there in every VM.
        cmd.arg("-netdev").arg(format!("stream,id=net1,server=off,addr.type=fd,addr.str={host}"));
        cmd.arg("-device").arg(format!("virtio-net-device,netdev=net1,mac={HOST_MAC}"));
        inherit_fd(&mut cmd, host);
        if let Some(fd) = outbound {
            cmd.arg("-netdev").arg(format!("stream,id=net0,server=off,addr.type=fd,addr.str={fd}"));
            cmd.arg("-device").arg(format!("virtio-net-device,netdev=net0,mac={OUTBOUND_MAC}"));
            inherit_fd(&mut cmd, fd);
        }
        cmd.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp_socket(spec).display()));
        if spec.incoming.is_some() {
            cmd.args(["-incoming", "defer"]);
        }
        cmd
    }

    async fn launch_inner(&self, spec: &VmSpec, procs: &mut Vec<ProcRef>) -> Result<()> {
        let log = spec.dir.join("vmm.log");
        // Each NIC's passt runs first, on one end of a socket pair; QEMU gets the other.
        // Each process holds its end only: when QEMU goes, passt sees the end of the stream
        // and exits.
        let pair = |what: &str| {
            let (qemu_end, passt_end) = std::os::unix::net::UnixStream::pair()
                .map_err(|e| SailboxError::io(format!("creating the {what} network's socket pair"), e))?;
            for end in [&qemu_end, &passt_end] {
                enlarge_buffers(end);
            }
            Ok::<_, SailboxError>((qemu_end, passt_end))
        };
        let (host_end, passt_end) = pair("host")?;
        let mut cmd = host_passt_command(&self.passt, &spec.dir, passt_end.as_raw_fd());
        spec.host_nic.enter_on_spawn(&mut cmd);
        // A missing passt fails here ("starting passt: ..."); `sail doctor` checks it.
        let host_passt = procs::spawn(cmd, &log)?;
        drop(passt_end);
        procs.push(host_passt.clone());
        std::fs::write(crate::host_nic::pid_file(&spec.dir), host_passt.pid.to_string())
            .map_err(|e| SailboxError::io("writing the host NIC's pid file", e))?;
        let outbound = match spec.network {
            Network::Outbound => {
                let (qemu_end, passt_end) = pair("outbound")?;
                let passt = procs::spawn(passt_command(&self.passt, &spec.dir, passt_end.as_raw_fd()), &log)?;
                procs.push(passt);
                Some(qemu_end)
            }
            Network::None => None,
        };
        let vmm = procs::spawn(self.command(spec, host_end.as_raw_fd(), outbound.as_ref().map(|s| s.as_raw_fd())), &log)?;
        drop((host_end, outbound));
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
}

impl QemuVm {
    /// Runs a migration (`migrate` or `migrate-incoming` to/from `uri`) in `format` and
    /// waits for it; returns QEMU's final status and when the vCPUs stopped (QEMU's `STOP`
    /// event; else the last moment the migration was seen unfinished). `IgnoreShared` skips
    /// RAM that is a shared file (the memory file is the RAM); `MappedRam` writes pages at
    /// fixed file offsets.
    async fn migrate(
        &self,
        command: &str,
        uri: String,
        format: StateFormat,
        timeout: Duration,
    ) -> Result<(serde_json::Value, Instant)> {
        let err = |source| SailboxError::Qmp { vm: self.spec.id.clone(), source };
        let mut qmp = Qmp::connect(&self.qmp, QMP_TIMEOUT).await.map_err(err)?;
        let mapped = format == StateFormat::MappedRam;
        let caps = json!({"capabilities": [
            {"capability": "x-ignore-shared", "state": !mapped},
            {"capability": "mapped-ram", "state": mapped},
        ]});
        qmp.execute("migrate-set-capabilities", caps, QMP_TIMEOUT).await.map_err(err)?;
        if mapped && command == "migrate" {
            // A local file: no bandwidth cap (QEMU's default is 128 MiB/s), a short last pass.
            let params = json!({"max-bandwidth": 1u64 << 40, "downtime-limit": LIVE_SAVE_DOWNTIME_MS});
            qmp.execute("migrate-set-parameters", params, QMP_TIMEOUT).await.map_err(err)?;
        }
        qmp.execute(command, json!({"uri": uri}), QMP_TIMEOUT).await.map_err(err)?;
        let deadline = Instant::now() + timeout;
        let mut unfinished_at = Instant::now();
        loop {
            let st = qmp.execute("query-migrate", json!({}), QMP_TIMEOUT).await.map_err(err)?;
            match st.get("status").and_then(|s| s.as_str()) {
                Some("completed") => {
                    let stopped = qmp.take_events().iter().rev().find_map(stop_time).unwrap_or(unfinished_at);
                    return Ok((st, stopped));
                }
                Some("failed") | Some("cancelled") => {
                    let why = st.get("error-desc").and_then(|d| d.as_str()).unwrap_or("no reason given");
                    return Err(SailboxError::Migration { command: command.to_owned(), reason: why.to_owned() });
                }
                _ => unfinished_at = Instant::now(),
            }
            if Instant::now() > deadline {
                let _ = qmp.execute("migrate_cancel", json!({}), QMP_TIMEOUT).await;
                return Err(SailboxError::Migration { command: command.to_owned(), reason: "it did not finish in time".into() });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn qmp(&self, command: &str) -> Result<serde_json::Value> {
        let err = |source| SailboxError::Qmp { vm: self.spec.id.clone(), source };
        let mut qmp = Qmp::connect(&self.qmp, QMP_TIMEOUT).await.map_err(err)?;
        qmp.execute(command, json!({}), QMP_TIMEOUT).await.map_err(err)
    }
}

/// When a QMP `STOP` event happened, on the monotonic clock (QEMU stamps events with the
/// wall clock; the time since then is taken off now).
fn stop_time(event: &serde_json::Value) -> Option<Instant> {
    if event.get("event").and_then(|e| e.as_str()) != Some("STOP") {
        return None;
    }
    let ts = event.get("timestamp")?;
    let (s, us) = (ts.get("seconds")?.as_u64()?, ts.get("microseconds")?.as_u64()?);
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(s) + Duration::from_micros(us);
    Instant::now().checked_sub(SystemTime::now().duration_since(at).unwrap_or_default())
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

    async fn launch(&self, spec: VmSpec) -> Result<Box<dyn VmHandle>> {
        let mut procs = Vec::new();
        let started = self.launch_inner(&spec, &mut procs).await;
        let vm = QemuVm { qmp: qmp_socket(&spec), spec, procs };
        let mut started = started;
        if started.is_ok()
            && let Some(state) = &vm.spec.incoming
        {
            let uri = format!("file:{}", state.path.display());
            started = vm.migrate("migrate-incoming", uri, state.format, MIGRATE_TIMEOUT).await.map(|_| ());
        }
        match started {
            Ok(()) => Ok(Box::new(vm)),
            Err(e) => {
                vm.kill().await;
                Err(e)
            }
        }
    }

    async fn attach(&self, spec: VmSpec, procs: Vec<ProcRef>) -> Result<Box<dyn VmHandle>> {
        let vm = QemuVm { qmp: qmp_socket(&spec), spec, procs };
        vm.status().await?;
        Ok(Box::new(vm))
    }

    fn stage_device_state(&self, state: &DeviceState, path: &Path) -> Result<Incoming> {
        match state.format {
            StateFormat::IgnoreShared => {
                std::fs::write(path, &state.bytes).map_err(|e| SailboxError::io("writing the device state", e))?
            }
            StateFormat::MappedRam => mapped_ram::write_sparse(&state.bytes, path)
                .map_err(|source| SailboxError::MappedRam { what: "staging the checkpoint's device state", source })?,
        }
        Ok(Incoming { path: path.to_path_buf(), format: state.format })
    }
}

#[async_trait]
impl VmHandle for QemuVm {
    fn spec(&self) -> &VmSpec {
        &self.spec
    }

    fn procs(&self) -> &[ProcRef] {
        &self.procs
    }

    fn alive(&self) -> bool {
        self.procs.last().is_some_and(procs::alive)
    }

    async fn status(&self) -> Result<VmStatus> {
        let v = self.qmp("query-status").await?;
        Ok(match v.get("status").and_then(|s| s.as_str()) {
            Some("running") => VmStatus::Running,
            Some("paused") => VmStatus::Paused,
            _ => VmStatus::Other,
        })
    }

    async fn pause(&self) -> Result<()> {
        self.qmp("stop").await.map(|_| ())
    }

    async fn resume(&self) -> Result<()> {
        self.qmp("cont").await.map(|_| ())
    }

    async fn save_device_state(&self, path: &Path) -> Result<DeviceState> {
        let uri = format!("file:{}", path.display());
        self.migrate("migrate", uri, StateFormat::IgnoreShared, MIGRATE_TIMEOUT).await?;
        let bytes = std::fs::read(path).map_err(|e| SailboxError::io("reading the device state", e))?;
        Ok(DeviceState { bytes, format: StateFormat::IgnoreShared })
    }

    async fn save_with_memory(&self, path: &Path) -> Result<LiveSave> {
        let _ = std::fs::remove_file(path);
        let uri = format!("file:{}", path.display());
        let (st, stopped_at) = self.migrate("migrate", uri, StateFormat::MappedRam, LIVE_SAVE_TIMEOUT).await?;
        Ok(LiveSave { downtime_ms: st.get("downtime").and_then(|d| d.as_u64()).unwrap_or(0), stopped_at })
    }

    async fn split_memory_save(&self, path: &Path) -> Result<(RamImage, DeviceState)> {
        let size = u64::from(self.spec.memory_mib) << 20;
        let path = path.to_path_buf();
        let (layout, bytes) = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                let layout = RamLayout::locate(&path, mapped_ram::MEMORY_BLOCK, size)?;
                layout.clean(&path)?;
                Ok::<_, mapped_ram::MappedRamError>((layout, mapped_ram::device_state(&path, &layout)?))
            }
        })
        .await?
        .map_err(|source| SailboxError::MappedRam { what: "splitting the memory save", source })?;
        let image = RamImage { path, offset: layout.pages_offset, size: layout.size };
        Ok((image, DeviceState { bytes, format: StateFormat::MappedRam }))
    }

    fn exited(&self) -> BoxFuture<'static, ()> {
        match self.procs.last().cloned() {
            Some(vmm) => Box::pin(procs::wait_exit(vmm)),
            None => Box::pin(std::future::ready(())),
        }
    }

    async fn kill(&self) {
        for p in self.procs.iter().rev() {
            procs::kill(p).await;
        }
    }
}
