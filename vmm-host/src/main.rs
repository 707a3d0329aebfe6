//! `vmm-host`: the sailbox service on its own. It opens a data directory (the same layout
//! as `sail up`'s: state under `<data-dir>/vmm`), starts or re-attaches the cowfs daemon and
//! the sailboxes it records, and serves `sail.sailbox.v1` over gRPC until SIGTERM or ctrl-c.
//! Then it stops its background work and leaves running sailboxes running (the next start
//! re-attaches them), as `sail up` does; see docs/vmm-host.md.
//!
//! Every call must carry an API key, which vmm-host checks by asking volumed (`--volumed`,
//! required): keys and orgs live there (docs/security.md).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use vmm_host::accel::AccelChoice;
use vmm_host::{GrpcSailboxes, Host, HostConfig};

#[derive(Parser)]
#[command(name = "vmm-host", version, about = "Runs sailboxes (QEMU microVMs) and serves the sail.sailbox.v1 gRPC service")]
struct Args {
    /// Data directory (state under `<data-dir>/vmm`, as with `sail up`; default:
    /// $XDG_DATA_HOME/sail or ~/.local/share/sail).
    #[arg(long, env = "SAIL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to serve gRPC on.
    #[arg(long, env = "SAIL_LISTEN", default_value = "127.0.0.1:7420")]
    listen: SocketAddr,
    /// Chunk directory for images and checkpoints (default: `<data-dir>/vmm/chunks`). Hosts
    /// sharing one can restore each other's checkpoints.
    #[arg(long, env = "SAIL_CHUNKS_DIR")]
    chunks_dir: Option<PathBuf>,
    /// VM accelerator: auto, kvm or tcg.
    #[arg(long, env = "SAIL_ACCEL", default_value = "auto")]
    accel: AccelChoice,
    /// Guest kernel kit (scripts/guest-kernel.sh; default: ~/.cache/sail/guest).
    #[arg(long, env = "SAIL_GUEST_DIR")]
    guest_dir: Option<PathBuf>,
    /// The static `sail-agent` guests boot.
    #[arg(long, env = "SAIL_AGENT_BIN")]
    agent_bin: Option<PathBuf>,
    /// The static `sail-volume-fuse` guests mount volumes with.
    #[arg(long, env = "SAIL_VOLUME_FUSE_BIN")]
    volume_fuse_bin: Option<PathBuf>,
    /// The `sail-cowfs` daemon (default: beside this binary).
    #[arg(long, env = "SAIL_COWFS_BIN")]
    cowfs_bin: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Address ingress listeners bind to.
    #[arg(long, default_value = "127.0.0.1")]
    ingress_addr: IpAddr,
    /// Longest a boot may take, in seconds (VMM launch to the agent's first answer).
    #[arg(long, default_value_t = 180)]
    boot_timeout_secs: u64,
    /// volumed's gRPC endpoint, where guests' volume calls are forwarded (without it,
    /// sailboxes cannot mount volumes).
    #[arg(long, env = "SAIL_VOLUMED")]
    volumed: Option<String>,
    /// The operator key vmm-host calls volumed with (default: `<data-dir>/keys/operator.key`,
    /// which volumed writes in a data directory it shares with this host).
    #[arg(long, env = "SAIL_VOLUMED_KEY_FILE")]
    volumed_key_file: Option<PathBuf>,
    /// The host's chunk cache for volume reads (default: `<data-dir>/vmm/chunk-cache`).
    #[arg(long, env = "SAIL_CHUNK_CACHE_DIR")]
    chunk_cache_dir: Option<PathBuf>,
    /// Its size cap, MiB.
    #[arg(long, default_value_t = 10240)]
    chunk_cache_mib: u64,
}

impl Args {
    /// The host configuration: `HostConfig::local` on `<data-dir>/vmm`, then the flags.
    fn config(&self) -> anyhow::Result<HostConfig> {
        let data_dir = self.data_dir.clone().unwrap_or_else(default_data_dir);
        let key_file = self.volumed_key_file.clone().unwrap_or_else(|| data_dir.join("keys/operator.key"));
        let mut config = HostConfig::local(data_dir.join("vmm"));
        if let Some(d) = &self.chunks_dir {
            config.chunks_dir = d.clone();
        }
        if let Some(d) = &self.guest_dir {
            config.guest_dir = d.clone();
        }
        if let Some(b) = &self.agent_bin {
            config.agent_binary = b.clone();
        }
        if let Some(b) = &self.volume_fuse_bin {
            config.volume_helper_binary = b.clone();
        }
        if let Some(b) = &self.cowfs_bin {
            config.cowfs_binary = b.clone();
        }
        config.accel = self.accel;
        config.qemu_binary = self.qemu.clone();
        config.ingress_addr = self.ingress_addr;
        config.boot_timeout = Duration::from_secs(self.boot_timeout_secs);
        config.volumed_endpoint = self.volumed.clone();
        config.volumed_key = tenancy::credentials::read_key_file(&key_file)
            .with_context(|| format!("reading volumed's operator key {}", key_file.display()))?;
        if config.volumed_key.is_none() {
            anyhow::bail!(
                "no operator key at {} (volumed writes one in its data directory; pass --volumed-key-file)",
                key_file.display()
            );
        }
        if let Some(d) = &self.chunk_cache_dir {
            config.chunk_cache_dir = d.clone();
        }
        config.chunk_cache_bytes = self.chunk_cache_mib << 20;
        Ok(config)
    }
}

/// `sail up`'s default: `$XDG_DATA_HOME/sail`, else `~/.local/share/sail`.
fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("sail");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/sail")
}

/// Resolves on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("signal received; shutting down");
}

async fn run(args: Args) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {}: API keys would cross the network in clear text and TLS is not served yet; \
             listen on 127.0.0.1 (reach it from elsewhere through an ssh tunnel)",
            args.listen
        );
    }
    let volumed = args.volumed.clone().context(
        "vmm-host needs --volumed (or SAIL_VOLUMED): callers' API keys are checked there, and guests' volumes served from it",
    )?;
    let auth = tenancy::server::RemoteAuthenticator::new(&volumed).with_context(|| format!("volumed endpoint {volumed:?}"))?;
    let config = args.config()?;
    let data_dir = config.data_dir.clone();
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let host = Host::open(config).await.with_context(|| format!("starting vmm-host (data in {})", data_dir.display()))?;
    println!("vmm-host listening on http://{addr} (data in {})", data_dir.display());
    let served = tonic::transport::Server::builder()
        .layer(tenancy::server::AuthLayer::new(std::sync::Arc::new(auth)))
        .add_service(GrpcSailboxes::new(host.clone()).into_server())
        .serve_with_incoming_shutdown(vmm_host::service::incoming_nodelay(listener), shutdown_signal())
        .await
        .context("serving gRPC");
    // Running and sleeping sailboxes keep running (the next start re-attaches them); with
    // none left, the cowfs daemon and its mount go too.
    host.shutdown().await;
    served
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = tokio::runtime::Runtime::new().context("starting the runtime").and_then(|rt| rt.block_on(run(args)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-host: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
