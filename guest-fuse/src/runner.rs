//! Running a mount: connect, fetch the head, mount, serve the control socket, and unmount
//! cleanly on SIGINT/SIGTERM, on an "unmount" request, or when someone runs `umount`.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use chunkstore::ChunkCache;
use fuser::{Config, MountOption, Session};
use parking_lot::Mutex;
use sysutil::mount::{clean_dead_mount, lazy_unmount};
use volume_client::VolumeClient;

use crate::control;
use crate::fs::VolumeFs;
use crate::mount::MountCore;
use crate::passthrough::Passthrough;
use crate::persist;
use crate::remote::Remote;
use crate::tree::State;

/// Everything a mount needs.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// volumed endpoint, `http://host:port`.
    pub endpoint: String,
    /// Org the volume belongs to.
    pub org: String,
    /// Volume name.
    pub volume: String,
    /// Create the volume if it does not exist.
    pub mint: bool,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Shared, verified chunk cache directory (unused with `trusted_endpoint`).
    pub cache_dir: PathBuf,
    /// Its size cap in bytes.
    pub cache_max_bytes: u64,
    /// Where this mount's overlay files and dirty state live (kept across a crash of the
    /// helper; see `persist`).
    pub overlay_dir: PathBuf,
    /// Control socket path (default: [`default_socket_path`]).
    pub control_socket: Option<PathBuf>,
    /// In-memory chunk cache in bytes.
    pub memory_cache_bytes: u64,
    /// FUSE worker threads.
    pub threads: usize,
    /// Serve reads of fully cached, unmodified files through FUSE passthrough (assembled
    /// copies in `overlay_dir`, at most `cache_max_bytes` of them; see `passthrough`).
    pub passthrough: bool,
    /// The endpoint is vmm-host's volume gateway (a helper inside a sailbox), which fetches,
    /// verifies and caches chunks once for every sailbox on the host: keep no chunk cache on
    /// this side and do not hash what it serves (see `VolumeClient::trusting_endpoint`).
    /// Reads are then served from memory and the kernel's page cache, and a miss asks the
    /// gateway again; passthrough has no cached chunks to assemble files from.
    pub trusted_endpoint: bool,
}

/// Where a mount's control socket goes by default: `/run/sail/mounts/<hash>.sock` as root
/// (`$XDG_RUNTIME_DIR/sail/mounts/` or `/tmp/sail-<uid>/mounts/` otherwise), the hash being
/// BLAKE3 of the absolute mount path. The mount root's `user.sail.control` xattr names it.
pub fn default_socket_path(mountpoint: &Path) -> PathBuf {
    let uid = rustix::process::getuid().as_raw();
    let base = if uid == 0 {
        PathBuf::from("/run/sail")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(d).join("sail")
    } else {
        PathBuf::from(format!("/tmp/sail-{uid}"))
    };
    let hash = blake3::hash(mountpoint.as_os_str().as_encoded_bytes()).to_hex();
    base.join("mounts").join(format!("{}.sock", &hash[..16]))
}

/// FUSE worker threads when not given: one per CPU, 2 to 8. More threads than cores only
/// add wake-ups and lock contention on the FUSE device (measured on 2 cores: unpacking
/// 10,000 files took 1.3 s with 2 threads, 2.2 s with 4, 1.8-2.0 s with 8; 1 thread is far
/// slower, 5-6 s, so 2 is the floor).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8)
}

/// Kernel readahead for the mount, in KiB, unless `SAIL_FUSE_READAHEAD_KIB` says otherwise.
/// The kernel starts a FUSE mount at 128 KiB, which leaves a cold sequential reader waiting
/// on one small request at a time; a deeper window keeps several 1 MiB reads in flight, so
/// the helper's own readahead (pieces fetched ahead) is reached early.
pub const DEFAULT_READAHEAD_KIB: u64 = 8192;

/// The `major:minor` device of the newest mount at `mountpoint`, from /proc/self/mountinfo
/// (read instead of stat, which would ask this very mount, perhaps dead or not serving yet).
pub fn mount_device(mountpoint: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.as_os_str().as_encoded_bytes();
    info.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let dev = f.nth(2)?;
            let point = f.nth(1)?;
            (point.as_bytes() == want).then(|| dev.to_owned())
        })
        .next_back()
}

/// Detaches a dead FUSE mount at `path` (its helper died, so a restarted helper can mount
/// there again).
fn detach_dead_mount(path: &Path) {
    if is_mounted(path) && clean_dead_mount(path) {
        tracing::info!(path = %path.display(), "detached the dead mount of a previous helper");
    }
}

/// Whether something is mounted at `path` (per /proc/self/mountinfo; no stat of the mount).
pub fn is_mounted(path: &Path) -> bool {
    mount_device(path).is_some()
}

/// Sets the mount's kernel readahead (`/sys/class/bdi/<dev>/read_ahead_kb`); best effort, as
/// only root may, and logged.
fn tune_readahead(mountpoint: &Path) {
    let kib = std::env::var("SAIL_FUSE_READAHEAD_KIB").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(DEFAULT_READAHEAD_KIB);
    let Some(dev) = mount_device(mountpoint) else {
        tracing::debug!("mount device not found; readahead left as is");
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&path, kib.to_string()) {
        Ok(()) => tracing::debug!(%path, kib, "readahead set"),
        Err(e) => tracing::debug!(%path, error = %e, "readahead left as is"),
    }
}

/// Large files keep an overlay file open while dirty: allow as many descriptors as the
/// hard limit permits.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    // `None` is unlimited.
    if lim.current.unwrap_or(u64::MAX) < lim.maximum.unwrap_or(u64::MAX) {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}

/// Mounts and serves until unmounted. `ready` runs once the mount is live and the control
/// socket accepts requests (with the socket's path).
pub fn run(mut opts: MountOptions, ready: impl FnOnce(&Path)) -> anyhow::Result<()> {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().thread_name("sail-fuse-io").build()?;
    let remote = connect(&opts, &rt)?;
    // An empty org means the key's own: from here on, the one volumed answered with.
    opts.org = remote.org().to_owned();
    std::fs::create_dir_all(&opts.overlay_dir).with_context(|| format!("creating {}", opts.overlay_dir.display()))?;
    // Uncommitted changes a previous helper left in the overlay directory (it crashed or
    // was killed): resumed, on the commit they were made against.
    let opened = persist::open(&opts.overlay_dir, &opts.org, &opts.volume, &remote)
        .with_context(|| format!("opening the overlay state in {}", opts.overlay_dir.display()))?;
    let state = match opened.state {
        Some(st) => {
            let (files, bytes) = st.dirty_summary();
            tracing::info!(volume = %opts.volume, commit = %st.base, dirty_entries = st.dirty.len(), dirty_files = files,
                dirty_bytes = bytes, pending_deletes = st.deleted.len(), "resumed uncommitted changes");
            st
        }
        None => {
            let (commit, root) = remote.head()?;
            tracing::info!(volume = %opts.volume, %commit, "head fetched");
            State::new(commit, root, 0o755)
        }
    };

    detach_dead_mount(&opts.mountpoint);
    let mountpoint = std::fs::canonicalize(&opts.mountpoint)
        .with_context(|| format!("mount point {} must be an existing directory", opts.mountpoint.display()))?;
    let (socket, listener) = SocketPath::bind(opts.control_socket.clone().unwrap_or_else(|| default_socket_path(&mountpoint)))?;

    let core = Arc::new(MountCore::new(
        state,
        remote,
        opts.overlay_dir.clone(),
        opened.data,
        opened.persist,
        socket.path.clone(),
        mountpoint.clone(),
        opts.endpoint.clone(),
        Passthrough::new(opts.passthrough && !opts.trusted_endpoint, opts.overlay_dir.clone(), opts.cache_max_bytes),
    ));
    let mut session = Session::new(VolumeFs(core.clone()), &mountpoint, &fuse_config(&opts))
        .with_context(|| format!("mounting {}", mountpoint.display()))?;
    // The INIT handshake is done: the kernel's readahead setting is final and can be raised.
    tune_readahead(&mountpoint);
    let _ = core.notifier.set(session.notifier());
    let unmount = unmounter(&mut session, mountpoint);
    {
        let (unmount, core) = (unmount.clone(), core.clone());
        std::thread::Builder::new().name("sail-control".into()).spawn(move || control::serve(listener, core, unmount))?;
    }
    let signalled = Arc::new(AtomicBool::new(false));
    unmount_on_signal(&rt, unmount, signalled.clone());
    persist::spawn_saver(&core)?;
    ready(&socket.path);
    let result = session.run();
    if result.is_ok() && !signalled.load(Ordering::SeqCst) {
        // An explicit unmount drops uncommitted changes (as documented).
        core.discard_state();
    } else if let Err(e) = core.save_state(true) {
        tracing::warn!(error = %e, "saving the overlay state failed");
    }
    socket.remove_if_ours();
    tracing::info!("unmounted");
    rt.shutdown_background();
    result.context("FUSE session failed")
}

/// Opens the shared chunk cache, connects to volumed and checks (or creates) the volume.
fn connect(opts: &MountOptions, rt: &tokio::runtime::Runtime) -> anyhow::Result<Arc<Remote>> {
    let client = rt.block_on(VolumeClient::connect(&opts.endpoint))?.with_author(fuse_author());
    let mut client = if opts.trusted_endpoint {
        client.trusting_endpoint()
    } else {
        let cache = ChunkCache::open(&opts.cache_dir, opts.cache_max_bytes)
            .with_context(|| format!("opening chunk cache {}", opts.cache_dir.display()))?;
        client.with_cache(cache)
    };
    let vol = rt.block_on(client.get_volume(&opts.org, &opts.volume, opts.mint))?;
    let org = if vol.org.is_empty() { opts.org.clone() } else { vol.org };
    Ok(Arc::new(Remote::new(rt.handle().clone(), client, &org, &opts.volume, opts.memory_cache_bytes)))
}

/// Who the mount's commits are by: `fuse/<hostname>` (in a sailbox, its gateway records
/// `sailbox/<id>` instead).
pub fn fuse_author() -> String {
    format!("fuse/{}", sysutil::host::hostname())
}

/// The mount's options: its name, `default_permissions`, no devices or setuid, every user
/// when run as root, and one cloned device fd per worker thread.
fn fuse_config(opts: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("sail:{}/{}", opts.org, opts.volume)),
        MountOption::Subtype("sail".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if rustix::process::getuid().is_root() {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    config
}

/// The unmount action (control request, signal): unmounts the session, or detaches the mount
/// lazily when it is busy.
fn unmounter(session: &mut Session<VolumeFs>, mountpoint: PathBuf) -> Arc<dyn Fn() + Send + Sync> {
    let unmounter = Mutex::new(session.unmount_callable());
    Arc::new(move || {
        let r = unmounter.lock().unmount();
        if let Err(e) = r {
            tracing::warn!(error = %e, "unmount failed (busy?); detaching lazily");
            let _ = lazy_unmount(&mountpoint);
        }
    })
}

/// Unmounts on SIGTERM or SIGINT (setting `signalled`: the dirty state is kept).
fn unmount_on_signal(rt: &tokio::runtime::Runtime, unmount: Arc<dyn Fn() + Send + Sync>, signalled: Arc<AtomicBool>) {
    rt.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received; unmounting (uncommitted changes are kept in the overlay directory)");
        signalled.store(true, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || unmount());
    });
}

/// The control socket's path and the inode it was bound with.
struct SocketPath {
    path: PathBuf,
    ino: Option<u64>,
}

impl SocketPath {
    /// Binds `path` (replacing a stale socket file).
    fn bind(path: PathBuf) -> anyhow::Result<(Self, UnixListener)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).with_context(|| format!("binding control socket {}", path.display()))?;
        let ino = std::fs::metadata(&path).map(|m| m.ino()).ok();
        Ok((Self { path, ino }, listener))
    }

    /// Removes the socket only if it is still ours: a new helper for the same mount point may
    /// already have bound the same path.
    fn remove_if_ours(&self) {
        if std::fs::metadata(&self.path).map(|m| m.ino()).ok() == self.ino {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
