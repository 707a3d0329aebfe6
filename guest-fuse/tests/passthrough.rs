//! FUSE passthrough on real mounts (run as root; /dev/fuse required): used for fully cached,
//! unmodified files; not used for files with local writes; a writer of a file that readers
//! hold open in passthrough still goes through the overlay; `--no-passthrough` turns it off.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Env, Mount, bytes_for};
use guest_fuse::MountStatus;

const MIB: usize = 1 << 20;

/// Reads a whole file after dropping its pages from the page cache, so that a plain open has
/// to ask the helper for every byte.
fn read_uncached(path: &Path) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    // SAFETY: a valid descriptor; fadvise only drops clean cached pages.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut out = Vec::new();
    f.read_to_end(&mut out).unwrap();
    out
}

/// Reads through the helper counted so far (chunk and piece reads of FUSE read requests).
fn helper_reads(st: &MountStatus) -> u64 {
    st.memory_hits + st.memory_misses
}

/// Opens `rel` until the mount holds `files` assembled files (an open of a fully cached file
/// starts assembling it in the background).
fn wait_assembled(m: &Mount, rel: &str, files: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = m.status();
        if st.assembled_files >= files && st.assembling == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{rel} was not assembled: {st:?}");
        drop(File::open(m.p(rel)).unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A volume with `big.bin` (three 8 MiB chunks) and `edited.bin`, and a fresh mount of it
/// that has read both once and assembled `big.bin`.
fn setup(env: &Env) -> (Mount, Vec<u8>, Vec<u8>) {
    let big = bytes_for(7, 20 * MIB + 1234);
    let edited = bytes_for(8, 3 * MIB);
    {
        let a = env.mount("vol");
        fs::write(a.p("big.bin"), &big).unwrap();
        fs::write(a.p("edited.bin"), &edited).unwrap();
        a.commit();
    }
    let b = env.mount("vol");
    assert!(b.status().passthrough, "passthrough is on by default");
    assert_eq!(fs::read(b.p("big.bin")).unwrap(), big, "cold read (plain path)");
    assert_eq!(fs::read(b.p("edited.bin")).unwrap(), edited);
    wait_assembled(&b, "big.bin", 1);
    (b, big, edited)
}

#[test]
fn fully_cached_files_are_read_through_passthrough_and_locally_written_ones_are_not() {
    let env = Env::new("vol");
    let (b, big, mut edited) = setup(&env);

    let st0 = b.status();
    assert_eq!(read_uncached(&b.p("big.bin")), big, "passthrough reads the right bytes");
    let st1 = b.status();
    assert_eq!(st1.passthrough_opens, st0.passthrough_opens + 1, "the open used passthrough: {st1:?}");
    assert_eq!(helper_reads(&st1), helper_reads(&st0), "no read reached the helper: {st1:?}");
    assert_eq!(st1.passthrough_fallbacks, 0);

    // mmap of a passthrough handle maps the assembled file.
    let f = File::open(b.p("big.bin")).unwrap();
    // SAFETY: a read-only private mapping of a file of this length, unmapped below.
    let map = unsafe { libc::mmap(std::ptr::null_mut(), big.len(), libc::PROT_READ, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: the mapping is big.len() bytes long and stays mapped while the slice lives.
    let mapped = unsafe { std::slice::from_raw_parts(map.cast::<u8>(), big.len()) };
    assert!(mapped == big.as_slice(), "mmap of a passthrough file shows its bytes");
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(map, big.len()) };
    drop(f);

    // A file with local writes is never read through passthrough, even once fully cached.
    wait_assembled(&b, "edited.bin", 2);
    let w = OpenOptions::new().write(true).open(b.p("edited.bin")).unwrap();
    w.write_all_at(b"written locally", MIB as u64).unwrap();
    drop(w);
    edited[MIB..MIB + 15].copy_from_slice(b"written locally");
    let st2 = b.status();
    assert_eq!(read_uncached(&b.p("edited.bin")), edited, "the overlay's bytes are read");
    let st3 = b.status();
    assert_eq!(st3.passthrough_opens, st2.passthrough_opens, "no passthrough for a written file: {st3:?}");
    assert_eq!(st3.passthrough_direct_opens, 0);
    assert!(helper_reads(&st3) > helper_reads(&st2), "the helper served the reads: {st3:?}");
    assert_eq!(b.commit().upserts, 1);
    assert_eq!(env.read_file("vol", "edited.bin"), edited);
}

#[test]
fn a_writer_of_a_file_held_in_passthrough_goes_through_the_overlay() {
    let env = Env::new("vol");
    let (b, mut big, _) = setup(&env);
    let old = big[100..103].to_vec();

    let reader = File::open(b.p("big.bin")).unwrap();
    let st0 = b.status();
    assert!(st0.passthrough_opens >= 1);
    // The kernel accepts only passthrough opens of an inode in passthrough mode: the writer's
    // open succeeds and its reads and writes go through the helper.
    let writer = OpenOptions::new().read(true).write(true).open(b.p("big.bin")).unwrap();
    writer.write_all_at(b"XYZ", 100).unwrap();
    let mut buf = [0u8; 3];
    writer.read_exact_at(&mut buf, 100).unwrap();
    assert_eq!(&buf, b"XYZ", "the writer reads its own write");
    big[100..103].copy_from_slice(b"XYZ");

    // The passthrough reader keeps the committed bytes it opened; a new reader sees the write.
    reader.read_exact_at(&mut buf, 100).unwrap();
    assert_eq!(&buf[..], &old[..], "an existing passthrough handle reads the committed bytes");
    let second = File::open(b.p("big.bin")).unwrap();
    second.read_exact_at(&mut buf, 100).unwrap();
    assert_eq!(&buf, b"XYZ", "a new reader of the changed file reads the overlay");
    let st1 = b.status();
    assert_eq!(st1.passthrough_direct_opens, st0.passthrough_direct_opens + 2, "{st1:?}");
    assert_eq!(st1.passthrough_opens, st0.passthrough_opens, "{st1:?}");
    drop((reader, writer, second));
    // The kernel sends RELEASE after close() returns: wait until the helper has seen the
    // last one, or the next open would still find the inode in passthrough mode.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while b.status().passthrough_inodes > 0 {
        assert!(std::time::Instant::now() < deadline, "the kernel never released the passthrough handles");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    // Once every handle is closed the file is an ordinary dirty file: plain reads.
    assert_eq!(read_uncached(&b.p("big.bin")), big);
    let st2 = b.status();
    assert_eq!((st2.passthrough_opens, st2.passthrough_direct_opens), (st1.passthrough_opens, st1.passthrough_direct_opens));
    let c = b.commit();
    assert_eq!((c.upserts, c.chunks_uploaded), (1, 1), "one changed chunk: {c:?}");
    assert_eq!(env.read_file("vol", "big.bin"), big);
}

#[test]
fn no_passthrough_serves_every_read_through_the_helper() {
    let env = Env::new("vol");
    let data = bytes_for(9, 12 * MIB);
    {
        let a = env.mount("vol");
        fs::write(a.p("f.bin"), &data).unwrap();
        a.commit();
    }
    let m = env.mount_with("vol", &["--no-passthrough"]);
    for _ in 0..3 {
        assert_eq!(read_uncached(&m.p("f.bin")), data);
    }
    let st = m.status();
    assert!(!st.passthrough, "{st:?}");
    assert_eq!((st.passthrough_opens, st.passthrough_direct_opens, st.assembled_files, st.assembling), (0, 0, 0, 0), "{st:?}");
}
