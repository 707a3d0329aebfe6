//! Server-side commit latency of one changed 4 KiB file in volumes of 1k, 100k and 1M files,
//! and the head + root listing a reload needs, over gRPC on loopback.
//!
//! Files sit in directories of 1,000 (`d{i}/f{j}`), so the root has N/1000 entries. The
//! commit is timed inside the server (`Volumes::commit`: validation done, chunk check, merge
//! onto the head, synced RocksDB batch); the chunk is uploaded beforehand, untimed. The
//! baseline is one synced RocksDB write of the same size class (an fsync of the WAL), the
//! floor any durable commit pays.
//!
//! `cargo run --release -p benches --bin commit_latency [-- --sizes 1000,100000,1000000]`

use std::time::{Duration, Instant};

use benches::{ms, percentile, print_table, random_bytes};
use bytes::Bytes;
use chunkstore::{Backend, ChunkId, ChunkPolicy, LocalBackend};
use clap::Parser;
use proto::volume as pb;
use volume_model::convert::{ValidCommit, ValidRef};
use volume_model::{Change, ChangeOp, Entry, EntryKind, FileData, VolPath};
use volumed::server::{Server, ServerConfig};
use volumed::service::Volumes;

#[derive(Parser)]
struct Args {
    /// Volume sizes (files) to measure.
    #[arg(long, value_delimiter = ',', default_value = "1000,100000,1000000")]
    sizes: Vec<usize>,
    /// Timed commits per size.
    #[arg(long, default_value_t = 200)]
    commits: usize,
    /// Timed head + root listings per size.
    #[arg(long, default_value_t = 200)]
    listings: usize,
}

fn file_entry(id: ChunkId, len: u32) -> Entry {
    Entry {
        mode: 0o644,
        mtime_ns: 0,
        kind: EntryKind::File(FileData {
            size: len as u64,
            policy: ChunkPolicy::Fixed { size: 8 << 20 },
            chunks: vec![(id, len)],
        }),
    }
}

fn upsert(path: String, e: Entry) -> Change {
    Change { path: VolPath::parse(&path).expect("valid path"), op: ChangeOp::Upsert(e) }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rows = Vec::new();
    for &n in &args.sizes {
        rows.push(measure(&args, n).await?);
    }
    print_table(
        "commit of one changed 4 KiB file (server-side) and head + root listing (gRPC, loopback)",
        &[
            "files",
            "fill s",
            "commit p50 ms",
            "commit p99 ms",
            "fsync'd write p50 ms",
            "p50 / fsync",
            "head+list p50 ms",
            "head+list p99 ms",
            "root entries",
        ],
        &rows,
    );
    Ok(())
}

/// The table row of a volume of `n` files: fill it, time commits and listings, and the
/// RocksDB floor.
async fn measure(args: &Args, n: usize) -> anyhow::Result<Vec<String>> {
    let dir = tempfile::tempdir()?;
    let server = Server::bind(ServerConfig::local(dir.path(), "127.0.0.1:0".parse()?)).await?;
    let volumes = server.volumes.clone();
    let running = server.spawn();
    let backend = LocalBackend::open(dir.path().join("chunks"))?;
    let vref = ValidRef { org: "bench".into(), name: format!("v{n}") };
    volumes.get_volume(vref.clone(), true, chunkstore::Chunking::Fixed).await?;
    let fill_time = fill(&volumes, &backend, &vref, n).await?;
    let mut samples = timed_commits(&volumes, &backend, &vref, n, args.commits).await?;
    let (mut listing, root_entries) = timed_listings(&running.endpoint(), running.operator_key(), &vref, args.listings).await?;

    // Baseline: a synced 4 KiB write to a RocksDB in the same directory.
    let db = rocksdb_floor(dir.path(), args.commits)?;

    let row = vec![
        n.to_string(),
        format!("{:.1}", fill_time.as_secs_f64()),
        ms(percentile(&mut samples.clone(), 50.0)),
        ms(percentile(&mut samples, 99.0)),
        ms(db),
        format!("{:.2}", percentile(&mut samples.clone(), 50.0).as_secs_f64() / db.as_secs_f64()),
        ms(percentile(&mut listing.clone(), 50.0)),
        ms(percentile(&mut listing, 99.0)),
        root_entries.to_string(),
    ];
    running.stop().await?;
    Ok(row)
}

/// Files per directory in a volume of `n` files.
fn per_dir(n: usize) -> usize {
    1000.min(n)
}

/// Populates the volume with `n` files; every file shares one 4 KiB chunk (the tree is what
/// matters here). Returns how long it took.
async fn fill(volumes: &Volumes, backend: &LocalBackend, vref: &ValidRef, n: usize) -> anyhow::Result<Duration> {
    let shared = Bytes::from(random_bytes(4096, 1));
    let shared_id = ChunkId::of(&shared);
    backend.put(shared_id, shared.clone()).await?;
    volumes.store().record_chunks(&[(shared_id, 4096)])?;
    let fill = Instant::now();
    let per_dir = per_dir(n);
    let mut batch = Vec::new();
    for i in 0..n {
        batch.push(upsert(format!("d{}/f{}", i / per_dir, i % per_dir), file_entry(shared_id, 4096)));
        if batch.len() == 100_000 || i + 1 == n {
            let changes = std::mem::take(&mut batch);
            volumes
                .commit(ValidCommit { volume: vref.clone(), base: None, changes, message: "fill".into(), author: String::new() })
                .await?;
        }
    }
    Ok(fill.elapsed())
}

/// Timed: one changed 4 KiB file per commit, at a pseudo-random existing path.
async fn timed_commits(
    volumes: &Volumes,
    backend: &LocalBackend,
    vref: &ValidRef,
    n: usize,
    commits: usize,
) -> anyhow::Result<Vec<Duration>> {
    let per_dir = per_dir(n);
    let mut samples = Vec::with_capacity(commits);
    for k in 0..commits {
        let data = Bytes::from(random_bytes(4096, 1000 + k as u64));
        let id = ChunkId::of(&data);
        backend.put(id, data).await?;
        volumes.store().record_chunks(&[(id, 4096)])?;
        let i = (k * 7919) % n;
        let change = upsert(format!("d{}/f{}", i / per_dir, i % per_dir), file_entry(id, 4096));
        let req = ValidCommit {
            volume: vref.clone(),
            base: None,
            changes: vec![change],
            message: String::new(),
            author: String::new(),
        };
        let start = Instant::now();
        volumes.commit(req).await?;
        samples.push(start.elapsed());
    }
    Ok(samples)
}

/// Timed: what a reload needs, over gRPC: GetHead + ListDir of the root. Returns the times
/// and the root's entry count.
async fn timed_listings(
    endpoint: &str,
    key: &tenancy::ApiKey,
    vref: &ValidRef,
    listings: usize,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let mut client = volume_client::VolumeClient::connect_with_key(endpoint, Some(key)).await?;
    let pref = Some(pb::VolumeRef { org: vref.org.clone(), name: vref.name.clone() });
    let mut listing = Vec::with_capacity(listings);
    let mut root_entries = 0;
    for _ in 0..listings {
        let start = Instant::now();
        let head = client.grpc().get_head(pb::GetHeadRequest { volume: pref.clone() }).await?.into_inner();
        let root = client
            .grpc()
            .list_dir(pb::ListDirRequest { volume: pref.clone(), commit: head.commit, path: String::new() })
            .await?
            .into_inner();
        listing.push(start.elapsed());
        root_entries = root.entries.len();
    }
    Ok((listing, root_entries))
}

/// Median latency of a synced 4 KiB RocksDB put: the durability floor on this disk.
fn rocksdb_floor(dir: &std::path::Path, n: usize) -> anyhow::Result<Duration> {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    let db = rocksdb::DB::open(&opts, dir.join("floor"))?;
    let mut wo = rocksdb::WriteOptions::default();
    wo.set_sync(true);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let value = random_bytes(4096, i as u64);
        let start = Instant::now();
        db.put_opt(i.to_be_bytes(), value, &wo)?;
        samples.push(start.elapsed());
    }
    Ok(percentile(&mut samples, 50.0))
}
