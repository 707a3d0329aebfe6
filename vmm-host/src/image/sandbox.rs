//! The build sandbox: one step's script run with an image's ext4 file system as its root,
//! isolated from the host's files.
//!
//! Why namespaces and not a builder VM: the steps are package installs and commands; under
//! QEMU TCG (what this machine runs) a VM runs them roughly ten times slower than the host,
//! and on KVM hosts a VM would still pay boot and a second copy of the image per step. The
//! sandbox gives each step what `docker build` gives a step, minus a few capabilities:
//!
//! - its own mount, PID, IPC and UTS namespaces (util-linux `unshare --kill-child`: when the
//!   build is cancelled or times out, everything the step started dies with it);
//! - the image as its root through `pivot_root`, the old root unmounted: no path leads to a
//!   host file; `/proc` of its own PID namespace with `sys`, `sysrq-trigger`, `irq`, `bus`
//!   and `fs` read-only and `kcore`, `keys`, `timer_list` masked; a private `/dev` holding only
//!   null, zero, full, random, urandom, tty and its own pts instance;
//! - Docker's default capability set without `mknod` and `net_raw` (no device nodes, no raw
//!   or packet sockets), with `no_new_privs` (setpriv);
//! - a network namespace of its own behind `pasta` (passt's namespace mode: userspace TCP/IP,
//!   no bridge, tap or host configuration), [`BuildNet`]: outbound connections leave through
//!   the host's sockets, so steps reach the package registries this host reaches, while the
//!   host's loopback (the sail API, anything else listening there) is out of reach
//!   (`--no-map-gw`) and nothing comes in (no port forwards). DNS goes to pasta's forwarder,
//!   which asks the host's resolver. (pasta started as root drops to `nobody`; pointed at a
//!   namespace created with `ip netns add` and `--runas 0:0`, it joins it.)
//!
//! The file system is a loop device over the layer's image file, mounted inside the step's
//! mount namespace with `discard` (files a step deletes are punched out of the image file, so
//! freed blocks read as zeros and are not stored). When the step ends the namespace goes
//! away, the file system is unmounted with it, and [`run_step`] waits until the loop device
//! is free before it detaches it, so the image file is complete when the caller chunks it.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Result, SailboxError};

/// Lines of a step's output kept for its error.
pub const LOG_TAIL_LINES: usize = 40;
/// Bytes of one log line kept (longer lines are cut).
const LOG_LINE_BYTES: usize = 2000;

/// What the host's shell does in the step's namespaces before it runs the step: mount the
/// image and the pseudo file systems, pivot into it, drop privileges, run the script.
const SETUP: &str = r#"set -eu
dev=$1 root=$2 resolv=$3 cas=$4
script=$SAIL_STEP_SCRIPT
unset SAIL_STEP_SCRIPT
mount -t ext4 -o discard "$dev" "$root"
# Every path below is used before pivot_root, where a symlink would resolve against the host's
# tree: an image (a step before this one) that made one of them a symlink is refused.
for d in proc dev tmp etc etc/resolv.conf etc/ssl etc/ssl/certs etc/ssl/certs/ca-certificates.crt; do
  if [ -L "$root/$d" ]; then echo "/$d in the image is a symlink; the build sandbox refuses it" >&2; exit 125; fi
done
mkdir -p "$root/proc" "$root/dev" "$root/tmp"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
for p in sys sysrq-trigger irq bus fs; do
  if [ -e "$root/proc/$p" ]; then mount --bind "$root/proc/$p" "$root/proc/$p"; mount -o remount,bind,ro "$root/proc/$p"; fi
done
for p in kcore keys timer_list; do
  if [ -e "$root/proc/$p" ]; then mount --bind /dev/null "$root/proc/$p"; fi
done
mount -t tmpfs -o nosuid,noexec,mode=755,size=1m sail-dev "$root/dev"
for n in null zero full random urandom tty; do : > "$root/dev/$n"; mount --bind "/dev/$n" "$root/dev/$n"; done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
mount -t tmpfs -o nosuid,nodev,size=64m shm "$root/dev/shm"
# pasta's resolver and the host's trust roots, read-only and for the step only (the registries this
# host reaches may sit behind a proxy whose CA only the host trusts).
# A missing resolv.conf is made for the step and removed after it.
if [ -d "$root/etc" ] && [ ! -e "$root/etc/resolv.conf" ]; then : > "$root/etc/resolv.conf"; made_resolv=1; fi
for f in "$resolv:/etc/resolv.conf" "$cas:/etc/ssl/certs/ca-certificates.crt"; do
  src=${f%%:*} dst=$root${f#*:}
  if [ -f "$src" ] && [ -f "$dst" ]; then
    mount --bind "$src" "$dst"; mount -o remount,bind,ro "$dst"
  fi
done
hostname sailbox-build 2>/dev/null || true
cd "$root"
mkdir -p .sail-old
pivot_root . .sail-old
cd /
umount -l /.sail-old
rmdir /.sail-old
if ! command -v setpriv >/dev/null 2>&1; then
  echo "the image has no setpriv (util-linux), which the build needs to drop privileges" >&2
  exit 125
fi
# Packages must not start services in the build.
if [ -d /usr/sbin ] && [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && rcd=1
fi
set +e
setpriv --no-new-privs --inh-caps=-all \
  --bounding-set=-all,+chown,+dac_override,+fowner,+fsetid,+kill,+setgid,+setuid,+setpcap,+net_bind_service,+sys_chroot,+audit_write,+setfcap \
  -- /bin/sh -e -c "$script"
rc=$?
[ -n "${rcd:-}" ] && rm -f /usr/sbin/policy-rc.d
kill -9 -1 2>/dev/null
if [ -n "${made_resolv:-}" ]; then umount /etc/resolv.conf 2>/dev/null; rm -f /etc/resolv.conf; fi
exit $rc
"#;

/// How a step ended.
#[derive(Debug)]
pub struct StepOutcome {
    /// `None` when the deadline killed it.
    pub code: Option<i32>,
    /// The last lines of its output.
    pub tail: Vec<String>,
}

impl StepOutcome {
    /// The step succeeded.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// The step's network: a named namespace (`ip netns add`) with a `pasta` attached. Dropping
/// it stops pasta and deletes the namespace.
struct BuildNet {
    name: String,
    pasta: Option<i32>,
}

/// Addresses inside the build namespace (as the guests' passt uses them).
const NET_ARGS: &[&str] = &["--address", "10.0.2.15", "--netmask", "24", "--gateway", "10.0.2.2", "--dns-forward", "10.0.2.3"];
/// The resolver a step uses: pasta's forwarder.
const NET_RESOLV: &str = "nameserver 10.0.2.3\n";

impl BuildNet {
    fn create(work: &Path) -> Result<Self> {
        let name = format!("sail-build-{:016x}", rand::random::<u64>());
        let out = Command::new("ip").args(["netns", "add", &name]).output().map_err(|e| SailboxError::ImageBuildStep {
            what: "running ip (iproute2) for the build network".into(),
            source: e.into(),
        })?;
        if !out.status.success() {
            return Err(SailboxError::ImageBuild(format!(
                "creating the build network namespace: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut net = Self { name, pasta: None };
        let pid_file = work.join("pasta.pid");
        let out = Command::new("pasta")
            .args(["--config-net", "--quiet", "--no-map-gw", "--ipv4-only", "--runas", "0:0"])
            .args(["-t", "none", "-u", "none", "-T", "none", "-U", "none"])
            .args(NET_ARGS)
            .arg("--pid")
            .arg(&pid_file)
            .arg("--netns")
            .arg(net.path())
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .output()
            .map_err(|e| SailboxError::ImageBuildStep {
                what: "running pasta (passt's namespace mode; `bash scripts/setup.sh vm` installs it)".into(),
                source: e.into(),
            })?;
        net.pasta = std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse().ok());
        if !out.status.success() || net.pasta.is_none() {
            return Err(SailboxError::ImageBuild(format!(
                "starting pasta for the build network ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(net)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for BuildNet {
    fn drop(&mut self) {
        if let Some(pid) = self.pasta.and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Detaches the loop device when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        // The file system must be gone first: wait until the device can be opened
        // exclusively (a mounted file system holds it), at most a while.
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&self.0).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Runs `script` with the ext4 image `raw` as root (see the module docs), with `env` and
/// `stdin`, until `deadline`; every output line goes to `log`.
pub fn run_step(
    raw: &Path,
    work: &Path,
    script: &str,
    env: &BTreeMap<String, String>,
    stdin: Option<File>,
    deadline: Instant,
    log: &(dyn Fn(&str) + Sync),
) -> Result<StepOutcome> {
    let setup_err = |what: &str, e: std::io::Error| SailboxError::ImageBuildStep { what: what.to_owned(), source: e.into() };
    let out =
        Command::new("losetup").args(["--find", "--show"]).arg(raw).output().map_err(|e| setup_err("running losetup", e))?;
    if !out.status.success() {
        return Err(SailboxError::ImageBuild(format!(
            "attaching {} to a loop device: {}",
            raw.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    let root = work.join("root");
    std::fs::create_dir_all(&root).map_err(|e| setup_err("creating the mount point", e))?;
    let net = BuildNet::create(work)?;
    let resolv = work.join("resolv.conf");
    std::fs::write(&resolv, NET_RESOLV).map_err(|e| setup_err("writing the build resolv.conf", e))?;

    let (reader, writer) = std::io::pipe().map_err(|e| setup_err("creating a pipe", e))?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", net.path()))
        .args(["--", "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--ipc", "--uts"])
        .arg("--")
        .args(["/bin/sh", "-c", SETUP, "sail-build"])
        .arg(&dev.0)
        .arg(&root)
        .arg(&resolv)
        .arg("/etc/ssl/certs/ca-certificates.crt")
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("SAIL_STEP_SCRIPT", script)
        .envs(env)
        .stdin(stdin.map_or_else(Stdio::null, Stdio::from))
        .stdout(writer.try_clone().map_err(|e| setup_err("pipe", e))?)
        .stderr(writer);
    let mut child = cmd.spawn().map_err(|e| setup_err("running unshare (util-linux)", e))?;
    // Drop our copies of the write end (held by `cmd`) so the reader sees EOF.
    drop(cmd);

    std::thread::scope(|s| {
        let lines = s.spawn(move || {
            let mut tail = VecDeque::with_capacity(LOG_TAIL_LINES);
            let mut r = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let mut line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                if line.len() > LOG_LINE_BYTES {
                    let mut cut = LOG_LINE_BYTES;
                    while !line.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    line.truncate(cut);
                }
                log(&line);
                if tail.len() == LOG_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            tail.into_iter().collect::<Vec<_>>()
        });
        let code = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status.code().or(Some(128)),
                Ok(None) if Instant::now() >= deadline => {
                    // nsenter execs unshare, whose --kill-child takes the step's whole PID
                    // namespace with it.
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(25)),
                Err(e) => return Err(setup_err("waiting for the step", e)),
            }
        };
        let tail = lines.join().unwrap_or_default();
        Ok(StepOutcome { code, tail })
    })
}
