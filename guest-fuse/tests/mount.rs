//! End-to-end tests on real FUSE mounts (run as root; /dev/fuse required).

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};

use common::{Env, bytes_for, hash_file};

const MIB: usize = 1 << 20;

#[test]
fn write_commit_reload_read_across_two_mounts() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    let b = env.mount("vol");
    fs::create_dir_all(a.p("src/nested")).unwrap();
    fs::write(a.p("src/nested/hello.txt"), b"hello").unwrap();
    fs::write(a.p("big.bin"), bytes_for(1, 20 * MIB)).unwrap();
    std::os::unix::fs::symlink("src/nested/hello.txt", a.p("link")).unwrap();

    assert!(!b.p("big.bin").exists(), "other mounts see nothing before commit + reload");
    let c = a.commit();
    assert_eq!(c.commit, env.head("vol"), "commit returns the new head");
    assert_eq!(c.seq, 1);
    assert_eq!(
        env.log_authors("vol"),
        [guest_fuse::runner::fuse_author(), String::new()],
        "the mount's commit, then the creation"
    );
    assert_eq!(a.status().dirty_entries, 0);
    assert!(!b.p("big.bin").exists(), "no live remote view: B needs a reload");

    let r = b.reload();
    assert_eq!(r.commit, c.commit);
    assert_eq!(fs::read(b.p("src/nested/hello.txt")).unwrap(), b"hello");
    assert_eq!(fs::read_link(b.p("link")).unwrap().to_str(), Some("src/nested/hello.txt"));
    assert_eq!(hash_file(&b.p("big.bin")), blake3::hash(&bytes_for(1, 20 * MIB)));
    assert_eq!(env.read_file("vol", "src/nested/hello.txt"), b"hello");
    let st = b.status();
    assert!(st.memory_misses >= 3 && st.cache_misses >= 3, "bytes were fetched lazily: {st:?}");
}

#[test]
fn concurrent_commits_merge_and_same_path_is_last_writer_wins() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    let b = env.mount("vol");
    fs::write(a.p("from_a.txt"), b"a").unwrap();
    fs::write(b.p("from_b.txt"), b"b").unwrap();
    fs::write(a.p("same.txt"), b"first").unwrap();
    fs::write(b.p("same.txt"), b"second").unwrap();
    let ca = a.commit();
    let cb = b.commit();
    assert!(!ca.merged && cb.merged, "B's commit was based on the old head and merged");
    for m in [&a, &b] {
        m.reload();
        assert_eq!(fs::read(m.p("from_a.txt")).unwrap(), b"a");
        assert_eq!(fs::read(m.p("from_b.txt")).unwrap(), b"b");
        assert_eq!(fs::read(m.p("same.txt")).unwrap(), b"second", "last writer wins");
    }
    // Deletes merge the same way.
    fs::remove_file(a.p("from_a.txt")).unwrap();
    fs::write(b.p("later.txt"), b"l").unwrap();
    a.commit();
    b.commit();
    b.reload();
    assert!(!b.p("from_a.txt").exists());
    assert!(b.p("later.txt").exists() && b.p("from_b.txt").exists());
}

#[test]
fn a_trusted_endpoint_serves_a_first_read_by_itself_then_the_whole_chunk() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    let data = bytes_for(7, 20 * MIB);
    fs::write(a.p("big.bin"), &data).unwrap();
    a.commit();
    // The endpoint is volumed itself here (a guest's is the host's verifying gateway): what
    // is tested is the helper's read path with a trusted endpoint.
    let b = env.mount_with("vol", &["--trusted-endpoint"]);
    let mut buf = vec![0u8; 4096];
    let f = fs::File::open(b.p("big.bin")).unwrap();
    f.read_exact_at(&mut buf, 3 * MIB as u64 + 5).unwrap();
    assert_eq!(buf, data[3 * MIB + 5..3 * MIB + 5 + 4096]);
    let st = b.status();
    assert_eq!(st.first_reads, 1, "the first read came with its own range request: {st:?}");
    // The rest of the file (the first chunk was fetched whole behind that read).
    assert_eq!(hash_file(&b.p("big.bin")), blake3::hash(&data));
    let st = b.status();
    assert!(st.first_reads >= 1 && st.prefetched >= 1, "{st:?}");
    // A mount that hashes what it reads never takes the unverified range path.
    let c = env.mount("vol");
    let f = fs::File::open(c.p("big.bin")).unwrap();
    f.read_exact_at(&mut buf, 3 * MIB as u64 + 5).unwrap();
    assert_eq!(buf, data[3 * MIB + 5..3 * MIB + 5 + 4096]);
    assert_eq!(c.status().first_reads, 0);
}

#[test]
fn reload_discards_local_changes_and_commit_of_nothing_is_the_head() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    fs::write(a.p("kept.txt"), b"kept").unwrap();
    let c = a.commit();
    fs::write(a.p("dropped.txt"), b"x").unwrap();
    fs::write(a.p("kept.txt"), b"changed").unwrap();
    fs::create_dir(a.p("newdir")).unwrap();
    assert_eq!(a.status().dirty_entries, 3);
    let r = a.reload();
    assert_eq!(r.commit, c.commit);
    assert_eq!(r.discarded, 3);
    assert!(!a.p("dropped.txt").exists() && !a.p("newdir").exists());
    assert_eq!(fs::read(a.p("kept.txt")).unwrap(), b"kept");
    let again = a.commit();
    assert_eq!((again.commit.as_str(), again.seq), (c.commit.as_str(), 0), "nothing to commit");
}

#[test]
fn append_past_a_full_chunk_uploads_exactly_the_new_chunk() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    fs::write(a.p("log.bin"), bytes_for(2, 8 * MIB)).unwrap();
    let first = a.commit();
    assert_eq!((first.chunks_uploaded, first.bytes_uploaded), (1, 8 * MIB as u64));
    let mut f = fs::OpenOptions::new().append(true).open(a.p("log.bin")).unwrap();
    f.write_all(&bytes_for(3, 4096)).unwrap();
    drop(f);
    let second = a.commit();
    assert_eq!(second.chunks_hashed, 1, "the full first chunk is neither read nor hashed again");
    assert_eq!((second.chunks_uploaded, second.bytes_uploaded), (1, 4096));
    let mut want = bytes_for(2, 8 * MIB);
    want.extend(bytes_for(3, 4096));
    assert_eq!(env.read_file("vol", "log.bin"), want);
}

#[test]
fn rewriting_one_byte_of_a_100_mib_file_uploads_one_chunk() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    let mut data = bytes_for(4, 100 * MIB);
    fs::write(a.p("data.bin"), &data).unwrap();
    let first = a.commit();
    assert_eq!(first.chunks_uploaded, 13, "100 MiB in 8 MiB chunks");
    let f = fs::OpenOptions::new().write(true).open(a.p("data.bin")).unwrap();
    f.write_all_at(&[0xAB], 50 * MIB as u64 + 7).unwrap();
    drop(f);
    data[50 * MIB + 7] = 0xAB;
    let second = a.commit();
    assert_eq!((second.chunks_hashed, second.chunks_uploaded, second.bytes_uploaded), (1, 1, 8 * MIB as u64));
    let b = env.mount("vol");
    assert_eq!(hash_file(&b.p("data.bin")), blake3::hash(&data));
}

#[test]
fn two_gib_file_written_and_read_back_matches() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    let block = 4 * MIB;
    let mut h = blake3::Hasher::new();
    let mut f = fs::File::create(a.p("huge.bin")).unwrap();
    let base = bytes_for(5, block);
    for i in 0..(2048 / 4) as u64 {
        let mut b = base.clone();
        b[..8].copy_from_slice(&i.to_le_bytes()); // every block (and chunk) differs
        h.update(&b);
        f.write_all(&b).unwrap();
    }
    drop(f);
    let want = h.finalize();
    let c = a.commit();
    assert_eq!(c.chunks_uploaded, 32, "2 GiB in 64 MiB chunks");
    let b = env.mount("vol");
    assert_eq!(fs::metadata(b.p("huge.bin")).unwrap().len(), 2 << 30);
    assert_eq!(hash_file(&b.p("huge.bin")), want);
    let st = b.status();
    assert!(st.pieces_fetched >= 32, "64 MiB chunks were read in verified 1 MiB pieces: {st:?}");
    assert_eq!(hash_file(&a.p("huge.bin")), want);
}

#[test]
fn posix_operations_and_their_errors() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    fs::create_dir_all(a.p("d/e")).unwrap();
    fs::write(a.p("d/e/f.txt"), b"0123456789").unwrap();
    fs::write(a.p("d/g.txt"), b"g").unwrap();
    a.commit();

    // Errors the kernel gets from us.
    let errno = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
    assert_eq!(errno(fs::remove_dir(a.p("d"))), Some(libc::ENOTEMPTY));
    assert_eq!(errno(fs::remove_file(a.p("d"))), Some(libc::EISDIR));
    assert_eq!(errno(fs::hard_link(a.p("d/g.txt"), a.p("d/h.txt"))), Some(libc::EPERM));
    assert_eq!(errno(fs::create_dir(a.p("d"))), Some(libc::EEXIST));
    assert_eq!(errno(fs::rename(a.p("d"), a.p("d/e/inside"))), Some(libc::EINVAL));
    let fifo = std::ffi::CString::new(a.p("fifo").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
    assert_eq!(xattr_set(&a.p("d/g.txt")), Some(libc::ENOTSUP));

    // Changes: truncate, random write, chmod, utimens, rename of a directory, unlink, rmdir.
    let f = fs::OpenOptions::new().write(true).open(a.p("d/e/f.txt")).unwrap();
    f.set_len(4).unwrap();
    f.write_all_at(b"XY", 8).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(a.p("d/e/f.txt")).unwrap(), b"0123\0\0\0\0XY");
    fs::set_permissions(a.p("d/g.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    fs::File::options().write(true).open(a.p("d/g.txt")).unwrap().set_modified(mtime).unwrap();
    fs::rename(a.p("d"), a.p("moved")).unwrap();
    fs::remove_file(a.p("moved/g.txt")).unwrap();
    fs::create_dir(a.p("empty")).unwrap();
    fs::create_dir(a.p("gone")).unwrap();
    fs::remove_dir(a.p("gone")).unwrap();
    // SAFETY: statvfs is a plain C struct of integers, for which all zeroes is valid.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let root = std::ffi::CString::new(a.path.clone().into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: valid path and out-pointer.
    assert_eq!(unsafe { libc::statvfs(root.as_ptr(), &mut s) }, 0);
    assert!(s.f_bavail > 0);
    let c = a.commit();
    assert_eq!(c.deletes, 1, "one delete marker: the old directory path");

    let b = env.mount("vol");
    let mut names: Vec<String> = walk(&b.path);
    names.sort();
    assert_eq!(names, ["empty/", "moved/", "moved/e/", "moved/e/f.txt"]);
    assert_eq!(fs::read(b.p("moved/e/f.txt")).unwrap(), b"0123\0\0\0\0XY");
    assert!(!b.p("d").exists());

    // chmod and mtime survive a commit.
    fs::write(b.p("moved/m.txt"), b"m").unwrap();
    fs::set_permissions(b.p("moved/m.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::File::options().write(true).open(b.p("moved/m.txt")).unwrap().set_modified(mtime).unwrap();
    b.commit();
    a.reload();
    let meta = fs::metadata(a.p("moved/m.txt")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(meta.modified().unwrap(), mtime);
}

fn xattr_set(p: &std::path::Path) -> Option<i32> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let name = c"user.test";
    // SAFETY: valid strings and buffer.
    let r = unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    (r != 0).then(|| std::io::Error::last_os_error().raw_os_error()).flatten()
}

fn walk(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                out.push(format!("{rel}/"));
                stack.push(e.path());
            } else {
                out.push(rel);
            }
        }
    }
    out
}

#[test]
fn open_handles_of_files_removed_by_a_reload_keep_reading() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    let b = env.mount("vol");
    fs::write(a.p("doomed.bin"), bytes_for(6, 3 * MIB)).unwrap();
    a.commit();
    b.reload();
    let mut f = fs::File::open(b.p("doomed.bin")).unwrap();
    let mut head = vec![0u8; 1000];
    f.read_exact(&mut head).unwrap();
    fs::remove_file(a.p("doomed.bin")).unwrap();
    a.commit();
    b.reload();
    assert!(!b.p("doomed.bin").exists());
    let mut rest = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, bytes_for(6, 3 * MIB), "the open handle still reads the old bytes");
}

#[test]
fn a_killed_helper_is_reported_unavailable_and_cleaned_up() {
    let env = Env::new("vol");
    let mut a = env.mount("vol");
    fs::write(a.p("x"), b"x").unwrap();
    a.commit();
    a.kill();
    let err = guest_fuse::ControlClient::for_mount(&a.path).err().expect("no helper");
    assert_eq!(err.name, guest_fuse::FUSE_UNAVAILABLE);
    assert!(err.message.contains("FUSE helper unavailable"), "{}", err.message);
    assert!(common::is_mounted(&a.path), "the dead mount is still there");
    assert!(sysutil::mount::clean_dead_mount(&a.path));
    assert!(!common::is_mounted(&a.path));
    let b = env.mount("vol");
    assert_eq!(fs::read(b.p("x")).unwrap(), b"x");
}

#[test]
fn reads_work_when_the_cache_cannot_hold_a_chunk() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    let data = bytes_for(7, 40 * MIB);
    fs::write(a.p("f.bin"), &data).unwrap();
    a.commit();
    // 4 MiB of disk cache cannot hold one 8 MiB chunk; 8 MiB of memory holds one.
    let b = env.mount_with("vol", &["--cache-max-mib", "4", "--memory-cache-mib", "8"]);
    assert_eq!(hash_file(&b.p("f.bin")), blake3::hash(&data));
    assert_eq!(hash_file(&b.p("f.bin")), blake3::hash(&data), "and again, after eviction");
    assert_eq!(b.status().cache_bytes, 0);
}

#[test]
fn killing_the_helper_mid_commit_leaves_the_old_or_the_new_commit() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    fs::write(a.p("base.txt"), b"base").unwrap();
    let base = a.commit().commit;
    drop(a);
    // Calibrate: how long does committing a 96 MiB file take here?
    let probe = env.mount("vol");
    fs::write(probe.p("probe.bin"), bytes_for(100, 96 * MIB)).unwrap();
    let started = std::time::Instant::now();
    probe.commit();
    let full = started.elapsed();
    probe.ctl().call("status").unwrap();
    drop(probe);
    let mut head = env.head("vol");
    // What base.txt holds at the head: every round rewrites it, so it names the last commit.
    let mut committed_text = b"base".to_vec();
    let uploads = &env.server.as_ref().expect("server").data_stats.chunk_uploads;
    let seed: u64 = rand::random();
    println!("kill seed {seed}, full commit {full:?}");
    let mut outcomes = Vec::new();
    // `None`: kill as soon as the round's first 8 MiB chunk has reached the server, so the
    // kill lands mid-upload (11 chunks still to go). `Some(f)`: kill at that fraction of the
    // commit's usual duration (1.5: after it).
    for (round, kill_at) in [None, None, Some(0.0), Some(0.6), Some(1.5)].into_iter().enumerate() {
        let round = round as u64;
        let mut m = env.mount("vol");
        let data = bytes_for(seed ^ round, 96 * MIB);
        fs::write(m.p(&format!("round{round}.bin")), &data).unwrap();
        fs::write(m.p("base.txt"), format!("round {round}")).unwrap();
        let ctl = m.ctl();
        let uploaded_before = uploads.load(std::sync::atomic::Ordering::SeqCst);
        let committer = std::thread::spawn(move || ctl.commit());
        match kill_at {
            None => {
                let deadline = std::time::Instant::now() + full * 10 + std::time::Duration::from_secs(30);
                while uploads.load(std::sync::atomic::Ordering::SeqCst) <= uploaded_before {
                    assert!(!committer.is_finished(), "round {round}: the commit ended before any chunk was uploaded");
                    assert!(std::time::Instant::now() < deadline, "round {round}: no chunk upload seen");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            Some(fraction) => std::thread::sleep(full.mul_f64(fraction)),
        }
        m.kill();
        let result = committer.join().unwrap();
        let now = env.head("vol");
        let text = env.read_file("vol", "base.txt");
        if now == head {
            // Nothing new was committed: the commit must have failed (an Ok commit of
            // these changes would have moved the head), and the old bytes are all there.
            assert!(result.is_err(), "round {round}: commit acknowledged but the head did not move: {result:?}");
            assert_eq!(text, committed_text, "round {round}: old head shows other bytes");
            outcomes.push("old");
        } else {
            // The new commit is whole: both files at their new contents.
            if let Ok(o) = &result {
                assert_eq!(o.commit, now, "round {round}: acknowledged commit is not the head");
            }
            assert_eq!(text, format!("round {round}").into_bytes());
            assert_eq!(blake3::hash(&env.read_file("vol", &format!("round{round}.bin"))), blake3::hash(&data));
            outcomes.push("new");
            head = now;
            committed_text = text;
        }
        assert!(sysutil::mount::clean_dead_mount(&m.path) || !common::is_mounted(&m.path));
    }
    // A kill mid-upload must have been seen to leave the old commit (and fail the call).
    assert!(outcomes[..2].contains(&"old"), "no kill landed mid-commit: {outcomes:?}");
    println!("outcomes: {outcomes:?} (base {base})");
    // The next mount works and shows the head.
    let b = env.mount("vol");
    assert_eq!(b.status().head, head);
    assert!(b.p("base.txt").exists());
}
