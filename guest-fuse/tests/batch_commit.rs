//! A commit of many small files from a real FUSE mount: the chunks travel in batch uploads
//! (counted by the mount and by volumed's data path), the commit is correct on another mount,
//! and committing again uploads nothing. Run as root; /dev/fuse required.

mod common;

use std::fs;
use std::sync::atomic::Ordering;

use common::{Env, bytes_for};

fn tree_file(i: usize) -> (String, Vec<u8>) {
    (format!("src/pkg{}/mod{}/file{i}.rs", i / 500, i / 25), bytes_for(i as u64, 100 + (i * 131) % 12_000))
}

#[test]
fn many_small_files_commit_through_batches() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    let n = 2500;
    for i in 0..n {
        let (path, data) = tree_file(i);
        let p = a.p(&path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }
    // Two files with the same bytes, and one larger than a batch takes: its own URL.
    fs::write(a.p("dup1"), bytes_for(7, 500)).unwrap();
    fs::write(a.p("dup2"), bytes_for(7, 500)).unwrap();
    fs::write(a.p("big.bin"), bytes_for(9, 3 << 20)).unwrap();

    let c = a.commit();
    assert_eq!(c.chunks_hashed, n + 3);
    assert_eq!(c.chunks_uploaded, n + 2, "the duplicate is uploaded once: {c:?}");
    assert_eq!(c.chunks_batched, n + 1, "every small chunk went through a batch: {c:?}");
    // A batch holds at most BATCH_MAX_CHUNKS chunks, so 2501 small chunks need two at least.
    let fewest = (n + 1).div_ceil(volume_model::batch::BATCH_MAX_CHUNKS);
    assert!(c.batches >= fewest && c.batches <= n / 10, "{} batches (at least {fewest})", c.batches);
    let stats = &env.server.as_ref().expect("server").data_stats;
    assert_eq!(stats.chunk_uploads.load(Ordering::Relaxed), 1, "only big.bin had a URL of its own");
    assert_eq!(stats.batch_chunks.load(Ordering::Relaxed), (n + 1) as u64);
    assert_eq!(stats.batch_uploads.load(Ordering::Relaxed), c.batches as u64);
    assert_eq!(stats.rejected_uploads.load(Ordering::Relaxed), 0);
    assert_eq!(a.status().dirty_entries, 0);

    let b = env.mount("vol");
    for i in (0..n).step_by(97).chain([n - 1]) {
        let (path, data) = tree_file(i);
        assert_eq!(fs::read(b.p(&path)).unwrap(), data, "{path}");
    }
    assert_eq!(fs::read(b.p("dup2")).unwrap(), bytes_for(7, 500));
    assert_eq!(env.read_file("vol", "big.bin"), bytes_for(9, 3 << 20));
    let listed = fs::read_dir(b.p("src/pkg1/mod20")).unwrap().count();
    assert_eq!(listed, 25);

    // Touch every file again with the same bytes: nothing to upload.
    for i in (0..n).step_by(10) {
        let (path, data) = tree_file(i);
        fs::write(a.p(&path), data).unwrap();
    }
    let again = a.commit();
    assert_eq!(again.chunks_hashed, n / 10);
    assert_eq!((again.chunks_uploaded, again.batches), (0, 0));
}
