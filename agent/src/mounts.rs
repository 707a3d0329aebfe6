//! Volume mounts: one `sail-volume-fuse` helper per mounted path, supervised.
//!
//! `Mount` validates the request, creates the mount point and starts the helper
//! (`<helper> --endpoint E --org O --cache-dir <volumes>/cache --overlay-dir
//! <volumes>/overlay/<hash> --control-socket <run>/<hash>.sock [--trusted-endpoint] VOLUME PATH`,
//! `--trusted-endpoint` when the host says the endpoint is its verifying gateway, `<hash>` being the
//! first 16 hex digits of BLAKE3 of the canonical mount path, the helper's own default naming),
//! then answers once the helper's control socket reports a status carrying the helper's pid.
//! A supervisor task per mount waits for the helper to exit: a helper that dies without an
//! `Unmount` (killed, crashed) leaves a dead FUSE mount (ENOTCONN), which is detached, and
//! the helper is started again after a backoff (100 ms doubling to 5 s; reset once a helper
//! stayed up for a minute). A helper that exits with status 0 was unmounted by someone in the
//! guest (`umount`, the SDK's or the CLI's unmount): the mount is forgotten, not restarted.
//!
//! Helper stdout and stderr go through a pipe into `<run>/<hash>.log` (truncated when it
//! passes 1 MiB) and into an in-memory tail that failures quote.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proto::agent as pb;
use serde_json::Value;
use tokio::sync::{oneshot, watch};

use crate::reaper::{Exit, Reaper};

/// Most mounts at once.
pub const MAX_MOUNTS: usize = 16;

/// Longest mount path, in bytes.
pub const MAX_PATH: usize = 4096;

/// Longest endpoint URL, in bytes.
const MAX_ENDPOINT: usize = 2048;

/// Where the helper binary is by default (init.sh copies it there from the initramfs).
pub const DEFAULT_HELPER: &str = "/run/sail/sail-volume-fuse";

/// Where the chunk cache and the overlays live by default (on the guest's disk).
pub const DEFAULT_VOLUMES_DIR: &str = "/var/lib/sail/volumes";

/// Where control sockets and helper logs go by default (the helper's own default as root).
pub const DEFAULT_RUN_DIR: &str = "/run/sail/mounts";

/// How long a helper may take to answer its control socket after it starts (it connects to
/// volumed and fetches the head first; guests under TCG are slow).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long one control call may take (status, unmount).
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause between readiness polls.
const READY_POLL: Duration = Duration::from_millis(50);

/// First restart delay; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Longest restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A helper that stayed up this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// How long an unmounted helper may take to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// A log file past this size is truncated.
const LOG_LIMIT: u64 = 1 << 20;

/// Bytes of helper output kept in memory for error messages.
const TAIL_BYTES: usize = 4096;

/// Bytes of that tail quoted in an error.
const TAIL_QUOTED: usize = 2048;

/// Where and with what the supervisor runs helpers.
#[derive(Clone, Debug)]
pub struct MountsConfig {
    /// The `sail-volume-fuse` binary.
    pub helper: PathBuf,
    /// Chunk cache (`cache/`) and overlays (`overlay/<hash>/`).
    pub volumes_dir: PathBuf,
    /// Control sockets (`<hash>.sock`) and helper logs (`<hash>.log`).
    pub run_dir: PathBuf,
}

impl Default for MountsConfig {
    fn default() -> Self {
        Self { helper: DEFAULT_HELPER.into(), volumes_dir: DEFAULT_VOLUMES_DIR.into(), run_dir: DEFAULT_RUN_DIR.into() }
    }
}

/// Why a mount request failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The request is malformed (path, names, endpoint).
    #[error("{0}")]
    Invalid(String),
    /// The path carries another volume.
    #[error("{path} already has volume {org}/{volume} mounted")]
    Conflict {
        /// The mount path.
        path: String,
        /// The org of the mounted volume.
        org: String,
        /// The mounted volume.
        volume: String,
    },
    /// [`MAX_MOUNTS`] are mounted.
    #[error("at most {MAX_MOUNTS} volumes can be mounted at once")]
    TooMany,
    /// Nothing is mounted at the path.
    #[error("no volume is mounted at {0}")]
    NotFound(String),
    /// The mount point could not be prepared.
    #[error("preparing mount point {path}: {source}")]
    MountPoint {
        /// The mount path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The helper binary is not there.
    #[error("the volume helper is not installed at {0} (this guest cannot mount volumes)")]
    NoHelper(String),
    /// The helper could not be started or exited before it answered.
    #[error("volume helper failed: {0}")]
    Helper(String),
    /// The helper did not answer in time.
    #[error("volume helper did not answer within {}s: {tail}", .after.as_secs())]
    Timeout {
        /// How long it was given.
        after: Duration,
        /// The tail of its output.
        tail: String,
    },
}

/// A mount's lifecycle state (the wire strings of `MountInfo.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountState {
    /// The helper is starting.
    Mounting,
    /// The helper answers on its control socket.
    Mounted,
    /// The helper died; a new one starts after a backoff.
    Restarting,
    /// The helper never came up.
    Failed,
    /// Unmounted.
    Unmounted,
}

impl MountState {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mounting => "mounting",
            Self::Mounted => "mounted",
            Self::Restarting => "restarting",
            Self::Failed => "failed",
            Self::Unmounted => "unmounted",
        }
    }
}

/// What changes over a mount's life.
#[derive(Clone, Debug)]
struct Status {
    state: MountState,
    head: String,
    dirty_bytes: u64,
    restarts: u32,
    last_error: String,
    pid: u32,
}

/// One mount.
struct Entry {
    /// As requested.
    path: String,
    /// Canonical (what the helper mounts and hashes).
    canonical: PathBuf,
    volume: String,
    org: String,
    endpoint: String,
    /// The endpoint verifies chunks (the host's gateway): `--trusted-endpoint`.
    trusted_endpoint: bool,
    /// Names the socket, log and overlay.
    hash: String,
    status: Mutex<Status>,
    /// The state after every change (waiters for "mounting" to end).
    state_tx: watch::Sender<MountState>,
    /// Set once by Unmount.
    stop_tx: watch::Sender<bool>,
    /// The supervisor task (taken by Unmount to wait for it).
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Entry {
    fn info(&self) -> pb::MountInfo {
        let s = self.status.lock().clone();
        pb::MountInfo {
            path: self.path.clone(),
            volume: self.volume.clone(),
            org: self.org.clone(),
            state: s.state.as_str().to_owned(),
            head_commit: s.head,
            dirty_bytes: s.dirty_bytes,
            restarts: s.restarts,
            last_error: s.last_error,
            pid: s.pid,
        }
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        let state = {
            let mut s = self.status.lock();
            f(&mut s);
            s.state
        };
        self.state_tx.send_replace(state);
    }

    fn stopping(&self) -> bool {
        *self.stop_tx.borrow()
    }
}

/// The mounts of this guest; cheap to clone.
#[derive(Clone)]
pub struct Mounts {
    inner: Arc<Inner>,
}

struct Inner {
    config: MountsConfig,
    reaper: Reaper,
    /// By canonical path.
    table: Mutex<HashMap<PathBuf, Arc<Entry>>>,
}

impl Mounts {
    /// No mounts yet.
    pub fn new(config: MountsConfig, reaper: Reaper) -> Self {
        Self { inner: Arc::new(Inner { config, reaper, table: Mutex::new(HashMap::new()) }) }
    }

    /// Mounts `req.volume` at `req.path` and returns once the helper answers (or the same
    /// volume already mounted there).
    pub async fn mount(&self, req: pb::MountRequest) -> Result<pb::MountInfo, MountError> {
        check_path(&req.path)?;
        for (what, name) in [("org", &req.org), ("volume", &req.volume)] {
            proto::volume::check_volume_name(what, name).map_err(MountError::Invalid)?;
        }
        check_endpoint(&req.endpoint)?;
        let path = req.path.clone();
        let canonical = tokio::task::spawn_blocking(move || prepare_mount_point(&path))
            .await
            .map_err(|e| MountError::Helper(format!("preparing the mount point: {e}")))??;

        let (entry, first_rx) = {
            let mut table = self.inner.table.lock();
            if let Some(existing) = table.get(&canonical) {
                if existing.volume != req.volume || existing.org != req.org {
                    return Err(MountError::Conflict {
                        path: req.path,
                        org: existing.org.clone(),
                        volume: existing.volume.clone(),
                    });
                }
                (existing.clone(), None)
            } else {
                if table.len() >= MAX_MOUNTS {
                    return Err(MountError::TooMany);
                }
                let hash = path_hash(&canonical);
                let entry = Arc::new(Entry {
                    path: req.path.clone(),
                    canonical: canonical.clone(),
                    volume: req.volume,
                    org: req.org,
                    endpoint: req.endpoint,
                    trusted_endpoint: req.trusted_endpoint,
                    hash,
                    status: Mutex::new(Status {
                        state: MountState::Mounting,
                        head: String::new(),
                        dirty_bytes: 0,
                        restarts: 0,
                        last_error: String::new(),
                        pid: 0,
                    }),
                    state_tx: watch::channel(MountState::Mounting).0,
                    stop_tx: watch::channel(false).0,
                    task: Mutex::new(None),
                });
                table.insert(canonical, entry.clone());
                let (first_tx, first_rx) = oneshot::channel();
                let task = tokio::spawn(self.clone().supervise(entry.clone(), first_tx));
                *entry.task.lock() = Some(task);
                (entry, Some(first_rx))
            }
        };
        match first_rx {
            // This call started the helper: its first outcome is ours.
            Some(rx) => match rx.await {
                Ok(Ok(())) => Ok(entry.info()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(MountError::Helper("the mount's supervisor ended before the helper answered".into())),
            },
            // Mounted (or being mounted) by an earlier call: wait until it is up.
            None => {
                let mut rx = entry.state_tx.subscribe();
                let state = *rx
                    .wait_for(|s| *s != MountState::Mounting)
                    .await
                    .map_err(|_| MountError::Helper("the mount's supervisor ended before the helper answered".into()))?;
                match state {
                    MountState::Failed => Err(MountError::Helper(entry.status.lock().last_error.clone())),
                    _ => Ok(entry.info()),
                }
            }
        }
    }

    /// Unmounts the volume at `path`: asks the helper to unmount, waits for it to exit
    /// (killing it after a grace period) and detaches whatever is left mounted.
    pub async fn unmount(&self, path: &str) -> Result<pb::MountInfo, MountError> {
        check_path(path)?;
        let entry = {
            let table = self.inner.table.lock();
            let wanted = Path::new(path);
            table
                .values()
                .find(|e| e.path == path || e.canonical == wanted)
                .cloned()
                .ok_or_else(|| MountError::NotFound(path.to_owned()))?
        };
        entry.stop_tx.send_replace(true);
        let task = entry.task.lock().take();
        match task {
            Some(task) => {
                if let Err(e) = task.await {
                    self.forget(&entry, MountState::Unmounted, format!("the mount's supervisor failed: {e}"));
                }
            }
            None => {
                // A concurrent Unmount took the task: wait until the supervisor is done.
                let mut rx = entry.state_tx.subscribe();
                let done = rx.wait_for(|s| matches!(s, MountState::Unmounted | MountState::Failed));
                let _ = tokio::time::timeout(EXIT_GRACE * 3, done).await;
            }
        }
        Ok(entry.info())
    }

    /// Every mount, with head and dirty bytes asked of each live helper.
    pub async fn list(&self) -> Vec<pb::MountInfo> {
        let entries: Vec<Arc<Entry>> = self.inner.table.lock().values().cloned().collect();
        let queries = entries.iter().map(|e| async move {
            if e.status.lock().state != MountState::Mounted {
                return;
            }
            match status(&self.socket(e)).await {
                Ok(st) => e.update(|s| {
                    s.head = st.head;
                    s.dirty_bytes = st.dirty_bytes;
                    s.last_error.clear();
                }),
                Err(why) => e.update(|s| s.last_error = format!("status: {why}")),
            }
        });
        futures::future::join_all(queries).await;
        let mut infos: Vec<pb::MountInfo> = entries.iter().map(|e| e.info()).collect();
        infos.sort_by(|a, b| a.path.cmp(&b.path));
        infos
    }

    fn socket(&self, e: &Entry) -> PathBuf {
        self.inner.config.run_dir.join(format!("{}.sock", e.hash))
    }

    fn log_path(&self, e: &Entry) -> PathBuf {
        self.inner.config.run_dir.join(format!("{}.log", e.hash))
    }

    /// Runs the helper of `entry` until Unmount: starts it, reports the first outcome on
    /// `first`, restarts it when it dies.
    async fn supervise(self, entry: Arc<Entry>, first: oneshot::Sender<Result<(), MountError>>) {
        let mut first = Some(first);
        let mut stop = entry.stop_tx.subscribe();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let why = match self.spawn(&entry) {
                Ok(mut helper) => match self.run_helper(&entry, &mut helper, &mut stop, &mut first).await {
                    Run::Stopped | Run::Forgotten => return,
                    Run::Ended { why, up_for } => {
                        if up_for >= STABLE_AFTER {
                            backoff = FIRST_BACKOFF;
                        }
                        why
                    }
                },
                Err(e) => e,
            };
            // The helper is gone (or never started) without an Unmount.
            if let Some(tx) = first.take() {
                self.forget(&entry, MountState::Failed, why.to_string());
                let _ = tx.send(Err(why));
                return;
            }
            let path = entry.canonical.clone();
            let cleaned = tokio::task::spawn_blocking(move || sysutil::mount::clean_dead_mount(&path)).await.unwrap_or(false);
            tracing::warn!(path = %entry.path, volume = %entry.volume, error = %why, cleaned, "volume helper died; restarting it");
            entry.update(|s| {
                s.state = MountState::Restarting;
                s.pid = 0;
                s.restarts += 1;
                s.last_error = if cleaned { format!("{why} (dead mount detached)") } else { why.to_string() };
            });
            if !self.pause(&entry, &mut stop, &mut backoff).await {
                return;
            }
        }
    }

    /// Runs one helper: waits for it to answer (reporting the first outcome), then for it to
    /// exit or for Unmount.
    async fn run_helper(
        &self,
        entry: &Arc<Entry>,
        helper: &mut Helper,
        stop: &mut watch::Receiver<bool>,
        first: &mut Option<oneshot::Sender<Result<(), MountError>>>,
    ) -> Run {
        let pid = helper.child.id();
        entry.update(|s| s.pid = pid);
        let socket = self.socket(entry);
        let ready = tokio::select! {
            r = tokio::time::timeout(READY_TIMEOUT, wait_ready(&socket, pid)) => Some(r.is_ok()),
            _ = helper.exited() => None,
            _ = stopped(stop) => {
                self.stop_helper(entry, helper).await;
                return Run::Stopped;
            }
        };
        match ready {
            Some(true) => {}
            Some(false) => {
                helper.kill();
                let _ = tokio::time::timeout(EXIT_GRACE, helper.exited()).await;
                return Run::Ended {
                    why: MountError::Timeout { after: READY_TIMEOUT, tail: helper.tail().await },
                    up_for: Duration::ZERO,
                };
            }
            None => return Run::Ended { why: helper.failure().await, up_for: Duration::ZERO },
        }
        let up_since = Instant::now();
        entry.update(|s| {
            s.state = MountState::Mounted;
            s.last_error.clear();
        });
        if let Some(tx) = first.take() {
            let _ = tx.send(Ok(()));
        }
        tracing::info!(path = %entry.path, volume = %entry.volume, pid, "volume mounted");
        let exit = tokio::select! {
            exit = helper.exited() => exit,
            _ = stopped(stop) => {
                self.stop_helper(entry, helper).await;
                return Run::Stopped;
            }
        };
        let path = entry.canonical.clone();
        let still_mounted = tokio::task::spawn_blocking(move || is_mounted(&path)).await.unwrap_or(true);
        if exit == Some(Exit::Code(0)) && !still_mounted {
            // Unmounted from inside the guest (umount, the SDK, the CLI): not a crash.
            tracing::info!(path = %entry.path, "volume unmounted in the guest; the mount is forgotten");
            self.forget(entry, MountState::Unmounted, String::new());
            return Run::Forgotten;
        }
        Run::Ended { why: helper.failure().await, up_for: up_since.elapsed() }
    }

    /// Sleeps the backoff (doubling it) unless Unmount comes first; false when it did (the
    /// mount is then forgotten).
    async fn pause(&self, entry: &Arc<Entry>, stop: &mut watch::Receiver<bool>, backoff: &mut Duration) -> bool {
        let delay = *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(stop) => {}
        }
        if entry.stopping() {
            let path = entry.canonical.clone();
            let _ = tokio::task::spawn_blocking(move || sysutil::mount::clean_dead_mount(&path)).await;
            self.forget(entry, MountState::Unmounted, String::new());
            return false;
        }
        true
    }

    /// Unmount of a running helper: the control socket's "unmount", then the exit (killed
    /// after [`EXIT_GRACE`]), then a lazy detach of anything still mounted.
    async fn stop_helper(&self, entry: &Arc<Entry>, helper: &mut Helper) {
        let asked = call(&self.socket(entry), "unmount").await;
        let exited = asked.is_ok() && tokio::time::timeout(EXIT_GRACE, helper.exited()).await.is_ok();
        if !exited {
            if let Err(e) = &asked {
                tracing::warn!(path = %entry.path, error = %e, "helper did not take the unmount request; killing it");
            }
            helper.kill();
            let _ = tokio::time::timeout(EXIT_GRACE, helper.exited()).await;
        }
        let path = entry.canonical.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if is_mounted(&path) {
                let _ = sysutil::mount::lazy_unmount(&path);
            }
        })
        .await;
        tracing::info!(path = %entry.path, volume = %entry.volume, "volume unmounted");
        self.forget(entry, MountState::Unmounted, String::new());
    }

    /// Removes `entry` from the table with its final state.
    fn forget(&self, entry: &Arc<Entry>, state: MountState, why: String) {
        {
            let mut table = self.inner.table.lock();
            if table.get(&entry.canonical).is_some_and(|e| Arc::ptr_eq(e, entry)) {
                table.remove(&entry.canonical);
            }
        }
        entry.update(|s| {
            s.state = state;
            s.pid = 0;
            if !why.is_empty() {
                s.last_error = why;
            }
        });
    }

    /// Starts the helper of `entry`, its output piped into the log and the tail.
    fn spawn(&self, entry: &Entry) -> Result<Helper, MountError> {
        let cfg = &self.inner.config;
        if !cfg.helper.is_file() {
            return Err(MountError::NoHelper(cfg.helper.display().to_string()));
        }
        let io = |what: &str, e: std::io::Error| MountError::Helper(format!("{what}: {e}"));
        let overlay = cfg.volumes_dir.join("overlay").join(&entry.hash);
        let cache = cfg.volumes_dir.join("cache");
        for d in [&overlay, &cache, &cfg.run_dir] {
            std::fs::create_dir_all(d).map_err(|e| io(&format!("creating {}", d.display()), e))?;
        }
        let (reader, writer) = std::io::pipe().map_err(|e| io("creating the output pipe", e))?;
        let writer2 = writer.try_clone().map_err(|e| io("creating the output pipe", e))?;
        let mut cmd = Command::new(&cfg.helper);
        cmd.arg("--endpoint")
            .arg(&entry.endpoint)
            .arg("--org")
            .arg(&entry.org)
            .arg("--cache-dir")
            .arg(&cache)
            .arg("--overlay-dir")
            .arg(&overlay)
            .arg("--control-socket")
            .arg(self.socket(entry))
            .args(entry.trusted_endpoint.then_some("--trusted-endpoint"))
            .arg(&entry.volume)
            .arg(&entry.canonical)
            // Its error is its last line (error backtraces would push it out of the tail).
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer2)
            // Its own group: signals meant for the agent's group do not reach it.
            .process_group(0);
        let (child, exit) =
            self.inner.reaper.spawn(&mut cmd).map_err(|e| io(&format!("starting {}", cfg.helper.display()), e))?;
        // The parent's copies of the pipe's write end go with the command.
        drop(cmd);
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_BYTES)));
        let (done_tx, done_rx) = oneshot::channel();
        let log = self.log_path(entry);
        {
            let tail = tail.clone();
            let spawned = std::thread::Builder::new().name("sail-mount-log".into()).spawn(move || {
                copy_output(reader, &log, &tail);
                let _ = done_tx.send(());
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "helper output thread not started; its output is lost");
            }
        }
        Ok(Helper { child, exit: Some(exit), exited: None, tail, done: Some(done_rx) })
    }
}

/// A running helper.
struct Helper {
    child: Child,
    /// Its exit, from the reaper (taken once it fired).
    exit: Option<oneshot::Receiver<Exit>>,
    /// Its exit once known (`Some(None)`: the reaper dropped it).
    exited: Option<Option<Exit>>,
    tail: Arc<Mutex<VecDeque<u8>>>,
    /// Fires when the output pipe is drained (the helper exited).
    done: Option<oneshot::Receiver<()>>,
}

/// How one helper's run ended.
enum Run {
    /// Unmount stopped it; the mount is forgotten.
    Stopped,
    /// It was unmounted in the guest; the mount is forgotten.
    Forgotten,
    /// It exited, died or never answered: restart it (or fail the first mount).
    Ended { why: MountError, up_for: Duration },
}

impl Helper {
    /// Waits for the exit (cancel-safe; remembered once seen).
    async fn exited(&mut self) -> Option<Exit> {
        if let Some(e) = self.exited {
            return e;
        }
        let e = match self.exit.as_mut() {
            Some(rx) => rx.await.ok(),
            None => None,
        };
        self.exit = None;
        self.exited = Some(e);
        e
    }

    /// SIGKILL, unless it is known to have exited (its pid could be someone else's by now).
    fn kill(&mut self) {
        if self.exited.is_some() {
            return;
        }
        if let Some(rx) = self.exit.as_mut() {
            let seen = match rx.try_recv() {
                Ok(e) => Some(Some(e)),
                Err(oneshot::error::TryRecvError::Closed) => Some(None),
                Err(oneshot::error::TryRecvError::Empty) => None,
            };
            if seen.is_some() {
                self.exited = seen;
                self.exit = None;
                return;
            }
        }
        let _ = self.child.kill();
    }

    /// Why it ended: how it exited, and the tail of its output.
    async fn failure(&mut self) -> MountError {
        let how = match self.exited().await {
            Some(Exit::Code(c)) => format!("exited with status {c}"),
            Some(Exit::Signal(s)) => format!("killed by signal {s}"),
            None => "ended (status unknown)".to_owned(),
        };
        let tail = self.tail().await;
        MountError::Helper(if tail.is_empty() { how } else { format!("{how}: {tail}") })
    }

    /// The last lines the helper wrote (waits briefly for its output to drain).
    async fn tail(&mut self) -> String {
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), done).await;
        }
        let bytes: Vec<u8> = self.tail.lock().iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim();
        let start = text.len().saturating_sub(TAIL_QUOTED);
        let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
        text[start..].to_owned()
    }
}

/// Copies the helper's output into the log file (truncated past [`LOG_LIMIT`]) and the tail,
/// until the pipe closes.
fn copy_output(mut reader: std::io::PipeReader, log: &Path, tail: &Mutex<VecDeque<u8>>) {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log).ok();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        {
            let mut t = tail.lock();
            t.extend(&buf[..n]);
            let excess = t.len().saturating_sub(TAIL_BYTES);
            t.drain(..excess);
        }
        if let Some(f) = file.as_mut() {
            if f.metadata().is_ok_and(|m| m.len() > LOG_LIMIT) {
                let _ = f.set_len(0);
                let _ = f.write_all(b"[log truncated]\n");
            }
            let _ = f.write_all(&buf[..n]);
        }
    }
}

/// Until Unmount is asked for.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What the agent reads of a helper's status.
struct HelperStatus {
    head: String,
    dirty_bytes: u64,
    pid: u64,
}

/// One control request with [`CALL_TIMEOUT`].
async fn call(socket: &Path, op: &str) -> Result<Value, String> {
    let req = serde_json::json!({ "op": op });
    match tokio::time::timeout(CALL_TIMEOUT, control_wire::call_async(socket, &req)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("control socket {} did not answer within {}s", socket.display(), CALL_TIMEOUT.as_secs())),
    }
}

/// The helper's status (head, dirty bytes, pid).
async fn status(socket: &Path) -> Result<HelperStatus, String> {
    let v = call(socket, "status").await?;
    Ok(HelperStatus {
        head: v.get("head").and_then(Value::as_str).unwrap_or_default().to_owned(),
        dirty_bytes: v.get("dirty_bytes").and_then(Value::as_u64).unwrap_or(0),
        pid: v.get("pid").and_then(Value::as_u64).unwrap_or(0),
    })
}

/// Polls the control socket until the helper with `pid` answers (a stale socket of an
/// earlier helper answers with another pid, or not at all).
async fn wait_ready(socket: &Path, pid: u32) {
    loop {
        if status(socket).await.is_ok_and(|s| s.pid == u64::from(pid)) {
            return;
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// An absolute, normalised path other than `/`: no `.`, `..` or empty components, no
/// trailing slash, no NUL, at most [`MAX_PATH`] bytes.
fn check_path(path: &str) -> Result<(), MountError> {
    let bad = |why: &str| Err(MountError::Invalid(format!("mount path {path:?} {why}")));
    if path.len() > MAX_PATH {
        return Err(MountError::Invalid(format!("mount path is longer than {MAX_PATH} bytes")));
    }
    if !path.starts_with('/') {
        return bad("must be absolute");
    }
    if path == "/" {
        return bad("must not be the root");
    }
    if path.contains('\0') {
        return bad("contains NUL");
    }
    if path.ends_with('/') || path.contains("//") {
        return bad("must be normalised (no empty components or trailing slash)");
    }
    if path.split('/').any(|c| c == "." || c == "..") {
        return bad("must not contain . or .. components");
    }
    Ok(())
}

fn check_endpoint(endpoint: &str) -> Result<(), MountError> {
    let ok = (endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        && endpoint.len() <= MAX_ENDPOINT
        && !endpoint.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok { Ok(()) } else { Err(MountError::Invalid(format!("endpoint {endpoint:?} must be an http:// or https:// URL"))) }
}

/// Detaches a dead mount at `path`, creates the directory if missing, and returns its
/// canonical form.
fn prepare_mount_point(path: &str) -> Result<PathBuf, MountError> {
    let p = Path::new(path);
    let err = |source| MountError::MountPoint { path: path.to_owned(), source };
    sysutil::mount::clean_dead_mount(p);
    std::fs::create_dir_all(p).map_err(err)?;
    let canonical = std::fs::canonicalize(p).map_err(err)?;
    if canonical == Path::new("/") {
        return Err(MountError::Invalid(format!("mount path {path:?} resolves to the root")));
    }
    Ok(canonical)
}

/// The helper's naming hash of a mount path: 16 hex digits of BLAKE3.
fn path_hash(canonical: &Path) -> String {
    let hash = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
    hash[..16].to_owned()
}

/// Whether something is mounted at `path` (per /proc/self/mountinfo; no stat of the mount,
/// which could hang on a dead helper).
fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = path.as_os_str().as_encoded_bytes();
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|point| unescape_octal(point) == want))
}

/// A mountinfo field with its `\ooo` escapes (space, tab, newline, backslash) decoded.
fn unescape_octal(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let digits = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match digits {
            Some(d) if b[i] == b'\\' => {
                out.push(d.iter().fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        for ok in ["/mnt/vol", "/a", "/home/user/work space"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in ["", "rel", "/", "/a/", "/a//b", "/a/./b", "/a/../b", "/a\0b"] {
            assert!(matches!(check_path(bad), Err(MountError::Invalid(_))), "{bad:?}");
        }
        assert!(check_path(&format!("/{}", "a".repeat(MAX_PATH))).is_err());
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(check_endpoint("http://10.0.3.2:7420").is_ok());
        for bad in ["", "10.0.3.2:7420", "http://a b", "ftp://x"] {
            assert!(check_endpoint(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_octal(r"/tmp/work\040space\134x"), b"/tmp/work space\\x");
        assert_eq!(unescape_octal("/plain"), b"/plain");
        assert_eq!(unescape_octal(r"/odd\09"), br"/odd\09");
    }

    #[test]
    fn hash_matches_the_helpers_naming() {
        // guest-fuse's default_socket_path: 16 hex digits of BLAKE3 of the path bytes.
        let h = path_hash(Path::new("/mnt/vol"));
        assert_eq!(h.len(), 16);
        assert_eq!(h, blake3::hash(b"/mnt/vol").to_hex()[..16]);
    }
}
