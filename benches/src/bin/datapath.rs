//! Data path throughput: 1 GiB in 8 MiB chunks through signed URLs, with same-run baselines.
//!
//! - local: upload and download through volumed's signed-URL HTTP endpoint (every chunk
//!   hashed by the server before it becomes visible and fsynced; every download verified by
//!   the client) vs a plain file copy of the same bytes (read + write + fsync).
//! - s3: the same through S3 presigned URLs against a local s3s-fs, vs aws-sdk-s3 PUT/GET
//!   of the same chunks straight to the same server, at the same concurrency.
//!
//! `cargo run --release -p benches --bin datapath [-- --mib 1024 --skip-s3]`

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::{mib_per_s, print_table, random_bytes};
use bytes::Bytes;
use chunkstore::{Backend, ChunkId, S3Backend};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use volume_client::{TRANSFER_CONCURRENCY, VolumeClient};
use volumed::server::{BackendConfig, Server, ServerConfig};

#[derive(Parser)]
struct Args {
    /// Total size in MiB (a multiple of 8).
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Skip the S3 half (it needs s3s-fs; scripts/setup.sh installs it).
    #[arg(long)]
    skip_s3: bool,
}

fn chunks(mib: usize) -> (HashMap<ChunkId, Bytes>, Vec<ChunkId>) {
    let mut map = HashMap::new();
    let mut order = Vec::new();
    for i in 0..mib / 8 {
        let b = Bytes::from(random_bytes(8 << 20, 10_000 + i as u64));
        let id = ChunkId::of(&b);
        order.push(id);
        map.insert(id, b);
    }
    (map, order)
}

/// Plain file copy of `total` bytes: read the source in 8 MiB blocks, write, fsync.
fn file_copy(dir: &std::path::Path, data: &HashMap<ChunkId, Bytes>, order: &[ChunkId]) -> anyhow::Result<Duration> {
    let src = dir.join("copy-src");
    let mut f = std::fs::File::create(&src)?;
    for id in order {
        f.write_all(&data[id])?;
    }
    f.sync_all()?;
    drop(f);
    let start = Instant::now();
    let mut input = std::fs::File::open(&src)?;
    let mut out = std::fs::File::create(dir.join("copy-dst"))?;
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    out.sync_all()?;
    Ok(start.elapsed())
}

async fn through_volumed(
    endpoint: &str,
    key: &tenancy::ApiKey,
    data: &HashMap<ChunkId, Bytes>,
    order: &[ChunkId],
) -> anyhow::Result<(Duration, Duration)> {
    let mut c = VolumeClient::connect_with_key(endpoint, Some(key)).await?;
    c.get_volume("bench", "data", true).await?;
    let start = Instant::now();
    let stats = c.upload_chunks("bench", "data", data).await?;
    let up = start.elapsed();
    anyhow::ensure!(stats.chunks_uploaded == order.len(), "uploaded {} of {} chunks", stats.chunks_uploaded, order.len());
    let start = Instant::now();
    let got = c.download_chunks("bench", "data", order).await?;
    let down = start.elapsed();
    anyhow::ensure!(got.len() == order.len());
    Ok((up, down))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (data, order) = chunks(args.mib);
    let total = (order.len() as u64) << 23;
    let mut rows = Vec::new();
    let row = |name: &str, d: Duration, base: Duration| {
        vec![
            name.to_owned(),
            format!("{:.2}", d.as_secs_f64()),
            format!("{:.0}", mib_per_s(total, d)),
            format!("{:.2}", base.as_secs_f64() / d.as_secs_f64()),
        ]
    };

    // Local backend through volumed's HTTP endpoint.
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))?;
    let copy = file_copy(dir.path(), &data, &order)?;
    let server = Server::bind(ServerConfig::local(dir.path().join("volumed"), "127.0.0.1:0".parse()?)).await?.spawn();
    let (up, down) = through_volumed(&server.endpoint(), server.operator_key(), &data, &order).await?;
    server.stop().await?;
    rows.push(row("plain file copy (read + write + fsync), baseline", copy, copy));
    rows.push(row("local: upload via signed URL (hash-checked, fsynced)", up, copy));
    rows.push(row("local: download via signed URL (verified)", down, copy));

    if !args.skip_s3 {
        let s3 = chunkstore::testing::LocalS3Server::start().await?;
        let cfg = s3.s3_config("bench");
        let direct = Arc::new(S3Backend::new(cfg.clone()).await?);
        direct.ensure_bucket().await?;
        let jobs: Vec<(ChunkId, Bytes)> = order.iter().map(|id| (*id, data[id].clone())).collect();
        let start = Instant::now();
        futures::stream::iter(jobs.clone())
            .map(|(id, b)| {
                let d = direct.clone();
                async move { d.put(id, b).await }
            })
            .buffer_unordered(TRANSFER_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        let sdk_put = start.elapsed();
        let start = Instant::now();
        futures::stream::iter(order.clone())
            .map(|id| {
                let d = direct.clone();
                async move { d.get(id).await }
            })
            .buffered(TRANSFER_CONCURRENCY)
            .try_collect::<Vec<Bytes>>()
            .await?;
        let sdk_get = start.elapsed();

        // Presigned: a second prefix, so the chunks are really missing.
        let mut vcfg = cfg.clone();
        vcfg.prefix = "presigned/".into();
        let mut sc = ServerConfig::local(dir.path().join("volumed-s3"), "127.0.0.1:0".parse()?);
        sc.backend = BackendConfig::S3(vcfg);
        let server = Server::bind(sc).await?.spawn();
        let (up, down) = through_volumed(&server.endpoint(), server.operator_key(), &data, &order).await?;
        server.stop().await?;
        rows.push(row("s3: aws-sdk-s3 PutObject direct, baseline", sdk_put, sdk_put));
        rows.push(row("s3: upload via presigned PUT", up, sdk_put));
        rows.push(row("s3: aws-sdk-s3 GetObject direct (verified), baseline", sdk_get, sdk_get));
        rows.push(row("s3: download via presigned GET (verified)", down, sdk_get));
    }
    print_table(
        &format!("data path, {} MiB in 8 MiB chunks, {TRANSFER_CONCURRENCY} transfers in flight", total >> 20),
        &["case", "seconds", "MiB/s", "x baseline"],
        &rows,
    );
    Ok(())
}
