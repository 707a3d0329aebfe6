//! `sail-cowfs`: the copy-on-write file server that holds sailbox memory and disks.
//! vmm-host starts one per host (see docs/vmm-host.md); it can also be run by hand.

use clap::Parser;

#[derive(Parser)]
#[command(name = "sail-cowfs", version, about = "Copy-on-write files over chunks (sailbox memory and disks)")]
struct Args {
    /// Mount point.
    #[arg(long)]
    mount: std::path::PathBuf,
    /// Control socket.
    #[arg(long)]
    control: std::path::PathBuf,
    /// Directory for layer files.
    #[arg(long)]
    store: std::path::PathBuf,
    /// Local chunk directory.
    #[arg(long)]
    chunks: std::path::PathBuf,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let a = Args::parse();
    let opts = cowfsd::daemon::DaemonOptions {
        mountpoint: a.mount,
        control: a.control,
        store: a.store,
        chunks: a.chunks,
        threads: a.threads,
    };
    match cowfsd::daemon::run(opts) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sail-cowfs: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
