//! The host NIC's private network: one network namespace per sailbox, holding its volume
//! gateway's listener and its host-NIC `passt`, and nothing else.
//!
//! Every VM has a *host NIC* through which its guest reaches its volume gateway at
//! [`crate::gateway::GUEST_ADDR`] (docs/networking.md). Its backend is a `passt` (userspace
//! TCP/IP, one process per VM, started before QEMU on one end of a socket pair) that runs in
//! this namespace: a guest's connection to the NIC's gateway address becomes a connection to
//! `127.0.0.1` *inside the namespace*, where only the gateway listens ([`GATEWAY_PORT`]). Any
//! other destination is routed to a veth whose peer has no address, so it never connects: the
//! host's own loopback, other sailboxes' gateways and the outside are out of reach. (passt
//! refuses to start without a routable interface, hence the veth; the namespace has no link
//! to the host's.)
//!
//! Why not QEMU's user network with a `guestfwd` relay (the first design): libslirp starts
//! the relay command for every new guest connection by forking QEMU, which took ~0.65 s per
//! connection here (QEMU maps all guest memory) and blocks QEMU's main loop meanwhile; a cold
//! read opening a few connections waited seconds for its first byte, and a relay stream ran at
//! 22 MiB/s against passt's 46-56 (docs/networking.md has the figures).
//!
//! The namespace lives as long as something holds it: this handle (vmm-host keeps one per
//! sailbox while it runs), the listener's socket, or the VM's passt. A vmm-host that restarts
//! while a VM runs finds the namespace again through the passt (its pid file in the run
//! directory) and binds a new listener in it. Making a namespace needs `CAP_SYS_ADMIN` (root,
//! as vmm-host runs here) and `ip` (iproute2) to configure its links.

use std::io::Write;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Result, SailboxError};

/// The port the gateway listens on inside the namespace (the guest connects to it at the
/// NIC's gateway address, [`crate::gateway::GUEST_ADDR`]).
pub const GATEWAY_PORT: u16 = 7420;

/// The namespace's links: loopback up (the gateway's listener), and a veth carrying the
/// default route passt requires, to a peer with no address.
const SETUP: &str = "link set lo up\n\
    link add sail0 type veth peer name sail1\n\
    link set sail1 up\n\
    link set sail0 up\n\
    address add 192.0.2.1/30 dev sail0\n\
    route add default via 192.0.2.2 dev sail0\n";

/// One sailbox's host-NIC namespace.
#[derive(Debug)]
pub struct HostNic {
    ns: OwnedFd,
}

/// The file, in a run directory, naming the VM's host-NIC passt (`<pid>`).
pub fn pid_file(run_dir: &Path) -> PathBuf {
    run_dir.join("host-nic.pid")
}

impl HostNic {
    /// A new namespace, configured.
    pub fn create() -> Result<Self> {
        in_thread(|| {
            // SAFETY: unsharing only the network namespace of this short-lived thread changes
            // no memory, descriptor table or credentials the process relies on.
            unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
                .map_err(|e| SailboxError::Setup(format!("creating the host NIC's network namespace: {e}")))?;
            // Children started from this thread are in the namespace.
            let mut ip = Command::new("ip")
                .args(["-batch", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| SailboxError::Setup(format!("running ip (iproute2) to configure the host NIC: {e}")))?;
            if let Some(mut stdin) = ip.stdin.take() {
                stdin.write_all(SETUP.as_bytes()).map_err(|e| SailboxError::io("configuring the host NIC", e))?;
            }
            let out = ip.wait_with_output().map_err(|e| SailboxError::io("configuring the host NIC", e))?;
            if !out.status.success() {
                return Err(SailboxError::Setup(format!(
                    "configuring the host NIC's namespace: ip: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Self::open("/proc/thread-self/ns/net")
        })
    }

    /// The namespace the VM of `run_dir` uses, when its host-NIC passt still runs (a vmm-host
    /// restarting while the VM runs); `None` when there is none.
    pub fn of_running_vm(run_dir: &Path) -> Result<Option<Self>> {
        let Ok(text) = std::fs::read_to_string(pid_file(run_dir)) else { return Ok(None) };
        let Ok(pid) = text.trim().parse::<u32>() else { return Ok(None) };
        // The pid must still be that passt: its command line names the run directory.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let needle = run_dir.as_os_str().as_encoded_bytes();
        if cmdline.is_empty() || !cmdline.windows(needle.len()).any(|w| w == needle) {
            return Ok(None);
        }
        Self::open(&format!("/proc/{pid}/ns/net")).map(Some)
    }

    fn open(path: &str) -> Result<Self> {
        let ns = std::fs::File::open(path).map_err(|e| SailboxError::io(format!("opening {path}"), e))?;
        Ok(Self { ns: ns.into() })
    }

    /// A TCP listener on `127.0.0.1:port` inside the namespace (what the guest reaches at the
    /// NIC's gateway address and `port`).
    pub fn listen(&self, port: u16) -> Result<TcpListener> {
        in_thread(|| {
            self.enter()?;
            let l = TcpListener::bind(("127.0.0.1", port))
                .map_err(|e| SailboxError::io(format!("binding 127.0.0.1:{port} in the host NIC's namespace"), e))?;
            l.set_nonblocking(true).map_err(|e| SailboxError::io("listener", e))?;
            Ok(l)
        })
    }

    fn enter(&self) -> Result<()> {
        rustix::thread::move_into_link_name_space(self.ns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
            .map_err(|e| SailboxError::Setup(format!("entering the host NIC's network namespace: {e}")))
    }

    /// Makes the child of `cmd` join the namespace before it runs (the VM's passt).
    pub fn enter_on_spawn(&self, cmd: &mut Command) {
        let fd = self.ns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the descriptor stays open in the parent (this
        // handle) until the child has been spawned, and the child only borrows it.
        unsafe {
            cmd.pre_exec(move || {
                let ns = BorrowedFd::borrow_raw(fd);
                rustix::thread::move_into_link_name_space(ns, Some(rustix::thread::LinkNameSpaceType::Network))
                    .map_err(std::io::Error::from)
            });
        }
    }
}

/// Runs `f` on a thread of its own (namespace changes stay on that thread, which then ends).
fn in_thread<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("sail-host-nic".into())
            .spawn_scoped(s, f)
            .map_err(|e| SailboxError::io("starting a thread", e))?
            .join()
            .map_err(|_| SailboxError::Setup("the host NIC's setup thread panicked".into()))?
    })
}
