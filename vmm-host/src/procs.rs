//! Processes vmm-host starts for sailboxes (VMMs, vhost-user daemons). They run in their own
//! session so they outlive a vmm-host restart, are identified by pid plus start time (a
//! recycled pid never matches), and are watched through pidfds, which also work for
//! processes this vmm-host did not start itself (re-attached after a restart).

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::error::{Result, SailboxError};
use crate::model::ProcRef;

/// Starts `cmd` in a new session with stdout and stderr appended to `log`. The child is
/// reaped by a background thread, so it never lingers as a zombie of vmm-host.
pub fn spawn(mut cmd: Command, log: &Path) -> Result<ProcRef> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| SailboxError::io(format!("opening {}", log.display()), e))?;
    let err = out.try_clone().map_err(|e| SailboxError::io("dup log", e))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe and the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().map_err(|e| SailboxError::io(format!("starting {program}"), e))?;
    let pid = child.id();
    std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            let _ = child.wait();
        })
        .map_err(|e| SailboxError::io("reaper thread", e))?;
    let start_ticks = start_ticks(pid).unwrap_or(0);
    Ok(ProcRef { pid, start_ticks })
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot).
pub fn start_ticks(pid: u32) -> Option<u64> {
    sysutil::process::start_ticks(pid)
}

/// Whether the process still runs (and is the same process: start time matches).
pub fn alive(p: &ProcRef) -> bool {
    let Some(ticks) = start_ticks(p.pid) else { return false };
    if ticks != p.start_ticks {
        return false;
    }
    // A zombie has exited: state field 3 is 'Z'.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)).unwrap_or_default();
    let state = stat.rfind(')').and_then(|i| stat[i + 2..].chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

/// A pidfd for the process, or `None` if it is gone (or not the same process).
pub fn pidfd(p: &ProcRef) -> Option<OwnedFd> {
    // Pid 0 is no process (pidfd_open would fail with EINVAL).
    let pid = rustix::process::Pid::from_raw(p.pid as i32)?;
    let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()?;
    // Check identity after opening: if the pid was recycled before pidfd_open, the start
    // time differs; after it, the pidfd pins the process we checked.
    alive(p).then_some(fd)
}

/// Resolves when the process exits (immediately if it is already gone).
pub async fn wait_exit(p: ProcRef) {
    let Some(fd) = pidfd(&p) else { return };
    // SAFETY: the AsyncFd owns the pidfd, so the descriptor stays valid while registered.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
    let Ok(afd) = registered else {
        // Cannot poll it: fall back to checking periodically.
        while alive(&p) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        return;
    };
    let _ = afd.readable().await;
}

/// Sends SIGKILL to the process if it is still the one we started, and waits (up to 5 s)
/// until it is gone.
pub async fn kill(p: &ProcRef) {
    let Some(fd) = pidfd(p) else { return };
    if let Err(e) = rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL) {
        tracing::warn!(pid = p.pid, error = %std::io::Error::from(e), "kill failed");
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), wait_exit(p.clone())).await;
}

/// Processes whose command line mentions `needle` (a run directory): orphans of an earlier
/// vmm-host are found this way.
pub fn find_by_cmdline(needle: &str) -> Vec<ProcRef> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return out };
    let me = std::process::id();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        if cmdline.split(|&b| b == 0).any(|arg| String::from_utf8_lossy(arg).contains(needle))
            && let Some(start_ticks) = start_ticks(pid)
        {
            out.push(ProcRef { pid, start_ticks });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawns_in_a_new_session_and_kills_through_a_pidfd() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let p = spawn(cmd, &dir.path().join("log")).unwrap();
        assert!(alive(&p));
        let sid = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)).unwrap();
        let sid: u32 = sid[sid.rfind(')').unwrap() + 2..].split_whitespace().nth(3).unwrap().parse().unwrap();
        assert_eq!(sid, p.pid, "the child leads its own session");
        assert!(pidfd(&p).is_some());
        kill(&p).await;
        assert!(!alive(&p));
        assert!(pidfd(&p).is_none());
        assert!(pidfd(&ProcRef { pid: 0, start_ticks: 0 }).is_none());
    }
}
