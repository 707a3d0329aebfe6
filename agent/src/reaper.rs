//! Child reaping. As PID 1 the agent inherits every orphaned process of the guest and must
//! reap them, which rules out per-child `waitpid(pid)` (a `waitpid(-1)` elsewhere would steal
//! their statuses). One thread reaps everything and hands statuses to whoever spawned them.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

/// How a reaped process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl Exit {
    /// Shell convention: the exit code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            Self::Code(c) => c,
            Self::Signal(s) => 128 + s,
        }
    }
}

#[derive(Default)]
struct Inner {
    waiters: HashMap<u32, oneshot::Sender<Exit>>,
    /// Bumped by every spawn, so a reaper sleeping on ECHILD wakes up at once.
    spawns: u64,
}

/// The process-wide reaper; cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    inner: Arc<(Mutex<Inner>, Condvar)>,
}

impl Reaper {
    /// Starts the reaping thread.
    pub fn start() -> std::io::Result<Self> {
        let inner = Arc::new((Mutex::new(Inner::default()), Condvar::new()));
        let thread_inner = inner.clone();
        std::thread::Builder::new().name("reaper".into()).spawn(move || reap_loop(&thread_inner))?;
        Ok(Self { inner })
    }

    /// Spawns `cmd` and returns the child plus a receiver of its exit. The spawn happens
    /// under the reaper's lock, so the child cannot be reaped before its waiter exists.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<Exit>)> {
        let (lock, cvar) = &*self.inner;
        let mut inner = lock.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        inner.waiters.insert(child.id(), tx);
        inner.spawns += 1;
        cvar.notify_all();
        Ok((child, rx))
    }

    /// Spawns `cmd` without waiting for it (its status is reaped and dropped).
    pub fn spawn_detached(&self, cmd: &mut Command) -> std::io::Result<u32> {
        let (lock, cvar) = &*self.inner;
        let mut inner = lock.lock();
        let child = cmd.spawn()?;
        inner.spawns += 1;
        cvar.notify_all();
        Ok(child.id())
    }
}

fn reap_loop(inner: &(Mutex<Inner>, Condvar)) {
    let (lock, cvar) = inner;
    loop {
        let seen = lock.lock().spawns;
        // `waitpid(-1, &status, 0)`: any child, blocking.
        let (pid, status) = match rustix::process::wait(rustix::process::WaitOptions::empty()) {
            Ok(Some(reaped)) => reaped,
            Err(rustix::io::Errno::INTR) => continue,
            // ECHILD: no children (a blocking wait never returns `None`). Sleep until the next
            // spawn; orphans that the kernel hands to PID 1 meanwhile are picked up within a second.
            Ok(None) | Err(_) => {
                let mut guard = lock.lock();
                let _ = cvar.wait_while_for(&mut guard, |i| i.spawns == seen, std::time::Duration::from_secs(1));
                continue;
            }
        };
        // Not signalled means exited: without WUNTRACED no stops are reported. WEXITSTATUS,
        // as before, should anything else ever come back.
        let exit = match status.terminating_signal() {
            Some(signal) => Exit::Signal(signal),
            None => Exit::Code(status.exit_status().unwrap_or((status.as_raw() >> 8) & 0xff)),
        };
        // Detached children and adopted orphans have no waiter: their status is dropped.
        let tx = lock.lock().waiters.remove(&(pid.as_raw_pid() as u32));
        if let Some(tx) = tx {
            let _ = tx.send(exit);
        }
    }
}
