//! Commit of many small files through volumed's data path (local backend, loopback), with one
//! signed URL per chunk against batch uploads (many small chunks per signed request, made
//! durable in one pass). Baseline: writing the same files into a local directory and
//! `sync -f` on it, the durable local equivalent.
//!
//! The tree is like `benches/fuse/gen_tree.py`: 25 files per directory, sizes log-normal
//! around 3 KiB (capped at 16 KiB). Each timed commit runs against a fresh volumed in a fresh
//! directory and includes chunking and hashing, `MissingChunks`, the uploads and `Commit`.
//!
//! `cargo run --release -p benches --bin small_files [-- --files 10000 --runs 3]`

use std::path::Path;
use std::time::{Duration, Instant};

use benches::{ms, print_table, random_bytes};
use clap::Parser;
use rand::{Rng, SeedableRng};
use volume_client::{FileUpload, VolumeClient};
use volumed::server::{Server, ServerConfig};

#[derive(Parser)]
struct Args {
    /// Files in the tree.
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// Timed runs per row (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// The synthetic source tree: (path, bytes).
fn tree(n: usize) -> Vec<(String, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    (0..n)
        .map(|i| {
            // Log-normal (mu 8, sigma 1) by Box-Muller.
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            let size = (8.0 + normal).exp().min(16384.0) as usize;
            (format!("pkg{:03}/mod{:04}/file{i:06}.rs", i / 25 / 20, i / 25), random_bytes(size.max(1), i as u64))
        })
        .collect()
}

fn local_write(dir: &Path, files: &[(String, Vec<u8>)]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for (path, data) in files {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(p, data)?;
    }
    let status = std::process::Command::new("sync").arg("-f").arg(dir).status()?;
    anyhow::ensure!(status.success(), "sync -f failed");
    Ok(start.elapsed())
}

/// One commit of the whole tree into a fresh volumed; returns (time, chunk requests).
async fn commit(files: &[(String, Vec<u8>)], batches: bool) -> anyhow::Result<(Duration, usize)> {
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let server = Server::bind(ServerConfig::local(dir.path(), "127.0.0.1:0".parse()?)).await?.spawn();
    let mut c =
        VolumeClient::connect_with_key(&server.endpoint(), Some(server.operator_key())).await?.with_batch_uploads(batches);
    let vol = c.get_volume("bench", "src", true).await?;
    let uploads: Vec<FileUpload> = files.iter().map(|(p, d)| FileUpload::from_bytes(p.clone(), d.clone(), 0o644)).collect();
    let start = Instant::now();
    c.commit_files("bench", "src", &vol.head, uploads, &[]).await?;
    let took = start.elapsed();
    let up = c.last_upload;
    anyhow::ensure!(up.chunks_uploaded == files.len(), "uploaded {} of {} chunks", up.chunks_uploaded, files.len());
    let requests = up.chunks_uploaded - up.chunks_batched + up.batches;
    server.stop().await?;
    Ok((took, requests))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let files = tree(args.files);
    let bytes: usize = files.iter().map(|(_, d)| d.len()).sum();
    let mut local = Vec::new();
    let mut single = Vec::new();
    let mut batched = Vec::new();
    let (mut single_reqs, mut batch_reqs) = (0, 0);
    for _ in 0..args.runs.max(1) {
        let dir = tempfile::tempdir_in("/var/tmp")?;
        local.push(local_write(dir.path(), &files)?);
        let (t, r) = commit(&files, false).await?;
        single.push(t);
        single_reqs = r;
        let (t, r) = commit(&files, true).await?;
        batched.push(t);
        batch_reqs = r;
    }
    let (local, single, batched) = (median(local), median(single), median(batched));
    let ratio = |d: Duration| format!("{:.2}x", d.as_secs_f64() / local.as_secs_f64());
    let mib = format!("{:.1}", bytes as f64 / (1 << 20) as f64);
    let n = args.files.to_string();
    print_table(
        &format!("commit of {} small files ({mib} MiB), median of {} runs", args.files, args.runs.max(1)),
        &["what", "files", "MiB", "ms", "vs local", "chunk requests"],
        &[
            vec!["local: write files + sync -f (baseline)".into(), n.clone(), mib.clone(), ms(local), "1.00x".into(), "-".into()],
            vec![
                "commit, one signed URL per chunk".into(),
                n.clone(),
                mib.clone(),
                ms(single),
                ratio(single),
                single_reqs.to_string(),
            ],
            vec!["commit, batch uploads".into(), n, mib, ms(batched), ratio(batched), batch_reqs.to_string()],
        ],
    );
    Ok(())
}
