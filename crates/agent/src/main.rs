//! `sail-agent`: the agent inside every sailbox.
//!
//! It is the guest's PID 1 (the initramfs mounts the root disk and hands over to it) or runs
//! under another init. It serves the `sail.agent.v1.Agent` gRPC service on vsock port 10000
//! and ingress forwarding on vsock port 10001; `--listen unix:PATH` / `--forward unix:PATH`
//! serve the same on Unix sockets instead (how its tests run it on a host).
//!
//! Protocol and behaviour: docs/vmm-host.md ("Guest agent").

mod exec;
mod files;
mod forward;
mod reaper;
mod service;
mod system;

use anyhow::{Context, bail};
use clap::Parser;
use tokio_stream::StreamExt;

/// Version of the agent protocol (crates/proto/proto/agent.proto).
pub const PROTOCOL_VERSION: u32 = 1;

/// The agent's behaviour version, reported as a sailbox's `guest_schema_version`. Bump it
/// with every change a host should upgrade running sailboxes to.
pub const GUEST_SCHEMA_VERSION: u32 = 1;

/// Default vsock port of the gRPC service.
pub const AGENT_PORT: u32 = 10000;
/// Default vsock port of ingress forwarding.
pub const FORWARD_PORT: u32 = 10001;

#[derive(Parser)]
#[command(name = "sail-agent", version, about = "The sailbox guest agent")]
struct Args {
    /// Where to serve the agent API: `vsock:PORT` or `unix:PATH`.
    #[arg(long, default_value = "vsock:10000")]
    listen: String,
    /// Where to serve ingress forwarding: `vsock:PORT` or `unix:PATH`.
    #[arg(long, default_value = "vsock:10001")]
    forward: String,
    /// Print the agent's versions as JSON and exit (vmm-host reads them when it builds the
    /// initramfs).
    #[arg(long)]
    describe: bool,
}

/// A listening address.
enum Addr {
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
    bail!("address {s:?} must be vsock:PORT or unix:PATH")
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
    let agent = service::AgentService { execs: exec::ExecTable::new(reaper), is_init };
    let api = proto::agent::agent_server::AgentServer::new(agent);
    let listen = parse_addr(&args.listen)?;
    let forward = parse_addr(&args.forward)?;

    let forwarding = tokio::spawn(serve_forwarding(forward));
    let router = tonic::transport::Server::builder().add_service(api);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), schema = GUEST_SCHEMA_VERSION, listen = %args.listen, "sail-agent serving");
    let served = match listen {
        Addr::Vsock(port) => {
            let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port))
                .with_context(|| format!("binding vsock port {port}"))?;
            let incoming = listener.incoming().filter_map(|c| keep_ok(c, "vsock accept"));
            router.serve_with_incoming(incoming).await
        }
        Addr::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener).filter_map(|c| keep_ok(c, "unix accept"));
            router.serve_with_incoming(incoming).await
        }
    };
    forwarding.abort();
    served.context("serving the agent API")
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

async fn serve_forwarding(addr: Addr) -> anyhow::Result<()> {
    match addr {
        Addr::Vsock(port) => {
            let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port))
                .with_context(|| format!("binding vsock port {port}"))?;
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(forward::serve(stream));
                    }
                    Err(e) => tracing::warn!(error = %e, "forward accept failed"),
                }
            }
        }
        Addr::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(forward::serve(stream));
                    }
                    Err(e) => tracing::warn!(error = %e, "forward accept failed"),
                }
            }
        }
    }
}
