//! Model-based randomized test: thousands of random operations applied both to a FUSE mount
//! and to a plain directory, compared after every commit and reload (and through a second
//! mount after every commit). The seed is printed; replay with SAIL_MODEL_SEED=<seed>.
//! SAIL_MODEL_OPS sets the number of operations (default 3000).

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{Env, bytes_for};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NAMES: [&str; 6] = ["a", "b", "c", "dir1", "dir2", "f.txt"];

fn random_path(rng: &mut StdRng) -> String {
    let depth = rng.random_range(1..=3);
    (0..depth).map(|_| NAMES[rng.random_range(0..NAMES.len())]).collect::<Vec<_>>().join("/")
}

fn random_data(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.random_range(0..100) {
        0..=1 => rng.random_range(8 << 20..(9 << 20)), // crosses the 8 MiB chunk boundary
        2..=9 => 0,
        _ => rng.random_range(1..20_000),
    };
    bytes_for(rng.random(), len)
}

/// The errno of a result (0 for success), so both sides can be compared.
fn code<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

#[derive(Debug)]
enum Op {
    Write(String, Vec<u8>),
    WriteAt(String, u64, Vec<u8>),
    Truncate(String, u64),
    Rename(String, String),
    Unlink(String),
    Mkdir(String),
    Rmdir(String),
    Commit,
    Reload,
    /// fsync of the mount root, then `kill -9` of the helper and a new one on the same
    /// overlay directory and mount point.
    Restart,
}

fn random_op(rng: &mut StdRng, restarts: bool) -> Op {
    if restarts && rng.random_range(0..100) < 4 {
        return Op::Restart;
    }
    match rng.random_range(0..100) {
        0..=24 => Op::Write(random_path(rng), random_data(rng)),
        25..=39 => {
            let off = if rng.random_bool(0.05) { rng.random_range(0..10 << 20) } else { rng.random_range(0..30_000) };
            Op::WriteAt(random_path(rng), off, bytes_for(rng.random(), rng.random_range(1..5000)))
        }
        40..=47 => Op::Truncate(random_path(rng), rng.random_range(0..40_000)),
        48..=59 => Op::Rename(random_path(rng), random_path(rng)),
        60..=69 => Op::Unlink(random_path(rng)),
        70..=83 => Op::Mkdir(random_path(rng)),
        84..=89 => Op::Rmdir(random_path(rng)),
        90..=95 => Op::Commit,
        _ => Op::Reload,
    }
}

fn apply(root: &Path, op: &Op) -> i32 {
    let p = |s: &str| root.join(s);
    match op {
        Op::Write(path, data) => code(fs::write(p(path), data)),
        Op::WriteAt(path, off, data) => {
            code(fs::OpenOptions::new().write(true).open(p(path)).and_then(|f| f.write_all_at(data, *off)))
        }
        Op::Truncate(path, len) => code(fs::OpenOptions::new().write(true).open(p(path)).and_then(|f| f.set_len(*len))),
        Op::Rename(a, b) => code(fs::rename(p(a), p(b))),
        Op::Unlink(path) => code(fs::remove_file(p(path))),
        Op::Mkdir(path) => code(fs::create_dir(p(path))),
        Op::Rmdir(path) => code(fs::remove_dir(p(path))),
        Op::Commit | Op::Reload | Op::Restart => 0,
    }
}

/// Sorted (path, kind, size, hash) of every entry below `root`.
fn snapshot(root: &Path) -> Vec<(String, char, u64, String)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                out.push((rel, 'd', 0, String::new()));
                stack.push(e.path());
            } else {
                let data = fs::read(e.path()).unwrap();
                out.push((rel, 'f', meta.len(), blake3::hash(&data).to_hex().to_string()));
            }
        }
    }
    out.sort();
    out
}

/// Asserts two snapshots are equal, printing only the entries that differ.
fn same(got: &Path, want: &Path, what: &str) {
    let (g, w) = (snapshot(got), snapshot(want));
    if g != w {
        let only_got: Vec<_> = g.iter().filter(|e| !w.contains(e)).collect();
        let only_want: Vec<_> = w.iter().filter(|e| !g.contains(e)).collect();
        panic!("{what}: mount differs from the model\n  only in mount: {only_got:?}\n  only in model: {only_want:?}");
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let _ = fs::remove_dir_all(to);
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[test]
fn random_operations_match_a_plain_directory() {
    run_model(false);
}

/// The same, with helpers killed and restarted on their overlay directory now and then: the
/// restarted mount must show exactly the model (uncommitted changes included).
#[test]
fn random_operations_survive_helper_restarts() {
    run_model(true);
}

fn run_model(restarts: bool) {
    let seed: u64 = std::env::var("SAIL_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let default_ops = if restarts { 1500 } else { 3000 };
    let ops: usize = std::env::var("SAIL_MODEL_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(default_ops);
    println!("model seed: {seed} (replay with SAIL_MODEL_SEED={seed}), {ops} operations, restarts: {restarts}");
    let mut rng = StdRng::seed_from_u64(seed);
    let env = Env::new("vol");
    let mut a = env.mount("vol");
    let b = env.mount("vol");
    let model: PathBuf = env.dir.path().join("model");
    let committed: PathBuf = env.dir.path().join("committed");
    fs::create_dir_all(&model).unwrap();
    fs::create_dir_all(&committed).unwrap();
    let (mut commits, mut reloads, mut restarted) = (0, 0, 0);
    for i in 0..ops {
        let op = random_op(&mut rng, restarts);
        match op {
            Op::Commit => {
                if std::env::var_os("SAIL_MODEL_TRACE").is_some() {
                    println!("op {i}: commit");
                }
                a.commit();
                copy_tree(&model, &committed);
                same(&a.path, &model, &format!("seed {seed}, op {i}: mount after commit"));
                b.reload();
                same(&b.path, &model, &format!("seed {seed}, op {i}: other mount after reload"));
                commits += 1;
            }
            Op::Reload => {
                if std::env::var_os("SAIL_MODEL_TRACE").is_some() {
                    println!("op {i}: reload");
                }
                a.reload();
                copy_tree(&committed, &model);
                same(&a.path, &model, &format!("seed {seed}, op {i}: mount after reload"));
                reloads += 1;
            }
            Op::Restart => {
                if std::env::var_os("SAIL_MODEL_TRACE").is_some() {
                    println!("op {i}: restart");
                }
                fs::File::open(&a.path).unwrap().sync_all().unwrap();
                a.kill();
                if !sysutil::mount::clean_dead_mount(&a.path) {
                    sysutil::mount::lazy_unmount(&a.path).unwrap();
                }
                let n = a.n;
                drop(a);
                a = env.remount_slot("vol", n, &[]);
                same(&a.path, &model, &format!("seed {seed}, op {i}: mount after a restart"));
                restarted += 1;
            }
            ref op => {
                if std::env::var_os("SAIL_MODEL_TRACE").is_some() {
                    let short = format!("{op:?}");
                    println!("op {i}: {}", &short[..short.len().min(80)]);
                }
                let want = apply(&model, op);
                let got = apply(&a.path, op);
                if std::env::var_os("SAIL_MODEL_TRACE").is_some() {
                    println!("   -> {got}");
                }
                assert_eq!(got, want, "seed {seed}, op {i}: {op:?} errno differs (mount {got}, model {want})");
            }
        }
    }
    a.commit();
    b.reload();
    same(&b.path, &model, &format!("seed {seed}: final state"));
    println!("{ops} operations, {commits} commits, {reloads} reloads, {restarted} restarts: mount matches the model");
}
