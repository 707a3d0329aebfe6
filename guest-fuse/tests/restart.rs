//! Uncommitted changes survive a killed helper: a new helper on the same overlay directory
//! and mount point resumes them (real FUSE mounts; run as root, /dev/fuse required).

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::{Env, Mount, bytes_for, hash_file};

const MIB: usize = 1 << 20;

/// Kills `m`'s helper and detaches its dead mount.
fn kill_and_clean(mut m: Mount) -> Mount {
    m.kill();
    assert!(common::is_mounted(&m.path), "the dead mount is still there");
    let err = guest_fuse::ControlClient::for_mount(&m.path).err().expect("no helper");
    assert_eq!(err.name, guest_fuse::FUSE_UNAVAILABLE);
    // `clean_dead_mount` stats the mount point, which the kernel may answer from the root's
    // cached attributes (no ENOTCONN): detach it directly then.
    if !sysutil::mount::clean_dead_mount(&m.path) {
        eprintln!("clean_dead_mount did not see the dead mount; detaching it");
        sysutil::mount::lazy_unmount(&m.path).unwrap();
    }
    assert!(!common::is_mounted(&m.path));
    m
}

fn broken_dirs(overlay: &Path) -> Vec<String> {
    fs::read_dir(overlay)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("dirty.broken-"))
        .collect()
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// The changed tree, as every check below expects it.
fn check_changed_tree(root: &Path, big_base: &[u8]) {
    let p = |r: &str| root.join(r);
    assert_eq!(fs::read(p("small.txt")).unwrap(), b"small bytes");
    assert_eq!(hash_file(&p("large.bin")), blake3::hash(&bytes_for(2, 5 * MIB)), "large file");
    assert_eq!(hash_file(&p("big-base.bin")), blake3::hash(big_base), "partly rewritten committed file");
    assert!(p("newdir").is_dir());
    assert_eq!(fs::read(p("newdir/n.txt")).unwrap(), b"in a new dir");
    assert!(!p("olddir").exists(), "renamed directory left its old path");
    assert_eq!(fs::read(p("moved/b.txt")).unwrap(), b"b");
    assert!(!p("moved/a.txt").exists(), "deleted inside a renamed directory");
    assert_eq!(fs::read(p("moved/sub/deep.txt")).unwrap(), b"deep", "never-loaded subdirectory of a renamed one");
    assert!(!p("keep.txt").exists() && fs::read(p("kept.txt")).unwrap() == b"keep", "renamed file");
    assert!(!p("gone.txt").exists(), "deleted committed file");
    assert_eq!(mode(&p("mode.txt")), 0o600, "chmod");
    assert_eq!(fs::read_link(p("link")).unwrap().to_str(), Some("kept.txt"));
    assert_eq!(fs::read(p("link")).unwrap(), b"keep");
}

#[test]
fn uncommitted_changes_survive_a_killed_helper_and_commit_after_restart() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    fs::write(a.p("keep.txt"), b"keep").unwrap();
    fs::write(a.p("gone.txt"), b"gone").unwrap();
    fs::write(a.p("mode.txt"), b"mode").unwrap();
    fs::create_dir_all(a.p("olddir/sub")).unwrap();
    fs::write(a.p("olddir/a.txt"), b"a").unwrap();
    fs::write(a.p("olddir/sub/deep.txt"), b"deep").unwrap();
    let mut big_base = bytes_for(1, 3 * MIB);
    fs::write(a.p("big-base.bin"), &big_base).unwrap();
    let base = a.commit().commit;
    drop(a);

    let a = env.mount("vol");
    fs::write(a.p("small.txt"), b"small bytes").unwrap();
    fs::write(a.p("large.bin"), bytes_for(2, 5 * MIB)).unwrap();
    fs::create_dir(a.p("newdir")).unwrap();
    fs::write(a.p("newdir/n.txt"), b"in a new dir").unwrap();
    fs::rename(a.p("olddir"), a.p("moved")).unwrap();
    fs::remove_file(a.p("moved/a.txt")).unwrap();
    fs::write(a.p("moved/b.txt"), b"b").unwrap();
    fs::rename(a.p("keep.txt"), a.p("kept.txt")).unwrap();
    fs::remove_file(a.p("gone.txt")).unwrap();
    fs::set_permissions(a.p("mode.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("kept.txt", a.p("link")).unwrap();
    {
        let f = fs::OpenOptions::new().write(true).open(a.p("big-base.bin")).unwrap();
        f.write_all_at(b"CHANGED", MIB as u64 + 5).unwrap();
        f.sync_all().unwrap();
    }
    big_base[MIB + 5..MIB + 12].copy_from_slice(b"CHANGED");
    fs::File::open(a.p("small.txt")).unwrap().sync_all().unwrap();
    fs::File::open(&a.path).unwrap().sync_all().unwrap(); // fsyncdir
    check_changed_tree(&a.path, &big_base);
    let before = a.status();
    assert!(before.dirty_entries > 0 && before.pending_deletes > 0, "{before:?}");

    let a = kill_and_clean(a);
    let n = a.n;
    let overlay = env.overlay_dir(n);
    assert!(overlay.join("dirty/state.json").exists(), "the state is on disk");
    drop(a);
    let b = env.remount_slot("vol", n, &[]);
    check_changed_tree(&b.path, &big_base);
    let after = b.status();
    assert_eq!(after.head, base, "the view is on the commit the changes were made against");
    assert_eq!(after.dirty_entries, before.dirty_entries, "{after:?} vs {before:?}");
    assert_eq!(after.pending_deletes, before.pending_deletes);
    assert_eq!(after.dirty_files, before.dirty_files);
    assert_eq!(after.dirty_bytes, before.dirty_bytes);
    assert!(broken_dirs(&overlay).is_empty());

    let c = b.commit();
    assert_ne!(c.commit, base);
    assert_eq!(b.status().dirty_entries, 0);
    assert!(!overlay.join("dirty/state.json").exists(), "nothing left to keep after the commit");
    let fresh = env.mount("vol");
    check_changed_tree(&fresh.path, &big_base);
}

#[test]
fn a_write_without_fsync_is_kept_after_the_save_interval() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    fs::write(a.p("x"), b"x\n").unwrap();
    fs::create_dir(a.p("d")).unwrap();
    fs::write(a.p("d/y"), bytes_for(3, 2 * MIB)).unwrap();
    std::thread::sleep(guest_fuse::persist::SAVE_INTERVAL * 3);
    let a = kill_and_clean(a);
    let n = a.n;
    drop(a);
    let b = env.remount_slot("vol", n, &[]);
    assert_eq!(fs::read(b.p("x")).unwrap(), b"x\n");
    assert_eq!(hash_file(&b.p("d/y")), blake3::hash(&bytes_for(3, 2 * MIB)));
    assert_eq!(b.status().dirty_files, 2);
    b.commit();
    assert_eq!(env.read_file("vol", "x"), b"x\n");
}

#[test]
fn state_of_another_volume_is_set_aside() {
    let env = Env::new("vol");
    let a = env.mount_with("other", &["--create"]);
    fs::write(a.p("theirs.txt"), b"other volume").unwrap();
    fs::File::open(a.p("theirs.txt")).unwrap().sync_all().unwrap();
    let a = kill_and_clean(a);
    let n = a.n;
    drop(a);
    let overlay = env.overlay_dir(n);
    assert!(overlay.join("dirty/state.json").exists());
    let b = env.remount_slot("vol", n, &[]);
    assert!(!b.p("theirs.txt").exists(), "another volume's changes are not applied");
    let st = b.status();
    assert_eq!((st.dirty_entries, st.pending_deletes), (0, 0));
    let aside = broken_dirs(&overlay);
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(overlay.join(&aside[0]).join("state.json").exists(), "kept for inspection");
    let log = fs::read_to_string(&b.log).unwrap();
    assert!(log.contains("set aside"), "a warning is logged");
    fs::write(b.p("mine.txt"), b"mine").unwrap();
    b.commit();
    assert_eq!(env.read_file("vol", "mine.txt"), b"mine");
}

#[test]
fn a_corrupt_state_is_set_aside_and_the_mount_works() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    fs::write(a.p("f.txt"), b"f").unwrap();
    fs::File::open(a.p("f.txt")).unwrap().sync_all().unwrap();
    let a = kill_and_clean(a);
    let n = a.n;
    drop(a);
    let state = env.overlay_dir(n).join("dirty/state.json");
    let text = fs::read_to_string(&state).unwrap();
    fs::write(&state, &text[..text.len() / 2]).unwrap();
    let b = env.remount_slot("vol", n, &[]);
    assert!(!b.p("f.txt").exists());
    assert_eq!(broken_dirs(&env.overlay_dir(n)).len(), 1);
    fs::write(b.p("g.txt"), b"g").unwrap();
    b.commit();
    assert_eq!(env.read_file("vol", "g.txt"), b"g");
    drop(b);

    // A well-formed state naming a data file that is not there: set aside too.
    let a = env.remount_slot("vol", n, &[]);
    fs::write(a.p("h.txt"), b"h").unwrap();
    fs::File::open(a.p("h.txt")).unwrap().sync_all().unwrap();
    let a = kill_and_clean(a);
    drop(a);
    fs::remove_dir_all(env.overlay_dir(n).join("dirty/data")).unwrap();
    let b = env.remount_slot("vol", n, &[]);
    assert!(!b.p("h.txt").exists());
    assert_eq!(broken_dirs(&env.overlay_dir(n)).len(), 2);
    assert_eq!(fs::read(b.p("g.txt")).unwrap(), b"g");
}

#[test]
fn an_explicit_unmount_drops_uncommitted_changes() {
    let env = Env::new("vol");
    let mut a = env.mount("vol");
    fs::write(a.p("f.txt"), b"f").unwrap();
    fs::File::open(a.p("f.txt")).unwrap().sync_all().unwrap();
    let n = a.n;
    a.ctl().unmount().unwrap();
    let _ = sysutil::process::wait_or_kill(&mut a.child, Duration::from_secs(10));
    assert!(!common::is_mounted(&a.path));
    drop(a);
    assert!(!env.overlay_dir(n).join("dirty").exists(), "the state went with the unmount");
    let b = env.remount_slot("vol", n, &[]);
    assert!(!b.p("f.txt").exists());
}

#[test]
fn a_second_helper_on_a_busy_overlay_directory_refuses_to_start() {
    let env = Env::new("vol");
    let a = env.mount("vol");
    fs::write(a.p("f.txt"), b"f").unwrap();
    let other = env.dir.path().join("other-mnt");
    fs::create_dir_all(&other).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sail-volume-fuse"))
        .args(["--endpoint", &env.endpoint])
        .env("SAIL_API_KEY", env.key.to_string())
        .arg("--cache-dir")
        .arg(env.dir.path().join("other-cache"))
        .arg("--overlay-dir")
        .arg(env.overlay_dir(a.n))
        .arg("--control-socket")
        .arg(env.dir.path().join("other.sock"))
        .arg("vol")
        .arg(&other)
        .output()
        .expect("helper runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another helper"), "{err}");
    assert!(!common::is_mounted(&other));
    assert_eq!(fs::read(a.p("f.txt")).unwrap(), b"f", "the first mount is untouched");
}
