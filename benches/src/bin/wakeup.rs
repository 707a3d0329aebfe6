//! The floor under every synchronous FUSE request on this machine: what one round trip
//! between two threads costs when both sit on one CPU and when each wake-up has to cross to
//! the other CPU. A FUSE request is such a round trip (the caller blocks in the kernel, a
//! helper thread wakes, replies, and wakes the caller), so `requests per operation x round
//! trip` bounds how fast small-file work through any FUSE file system can go here.
//!
//! Rows:
//! - ping-pong of one byte between two threads over a Unix socket pair (the machine's
//!   baseline, no FUSE): pinned to one CPU, pinned to two CPUs, placed by the scheduler
//!   (which may leave the pair on one CPU or on two: that row moves between the two costs
//!   from run to run);
//! - with `--mount PATH` (a sail mount): `getxattr(PATH, "user.sail.control")`, which the
//!   helper answers from memory, so it is a FUSE round trip and nothing else; from this
//!   process pinned to CPU 0, to CPU 1, and placed by the scheduler. Pin the helper itself
//!   with `taskset` to compare placements (benches/fuse/run.sh pins one to CPU 0, so its
//!   CPU 1 row is a request and a reply that each cross CPUs).
//!
//! `cargo run --release -p benches --bin wakeup [-- --mount /mnt/ws --rounds 20000]`

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use benches::print_table;
use clap::Parser;
use guest_fuse::mount::CONTROL_XATTR;

#[derive(Parser)]
struct Args {
    /// Round trips per row.
    #[arg(long, default_value_t = 20_000)]
    rounds: usize,
    /// A sail mount whose root answers getxattr (adds the FUSE rows).
    #[arg(long)]
    mount: Option<PathBuf>,
}

/// Runs `f` on a new thread, pinned to `cpu` when given (None: placed by the scheduler).
/// Pinning a thread of its own leaves the caller's placement as it was.
fn on_thread<T: Send>(cpu: Option<usize>, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(cpu) = cpu {
                pin(cpu)?;
            }
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("bench thread panicked"))?
    })
}

/// Lets the calling thread run only on `cpu`.
fn pin(cpu: usize) -> anyhow::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    // None: the calling thread.
    rustix::thread::sched_setaffinity(None, &set).map_err(|e| anyhow::anyhow!("sched_setaffinity(CPU {cpu}): {e}"))
}

/// Median and p99 of `rounds` ping-pongs over a socket pair, the two ends on threads pinned
/// to `cpus` (None: the scheduler places them).
fn ping_pong(rounds: usize, cpus: Option<(usize, usize)>) -> anyhow::Result<(Duration, Duration)> {
    let (mut a, mut b) = UnixStream::pair()?;
    std::thread::scope(|s| {
        let echo = s.spawn(move || -> anyhow::Result<()> {
            if let Some((_, cpu)) = cpus {
                pin(cpu)?;
            }
            let mut byte = [0u8; 1];
            while b.read(&mut byte)? == 1 {
                b.write_all(&byte)?;
            }
            Ok(())
        });
        let times = on_thread(cpus.map(|c| c.0), move || {
            timed(rounds, || {
                a.write_all(&[1])?;
                let mut byte = [0u8; 1];
                a.read_exact(&mut byte)?;
                Ok(())
            })
            // `a` is dropped here, which ends the echo loop.
        });
        echo.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
        times
    })
}

/// Median and p99 of `rounds` getxattr calls on `mount` (a FUSE round trip each), made from
/// a thread on `cpu` (None: placed by the scheduler).
fn fuse_getxattr(rounds: usize, mount: &std::path::Path, cpu: Option<usize>) -> anyhow::Result<(Duration, Duration)> {
    // NUL-terminated once, outside the timed loop.
    let path = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes())?;
    let name = std::ffi::CString::new(CONTROL_XATTR)?;
    on_thread(cpu, || {
        let mut buf = [0u8; 4096];
        timed(rounds, || {
            let n = rustix::fs::getxattr(path.as_c_str(), name.as_c_str(), &mut buf[..])
                .map_err(|e| anyhow::anyhow!("getxattr {}: {e}", mount.display()))?;
            anyhow::ensure!(n > 0, "getxattr {}: empty value", mount.display());
            Ok(())
        })
    })
}

/// Runs `f` `rounds` times (after a tenth as warm-up) and returns the median and p99.
fn timed(rounds: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<(Duration, Duration)> {
    for _ in 0..rounds / 10 {
        f()?;
    }
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed());
    }
    let p99 = benches::percentile(&mut samples, 99.0);
    Ok((benches::percentile(&mut samples, 50.0), p99))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    let us = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e6);
    let (same, same99) = ping_pong(args.rounds, Some((0, 0)))?;
    rows.push(vec!["socket ping-pong, both threads on CPU 0 (baseline)".into(), us(same), us(same99), "1.00".into()]);
    let mut push = |name: String, (p50, p99): (Duration, Duration)| {
        let ratio = format!("{:.2}", p50.as_secs_f64() / same.as_secs_f64().max(1e-9));
        rows.push(vec![name, us(p50), us(p99), ratio]);
    };
    if cpus > 1 {
        push("socket ping-pong, threads on CPUs 0 and 1".into(), ping_pong(args.rounds, Some((0, 1)))?);
    }
    push("socket ping-pong, placed by the scheduler".into(), ping_pong(args.rounds, None)?);
    if let Some(mount) = &args.mount {
        for cpu in 0..cpus.min(2) {
            push(format!("FUSE getxattr round trip, caller on CPU {cpu}"), fuse_getxattr(args.rounds, mount, Some(cpu))?);
        }
        push("FUSE getxattr round trip, caller placed by the scheduler".into(), fuse_getxattr(args.rounds, mount, None)?);
    }
    print_table(
        &format!("Synchronous round trips ({} each, {cpus} CPUs)", args.rounds),
        &["case", "p50 us", "p99 us", "x same-CPU ping-pong"],
        &rows,
    );
    Ok(())
}
