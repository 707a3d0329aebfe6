//! `sail-agent`: the agent inside every sailbox.
//!
//! It is the guest's PID 1 (the initramfs mounts the root disk and hands over to it) or runs
//! under another init. It serves the `sail.agent.v1.Agent` gRPC service (ingress included)
//! on the `sail.agent` virtio-serial port (QEMU) and on vsock port 10000 (Cloud Hypervisor);
//! `--listen unix:PATH` serves it on a Unix socket instead (how its tests run it on a host).
//!
//! Protocol and behaviour: docs/vmm-host.md ("Guest agent").

mod exec;
mod files;
mod forward;
mod link;
mod mounts;
mod reaper;
mod service;
mod system;

use anyhow::{Context, bail};
use clap::Parser;
use tokio_stream::StreamExt;

/// Version of the agent protocol (proto/proto/agent.proto).
pub const PROTOCOL_VERSION: u32 = 1;

/// The agent's behaviour version, reported as a sailbox's `guest_schema_version`. Bump it
/// with every change a host should upgrade running sailboxes to.
pub const GUEST_SCHEMA_VERSION: u32 = 2;

#[derive(Parser)]
#[command(name = "sail-agent", version, about = "The sailbox guest agent")]
struct Args {
    /// Where to serve the agent API (repeatable): `serial:PATH` (a virtio-serial port),
    /// `vsock:PORT`, or `unix:PATH`. Default: the `sail.agent` serial port and vsock port
    /// 10000, whichever exist.
    #[arg(long)]
    listen: Vec<String>,
    /// Print the agent's versions as JSON and exit (vmm-host reads them when it builds the
    /// initramfs).
    #[arg(long)]
    describe: bool,
    /// The volume mount helper (`sail-volume-fuse`) run for each mount.
    #[arg(long, default_value = mounts::DEFAULT_HELPER)]
    volume_helper: std::path::PathBuf,
    /// Where mounts keep their chunk cache (`cache/`) and overlays (`overlay/<hash>/`): on the
    /// guest's disk.
    #[arg(long, default_value = mounts::DEFAULT_VOLUMES_DIR)]
    volumes_dir: std::path::PathBuf,
    /// Where mount helpers' control sockets and logs go (`<hash>.sock`, `<hash>.log`).
    #[arg(long, default_value = mounts::DEFAULT_RUN_DIR)]
    mounts_run_dir: std::path::PathBuf,
}

/// The name of the virtio-serial port QEMU gives the agent.
const SERIAL_NAME: &str = "sail.agent";

/// A listening address.
enum Addr {
    Serial(std::path::PathBuf),
    Vsock(u32),
    Unix(std::path::PathBuf),
}

fn parse_addr(s: &str) -> anyhow::Result<Addr> {
    if let Some(port) = s.strip_prefix("vsock:") {
        return Ok(Addr::Vsock(port.parse().with_context(|| format!("bad vsock port in {s:?}"))?));
    }
    if let Some(path) = s.strip_prefix("unix:") {
        return Ok(Addr::Unix(path.into()));
    }
    if let Some(path) = s.strip_prefix("serial:") {
        return Ok(Addr::Serial(path.into()));
    }
    bail!("address {s:?} must be serial:PATH, vsock:PORT or unix:PATH")
}

/// The device node of the virtio-serial port named `name` (there is no udev to make the
/// `/dev/virtio-ports/<name>` link, so sysfs is asked).
fn serial_port(name: &str) -> Option<std::path::PathBuf> {
    let ports = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    ports.flatten().find_map(|p| {
        let port_name = std::fs::read_to_string(p.path().join("name")).ok()?;
        (port_name.trim() == name).then(|| std::path::Path::new("/dev").join(p.file_name()))
    })
}

/// The links to serve when none are given: the `sail.agent` serial port and vsock port
/// 10000, whichever this VM has.
fn default_links() -> Vec<Addr> {
    let mut links = Vec::new();
    if let Some(port) = serial_port(SERIAL_NAME) {
        links.push(Addr::Serial(port));
    }
    if std::path::Path::new("/dev/vsock").exists() {
        links.push(Addr::Vsock(proto::agent::VSOCK_PORT));
    }
    links
}

fn main() {
    let is_init = std::process::id() == 1;
    // As PID 1 the kernel's command line (console=...) decides where stderr goes.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    if args.describe {
        println!(
            "{{\"agent_version\":\"{}\",\"guest_schema_version\":{GUEST_SCHEMA_VERSION},\"protocol_version\":{PROTOCOL_VERSION}}}",
            env!("CARGO_PKG_VERSION")
        );
        return;
    }
    if is_init {
        system::init_mounts();
        if let Err(e) = system::grow_root_fs() {
            tracing::warn!(error = %e, "could not grow the root file system to its disk");
        }
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")
        .and_then(|rt| rt.block_on(run(args, is_init)));
    if let Err(e) = result {
        tracing::error!("sail-agent failed: {e:#}");
        if is_init {
            // PID 1 must not exit (the kernel would panic): power the guest off instead,
            // which the host sees as the VMM exiting.
            let e = system::power_off(false);
            tracing::error!(error = %e, "power off failed");
            loop {
                std::thread::park();
            }
        }
        std::process::exit(1);
    }
}

async fn run(args: Args, is_init: bool) -> anyhow::Result<()> {
    let reaper = reaper::Reaper::start().context("starting the reaper")?;
    let mounts = mounts::Mounts::new(
        mounts::MountsConfig {
            helper: args.volume_helper.clone(),
            volumes_dir: args.volumes_dir.clone(),
            run_dir: args.mounts_run_dir.clone(),
        },
        reaper.clone(),
    );
    let agent = service::AgentService { execs: exec::ExecTable::new(reaper), mounts, is_init };
    let api = proto::agent::agent_server::AgentServer::new(agent);
    let mut links = args.listen.iter().map(|s| parse_addr(s)).collect::<anyhow::Result<Vec<_>>>()?;
    if links.is_empty() {
        // Devices appear just after boot. The serial port is the link on QEMU; vsock alone
        // (Cloud Hypervisor) is taken once the serial port had a second to show up.
        for i in 0..500 {
            links = default_links();
            let has_serial = links.iter().any(|l| matches!(l, Addr::Serial(_)));
            if has_serial || (!links.is_empty() && i >= 50) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    if links.is_empty() {
        bail!("no host link: no virtio-serial port named {SERIAL_NAME} and no /dev/vsock");
    }
    let mut servers = tokio::task::JoinSet::new();
    for link in links {
        let api = api.clone();
        servers.spawn(serve(link, api));
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), schema = GUEST_SCHEMA_VERSION, "sail-agent serving");
    match servers.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(anyhow::anyhow!("a listener task failed: {e}")),
        None => Ok(()),
    }
}

type Api = proto::agent::agent_server::AgentServer<service::AgentService>;

/// Serves the API on one link until it fails.
async fn serve(link: Addr, api: Api) -> anyhow::Result<()> {
    // Ingress streams share one HTTP/2 connection: give them room.
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .add_service(api);
    match link {
        Addr::Serial(path) => {
            tracing::info!(port = %path.display(), "serving on the virtio-serial port");
            let incoming = link::incoming(path).filter_map(|c| keep_ok(c, "serial session"));
            router.serve_with_incoming(incoming).await.context("serving on the serial port")
        }
        Addr::Vsock(port) => {
            let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port))
                .with_context(|| format!("binding vsock port {port}"))?;
            tracing::info!(port, "serving on vsock");
            let incoming = listener.incoming().filter_map(|c| keep_ok(c, "vsock accept"));
            router.serve_with_incoming(incoming).await.context("serving on vsock")
        }
        Addr::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener).filter_map(|c| keep_ok(c, "unix accept"));
            router.serve_with_incoming(incoming).await.context("serving on the unix socket")
        }
    }
}

/// Drops failed accepts (logged) so one bad connection never stops the server.
fn keep_ok<T>(conn: std::io::Result<T>, what: &str) -> Option<std::io::Result<T>> {
    match conn {
        Ok(c) => Some(Ok(c)),
        Err(e) => {
            tracing::warn!(error = %e, "{what} failed");
            None
        }
    }
}
