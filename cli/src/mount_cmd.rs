//! `sail volume mount|commit|reload|status|unmount`: mounts run the guest-fuse helper (in the
//! foreground, or as a detached child of this binary), and the other commands talk to a
//! mount's control socket, found through the mount root's `user.sail.control` attribute.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use guest_fuse::{ControlClient, ControlError, MountOptions, is_mounted};

use crate::{UserError, human, quiet, short};

/// Options of `sail volume mount`.
#[derive(clap::Args, Debug, Clone)]
pub struct MountArgs {
    /// Volume name.
    pub name: String,
    /// Mount point (an existing, empty directory).
    pub path: PathBuf,
    /// Stay in the foreground (logs to stderr; Ctrl-C unmounts).
    #[arg(long)]
    pub foreground: bool,
    /// Create the volume if it does not exist.
    #[arg(long)]
    pub create: bool,
    /// Overlay directory for local writes (default: ~/.cache/sail/overlay/<hash>).
    #[arg(long)]
    pub overlay_dir: Option<PathBuf>,
    /// In-memory chunk cache, MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_cache_mib: u64,
    /// FUSE worker threads (default: one per CPU, 2 to 8).
    #[arg(long, default_value_t = guest_fuse::runner::default_threads())]
    pub threads: usize,
    /// Serve every read through the helper: no FUSE passthrough for fully cached files.
    #[arg(long)]
    pub no_passthrough: bool,
}

/// Global settings a mount needs.
pub struct Globals {
    /// volumed endpoint.
    pub endpoint: String,
    /// Org.
    pub org: String,
    /// Chunk cache directory, if given.
    pub cache_dir: Option<PathBuf>,
    /// Cache cap, MiB.
    pub cache_mib: u64,
    /// JSON output.
    pub json: bool,
}

fn cache_home() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("sail");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/sail")
}

fn path_hash(p: &Path) -> String {
    blake3::hash(p.as_os_str().as_encoded_bytes()).to_hex()[..16].to_owned()
}

/// `sail volume mount`.
pub fn mount(g: &Globals, a: MountArgs) -> anyhow::Result<()> {
    let mountpoint = std::fs::canonicalize(&a.path).map_err(|e| UserError(format!("mount point {}: {e}", a.path.display())))?;
    if !mountpoint.is_dir() {
        bail!(UserError(format!("mount point {} is not a directory", mountpoint.display())));
    }
    let opts = mount_options(g, &a, mountpoint.clone());
    if a.foreground {
        return guest_fuse::run(opts, |socket| {
            crate::note!("mounted {} at {}; control socket {}", a.name, mountpoint.display(), socket.display())
        });
    }
    // Detach: re-run this binary in the foreground in its own session, logging to a file.
    let log_path = guest_fuse::default_socket_path(&mountpoint).with_extension("log");
    let started = Instant::now();
    let child = spawn_helper(g, &a, &opts, &log_path)?;
    let bar = crate::output::spinner(format!("mounting {}", a.name));
    let ready = wait_ready(g, &a, &mountpoint, child, &log_path, started);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    ready
}

/// What the FUSE helper gets: the globals, the arguments, and the default cache and overlay
/// directories under the user's cache home.
fn mount_options(g: &Globals, a: &MountArgs, mountpoint: PathBuf) -> MountOptions {
    let hash = path_hash(&mountpoint);
    MountOptions {
        endpoint: g.endpoint.clone(),
        org: g.org.clone(),
        volume: a.name.clone(),
        mint: a.create,
        mountpoint,
        cache_dir: g.cache_dir.clone().unwrap_or_else(|| cache_home().join("chunks")),
        cache_max_bytes: g.cache_mib << 20,
        overlay_dir: a.overlay_dir.clone().unwrap_or_else(|| cache_home().join("overlay").join(&hash)),
        control_socket: None,
        memory_cache_bytes: a.memory_cache_mib << 20,
        threads: a.threads,
        passthrough: !a.no_passthrough,
        trusted_endpoint: false,
    }
}

/// Starts this binary as `sail volume mount --foreground` in a session of its own (so it
/// outlives us), its output going to `log_path`.
fn spawn_helper(g: &Globals, a: &MountArgs, opts: &MountOptions, log_path: &Path) -> anyhow::Result<std::process::Child> {
    if let Some(d) = log_path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let log = std::fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(["--endpoint", &g.endpoint, "--org", &g.org, "--cache-mib", &g.cache_mib.to_string()])
        .args(["--cache-dir".as_ref(), opts.cache_dir.as_os_str()])
        .args(["volume", "mount", "--foreground"])
        .args(["--overlay-dir".as_ref(), opts.overlay_dir.as_os_str()])
        .args(["--memory-cache-mib", &a.memory_cache_mib.to_string(), "--threads", &a.threads.to_string()])
        .args(if a.create { &["--create"][..] } else { &[][..] })
        .args(if a.no_passthrough { &["--no-passthrough"][..] } else { &[][..] })
        .arg(&a.name)
        .arg(&opts.mountpoint)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the child gets its own session so it outlives us.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let _ = rustix::process::setsid();
            Ok(())
        });
    }
    cmd.spawn().context("starting the FUSE helper")
}

/// Waits (at most 60 s) until the helper serves the mount, then prints it; fails with the
/// tail of its log if it exits first.
fn wait_ready(
    g: &Globals,
    a: &MountArgs,
    mountpoint: &Path,
    mut child: std::process::Child,
    log_path: &Path,
    started: Instant,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
            let message = format!("the FUSE helper exited ({status}) before the mount was ready:\n{}", tail.join("\n"));
            // The helper is this binary: exit code 2 is a user error there too (an unknown
            // volume without --create, a bad argument), and stays one here.
            if status.code() == Some(2) {
                bail!(UserError(message));
            }
            bail!(message);
        }
        if let Ok(c) = ControlClient::for_mount(mountpoint)
            && let Ok(st) = c.status()
            && st.pid == child.id()
        {
            if g.json {
                println!(
                    "{}",
                    serde_json::json!({"mountpoint": mountpoint, "volume": a.name, "head": st.head,
                    "pid": st.pid, "log": log_path, "ms": started.elapsed().as_secs_f64() * 1e3})
                );
            } else if !quiet() {
                println!(
                    "mounted {}/{} at {} (head {}) in {:.0?}; helper pid {}, log {}",
                    g.org,
                    a.name,
                    mountpoint.display(),
                    short(&st.head),
                    started.elapsed(),
                    st.pid,
                    log_path.display()
                );
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the FUSE helper did not become ready in 60 s (log: {})", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn client(path: &Path) -> anyhow::Result<ControlClient> {
    Ok(ControlClient::for_mount(path)?)
}

/// A spinner on stderr while a long call runs (see [`crate::output::spinner`]).
fn with_spinner<T>(msg: &str, f: impl FnOnce() -> Result<T, ControlError>) -> Result<T, ControlError> {
    let bar = crate::output::spinner(msg);
    let r = f();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    r
}

/// `sail volume commit PATH`.
pub fn commit(g: &Globals, path: &Path) -> anyhow::Result<()> {
    let c = client(path)?;
    let o = with_spinner("committing", || c.commit())?;
    if g.json {
        println!("{}", serde_json::to_string(&o)?);
    } else if quiet() {
        println!("{}", o.commit);
    } else if o.seq == 0 {
        println!("nothing to commit; head {}", short(&o.commit));
    } else {
        println!(
            "committed #{} {}{}: {} upserts, {} deletes, {} chunks hashed, {} uploaded ({}) in {:.1} ms",
            o.seq,
            short(&o.commit),
            if o.merged { " (merged onto a newer head)" } else { "" },
            o.upserts,
            o.deletes,
            o.chunks_hashed,
            o.chunks_uploaded,
            human(o.bytes_uploaded),
            o.elapsed_ms
        );
    }
    Ok(())
}

/// `sail volume reload PATH`.
pub fn reload(g: &Globals, path: &Path) -> anyhow::Result<()> {
    let o = with_spinner("reloading", || client(path).map_err(to_control)?.reload())?;
    if g.json {
        println!("{}", serde_json::to_string(&o)?);
    } else if !quiet() {
        println!(
            "reloaded to {} (was {}); {} local changes discarded; {:.1} ms",
            short(&o.commit),
            short(&o.previous),
            o.discarded,
            o.elapsed_ms
        );
    }
    Ok(())
}

fn to_control(e: anyhow::Error) -> ControlError {
    match e.downcast::<ControlError>() {
        Ok(c) => c,
        Err(e) => ControlError { name: "SailError".into(), message: e.to_string(), source: Some(e.into()) },
    }
}

/// `sail volume status PATH`.
pub fn status(g: &Globals, path: &Path) -> anyhow::Result<()> {
    let s = client(path)?.status()?;
    if g.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!("{}/{} at {} (helper pid {})", s.org, s.volume, s.mountpoint, s.pid);
        println!("  head     {}", s.head);
        println!(
            "  dirty    {} entries ({} files, {} changed), {} deletes pending",
            s.dirty_entries,
            s.dirty_files,
            human(s.dirty_bytes),
            s.pending_deletes
        );
        println!(
            "  reads    {} from memory, {} from disk cache or network ({} prefetched, {} verified 1 MiB pieces)",
            s.memory_hits, s.memory_misses, s.prefetched, s.pieces_fetched
        );
        println!(
            "  cache    {} hits, {} misses, {} of {} used",
            s.cache_hits,
            s.cache_misses,
            human(s.cache_bytes),
            human(s.cache_capacity)
        );
        println!(
            "  passthrough {}: {} opens, {} served by the helper, {} fallbacks, {} files held open; {} files assembled ({}){}",
            if s.passthrough { "on" } else { "off" },
            s.passthrough_opens,
            s.passthrough_direct_opens,
            s.passthrough_fallbacks,
            s.passthrough_inodes,
            s.assembled_files,
            human(s.assembled_bytes),
            if s.assembling > 0 { ", assembling" } else { "" }
        );
    }
    Ok(())
}

/// `sail volume unmount PATH`: asks the helper to unmount; a mount whose helper died is
/// detached (lazily, like `umount -l`).
pub fn unmount(g: &Globals, path: &Path) -> anyhow::Result<()> {
    let path = std::path::absolute(path)?;
    match ControlClient::for_mount(&path) {
        Ok(c) => {
            let pid = c.status().map(|s| s.pid).ok();
            c.unmount()?;
            // Wait for the unmount and for the helper to exit (so a new mount on this path
            // does not race the old helper's cleanup).
            let deadline = Instant::now() + Duration::from_secs(10);
            // Running unless gone or a zombie (its parent, often init, reaps it later).
            let alive = |pid: Option<u32>| {
                pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
                    .and_then(|st| st.rsplit(')').next().map(|rest| !rest.trim_start().starts_with('Z')))
                    .unwrap_or(false)
            };
            while (is_mounted(&path) || alive(pid)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if is_mounted(&path) {
                guest_fuse::lazy_unmount(&path)?;
            }
        }
        Err(e) if is_mounted(&path) => {
            guest_fuse::lazy_unmount(&path).with_context(|| format!("{e}; detaching the dead mount failed"))?;
        }
        Err(e) => return Err(e.into()),
    }
    if g.json {
        println!("{}", serde_json::json!({"unmounted": path}));
    } else if !quiet() {
        println!("unmounted {}", path.display());
    }
    Ok(())
}
