//! Chunk + hash throughput: the fixed and FastCDC chunkers, on one thread and on all cores,
//! against plain single-thread BLAKE3 of the same buffer.
//!
//! `cargo run --release -p benches --bin chunk_hash [-- --mib 512 --runs 5]`

use benches::{median_of, mib_per_s, print_table, random_bytes};
use chunkstore::{ChunkPolicy, Chunking};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Buffer size in MiB.
    #[arg(long, default_value_t = 512)]
    mib: usize,
    /// Runs per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn main() {
    let args = Args::parse();
    let buf = random_bytes(args.mib << 20, 42);
    let bytes = buf.len() as u64;
    let threads = rayon::current_num_threads();

    let plain = median_of(args.runs, || blake3::hash(&buf));
    let fixed = Chunking::Fixed.policy_for(bytes);
    let large = ChunkPolicy::Fixed { size: chunkstore::chunker::LARGE_CHUNK_SIZE };
    let cdc = Chunking::FastCdc.policy_for(bytes);

    let mut rows = vec![vec![
        "plain BLAKE3, 1 thread (baseline)".into(),
        format!("{:.0}", mib_per_s(bytes, plain)),
        "1.00".into(),
        "-".into(),
    ]];
    let cases: Vec<(String, Box<dyn Fn() -> usize>)> = vec![
        (format!("fixed {} MiB, 1 thread", fixed.max_chunk_len() >> 20), Box::new(|| fixed.chunk(&buf).len())),
        (format!("fixed {} MiB, {threads} threads", fixed.max_chunk_len() >> 20), Box::new(|| fixed.chunk_parallel(&buf).len())),
        ("fixed 64 MiB, 1 thread".into(), Box::new(|| large.chunk(&buf).len())),
        (format!("fixed 64 MiB, {threads} threads"), Box::new(|| large.chunk_parallel(&buf).len())),
        ("FastCDC v2020 avg 4 MiB, 1 thread".into(), Box::new(|| cdc.chunk(&buf).len())),
        (format!("FastCDC v2020 avg 4 MiB, {threads} threads (hashing)"), Box::new(|| cdc.chunk_parallel(&buf).len())),
        ("FastCDC boundaries only, 1 thread".into(), Box::new(|| cdc.boundaries(&buf).len())),
    ];
    for (name, f) in &cases {
        let chunks = f();
        let t = median_of(args.runs, f);
        rows.push(vec![
            name.clone(),
            format!("{:.0}", mib_per_s(bytes, t)),
            format!("{:.2}", plain.as_secs_f64() / t.as_secs_f64()),
            chunks.to_string(),
        ]);
    }
    print_table(
        &format!("chunk + hash throughput, {} MiB buffer, median of {} runs, {threads} cores", args.mib, args.runs),
        &["case", "MiB/s", "x plain BLAKE3", "chunks"],
        &rows,
    );
}
