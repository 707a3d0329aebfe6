//! Processes: ending a child politely (a grace period to exit, then SIGKILL), and telling a
//! process apart from a later one that reused its pid (its start time).

use std::io;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Waits up to `grace` for `child` to exit (polling every 10 ms), then kills it and reaps it.
/// Returns its exit status, or the error of waiting on it.
pub fn wait_or_kill(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // It may exit between the last poll and the kill: kill's error is then moot.
    let _ = child.kill();
    child.wait()
}

/// Sends SIGTERM to `child`, then [`wait_or_kill`].
pub fn terminate(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        // ESRCH (already gone) is fine: the wait below reaps it.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    wait_or_kill(child, grace)
}

/// Field 22 of `/proc/PID/stat`: the process's start time in clock ticks since boot. With the
/// pid it names one process for good (a pid is reused, a pid with its start time is not).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn sigterm_ends_a_child_that_honours_it() {
        let mut child = Command::new("sleep").arg("30").spawn().expect("spawn sleep");
        let started = Instant::now();
        let status = terminate(&mut child, Duration::from_secs(10)).expect("terminate");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(15), "ended by SIGTERM, not SIGKILL: {status:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_child_ignoring_sigterm_is_killed_after_the_grace() {
        let mut child = Command::new("sh").args(["-c", "trap '' TERM; sleep 30"]).spawn().expect("spawn sh");
        std::thread::sleep(Duration::from_millis(200)); // let the trap be set
        let status = terminate(&mut child, Duration::from_millis(300)).expect("terminate");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "SIGKILL after the grace: {status:?}");
    }
}
