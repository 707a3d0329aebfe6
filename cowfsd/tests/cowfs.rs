//! The daemon on a real FUSE mount (root and /dev/fuse): files written through write(2) and
//! through shared mappings (as QEMU writes guest memory), frozen and exported as chunks,
//! rebuilt lazily from their manifests, and checkpoints that stay exact while the file keeps
//! changing.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cowfs::{ClientError, CowClient, ErrorKind};
use serde_json::Value;

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    client: CowClient,
}

impl Daemon {
    fn mount(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
    fn file(&self, name: &str) -> PathBuf {
        self.mount().join(name)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = sysutil::process::terminate(&mut self.child, Duration::from_secs(10));
        sysutil::mount::clean_dead_mount(&self.mount());
        // Detach a mount this test made, if it is still there (an error: nothing mounted).
        let _ = sysutil::mount::lazy_unmount(&self.mount());
    }
}

async fn start(chunks: &Path) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_sail-cowfs"))
        .arg("--mount")
        .arg(dir.path().join("mnt"))
        .arg("--control")
        .arg(&control)
        .arg("--store")
        .arg(dir.path().join("store"))
        .arg("--chunks")
        .arg(chunks)
        .spawn()
        .unwrap();
    let client = CowClient::new(&control);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client.ping().await {
        assert!(Instant::now() < deadline, "sail-cowfs did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Daemon { child, dir, client }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Writes through a shared mapping and flushes it (msync), as guest memory is written.
fn write_mapped(path: &Path, off: usize, data: &[u8]) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    // SAFETY: a fresh shared mapping of the whole file, written within bounds, then unmapped.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(data.as_ptr(), (p as *mut u8).add(off), data.len());
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0);
        libc::munmap(p, len);
    }
    f.sync_all().unwrap();
}

fn stat(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(u64::MAX)
}

/// Bad requests on a daemon holding the file `restored`: each is refused with its kind.
async fn refuses_bad_requests(client: &CowClient) {
    let kind = |r: Result<(), ClientError>| r.err().and_then(|e| e.kind());
    assert!(client.create_zeros("../escape", 10).await.is_err());
    assert_eq!(kind(client.create_zeros("../escape", 10).await), Some(ErrorKind::Invalid));
    assert!(client.create_zeros("restored", 10).await.is_err(), "names are unique");
    assert_eq!(kind(client.create_zeros("restored", 10).await), Some(ErrorKind::Exists));
    assert!(client.create_from("x", "00").await.is_err());
    assert_eq!(kind(client.create_from("x", "00").await), Some(ErrorKind::Invalid), "not a chunk id");
    assert_eq!(kind(client.create_zeros("huge", u64::MAX).await), Some(ErrorKind::Invalid), "over the size limit");
    assert!(client.freeze("missing").await.is_err());
    assert_eq!(client.freeze("missing").await.err().and_then(|e| e.kind()), Some(ErrorKind::NotFound));
    client.remove("missing").await.expect("removing a missing file is fine");
    // A manifest id that names no stored chunk is the chunk store's failure.
    let absent = chunkstore::ChunkId::of(b"never stored").to_hex();
    assert_eq!(kind(client.create_from("y", &absent).await), Some(ErrorKind::Chunks));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_round_trip_through_chunks() {
    let chunks = tempfile::tempdir().unwrap();
    let d = start(chunks.path()).await;
    let size = 8 << 20;
    d.client.create_zeros("vm.mem", size).await.unwrap();
    let path = d.file("vm.mem");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), size);

    // Writes through a mapping (page-sized) and through pwrite (partial pages).
    let a = pattern(300 << 10, 1);
    write_mapped(&path, 1 << 20, &a);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    f.write_all_at(b"hello", 5_000_003).unwrap();
    let st = d.client.stats("vm.mem").await.unwrap();
    assert_eq!(stat(&st, "dirty_regions"), 3, "regions 4, 5 and 19 were written: {st}");

    // Checkpoint 1.
    assert_eq!(d.client.freeze("vm.mem").await.unwrap(), 3);
    let first = d.client.export("vm.mem").await.unwrap();
    assert_eq!((first.regions, first.chunks_uploaded, first.zero_regions), (3, 3, 0));

    // Changes after a freeze do not leak into that checkpoint.
    f.write_all_at(b"hello", 1_000_000).unwrap();
    assert_eq!(d.client.freeze("vm.mem").await.unwrap(), 1);
    f.write_all_at(b"LATER", 1_000_000).unwrap(); // after the freeze: must not be exported
    let second = d.client.export("vm.mem").await.unwrap();
    assert_eq!(second.regions, 1);
    // Rewriting a region to its previous bytes uploads nothing new (region 3 changed after
    // the last freeze, region 4 is rewritten with the bytes it had).
    f.write_all_at(&a[..5], 1 << 20).unwrap();
    d.client.freeze("vm.mem").await.unwrap();
    let third = d.client.export("vm.mem").await.unwrap();
    assert_eq!((third.regions, third.chunks_uploaded), (2, 1), "unchanged bytes are not uploaded again");

    // A new daemon on the same chunk store rebuilds checkpoint 2 lazily.
    drop(f);
    let e = start(chunks.path()).await;
    e.client.create_from("restored", &second.manifest).await.unwrap();
    let r = std::fs::File::open(e.file("restored")).unwrap();
    let mut buf = vec![0u8; 5];
    r.read_exact_at(&mut buf, 1_000_000).unwrap();
    assert_eq!(&buf, b"hello", "the checkpoint holds what was there at its freeze");
    r.read_exact_at(&mut buf, 5_000_003).unwrap();
    assert_eq!(&buf, b"hello");
    let mut got = vec![0u8; a.len()];
    r.read_exact_at(&mut got, 1 << 20).unwrap();
    assert!(got == a, "mapped writes were captured");
    let st = e.client.stats("restored").await.unwrap();
    let fetched = st["chunks"]["fetched"].as_u64().unwrap();
    // The manifest, plus the four regions read (3, 4, 5, 19); the file has 32.
    assert!((2..=5).contains(&fetched), "only touched regions are fetched: {st}");
    let mut zero = vec![1u8; 4096];
    r.read_exact_at(&mut zero, 7 << 20).unwrap();
    assert!(zero.iter().all(|&b| b == 0), "untouched regions read as zeros");
    assert_eq!(e.client.stats("restored").await.unwrap()["chunks"]["fetched"].as_u64().unwrap(), fetched);

    // Bad requests get errors of their kind, and the daemon goes on.
    refuses_bad_requests(&e.client).await;
    assert!(e.client.ping().await);
    e.client.remove("restored").await.unwrap();
    assert!(!e.file("restored").exists());
}

/// Bytes in every file below `dir` (what the daemon has written there).
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// What a sailbox create (a file over its image's manifest) and a fork (a file over the
/// parent's checkpoint) write to the host disk does not depend on the image's size: no base
/// byte is copied, only what the guest writes later lands locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_and_fork_copy_nothing_of_the_base() {
    let chunks = tempfile::tempdir().unwrap();
    let d = start(chunks.path()).await;
    let on_disk = || bytes_under(&d.dir.path().join("store")) + bytes_under(chunks.path());
    let mut written = Vec::new();
    for (i, mib) in [16u64, 256].into_iter().enumerate() {
        // An "image" full of data, stored as chunks.
        let image = format!("image{i}");
        d.client.create_zeros(&image, mib << 20).await.unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(d.file(&image)).unwrap();
        for off in (0..mib << 20).step_by(4 << 20) {
            f.write_all_at(&pattern(4 << 20, (off >> 20) as u8 ^ i as u8), off).unwrap();
        }
        drop(f);
        d.client.freeze(&image).await.unwrap();
        let img = d.client.export(&image).await.unwrap();
        d.client.remove(&image).await.unwrap();

        // Create: a file over the image.
        let before = on_disk();
        let child = format!("child{i}");
        d.client.create_from(&child, &img.manifest).await.unwrap();
        let created = on_disk() - before;
        // The guest writes 5 bytes; its checkpoint is taken (that does write: the region
        // and the manifest, which shows the measure sees writes); a fork starts from it.
        let before_guest = on_disk();
        std::fs::OpenOptions::new().write(true).open(d.file(&child)).unwrap().write_all_at(b"guest", 12345).unwrap();
        d.client.freeze(&child).await.unwrap();
        let ck = d.client.export(&child).await.unwrap();
        let before = on_disk();
        assert!(before - before_guest >= 4096, "the checkpoint's region was stored: {} B", before - before_guest);
        d.client.create_from(&format!("fork{i}"), &ck.manifest).await.unwrap();
        let forked = on_disk() - before;
        let mut buf = [0u8; 5];
        std::fs::File::open(d.file(&format!("fork{i}"))).unwrap().read_exact_at(&mut buf, 12345).unwrap();
        assert_eq!(&buf, b"guest", "the fork sees its parent's checkpoint");
        written.push((mib, created, forked));
    }
    eprintln!("bytes written to the host disk (base MiB, create, fork): {written:?}");
    for &(mib, created, forked) in &written {
        assert!(created < 64 << 10 && forked < 64 << 10, "{mib} MiB base: create wrote {created} B, fork {forked} B");
    }
    assert_eq!(written[0].1, written[1].1, "create writes the same for a 16x larger base: {written:?}");
    assert_eq!(written[0].2, written[1].2, "fork writes the same for a 16x larger base: {written:?}");
}

/// A read-only file (what a checkpoint's memory view is): writes and opens for writing fail
/// with EROFS, reads serve the base, and a private mapping written by one process changes
/// neither the file nor what another private mapping of it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_files_serve_private_mappings_and_refuse_writes() {
    let chunks = tempfile::tempdir().unwrap();
    let d = start(chunks.path()).await;
    let size = 4usize << 20;
    d.client.create_zeros("src", size as u64).await.unwrap();
    std::fs::OpenOptions::new().write(true).open(d.file("src")).unwrap().write_all_at(&pattern(size, 7), 0).unwrap();
    d.client.freeze("src").await.unwrap();
    let m = d.client.export("src").await.unwrap();
    d.client.create_readonly("view", &m.manifest).await.unwrap();

    let e = std::fs::OpenOptions::new().write(true).open(d.file("view")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let e = std::fs::OpenOptions::new().read(true).write(true).open(d.file("view")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert_eq!(std::fs::read(d.file("view")).unwrap(), pattern(size, 7));

    let map = |f: &std::fs::File| {
        // SAFETY: a private, writable mapping of a read-only descriptor (copy-on-write).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(f),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as *mut u8
    };
    let (fa, fb) = (std::fs::File::open(d.file("view")).unwrap(), std::fs::File::open(d.file("view")).unwrap());
    let (a, b) = (map(&fa), map(&fb));
    // SAFETY: both mappings are `size` bytes long; offsets are within them.
    unsafe {
        std::ptr::write_bytes(a.add(4096), 0xee, 4096);
        assert_eq!(*a.add(4096), 0xee, "the writer sees its own copy");
        assert_eq!(*b.add(4096), pattern(size, 7)[4096], "another mapping still reads the file");
        libc::munmap(a as *mut libc::c_void, size);
        libc::munmap(b as *mut libc::c_void, size);
    }
    assert_eq!(std::fs::read(d.file("view")).unwrap(), pattern(size, 7), "the file did not change");
    assert_eq!(stat(&d.client.stats("view").await.unwrap(), "dirty_regions"), 0);
}

/// A checkpoint whose export fails (the chunk directory refuses new chunks, even to root)
/// is abandoned without losing its regions: the next checkpoint stores them, and so does a
/// checkpoint after one that was frozen and never exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_or_abandoned_checkpoints_lose_nothing() {
    let chunks = tempfile::tempdir().unwrap();
    let d = start(chunks.path()).await;
    let size = 4usize << 20;
    d.client.create_zeros("f", size as u64).await.unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(d.file("f")).unwrap();
    f.write_all_at(&pattern(4096, 1), 0).unwrap();
    d.client.freeze("f").await.unwrap();
    let chattr = |flag: &str| {
        let st = Command::new("chattr").arg("-R").arg(flag).arg(chunks.path()).status().expect("chattr (e2fsprogs)");
        assert!(st.success());
    };
    chattr("+i");
    let failed = d.client.export("f").await;
    chattr("-i");
    assert!(failed.is_err(), "the export cannot store its chunk");
    assert_eq!(failed.err().and_then(|e| e.kind()), Some(ErrorKind::Chunks), "a chunk store failure");
    // Written again after the failure, then frozen (and abandoned, never exported).
    f.write_all_at(&pattern(4096, 2), 1 << 20).unwrap();
    d.client.freeze("f").await.unwrap();
    f.write_all_at(&pattern(4096, 3), 2 << 20).unwrap();
    assert_eq!(d.client.freeze("f").await.unwrap(), 3, "all three written regions are in the checkpoint");
    let m = d.client.export("f").await.unwrap();
    d.client.create_from("g", &m.manifest).await.unwrap();
    let g = std::fs::read(d.file("g")).unwrap();
    assert_eq!(&g[..4096], &pattern(4096, 1)[..]);
    assert_eq!(&g[1 << 20..(1 << 20) + 4096], &pattern(4096, 2)[..]);
    assert_eq!(&g[2 << 20..(2 << 20) + 4096], &pattern(4096, 3)[..]);
}
