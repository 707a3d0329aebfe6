//! Snapshot figures on a real VMM: checkpoint pause and total time with 1%, 10% and ~90% of
//! a 1 GiB guest's memory dirtied since the last checkpoint, bytes uploaded vs dirtied,
//! resume from sleep and fork to the first exec answered at two guest sizes (the time must
//! not grow with memory), host memory of 4 forks vs 4 independent sailboxes, and the cowfs
//! disk file against a plain local file.
//!
//! `cargo run --release -p benches --bin snapshot [-- --reps 3 --big-mib 4096]`
//! (root; `bash scripts/setup.sh vm && bash scripts/build-agent.sh` first).

use std::io::{Read, Write};

use std::time::{Duration, Instant};

use benches::{mib_per_s, ms, percentile, print_table};
use clap::Parser;
use proto::sailbox as pb;
type Client = benches::SailboxClient;
use tokio_stream::StreamExt;

#[derive(Parser)]
struct Args {
    /// Repetitions per row (medians reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// The larger guest for the memory-independence rows, MiB.
    #[arg(long, default_value_t = 4096)]
    big_mib: u32,
    /// Sailboxes for the host-memory rows.
    #[arg(long, default_value_t = 4)]
    forks: usize,
    /// Working set each of them touches, MiB.
    #[arg(long, default_value_t = 200)]
    working_set_mib: u64,
    /// Sections to run: checkpoint, disk, wake, memory.
    #[arg(long, value_delimiter = ',', default_value = "checkpoint,disk,wake,memory")]
    only: Vec<String>,
}

async fn exec(c: &mut Client, id: &str, command: &str) -> anyhow::Result<pb::ExecResult> {
    let r = benches::exec(c, id, command).await?;
    anyhow::ensure!(r.return_code == 0, "{command:?} failed: {}", String::from_utf8_lossy(&r.stderr));
    Ok(r)
}

async fn create(c: &mut Client, memory_mib: u32) -> anyhow::Result<String> {
    let req = pb::CreateSailboxRequest {
        app: "bench".into(),
        image: "minimal".into(),
        cpu: 1.0,
        memory_mib,
        disk_gib: 2,
        ..Default::default()
    };
    Ok(c.create_sailbox(req).await?.into_inner().sailbox_id)
}

fn sid(id: &str) -> pb::SailboxIdRequest {
    pb::SailboxIdRequest { sailbox_id: id.into() }
}

async fn terminate(c: &mut Client, id: &str) -> anyhow::Result<()> {
    c.terminate(pb::TerminateRequest { sailbox_id: id.into() }).await?;
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    percentile(&mut v, 50.0)
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

/// Rss and Pss (bytes) of a set of processes.
#[derive(Clone, Copy, Default)]
struct Mem {
    rss: u64,
    pss: u64,
}

/// Rss and Pss summed over the processes whose command line mentions `needle` (the VMMs
/// under a data directory, and its cowfs daemon): the VMMs, and the rest (the daemon). Pss
/// splits a shared page among the processes that map it, so it is what sharing saves.
fn memory_of(needle: &str) -> (Mem, Mem) {
    let (mut vmms, mut rest) = (Mem::default(), Mem::default());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (vmms, rest);
    };
    let me = std::process::id().to_string();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == me || !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmdline = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default()).into_owned();
        if !cmdline.contains(needle) {
            continue;
        }
        let into = if cmdline.contains("qemu") { &mut vmms } else { &mut rest };
        let rollup = std::fs::read_to_string(e.path().join("smaps_rollup")).unwrap_or_default();
        for line in rollup.lines() {
            let kb = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) << 10;
            if line.starts_with("Rss:") {
                into.rss += kb(line);
            } else if line.starts_with("Pss:") {
                into.pss += kb(line);
            }
        }
    }
    (vmms, rest)
}

/// One checkpoint table row: `reps` times, rewrite `mib_dirty` MiB of the guest's tmpfs
/// file with new random bytes and checkpoint; medians.
async fn checkpoint_row(
    c: &mut Client,
    id: &str,
    label: &str,
    mib_dirty: u64,
    reps: usize,
    guest_bytes: u64,
) -> anyhow::Result<Vec<String>> {
    let (mut pause, mut total, mut changed, mut uploaded) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        exec(c, id, &format!("dd if=/dev/urandom of=/mnt/fill/d bs=1M count={mib_dirty} conv=notrunc 2>/dev/null")).await?;
        let ck = c.checkpoint_sailbox(sid(id)).await?.into_inner();
        pause.push(Duration::from_millis(ck.pause_ms));
        total.push(Duration::from_millis(ck.total_ms));
        changed.push(ck.memory_bytes_changed);
        uploaded.push(ck.memory_bytes_uploaded);
    }
    let dirtied = mib_dirty << 20;
    let up = median_u64(uploaded);
    Ok(vec![
        label.to_owned(),
        mib(dirtied),
        ms(median(pause)),
        ms(median(total)),
        mib(median_u64(changed)),
        mib(up),
        format!("{:.2}", up as f64 / dirtied as f64),
        format!("{:.3}", up as f64 / guest_bytes as f64),
    ])
}

/// Drops clean page cache so memory deltas are comparable.
fn drop_caches() {
    rustix::fs::sync();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new().prefix("sbxs").tempdir_in("/tmp")?;
    let _cleanup = benches::KillUnder(dir.path().to_path_buf());
    let (host, mut c) = benches::serve_host(&dir.path().join("vmm")).await?;
    let info = c.get_host_info(pb::HostInfoRequest {}).await?.into_inner();
    let accel = format!("{} {}", info.hypervisor, info.accelerator);
    eprintln!("bench: {accel} ({})", info.accelerator_reason);
    let mut progress = c.ensure_image(pb::EnsureImageRequest { image: "minimal".into() }).await?.into_inner();
    while progress.next().await.is_some() {}

    let want = |name: &str| args.only.iter().any(|s| s == name);
    let mut disk = Vec::new();
    if want("checkpoint") || want("disk") {
        disk = checkpoints_and_disk(&mut c, &args, &accel, dir.path(), want("checkpoint"), want("disk")).await?;
    }
    if want("wake") {
        wake_and_fork(&mut c, &args, &accel).await?;
    }
    if want("memory") {
        host_memory(&mut c, &args, &dir.path().display().to_string()).await?;
    }
    if want("disk") {
        print_table(
            "Disk: a cowfs file vs a plain local file (host side), and the guest's own dd",
            &["case", "MiB/s", "local file MiB/s", "cowfs / local"],
            &disk,
        );
    }
    host.shutdown().await;
    Ok(())
}

/// Section 1: checkpoints of a 1 GiB guest after dirtying a share of its memory (printed when
/// `checkpoint`), then the disk rows (returned when `disk`, for printing last).
async fn checkpoints_and_disk(
    c: &mut Client,
    args: &Args,
    accel: &str,
    dir: &std::path::Path,
    checkpoint: bool,
    want_disk: bool,
) -> anyhow::Result<Vec<Vec<String>>> {
    let mut disk = Vec::new();
    let id = create(c, 1024).await?;
    exec(c, &id, "mkdir -p /mnt/fill && mount -t tmpfs -o size=950m tmpfs /mnt/fill").await?;
    let guest_bytes = 1024u64 << 20;
    if checkpoint {
        checkpoint_table(c, &id, args, accel, guest_bytes).await?;
    }

    // Disk through cowfs: the guest's dd, and the cowfs file against a local file on the host.
    let timed = |cmd: &str| {
        format!(
            "a=$(cut -d' ' -f1 /proc/uptime); {cmd} >/dev/null 2>&1; b=$(cut -d' ' -f1 /proc/uptime); echo \"$a $b\" | awk '{{print 256 / ($2 - $1)}}'"
        )
    };
    let w = exec(c, &id, &timed("dd if=/dev/zero of=/ddtest bs=1M count=256 conv=fsync")).await?;
    exec(c, &id, "sync; echo 3 > /proc/sys/vm/drop_caches").await?;
    let r = exec(c, &id, &timed("dd if=/ddtest of=/dev/null bs=1M")).await?;
    let guest_dd = (String::from_utf8_lossy(&w.stdout).trim().to_owned(), String::from_utf8_lossy(&r.stdout).trim().to_owned());
    terminate(c, &id).await?;
    if want_disk {
        disk = host_side_disk(&dir.join("vmm/cowfs/control.sock"), &dir.join("vmm/cowfs/mnt"), &dir.join("plain.raw"))?;
        disk.push(vec!["guest dd write 256 MiB (fsync), on the cowfs disk".into(), guest_dd.0, String::new(), String::new()]);
        disk.push(vec!["guest dd read 256 MiB (cold), on the cowfs disk".into(), guest_dd.1, String::new(), String::new()]);
    }
    Ok(disk)
}

/// The checkpoint table: rows for 1%, 10% and ~80% of the guest `id` dirtied, and 1% in a
/// fork of it.
async fn checkpoint_table(c: &mut Client, id: &str, args: &Args, accel: &str, guest_bytes: u64) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for (label, mib_dirty) in [("1%", 10u64), ("10%", 102), ("~80% (what a 1 GiB guest can spare)", 800)] {
        // The region the dd writes is allocated once; each repetition rewrites it with new
        // random bytes, so exactly `mib_dirty` MiB of guest memory changes per checkpoint.
        exec(c, id, &format!("dd if=/dev/urandom of=/mnt/fill/d bs=1M count={mib_dirty} 2>/dev/null")).await?;
        c.checkpoint_sailbox(sid(id)).await?;
        rows.push(checkpoint_row(c, id, label, mib_dirty, args.reps, guest_bytes).await?);
        eprintln!("bench: checkpoint rows for {label} done");
    }
    // A fork runs on a private mapping of its checkpoint's memory: each of its
    // checkpoints saves all of memory live (mapped-ram) and uploads what is new.
    let child = c.fork(sid(id)).await?.into_inner().child.unwrap_or_default().sailbox_id;
    let label = "1%, in a fork (saves all memory; changed = since the fork)";
    rows.push(checkpoint_row(c, &child, label, 10, args.reps, guest_bytes).await?);
    terminate(c, &child).await?;
    eprintln!("bench: checkpoint rows for a fork done");
    print_table(
        &format!("Checkpoint of a running 1 GiB guest ({accel}; medians of {})", args.reps),
        &[
            "dirtied since last",
            "dirtied MiB",
            "pause ms",
            "total ms",
            "changed MiB (256 KiB regions)",
            "uploaded MiB",
            "uploaded / dirtied",
            "uploaded / guest memory",
        ],
        &rows,
    );
    Ok(())
}

/// 2. Resume from sleep and fork, to the first exec answered, at two guest sizes.
async fn wake_and_fork(c: &mut Client, args: &Args, accel: &str) -> anyhow::Result<()> {
    let mut life = Vec::new();
    for memory in [1024u32, args.big_mib] {
        let id = create(c, memory).await?;
        exec(c, &id, "head -c 100000000 /dev/urandom > /run/blob").await?;
        let (mut resume, mut fork) = (Vec::new(), Vec::new());
        for _ in 0..args.reps {
            c.sleep(pb::SleepRequest { sailbox_id: id.clone(), call: String::new() }).await?;
            let t = Instant::now();
            exec(c, &id, "true").await?; // wakes it
            resume.push(t.elapsed());
            let t = Instant::now();
            let child = c.fork(sid(&id)).await?.into_inner().child.unwrap_or_default().sailbox_id;
            exec(c, &child, "true").await?;
            fork.push(t.elapsed());
            terminate(c, &child).await?;
        }
        // Fork of a sleeping sailbox: no checkpoint to take, only the child to start.
        c.sleep(pb::SleepRequest { sailbox_id: id.clone(), call: String::new() }).await?;
        let mut fork_sleeping = Vec::new();
        for _ in 0..args.reps {
            let t = Instant::now();
            let child = c.fork(sid(&id)).await?.into_inner().child.unwrap_or_default().sailbox_id;
            exec(c, &child, "true").await?;
            fork_sleeping.push(t.elapsed());
            terminate(c, &child).await?;
        }
        terminate(c, &id).await?;
        life.push(vec![format!("{memory} MiB"), ms(median(resume)), ms(median(fork)), ms(median(fork_sleeping))]);
        eprintln!("bench: lifecycle rows for {memory} MiB done");
    }
    print_table(
        &format!(
            "Wake and fork to the first exec answered ({accel}; medians of {}; guests hold 100 MB of random data in memory)",
            args.reps
        ),
        &["guest memory", "resume from sleep ms", "fork of a running sailbox ms", "fork of a sleeping sailbox ms"],
        &life,
    );
    Ok(())
}

/// 3. Host memory: forks of one checkpoint vs independent sailboxes, each touching the
///    same working set in guest memory. `needle`: what the command lines of this run's
///    processes contain (its data directory).
async fn host_memory(c: &mut Client, args: &Args, needle: &str) -> anyhow::Result<()> {
    let ws = args.working_set_mib;
    // md5sum reads every byte (cat to /dev/null may splice, which reads nothing).
    let read = "md5sum /run/ws > /dev/null";
    let touch = format!("dd if=/dev/urandom of=/run/ws bs=1M count={ws} 2>/dev/null && {read}");
    let parent = create(c, 1024).await?;
    exec(c, &parent, &touch).await?;
    c.sleep(pb::SleepRequest { sailbox_id: parent.clone(), call: String::new() }).await?;
    drop_caches();
    let mut children = Vec::new();
    for _ in 0..args.forks {
        let child = c.fork(sid(&parent)).await?.into_inner().child.unwrap_or_default().sailbox_id;
        exec(c, &child, read).await?;
        children.push(child);
    }
    let forks = memory_of(needle);
    for child in &children {
        terminate(c, child).await?;
    }
    terminate(c, &parent).await?;
    drop_caches();
    let mut independent = Vec::new();
    for _ in 0..args.forks {
        let id = create(c, 1024).await?;
        exec(c, &id, &touch).await?;
        independent.push(id);
    }
    let alone = memory_of(needle);
    for id in &independent {
        terminate(c, id).await?;
    }
    let n = args.forks as u64;
    let row = |what: String, (vmm, daemon): (Mem, Mem), ratio: String| {
        vec![what, mib(vmm.rss), mib(vmm.pss), mib(vmm.pss / n), mib(daemon.pss), mib(vmm.pss + daemon.pss), ratio]
    };
    let total = |(v, d): (Mem, Mem)| (v.pss + d.pss).max(1) as f64;
    print_table(
        &format!("Host memory of {} sailboxes each holding {ws} MiB of data in guest memory", args.forks),
        &[
            "sailboxes",
            "VMM Rss MiB",
            "VMM Pss MiB",
            "VMM Pss per sailbox MiB",
            "cowfs daemon Pss MiB",
            "total Pss MiB",
            "total Pss x independent",
        ],
        &[
            row(format!("{} forks of one checkpoint", args.forks), forks, format!("{:.2}", total(forks) / total(alone))),
            row(format!("{} independent sailboxes", args.forks), alone, "1.00".into()),
        ],
    );
    Ok(())
}

/// Sequential write (then fsync) and cold read of 256 MiB: a cowfs file vs a local file.
fn host_side_disk(
    control: &std::path::Path,
    mount: &std::path::Path,
    plain: &std::path::Path,
) -> anyhow::Result<Vec<Vec<String>>> {
    let size: u64 = 256 << 20;
    {
        let mut s = std::os::unix::net::UnixStream::connect(control)?;
        writeln!(s, "{}", serde_json::json!({"op": "create", "name": "bench.disk", "size": size}))?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line)?;
        anyhow::ensure!(line.contains("\"ok\":true"), "cowfs create: {line}");
    }
    let cow = mount.join("bench.disk");
    std::fs::File::create(plain)?.set_len(size)?;
    let data = benches::random_bytes(1 << 20, 5);
    let write = |path: &std::path::Path| -> anyhow::Result<Duration> {
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        let t = Instant::now();
        for _ in 0..(size >> 20) {
            f.write_all(&data)?;
        }
        f.sync_all()?;
        Ok(t.elapsed())
    };
    let read = |path: &std::path::Path| -> anyhow::Result<Duration> {
        drop_caches();
        let mut f = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        let t = Instant::now();
        while f.read(&mut buf)? > 0 {}
        Ok(t.elapsed())
    };
    let (cw, pw) = (write(&cow)?, write(plain)?);
    let (cr, pr) = (read(&cow)?, read(plain)?);
    // cowfs's fsync is a no-op (a file's durability is its checkpoint): compare writes
    // without fsync too.
    let nosync = |path: &std::path::Path| -> anyhow::Result<Duration> {
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        let t = Instant::now();
        for _ in 0..(size >> 20) {
            f.write_all(&data)?;
        }
        Ok(t.elapsed())
    };
    let (cn, pn) = (nosync(&cow)?, nosync(plain)?);
    let row = |name: &str, cowd: Duration, plaind: Duration| {
        vec![
            name.to_owned(),
            format!("{:.0}", mib_per_s(size, cowd)),
            format!("{:.0}", mib_per_s(size, plaind)),
            format!("{:.2}", plaind.as_secs_f64() / cowd.as_secs_f64()),
        ]
    };
    Ok(vec![
        row("host write 256 MiB + fsync (a no-op on cowfs)", cw, pw),
        row("host write 256 MiB, no fsync", cn, pn),
        row("host read 256 MiB, cold page cache", cr, pr),
    ])
}
