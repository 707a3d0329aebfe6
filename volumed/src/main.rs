//! The `volumed` binary: runs the volume service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chunkstore::{S3Config, S3Credentials};
use clap::Parser;
use volumed::server::{BackendConfig, Server, ServerConfig};

/// Serve volumes: metadata over gRPC, chunk bytes through signed URLs.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Data directory (RocksDB under meta/, local chunks under chunks/).
    #[arg(long, env = "SAIL_DATA_DIR")]
    data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "SAIL_LISTEN", default_value = "127.0.0.1:7420")]
    listen: SocketAddr,
    /// Base URL clients use for the chunk endpoint (default: http://<listen address>).
    #[arg(long, env = "SAIL_PUBLIC_URL")]
    public_url: Option<String>,
    /// Lifetime of signed chunk URLs, in seconds.
    #[arg(long, default_value_t = 900)]
    url_ttl_secs: u64,
    /// Store chunks in this S3 bucket instead of the local directory.
    #[arg(long, env = "SAIL_S3_BUCKET")]
    s3_bucket: Option<String>,
    /// S3-compatible endpoint URL (default: AWS).
    #[arg(long, env = "SAIL_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "SAIL_S3_REGION", default_value = "us-east-1")]
    s3_region: String,
    /// Key prefix inside the bucket.
    #[arg(long, env = "SAIL_S3_PREFIX", default_value = "")]
    s3_prefix: String,
    /// Use path-style addressing (most S3-compatible servers need it).
    #[arg(long, env = "SAIL_S3_PATH_STYLE")]
    s3_path_style: bool,
    /// Print the bound address as `listening on ADDR` on stdout once ready (for scripts).
    #[arg(long)]
    print_addr: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let backend = match &args.s3_bucket {
        None => BackendConfig::Local,
        Some(bucket) => {
            let mut s3 = S3Config::new(bucket.clone());
            s3.endpoint = args.s3_endpoint.clone();
            s3.region = args.s3_region.clone();
            s3.prefix = args.s3_prefix.clone();
            s3.force_path_style = args.s3_path_style;
            s3.credentials = S3Credentials::Environment;
            BackendConfig::S3(s3)
        }
    };
    let config = ServerConfig {
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        public_url: args.public_url.clone(),
        backend,
        url_ttl: Duration::from_secs(args.url_ttl_secs),
        upload_limits: volumed::datapath::body::UploadLimits::default(),
    };
    let server = Server::bind(config)
        .await
        .with_context(|| format!("starting volumed on {} with data in {}", args.listen, args.data_dir.display()))?;
    if args.print_addr {
        println!("listening on {}", server.addr);
    }
    server
        .serve(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
        })
        .await
        .context("serving")?;
    Ok(())
}
