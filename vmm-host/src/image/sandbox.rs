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
//! - the host's network namespace, so steps reach the package registries this host reaches.
//!   (A private namespace behind pasta was tried: pasta started as root drops to `nobody`
//!   before it opens a namespace and cannot join one that root made.) A step can therefore
//!   connect to services listening on the host's loopback; until API keys exist (the tenancy
//!   issue) that includes the sail API itself. docs/images.md says so.
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
# The host's resolver and trust roots, read-only and for the step only (the registries this
# host reaches may sit behind a proxy whose CA only the host trusts).
for f in "$resolv:/etc/resolv.conf" "$cas:/etc/ssl/certs/ca-certificates.crt"; do
  src=${f%%:*} dst=$root${f#*:}
  if [ -f "$src" ] && [ -f "$dst" ] && [ ! -L "$dst" ]; then
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

    let (reader, writer) = std::io::pipe().map_err(|e| setup_err("creating a pipe", e))?;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--ipc", "--uts", "--"])
        .args(["/bin/sh", "-c", SETUP, "sail-build"])
        .arg(&dev.0)
        .arg(&root)
        .arg("/etc/resolv.conf")
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
                    // unshare's --kill-child takes the step's whole PID namespace with it.
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
