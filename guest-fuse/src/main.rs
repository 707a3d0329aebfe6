//! `sail-volume-fuse`: mounts one volume in the foreground. `sail volume mount` runs the
//! same code (and daemonizes it); this binary is for guests and service managers. Its
//! subcommands `commit`, `reload` and `status PATH` talk to a running mount's helper (inside a
//! sailbox, where no `sail` CLI is installed; the agent's PATH has this binary).

use std::path::PathBuf;

use clap::Parser;

/// Mount a sail volume lazily through FUSE.
#[derive(Parser, Debug)]
#[command(name = "sail-volume-fuse", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    control: Option<Control>,
    /// volumed endpoint.
    #[arg(long, env = "SAIL_ENDPOINT", default_value = "http://127.0.0.1:7420")]
    endpoint: String,
    /// Org of the volume.
    #[arg(long, env = "SAIL_ORG", default_value = "default")]
    org: String,
    /// Create the volume if it does not exist.
    #[arg(long)]
    create: bool,
    /// Chunk cache directory (shared by all mounts on the host).
    #[arg(long, env = "SAIL_CACHE_DIR", default_value = "/var/cache/sail/chunks")]
    cache_dir: PathBuf,
    /// Chunk cache size cap in MiB.
    #[arg(long, default_value_t = 10240)]
    cache_max_mib: u64,
    /// Overlay directory for local writes (default: a directory beside the cache).
    #[arg(long)]
    overlay_dir: Option<PathBuf>,
    /// Control socket path (default: /run/sail/mounts/<hash>.sock).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// In-memory chunk cache in MiB (default 256; 64 with --trusted-endpoint, where the
    /// guest's page cache keeps what was read and this only bridges partial reads of a chunk
    /// and readahead: a small one recycles its receive buffers instead of faulting in new
    /// memory for every chunk).
    #[arg(long)]
    memory_cache_mib: Option<u64>,
    /// FUSE worker threads (default: one per CPU, 2 to 8).
    #[arg(long, default_value_t = guest_fuse::runner::default_threads())]
    threads: usize,
    /// Serve every read through this process: no FUSE passthrough for fully cached files.
    #[arg(long)]
    no_passthrough: bool,
    /// The endpoint is vmm-host's volume gateway (inside a sailbox; the agent passes this):
    /// it verifies and caches chunks on the host, so this helper keeps no chunk cache and
    /// does not hash what the gateway serves.
    #[arg(long)]
    trusted_endpoint: bool,
    /// Volume name.
    #[arg(required = true)]
    volume: Option<String>,
    /// Mount point (an existing directory).
    #[arg(required = true)]
    mountpoint: Option<PathBuf>,
}

/// Calls on a running mount (its helper's control socket).
#[derive(clap::Subcommand, Debug)]
enum Control {
    /// Commit the mount's changes; prints the commit id.
    Commit {
        /// The mount point.
        path: PathBuf,
    },
    /// Switch the mount to the newest commit (drops uncommitted changes); prints it.
    Reload {
        /// The mount point.
        path: PathBuf,
    },
    /// The mount's status as JSON.
    Status {
        /// The mount point.
        path: PathBuf,
    },
}

/// Runs a control call; the error's contract name comes first on stderr, exit code 1.
fn control(c: Control) -> anyhow::Result<()> {
    use guest_fuse::control::ControlClient as Client;
    match c {
        Control::Commit { path } => println!("{}", Client::for_mount(&path)?.commit()?.commit),
        Control::Reload { path } => println!("{}", Client::for_mount(&path)?.reload()?.commit),
        Control::Status { path } => println!("{}", serde_json::to_string_pretty(&Client::for_mount(&path)?.status()?)?),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("SAIL_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    if let Some(c) = a.control {
        return control(c);
    }
    let (Some(volume), Some(mountpoint)) = (a.volume, a.mountpoint) else {
        anyhow::bail!("give a VOLUME and a MOUNTPOINT (or a subcommand)");
    };
    let overlay_dir = a.overlay_dir.unwrap_or_else(|| {
        let hash = blake3::hash(mountpoint.as_os_str().as_encoded_bytes()).to_hex();
        a.cache_dir.with_file_name("overlay").join(&hash[..16])
    });
    let opts = guest_fuse::MountOptions {
        endpoint: a.endpoint,
        org: a.org,
        volume,
        mint: a.create,
        mountpoint,
        cache_dir: a.cache_dir,
        cache_max_bytes: a.cache_max_mib << 20,
        overlay_dir,
        control_socket: a.control_socket,
        memory_cache_bytes: a.memory_cache_mib.unwrap_or(if a.trusted_endpoint { 64 } else { 256 }) << 20,
        threads: a.threads,
        passthrough: !a.no_passthrough,
        trusted_endpoint: a.trusted_endpoint,
    };
    guest_fuse::run(opts, |socket| eprintln!("mounted; control socket {}", socket.display()))
}
