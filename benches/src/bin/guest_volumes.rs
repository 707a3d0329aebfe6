//! Volumes inside a sailbox (issue figures, docs/benchmarks.md): one real volumed, one
//! vmm-host, Debian sailboxes under QEMU (TCG here), each row against a same-run baseline.
//!
//! - **Sequential read of a committed file** (`--mib`, default 1 GiB) through the guest's
//!   mount, against the same amount of random bytes in a file on the guest's own disk:
//!   cold (guest page cache dropped; for the mount also nothing on the host yet, so the
//!   gateway fetches from the backend), warm (read again), and "host-cached" (guest page
//!   cache dropped again: the bytes come from the gateway's host cache over the guest's
//!   host NIC). Time to first byte is `open` + the first 4 KiB `read`. Each row prints the
//!   guest's CPU (busy share of its vCPU, and the helper's own CPU seconds) and the host's
//!   CPU seconds (QEMU's user network, the relay, the gateway) spent on it.
//! - **A second sailbox** reads the same cold file: the gateway's backend fetches during
//!   that read (0 = everything came from the host cache).
//! - **Commit of one changed file in a 100,000-file volume** (`--files`) from inside the
//!   guest with the SDK (`sail.Volume.from_mount(p).commit()`), median of 5, against the
//!   same on a host mount of the volume.
//! - **A 10,000-file tree** (`--tree-files`, 1 KiB each) written and committed inside the
//!   guest, against the same on a host mount, and writing it to the guest's own disk.
//!
//! `cargo run --release -p benches --bin guest_volumes [-- --mib 1024 --files 100000]`
//! (root; `bash scripts/setup.sh vm && bash scripts/build-agent.sh` first; the guest
//! binaries are found as the tests find them, `SAIL_AGENT_BIN` to override).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use benches::{mib_per_s, print_table, random_bytes, write_file as write};
use bytes::Bytes;
use clap::Parser;
use proto::sailbox as pb;
type Client = benches::SailboxClient;
use proto::volume as vpb;
use tokio_stream::StreamExt;
use volume_client::{FileUpload, VolumeClient};

#[derive(Parser)]
struct Args {
    /// Size of the file read sequentially, MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Files in the volume the one-file commit is timed in.
    #[arg(long, default_value_t = 100_000)]
    files: usize,
    /// Files in the tree written and committed.
    #[arg(long, default_value_t = 10_000)]
    tree_files: usize,
    /// Guest memory, MiB (enough to keep both read files in the page cache for the warm rows).
    #[arg(long, default_value_t = 4096)]
    memory_mib: u32,
    /// A data directory to keep (the debian image is built once into it); default: a
    /// temporary one.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

const ORG: &str = "default";
const BIG: &str = "reads";
const MANY: &str = "many";

/// Runs `command` in the guest; its stdout, or an error with its output if it failed.
async fn exec(c: &mut Client, id: &str, command: &str) -> anyhow::Result<String> {
    let r = benches::exec(c, id, command).await?;
    anyhow::ensure!(
        r.return_code == 0,
        "{command}: exit {}: {} {}",
        r.return_code,
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    Ok(String::from_utf8_lossy(&r.stdout).trim().to_owned())
}

/// The guest's reader: drops the page cache when asked, times `open` + the first 4 KiB and
/// the whole sequential read (1 MiB reads), and reports the vCPU's busy time and the
/// helpers' CPU time over it, as JSON.
const READ_PY: &str = r#"
import os, sys, time, json
def cpu():
    v = list(map(int, open('/proc/stat').readline().split()[1:]))
    return sum(v) - v[3] - v[4]
def helpers():
    t = 0
    for p in os.listdir('/proc'):
        if not p.isdigit():
            continue
        try:
            if open('/proc/%s/comm' % p).read().startswith('sail-volume-fu'):
                f = open('/proc/%s/stat' % p).read().rsplit(')', 1)[1].split()
                t += int(f[11]) + int(f[12])
        except OSError:
            pass
    return t
path, drop = sys.argv[1], sys.argv[2] == '1'
if drop:
    os.sync()
    open('/proc/sys/vm/drop_caches', 'w').write('3')
    time.sleep(0.5)
b0, h0 = cpu(), helpers()
t = time.monotonic()
fd = os.open(path, os.O_RDONLY)
n = len(os.read(fd, 4096))
ttfb = time.monotonic() - t
buf = bytearray(1 << 20)
while True:
    k = os.readv(fd, [buf])
    if k == 0:
        break
    n += k
secs = time.monotonic() - t
os.close(fd)
hz = os.sysconf('SC_CLK_TCK')
print(json.dumps(dict(bytes=n, secs=secs, ttfb_ms=ttfb * 1e3, busy_s=(cpu() - b0) / hz, helper_s=(helpers() - h0) / hz)))
"#;

/// One timed guest read.
struct Read {
    bytes: u64,
    secs: f64,
    ttfb_ms: f64,
    busy_s: f64,
    helper_s: f64,
}

/// Host CPU seconds (all processes) so far.
fn host_cpu_s() -> f64 {
    let line = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = line.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let busy: u64 = v.iter().sum::<u64>() - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0);
    busy as f64 / 100.0
}

/// Reads `path` in the guest (dropping its page cache first with `drop`); also the host's
/// CPU seconds over the read.
async fn guest_read(c: &mut Client, id: &str, path: &str, drop: bool) -> anyhow::Result<(Read, f64)> {
    let h0 = host_cpu_s();
    let out = exec(c, id, &format!("python3 /bench/read.py {path} {}", u8::from(drop))).await?;
    let host = host_cpu_s() - h0;
    let j: serde_json::Value = serde_json::from_str(&out).map_err(|e| anyhow::anyhow!("{out:?}: {e}"))?;
    let f = |k: &str| j[k].as_f64().ok_or_else(|| anyhow::anyhow!("{out:?}: no {k}"));
    let r = Read {
        bytes: f("bytes")? as u64,
        secs: f("secs")?,
        ttfb_ms: f("ttfb_ms")?,
        busy_s: f("busy_s")?,
        helper_s: f("helper_s")?,
    };
    Ok((r, host))
}

fn read_row(what: &str, r: &Read, host_s: f64, base: Option<&Read>) -> Vec<String> {
    let mbs = mib_per_s(r.bytes, Duration::from_secs_f64(r.secs));
    let ratio = base
        .map_or("1.00 (baseline)".to_owned(), |b| format!("{:.2}", mbs / mib_per_s(b.bytes, Duration::from_secs_f64(b.secs))));
    vec![
        what.to_owned(),
        format!("{mbs:.1}"),
        ratio,
        format!("{:.1}", r.ttfb_ms),
        format!("{:.0}%", 100.0 * r.busy_s / r.secs),
        format!("{:.2}", r.helper_s),
        format!("{host_s:.2}"),
    ]
}

/// Mounts `volume` on the host (the helper in this process, straight to volumed) at `at`.
fn host_mount(endpoint: &str, volume: &str, at: &Path, work: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(at)?;
    let opts = guest_fuse::MountOptions {
        endpoint: endpoint.to_owned(),
        org: ORG.into(),
        volume: volume.into(),
        mint: false,
        mountpoint: at.to_owned(),
        cache_dir: work.join("cache"),
        cache_max_bytes: 4 << 30,
        overlay_dir: work.join(format!("overlay-{volume}")),
        control_socket: Some(work.join(format!("{volume}.sock"))),
        memory_cache_bytes: 256 << 20,
        threads: guest_fuse::runner::default_threads(),
        passthrough: true,
        trusted_endpoint: false,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let tx2 = tx.clone();
        if let Err(e) = guest_fuse::run(opts, move |_| {
            let _ = tx2.send(Ok(()));
        }) {
            let _ = tx.send(Err(e));
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).map_err(|_| anyhow::anyhow!("host mount did not come up"))?
}

fn host_commit(at: &Path) -> anyhow::Result<String> {
    Ok(guest_fuse::control::ControlClient::for_mount(at)?.commit()?.commit)
}

/// A volume of `n` files of 4 KiB in directories of 1,000 (`d{i}/f{j}`), all of one chunk
/// (how large volumes are built in commit_latency too: the tree is what a commit walks).
async fn build_many(v: &mut VolumeClient, n: usize) -> anyhow::Result<()> {
    v.get_volume(ORG, MANY, true).await?;
    let data = Bytes::from(random_bytes(4096, 7));
    let id = chunkstore::ChunkId::of(&data);
    v.upload_chunks(ORG, MANY, &HashMap::from([(id, data.clone())])).await?;
    let entry = vpb::Entry {
        mode: 0o644,
        mtime_ns: 0,
        kind: Some(vpb::entry::Kind::File(vpb::FileEntry {
            size: 4096,
            policy: Some(vpb::ChunkPolicy { kind: Some(vpb::chunk_policy::Kind::FixedSize(8 << 20)) }),
            chunks: vec![vpb::ChunkRef { id: id.as_bytes().to_vec(), len: 4096 }],
        })),
    };
    let paths: Vec<String> = (0..n).map(|i| format!("d{:03}/f{:05}", i / 1000, i)).collect();
    for part in paths.chunks(20_000) {
        let base = v.head(ORG, MANY).await?.commit;
        let changes =
            part.iter().map(|p| vpb::Change { path: p.clone(), op: Some(vpb::change::Op::Upsert(entry.clone())) }).collect();
        let req = vpb::CommitRequest {
            volume: Some(vpb::VolumeRef { org: ORG.into(), name: MANY.into() }),
            base,
            changes,
            message: String::new(),
            author: "bench".into(),
        };
        v.grpc().commit(req).await?;
    }
    Ok(())
}

/// Guest script: writes `n` files of 1 KiB under `root` (100 per directory), prints the
/// seconds; with `commit`, then commits the mount and prints that too.
fn tree_py(root: &str, n: usize, commit: Option<&str>) -> String {
    let commit = commit.map_or(String::new(), |m| {
        format!("t=time.monotonic(); sail.Volume.from_mount('{m}').commit(); print(time.monotonic()-t)\n")
    });
    format!(
        "import os, time, sail\nroot='{root}'; n={n}; data=os.urandom(1024)\nt=time.monotonic()\n\
         for i in range(n):\n    d='%s/d%03d' % (root, i // 100)\n    if i % 100 == 0: os.makedirs(d, exist_ok=True)\n    \
         f=open('%s/f%05d' % (d, i), 'wb'); f.write(data); f.close()\nprint(time.monotonic()-t)\n{commit}"
    )
}

fn host_tree(root: &Path, n: usize) -> anyhow::Result<Duration> {
    let data = random_bytes(1024, 3);
    let t = Instant::now();
    for i in 0..n {
        let d = root.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&d)?;
        }
        std::fs::write(d.join(format!("f{i:05}")), &data)?;
    }
    Ok(t.elapsed())
}

fn secs_list(out: &str) -> Vec<f64> {
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new().prefix("sbxv").tempdir_in("/tmp")?;
    let data_dir = args.data_dir.clone().unwrap_or_else(|| dir.path().join("vmm"));
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work)?;
    let _cleanup = (benches::KillUnder(data_dir.clone()), benches::KillUnder(work.clone()));

    let vconfig = volumed::server::ServerConfig::local(dir.path().join("volumed"), "127.0.0.1:0".parse()?);
    let volumed = volumed::server::Server::bind(vconfig).await?.spawn();
    let endpoint = volumed.endpoint();
    let mut config = vmm_host::HostConfig::local(&data_dir);
    config.volumed_endpoint = Some(endpoint.clone());
    config.volumed_key = Some(volumed.operator_key().clone());
    let (host, mut c) = benches::serve_host_with(config).await?;
    let mut v = VolumeClient::connect_with_key(&endpoint, Some(volumed.operator_key())).await?;

    // The volumes: a large file (and a 64 MiB one for time to first byte), many files.
    eprintln!("bench: committing {} MiB and {} files", args.mib, args.files);
    v.get_volume(ORG, BIG, true).await?;
    let head = v.head(ORG, BIG).await?.commit;
    let file = |path: &str, len: u64, seed: u64| FileUpload {
        path: path.into(),
        data: Bytes::from(random_bytes(len as usize, seed)),
        mode: 0o644,
        mtime_ns: 0,
    };
    v.commit_files(ORG, BIG, &head, vec![file("big.bin", args.mib << 20, 1), file("first.bin", 64 << 20, 2)], &[]).await?;
    build_many(&mut v, args.files).await?;

    let mut progress = c.ensure_image(pb::EnsureImageRequest { image: "debian".into() }).await?.into_inner();
    while let Some(p) = progress.next().await {
        eprintln!("bench: {}", p?.message);
    }
    let mount = |path: &str, volume: &str| (path.to_owned(), pb::VolumeMount { volume: volume.into(), ..Default::default() });
    let create = |name: &str, volumes: Vec<(String, pb::VolumeMount)>| pb::CreateSailboxRequest {
        app: "bench".into(),
        name: name.into(),
        image: "debian".into(),
        cpu: 1.0,
        memory_mib: args.memory_mib,
        disk_gib: 8,
        volumes: volumes.into_iter().collect(),
        ..Default::default()
    };
    let sb = c.create_sailbox(create("reader-1", vec![mount("/mnt/v", BIG), mount("/mnt/many", MANY)])).await?.into_inner();
    let a = sb.sailbox_id.clone();
    eprintln!("bench: {a} ({} {})", sb.hypervisor, sb.accelerator);
    exec(&mut c, &a, "mkdir -p /bench").await?;
    write(&mut c, &a, "/bench/read.py", READ_PY.as_bytes()).await?;
    eprintln!("bench: writing the baseline file on the guest's disk");
    // From the host: /dev/urandom in a TCG guest takes minutes for 1 GiB.
    write(&mut c, &a, "/root/disk.bin", &random_bytes((args.mib << 20) as usize, 9)).await?;
    exec(&mut c, &a, "sync").await?;

    // Reads: the disk file, then the committed one.
    let (disk_cold, h1) = guest_read(&mut c, &a, "/root/disk.bin", true).await?;
    let (disk_warm, h2) = guest_read(&mut c, &a, "/root/disk.bin", false).await?;
    let fetched0 = host.gateway_cache_stats().map_or(0, |s| s.fetches);
    let (first, h3) = guest_read(&mut c, &a, "/mnt/v/first.bin", true).await?;
    let (cold, h4) = guest_read(&mut c, &a, "/mnt/v/big.bin", true).await?;
    let (warm, h5) = guest_read(&mut c, &a, "/mnt/v/big.bin", false).await?;
    let (hosted, h6) = guest_read(&mut c, &a, "/mnt/v/big.bin", true).await?;
    let fetched1 = host.gateway_cache_stats().map_or(0, |s| s.fetches);

    // A second sailbox reads the same file cold.
    let sb2 = c.create_sailbox(create("reader-2", vec![mount("/mnt/v", BIG)])).await?.into_inner().sailbox_id;
    exec(&mut c, &sb2, "mkdir -p /bench").await?;
    write(&mut c, &sb2, "/bench/read.py", READ_PY.as_bytes()).await?;
    let (second, h7) = guest_read(&mut c, &sb2, "/mnt/v/big.bin", true).await?;
    let fetched2 = host.gateway_cache_stats().map_or(0, |s| s.fetches);
    c.terminate(pb::TerminateRequest { sailbox_id: sb2 }).await?;

    print_table(
        &format!(
            "Sequential read inside a sailbox ({} {}, 1 vCPU, {} MiB guest), {} MiB file (TTFB: open + first 4 KiB)",
            sb.hypervisor, sb.accelerator, args.memory_mib, args.mib
        ),
        &["read", "MiB/s", "ratio", "TTFB ms", "guest vCPU busy", "helper CPU s", "host CPU s"],
        &[
            read_row("guest disk, cold (baseline for cold)", &disk_cold, h1, None),
            read_row("guest disk, warm (baseline for warm)", &disk_warm, h2, None),
            read_row("volume, cold: 64 MiB first.bin (TTFB row)", &first, h3, Some(&disk_cold)),
            read_row("volume, cold (backend -> host cache -> guest)", &cold, h4, Some(&disk_cold)),
            read_row("volume, warm (guest page cache)", &warm, h5, Some(&disk_warm)),
            read_row("volume, host-cached (guest caches dropped)", &hosted, h6, Some(&disk_cold)),
            read_row("second sailbox, first read (host-cached)", &second, h7, Some(&disk_cold)),
        ],
    );
    println!(
        "gateway backend fetches: first sailbox {} chunks; second sailbox reading the same file {} chunks",
        fetched1 - fetched0,
        fetched2 - fetched1
    );

    // One changed file in a large volume: inside the guest (SDK), and on a host mount.
    let commit_script = "import sail, time\nv = sail.Volume.from_mount('/mnt/many')\nfor i in range(5):\n    \
         open('/mnt/many/d050/bench-%d.txt' % i, 'w').write('x')\n    t = time.monotonic(); v.commit(); \
         print(time.monotonic() - t)\n";
    write(&mut c, &a, "/bench/commit.py", commit_script.as_bytes()).await?;
    let guest_commit = median(secs_list(&exec(&mut c, &a, "python3 /bench/commit.py").await?));
    let many_at = work.join("many");
    host_mount(&endpoint, MANY, &many_at, &work)?;
    let mut host_commits = Vec::new();
    for i in 0..5 {
        std::fs::write(many_at.join(format!("d051/host-{i}.txt")), b"x")?;
        let t = Instant::now();
        host_commit(&many_at)?;
        host_commits.push(t.elapsed().as_secs_f64());
    }
    let host_commit_s = median(host_commits);
    print_table(
        &format!("Commit of 1 changed file in a {}-file volume (median of 5)", args.files),
        &["where", "ms", "ratio"],
        &[
            vec!["host mount (baseline)".into(), format!("{:.1}", host_commit_s * 1e3), "1.00".into()],
            vec![
                "inside the sailbox (sail.Volume.from_mount().commit())".into(),
                format!("{:.1}", guest_commit * 1e3),
                format!("{:.2}", guest_commit / host_commit_s),
            ],
        ],
    );

    // A tree written and committed: guest mount, host mount, guest disk.
    let n = args.tree_files;
    write(&mut c, &a, "/bench/tree.py", tree_py("/mnt/v/tree", n, Some("/mnt/v")).as_bytes()).await?;
    let g = secs_list(&exec(&mut c, &a, "python3 /bench/tree.py").await?);
    write(&mut c, &a, "/bench/tree-disk.py", tree_py("/root/tree", n, None).as_bytes()).await?;
    let gd = secs_list(&exec(&mut c, &a, "python3 /bench/tree-disk.py && sync").await?);
    let big_at = work.join("reads");
    host_mount(&endpoint, BIG, &big_at, &work)?;
    let hw = host_tree(&big_at.join("host-tree"), n)?;
    let t = Instant::now();
    host_commit(&big_at)?;
    let hc = t.elapsed();
    let cell = |v: &[f64], i: usize| v.get(i).map_or("-".to_owned(), |s| format!("{s:.2}"));
    print_table(
        &format!("{n} files of 1 KiB written, then committed"),
        &["where", "write s", "commit s", "files/s (write + commit)"],
        &[
            vec![
                "host mount (baseline)".into(),
                format!("{:.2}", hw.as_secs_f64()),
                format!("{:.2}", hc.as_secs_f64()),
                format!("{:.0}", n as f64 / (hw + hc).as_secs_f64()),
            ],
            vec!["inside the sailbox".into(), cell(&g, 0), cell(&g, 1), format!("{:.0}", n as f64 / g.iter().sum::<f64>())],
            vec![
                "guest disk (no commit)".into(),
                cell(&gd, 0),
                "-".into(),
                gd.first().map_or("-".to_owned(), |s| format!("{:.0}", n as f64 / s)),
            ],
        ],
    );
    c.terminate(pb::TerminateRequest { sailbox_id: a }).await?;
    for m in [&many_at, &big_at] {
        let _ = std::process::Command::new("umount").arg(m).status();
    }
    host.shutdown().await;
    Ok(())
}
