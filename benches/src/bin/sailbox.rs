//! Sailbox figures on a real VMM: create to first exec, exec round trip, and file transfer
//! through the agent against the guest's own `dd` of the same size.
//!
//! Baselines in the same run: a host `sh -c true` (fork + exec, what an exec costs without a
//! VM), the agent's `Hello` (the vsock + gRPC round trip alone), and the guest's `dd`.
//!
//! `cargo run --release -p benches --bin sailbox [-- --boots 5 --execs 50 --mib 256]`
//! (root; `bash scripts/setup.sh vm && bash scripts/build-agent.sh` first).

use std::time::{Duration, Instant};

use benches::{exec, mib_per_s, ms, percentile, print_table, random_bytes};
use clap::Parser;
use proto::sailbox as pb;
type Client = benches::SailboxClient;
use tokio_stream::StreamExt;

#[derive(Parser)]
struct Args {
    /// Boots to time (create to first exec).
    #[arg(long, default_value_t = 5)]
    boots: usize,
    /// Exec round trips to time.
    #[arg(long, default_value_t = 50)]
    execs: usize,
    /// File size for the transfer rows, MiB.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Transfers per direction (median reported).
    #[arg(long, default_value_t = 5)]
    transfers: usize,
    /// Image to boot.
    #[arg(long, default_value = "minimal")]
    image: String,
}

fn create_req(image: &str, disk_gib: u32) -> pb::CreateSailboxRequest {
    pb::CreateSailboxRequest {
        app: "bench".into(),
        image: image.into(),
        cpu: 1.0,
        memory_mib: 1024,
        disk_gib,
        ..Default::default()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    percentile(&mut v, 50.0)
}

/// Runs `cmd` in the guest and returns how long it took by the guest's own clock
/// (/proc/uptime, 10 ms resolution; busybox dd prints no timing).
fn timed(cmd: &str) -> String {
    format!(
        "a=$(cut -d' ' -f1 /proc/uptime); {cmd} >/dev/null 2>&1; b=$(cut -d' ' -f1 /proc/uptime); echo \"$a $b\" | awk '{{print $2 - $1}}'"
    )
}

fn seconds(out: &[u8]) -> anyhow::Result<f64> {
    String::from_utf8_lossy(out).trim().parse().map_err(|_| anyhow::anyhow!("no time in {:?}", String::from_utf8_lossy(out)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new().prefix("sbxb").tempdir_in("/tmp")?;
    let _cleanup = benches::KillUnder(dir.path().to_path_buf());
    let (host, mut c) = benches::serve_host(&dir.path().join("vmm")).await?;
    let info = c.get_host_info(pb::HostInfoRequest {}).await?.into_inner();
    eprintln!("bench: {} {} ({}), image {}", info.hypervisor, info.accelerator, info.accelerator_reason, args.image);
    // Build / assemble the image outside the timed boots.
    let mut progress = c.ensure_image(pb::EnsureImageRequest { image: args.image.clone() }).await?.into_inner();
    while let Some(p) = progress.next().await {
        eprintln!("bench: {}", p?.message);
    }

    let (boots, agent_boot) = boot_times(&mut c, &args).await?;
    let sb = c.create_sailbox(create_req(&args.image, 4)).await?.into_inner();
    let id = sb.sailbox_id.clone();
    let trips = round_trips(&mut c, &host, &args, &id).await?;
    let moved = transfers(&mut c, &args, &id).await?;
    c.terminate(pb::TerminateRequest { sailbox_id: id }).await?;

    let accel = info.accelerator.clone();
    print_table(
        &format!("Sailbox lifecycle ({} {}; medians)", info.hypervisor, accel),
        &["measure", "ms", "baseline", "baseline ms", "ratio"],
        &[
            vec![
                format!("create to first exec answered (n={})", args.boots),
                ms(median(boots.clone())),
                "agent first answer (boot_ms)".into(),
                ms(median(agent_boot.clone())),
                format!("{:.2}x", median(boots.clone()).as_secs_f64() / median(agent_boot.clone()).as_secs_f64().max(1e-9)),
            ],
            vec![
                format!("exec `true` round trip p50 (n={})", args.execs),
                ms(trips.rtt_p50),
                "host sh -c true".into(),
                ms(trips.fork_p50),
                format!("{:.1}x", trips.rtt_p50.as_secs_f64() / trips.fork_p50.as_secs_f64()),
            ],
            vec![
                "exec `true` round trip p99".into(),
                ms(trips.rtt_p99),
                "agent Hello (serial link + gRPC)".into(),
                ms(trips.hello_p50),
                format!("{:.1}x", trips.rtt_p50.as_secs_f64() / trips.hello_p50.as_secs_f64()),
            ],
        ],
    );
    print_transfers(&args, &moved);
    host.shutdown().await;
    Ok(())
}

/// Create to first exec answered, `args.boots` times: the client's times and the agent's
/// `boot_ms`.
async fn boot_times(c: &mut Client, args: &Args) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut boots = Vec::new();
    let mut agent_boot = Vec::new();
    for i in 0..args.boots {
        let t = Instant::now();
        let sb = c.create_sailbox(create_req(&args.image, 2)).await?.into_inner();
        let r = exec(c, &sb.sailbox_id, "true").await?;
        anyhow::ensure!(r.return_code == 0, "first exec failed");
        boots.push(t.elapsed());
        agent_boot.push(Duration::from_millis(sb.boot_ms));
        eprintln!("bench: boot {} of {}: {:.2} s", i + 1, args.boots, t.elapsed().as_secs_f64());
        c.terminate(pb::TerminateRequest { sailbox_id: sb.sailbox_id }).await?;
    }
    Ok((boots, agent_boot))
}

/// Exec round trips and their baselines.
struct RoundTrips {
    rtt_p50: Duration,
    rtt_p99: Duration,
    fork_p50: Duration,
    hello_p50: Duration,
}

/// Exec round trips on the running sailbox `id`; baselines: host fork+exec, agent Hello.
async fn round_trips(c: &mut Client, host: &vmm_host::Host, args: &Args, id: &str) -> anyhow::Result<RoundTrips> {
    let mut rtt = Vec::new();
    for _ in 0..args.execs {
        let t = Instant::now();
        exec(c, id, "true").await?;
        rtt.push(t.elapsed());
    }
    let mut fork_exec = Vec::new();
    for _ in 0..args.execs {
        let t = Instant::now();
        std::process::Command::new("/bin/sh").args(["-c", "true"]).status()?;
        fork_exec.push(t.elapsed());
    }
    // The agent's own round trip, through the host's connection to it (GetSailbox with a
    // probe-free listener call would add the state store; Hello is the link alone).
    let mut hello = Vec::new();
    for _ in 0..args.execs {
        let t = Instant::now();
        host.agent_hello(id).await?;
        hello.push(t.elapsed());
    }
    Ok(RoundTrips {
        rtt_p50: percentile(&mut rtt, 50.0),
        rtt_p99: percentile(&mut rtt, 99.0),
        fork_p50: percentile(&mut fork_exec, 50.0),
        hello_p50: percentile(&mut hello, 50.0),
    })
}

/// Median times of the transfer rows.
struct Transfers {
    bytes: u64,
    up: Duration,
    down: Duration,
    dd_w: Duration,
    dd_r: Duration,
}

/// Files through the agent vs the guest's dd of the same size (write fsynced, read cold).
async fn transfers(c: &mut Client, args: &Args, id: &str) -> anyhow::Result<Transfers> {
    let bytes = (args.mib as u64) << 20;
    let data = random_bytes(bytes as usize, 11);
    let (mut up, mut down, mut dd_w, mut dd_r) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.transfers {
        let t = Instant::now();
        let mut msgs = vec![pb::WriteFileRequest {
            sailbox_id: id.to_owned(),
            path: "/bench/file".into(),
            mode: 0o644,
            size: bytes,
            data: Vec::new(),
        }];
        msgs.extend(data.chunks(1 << 20).map(|p| pb::WriteFileRequest { data: p.to_vec(), ..Default::default() }));
        c.write_file(tokio_stream::iter(msgs)).await?;
        up.push(t.elapsed());
        exec(c, id, "sync; echo 3 > /proc/sys/vm/drop_caches").await?;
        let t = Instant::now();
        let mut s =
            c.read_file(pb::ReadFileRequest { sailbox_id: id.to_owned(), path: "/bench/file".into() }).await?.into_inner();
        let mut n = 0u64;
        while let Some(m) = s.next().await {
            n += m?.data.len() as u64;
        }
        anyhow::ensure!(n == bytes, "short read");
        down.push(t.elapsed());
        let w = exec(c, id, &timed(&format!("dd if=/dev/zero of=/bench/dd bs=1M count={} conv=fsync", args.mib))).await?;
        dd_w.push(Duration::from_secs_f64(seconds(&w.stdout)?));
        exec(c, id, "sync; echo 3 > /proc/sys/vm/drop_caches").await?;
        let r = exec(c, id, &timed("dd if=/bench/file of=/dev/null bs=1M")).await?;
        dd_r.push(Duration::from_secs_f64(seconds(&r.stdout)?));
        exec(c, id, "rm -f /bench/dd").await?;
    }
    Ok(Transfers { bytes, up: median(up), down: median(down), dd_w: median(dd_w), dd_r: median(dd_r) })
}

fn print_transfers(args: &Args, t: &Transfers) {
    let Transfers { bytes, up, down, dd_w, dd_r } = *t;
    print_table(
        &format!("File transfer through the agent, {} MiB (medians of {})", args.mib, args.transfers),
        &["direction", "agent MiB/s", "guest dd MiB/s", "agent / dd"],
        &[
            vec![
                "write (host -> guest file, fsynced)".into(),
                format!("{:.1}", mib_per_s(bytes, up)),
                format!("{:.1}", mib_per_s(bytes, dd_w)),
                format!("{:.2}", dd_w.as_secs_f64() / up.as_secs_f64()),
            ],
            vec![
                "read (guest file -> host, cold cache)".into(),
                format!("{:.1}", mib_per_s(bytes, down)),
                format!("{:.1}", mib_per_s(bytes, dd_r)),
                format!("{:.2}", dd_r.as_secs_f64() / down.as_secs_f64()),
            ],
        ],
    );
}
