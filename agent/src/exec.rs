//! Exec requests: shell commands run under request ids chosen by the host, with captured
//! (capped) output, a timeout that kills the whole process group, and detached background
//! launches. Requests live in memory until the table's retention limit; the host persists
//! results, so it only needs the agent's copy while a command runs or the host reconnects.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use proto::agent as pb;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::reaper::{Exit, Reaper};

/// Bytes of stdout and of stderr kept per request; the rest is counted, not kept.
pub use proto::agent::OUTPUT_CAP;

/// Finished requests kept for late waiters (the oldest are dropped first).
const RETAIN_FINISHED: usize = 256;

/// How long output is still read after the command exits, for pipes that a leftover
/// grandchild keeps open (`sleep 100 &` inside a foreground command).
const DRAIN_GRACE: Duration = Duration::from_millis(250);

/// Exit code reported when the timeout killed the command (as coreutils `timeout` does).
pub const TIMEOUT_CODE: i32 = 124;

/// The base environment of every command (requests add to it).
const BASE_ENV: &[(&str, &str)] = &[
    // Last: /run/sail, where the initramfs puts `sail-volume-fuse` (commit/reload/status).
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/run/sail"),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "xterm"),
    // The in-guest Python SDK, installed by the initramfs (vmm-host's guest::sdk).
    ("PYTHONPATH", "/run/sail/python"),
];

/// Why an exec request could not start.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The shell could not be started.
    #[error("could not start /bin/sh: {0}")]
    Spawn(std::io::Error),
    /// No request with this id.
    #[error("no exec request {0}")]
    NotFound(String),
}

#[derive(Default)]
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_bytes: u64,
    stderr_bytes: u64,
    result: Option<pb::ExecResult>,
}

impl Output {
    fn push(&mut self, err: bool, data: &[u8]) {
        let (buf, total) =
            if err { (&mut self.stderr, &mut self.stderr_bytes) } else { (&mut self.stdout, &mut self.stdout_bytes) };
        *total += data.len() as u64;
        let room = OUTPUT_CAP.saturating_sub(buf.len());
        buf.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// One request: its captured output and, once finished, its result.
struct Request {
    output: Mutex<Output>,
    /// Bumped on every change; streamers wait on it.
    changed: watch::Sender<u64>,
    pid: u32,
}

impl Request {
    fn update(&self, f: impl FnOnce(&mut Output)) {
        f(&mut self.output.lock());
        self.changed.send_modify(|v| *v += 1);
    }
}

/// All requests of this boot.
#[derive(Clone)]
pub struct ExecTable {
    reaper: Reaper,
    inner: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    requests: HashMap<String, Arc<Request>>,
    finished: VecDeque<String>,
}

impl ExecTable {
    /// An empty table spawning through `reaper`.
    pub fn new(reaper: Reaper) -> Self {
        Self { reaper, inner: Arc::default() }
    }

    /// Starts a request (or returns the running one with the same id).
    pub fn start(&self, req: pb::StartExecRequest) -> Result<pb::StartExecResponse, ExecError> {
        validate(&req)?;
        let table = self.inner.lock();
        if let Some(existing) = table.requests.get(&req.request_id) {
            return Ok(pb::StartExecResponse { request_id: req.request_id, already_started: true, pid: existing.pid });
        }
        let started = sysutil::clock::now_ms();
        let cmd = shell_command(&req);
        if req.background {
            self.start_background(table, cmd, req, started)
        } else {
            self.start_foreground(table, cmd, req, started)
        }
    }

    /// A detached launch: no output is kept, and the request is finished as soon as the
    /// shell is started.
    fn start_background(
        &self,
        mut table: MutexGuard<'_, Table>,
        mut cmd: Command,
        req: pb::StartExecRequest,
        started: u64,
    ) -> Result<pb::StartExecResponse, ExecError> {
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let pid = self.reaper.spawn_detached(&mut cmd).map_err(ExecError::Spawn)?;
        let (tx, _) = watch::channel(0);
        let request = Arc::new(Request { output: Mutex::default(), changed: tx, pid });
        request.update(|o| {
            o.result = Some(pb::ExecResult {
                request_id: req.request_id.clone(),
                started_unix_ms: started,
                finished_unix_ms: sysutil::clock::now_ms(),
                ..Default::default()
            })
        });
        insert(&mut table, &req.request_id, request, true);
        Ok(pb::StartExecResponse { request_id: req.request_id, already_started: false, pid })
    }

    /// A command whose output is captured; a task feeds its stdin, reads its pipes, waits
    /// for its exit (or timeout) and records the result.
    fn start_foreground(
        &self,
        mut table: MutexGuard<'_, Table>,
        mut cmd: Command,
        req: pb::StartExecRequest,
        started: u64,
    ) -> Result<pb::StartExecResponse, ExecError> {
        cmd.stdin(if req.stdin.is_empty() { Stdio::null() } else { Stdio::piped() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let (mut child, exited) = self.reaper.spawn(&mut cmd).map_err(ExecError::Spawn)?;
        let pid = child.id();
        let (tx, _) = watch::channel(0);
        let request = Arc::new(Request { output: Mutex::default(), changed: tx, pid });
        insert(&mut table, &req.request_id, request.clone(), false);
        drop(table);

        let pipes = Pipes {
            stdin: child.stdin.take().map(OwnedFd::from),
            stdout: child.stdout.take().map(OwnedFd::from),
            stderr: child.stderr.take().map(OwnedFd::from),
        };
        let request_id = req.request_id.clone();
        tokio::spawn(self.clone().supervise(request, req, pipes, exited, started));
        Ok(pb::StartExecResponse { request_id, already_started: false, pid })
    }

    /// Runs a foreground request to its end: stdin fed, output pumped until the exit (and a
    /// short grace for pipes a leftover grandchild holds), then the result recorded.
    async fn supervise(
        self,
        request: Arc<Request>,
        req: pb::StartExecRequest,
        pipes: Pipes,
        exited: tokio::sync::oneshot::Receiver<Exit>,
        started: u64,
    ) {
        let pid = request.pid;
        let timeout = (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms));
        if let Some(fd) = pipes.stdin {
            tokio::spawn(feed_stdin(fd, req.stdin));
        }
        let out = pipes.stdout.map(|fd| tokio::spawn(pump(fd, request.clone(), false)));
        let err = pipes.stderr.map(|fd| tokio::spawn(pump(fd, request.clone(), true)));
        let (exit, timed_out) = wait_exit(exited, pid, timeout).await;
        for pump in [out, err].into_iter().flatten() {
            if tokio::time::timeout(DRAIN_GRACE, pump).await.is_err() {
                tracing::debug!(pid, "output pipe still open after exit; stopped reading");
            }
        }
        let code = if timed_out { TIMEOUT_CODE } else { exit.shell_code() };
        request.update(|o| {
            o.result = Some(pb::ExecResult {
                request_id: req.request_id.clone(),
                return_code: code,
                stdout: o.stdout.clone(),
                stderr: o.stderr.clone(),
                stdout_truncated: o.stdout_bytes > o.stdout.len() as u64,
                stderr_truncated: o.stderr_bytes > o.stderr.len() as u64,
                stdout_bytes: o.stdout_bytes,
                stderr_bytes: o.stderr_bytes,
                timed_out,
                started_unix_ms: started,
                finished_unix_ms: sysutil::clock::now_ms(),
                signal: match exit {
                    Exit::Signal(s) => s,
                    Exit::Code(_) => 0,
                },
            })
        });
        self.mark_finished(&req.request_id);
    }

    fn get(&self, id: &str) -> Result<Arc<Request>, ExecError> {
        let table = self.inner.lock();
        table.requests.get(id).cloned().ok_or_else(|| ExecError::NotFound(id.to_owned()))
    }

    fn mark_finished(&self, id: &str) {
        let mut table = self.inner.lock();
        table.finished.push_back(id.to_owned());
        trim(&mut table);
    }

    /// Waits until the request finishes and returns its result.
    pub async fn wait(&self, id: &str) -> Result<pb::ExecResult, ExecError> {
        let request = self.get(id)?;
        let mut rx = request.changed.subscribe();
        loop {
            if let Some(r) = request.output.lock().result.clone() {
                return Ok(r);
            }
            if rx.changed().await.is_err() {
                return Err(ExecError::NotFound(id.to_owned()));
            }
        }
    }

    /// Streams output past the given offsets as it arrives, then the result.
    pub fn stream(
        &self,
        id: &str,
        mut out_off: u64,
        mut err_off: u64,
    ) -> Result<tokio::sync::mpsc::Receiver<pb::ExecEvent>, ExecError> {
        use pb::exec_event::Event;
        let request = self.get(id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut changes = request.changed.subscribe();
            loop {
                let (events, done) = {
                    let o = request.output.lock();
                    let mut events = Vec::new();
                    let out_new = o.stdout.get(out_off as usize..).unwrap_or_default();
                    if !out_new.is_empty() {
                        events.push(Event::Stdout(out_new.to_vec()));
                        out_off += out_new.len() as u64;
                    }
                    let err_new = o.stderr.get(err_off as usize..).unwrap_or_default();
                    if !err_new.is_empty() {
                        events.push(Event::Stderr(err_new.to_vec()));
                        err_off += err_new.len() as u64;
                    }
                    if let Some(r) = &o.result {
                        events.push(Event::Result(r.clone()));
                    }
                    (events, o.result.is_some())
                };
                for event in events {
                    if tx.send(pb::ExecEvent { event: Some(event) }).await.is_err() {
                        return;
                    }
                }
                if done || changes.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

/// Where an image's `env` steps leave their variables (`KEY=VALUE` lines; vmm-host's image
/// builder writes it).
const IMAGE_ENV: &str = "/etc/sail/image.env";
/// Bytes of [`IMAGE_ENV`] read, at most.
const IMAGE_ENV_MAX: u64 = 64 << 10;

/// The image's environment: applied over the base environment, under the request's.
fn image_env() -> Vec<(String, String)> {
    use std::io::Read;
    let mut text = String::new();
    let Ok(f) = std::fs::File::open(IMAGE_ENV) else { return Vec::new() };
    if f.take(IMAGE_ENV_MAX).read_to_string(&mut text).is_err() {
        return Vec::new();
    }
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The child's ends of a foreground request's pipes.
struct Pipes {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

/// `/bin/sh -c COMMAND` in the request's directory and environment, in a session of its own.
fn shell_command(req: &pb::StartExecRequest) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(&req.command).env_clear();
    cmd.current_dir(if req.cwd.is_empty() { "/" } else { &req.cwd });
    for (k, v) in BASE_ENV {
        cmd.env(k, v);
    }
    for (k, v) in image_env() {
        cmd.env(k, v);
    }
    for e in &req.env {
        cmd.env(&e.name, &e.value);
    }
    // Its own session and process group: a timeout kills everything it started, and a
    // background launch outlives nothing of ours.
    // SAFETY: setsid is async-signal-safe (one raw syscall, no allocation); nothing else runs
    // between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            Ok(())
        });
    }
    cmd
}

fn insert(table: &mut Table, id: &str, request: Arc<Request>, finished: bool) {
    table.requests.insert(id.to_owned(), request);
    if finished {
        table.finished.push_back(id.to_owned());
        trim(table);
    }
}

fn trim(table: &mut Table) {
    while table.finished.len() > RETAIN_FINISHED {
        if let Some(old) = table.finished.pop_front() {
            table.requests.remove(&old);
        }
    }
}

fn validate(req: &pb::StartExecRequest) -> Result<(), ExecError> {
    let bad = |m: &str| Err(ExecError::Invalid(m.to_owned()));
    if req.request_id.is_empty() || req.request_id.len() > 128 {
        return bad("request_id must be 1..=128 bytes");
    }
    if req.command.is_empty() {
        return bad("command is empty");
    }
    if req.command.contains('\0') || req.cwd.contains('\0') {
        return bad("command and cwd must not contain NUL");
    }
    if !req.cwd.is_empty() {
        if !req.cwd.starts_with('/') {
            return bad("cwd must be an absolute path");
        }
        if !std::path::Path::new(&req.cwd).is_dir() {
            return Err(ExecError::Invalid(format!("cwd {} is not a directory", req.cwd)));
        }
    }
    for e in &req.env {
        if e.name.is_empty() || e.name.contains(['=', '\0']) || e.value.contains('\0') {
            return Err(ExecError::Invalid(format!("bad environment variable name {:?}", e.name)));
        }
    }
    Ok(())
}

/// Waits for the exit, killing the process group when the timeout passes first.
async fn wait_exit(mut exited: tokio::sync::oneshot::Receiver<Exit>, pid: u32, timeout: Option<Duration>) -> (Exit, bool) {
    let mut timed_out = false;
    if let Some(limit) = timeout {
        match tokio::time::timeout(limit, &mut exited).await {
            Ok(exit) => return (exit.unwrap_or(Exit::Code(-1)), false),
            Err(_) => {
                timed_out = true;
                // The group id is the child's pid (setsid). ESRCH (all gone already) is moot.
                if let Some(group) = rustix::process::Pid::from_raw(pid as i32) {
                    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                }
            }
        }
    }
    (exited.await.unwrap_or(Exit::Code(-1)), timed_out)
}

async fn pump(fd: OwnedFd, request: Arc<Request>, err: bool) {
    let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else { return };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.update(|o| o.push(err, &buf[..n])),
        }
    }
}

async fn feed_stdin(fd: OwnedFd, data: Vec<u8>) {
    use tokio::io::AsyncWriteExt;
    if let Ok(mut pipe) = tokio::net::unix::pipe::Sender::from_owned_fd(fd) {
        let _ = pipe.write_all(&data).await;
    }
}
