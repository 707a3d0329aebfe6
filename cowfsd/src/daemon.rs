//! Running the daemon: mount the file system, serve the control socket, until unmounted or
//! signalled. One daemon serves every sailbox of a host; it runs in its own session, so
//! vmm-host can restart without taking guest memory and disks away.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use fuser::{Config, MountOption, Session};

use crate::chunks::Chunks;
use crate::fs::{CowFs, Registry};

/// Where the daemon keeps things.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// Mount point (created if missing).
    pub mountpoint: PathBuf,
    /// Control socket path.
    pub control: PathBuf,
    /// Directory for layer files (unlinked once open: nothing stays behind).
    pub store: PathBuf,
    /// Local chunk directory (`chunkstore::LocalBackend`).
    pub chunks: PathBuf,
    /// FUSE worker threads.
    pub threads: usize,
}

/// Runs until unmounted (`umount`, SIGTERM/SIGINT).
pub fn run(opts: DaemonOptions) -> anyhow::Result<()> {
    sysutil::mount::clean_dead_mount(&opts.mountpoint);
    for d in [&opts.mountpoint, &opts.store, &opts.chunks] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let backend = Arc::new(chunkstore::LocalBackend::open(&opts.chunks).context("opening the chunk directory")?);
    let chunks = Arc::new(Chunks::new(backend, rt.handle().clone()));
    let registry = Arc::new(Registry::new(opts.store.clone(), chunks));
    let _ = std::fs::remove_file(&opts.control);
    let listener =
        std::os::unix::net::UnixListener::bind(&opts.control).with_context(|| format!("binding {}", opts.control.display()))?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("sail-cowfs".into()),
        MountOption::Subtype("sail-cowfs".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let mut session = Session::new(CowFs(registry.clone()), &opts.mountpoint, &config)
        .with_context(|| format!("mounting {}", opts.mountpoint.display()))?;
    let unmounter = Arc::new(parking_lot::Mutex::new(session.unmount_callable()));
    {
        let registry = registry.clone();
        std::thread::Builder::new().name("cowfs-accept".into()).spawn(move || crate::control::serve(listener, registry))?;
    }
    {
        let unmounter = unmounter.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("signal received; unmounting");
            let _ = tokio::task::spawn_blocking(move || unmounter.lock().unmount()).await;
        });
    }
    tracing::info!(mount = %opts.mountpoint.display(), control = %opts.control.display(), "sail-cowfs serving");
    let result = session.run();
    let _ = std::fs::remove_file(&opts.control);
    rt.shutdown_background();
    result.context("FUSE session failed")
}
