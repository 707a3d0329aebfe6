//! Guest networking figures (docs/networking.md) on one real VM (the debian image, so python3
//! can be timed against busybox's wget and nc):
//!
//! - download and upload through the outbound NIC (passt in the host's namespace) and
//!   through the host NIC (passt in the sailbox's own namespace, to a server listening where
//!   the volume gateway listens), each with busybox's tool and with python3, and the
//!   outbound NIC again at MTU 1500 (init sets passt's own, 65520);
//! - connection setup: small request/response round trips through each NIC;
//! - ingress: vmm-host's listener (agent `Forward` over the serial link) to a guest server:
//!   requests/s for a small file and MiB/s for a 64 MiB one. (Until the host NIC moved to
//!   passt, this compared QEMU's own `hostfwd` on the user-network NIC too; a passt NIC has
//!   no runtime port forward. docs/networking.md keeps that run's figures.)
//!
//! `cargo run --release -p benches --bin network [-- --mib 256 --runs 3 --requests 200]`
//! (root; `bash scripts/setup.sh vm && bash scripts/build-agent.sh` first).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use benches::{exec, mib_per_s, print_table, write_file as write};
use clap::Parser;
use proto::sailbox as pb;
type Client = benches::SailboxClient;
use tokio_stream::StreamExt;
use vmm_host::gateway::GUEST_ADDR;
use vmm_host::host_nic::{GATEWAY_PORT, HostNic};
use vmm_host::hypervisor::qemu::OUTBOUND_MAC;

#[derive(Parser)]
struct Args {
    /// Transfer size, MiB.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Runs per transfer row (median reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Small requests per connection-setup and ingress rows.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Concurrent clients of the ingress requests/s rows.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// A data directory to keep (the debian image is built once into it); default: a
    /// temporary one.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

/// How long one guest transfer may take before it counts as stalled, s.
const STALL_S: u32 = 120;

/// Runs a shell command in the guest, timed by python3's monotonic clock there; seconds, or
/// `None` when it ran into [`STALL_S`].
async fn guest_timed(c: &mut Client, id: &str, cmd: &str) -> anyhow::Result<Option<f64>> {
    let script = format!(
        "import subprocess,sys,time\nt=time.monotonic()\ntry:\n  r=subprocess.run({cmd:?},shell=True,timeout={STALL_S})\nexcept subprocess.TimeoutExpired:\n  print('stalled'); sys.exit(0)\nd=time.monotonic()-t\nprint(d if r.returncode==0 else -1)\n"
    );
    exec(c, id, "mkdir -p /bench").await?;
    write(c, id, "/bench/timed.py", script.as_bytes()).await?;
    let r = exec(c, id, "python3 /bench/timed.py").await?;
    let out = String::from_utf8_lossy(&r.stdout).trim().to_owned();
    if out == "stalled" {
        return Ok(None);
    }
    let s: f64 = out.parse().unwrap_or(-1.0);
    anyhow::ensure!(s >= 0.0, "{cmd:?} failed: {}", String::from_utf8_lossy(&r.stderr));
    Ok(Some(s))
}

/// One connection of the host-side test server. The first line says what to do:
/// `GET /N HTTP/...` (headers follow): an HTTP/1.0 answer of N zero bytes; `PUT N`: read N
/// bytes, answer `ok`.
fn serve_one(mut s: impl Read + Write) {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    let line = String::from_utf8_lossy(&line).trim().to_owned();
    if let Some(rest) = line.strip_prefix("GET /") {
        // Skip the headers (up to the empty line).
        let mut header = 0usize;
        while s.read(&mut b).unwrap_or(0) == 1 {
            match b[0] {
                b'\n' if header == 0 => break,
                b'\n' => header = 0,
                b'\r' => {}
                _ => header += 1,
            }
        }
        let n: u64 = rest.split_whitespace().next().unwrap_or("0").parse().unwrap_or(0);
        let _ = s.write_all(format!("HTTP/1.0 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes());
        let buf = vec![0u8; 1 << 20];
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            if s.write_all(&buf[..k]).is_err() {
                return;
            }
            left -= k as u64;
        }
    } else if let Some(n) = line.strip_prefix("PUT ") {
        let n: u64 = n.parse().unwrap_or(0);
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < n {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k as u64,
            }
        }
        let _ = s.write_all(format!("ok {got}\n").as_bytes());
    }
}

/// The host's address the guest reaches through passt (not loopback: passt's gateway does
/// not map to the host).
fn host_ip() -> anyhow::Result<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.connect("192.0.2.1:9")?;
    Ok(s.local_addr()?.ip())
}

/// Median of `runs` seconds values.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs a transfer `runs` times: the median MiB/s, or how many of the runs stalled.
async fn transfer(c: &mut Client, id: &str, cmd: &str, bytes: u64, runs: usize) -> anyhow::Result<String> {
    let (mut times, mut stalled, mut failed) = (Vec::new(), 0, Vec::new());
    for _ in 0..runs {
        match guest_timed(c, id, cmd).await {
            Ok(Some(s)) => times.push(s),
            Ok(None) => stalled += 1,
            Err(e) => {
                eprintln!("bench: {e:#}");
                failed.push(e.to_string().lines().last().unwrap_or("").trim().to_owned());
            }
        }
    }
    let mut cell = if times.is_empty() {
        "-".to_owned()
    } else {
        format!("{:.1}", mib_per_s(bytes, Duration::from_secs_f64(median(times))))
    };
    if stalled > 0 {
        cell.push_str(&format!(" ({stalled} of {runs} stalled > {STALL_S} s)"));
    }
    if let Some(why) = failed.first() {
        cell.push_str(&format!(" ({} of {runs} failed: {why})", failed.len()));
    }
    Ok(cell)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new().prefix("sbxn").tempdir_in("/tmp")?;
    let data_dir = args.data_dir.clone().unwrap_or_else(|| dir.path().join("vmm"));
    let _cleanup = benches::KillUnder(data_dir.clone());
    let (host, mut c) = benches::serve_host(&data_dir).await?;
    let mut progress = c.ensure_image(pb::EnsureImageRequest { image: "debian".into() }).await?.into_inner();
    while let Some(p) = progress.next().await {
        eprintln!("bench: {}", p?.message);
    }
    let req = pb::CreateSailboxRequest {
        app: "bench".into(),
        image: "debian".into(),
        cpu: 1.0,
        memory_mib: 1024,
        disk_gib: 4,
        ingress_ports: vec![8080],
        ..Default::default()
    };
    let sb = c.create_sailbox(req).await?.into_inner();
    let id = sb.sailbox_id.clone();
    let run_dir = data_dir.join("run").join(&id);
    eprintln!("bench: {id} ({} {})", sb.hypervisor, sb.accelerator);

    // The host-side servers: TCP on the host's address (outbound NIC), the gateway's port in
    // the sailbox's host-NIC namespace (host NIC; no volumed here, so it is free).
    let tcp = TcpListener::bind("0.0.0.0:0")?;
    let out_addr = format!("{}:{}", host_ip()?, tcp.local_addr()?.port());
    std::thread::spawn(move || {
        for s in tcp.incoming().flatten() {
            let _ = s.set_nodelay(true);
            std::thread::spawn(move || serve_one(s));
        }
    });
    let nic = HostNic::of_running_vm(&run_dir)?.ok_or_else(|| anyhow::anyhow!("no host-NIC passt for {id}"))?;
    let gw = nic.listen(GATEWAY_PORT)?;
    gw.set_nonblocking(false)?;
    std::thread::spawn(move || {
        for s in gw.incoming().flatten() {
            let _ = s.set_nodelay(true);
            std::thread::spawn(move || serve_one(s));
        }
    });
    // busybox (the guest kit's static one) beside python3.
    let busybox = std::fs::read(vmm_host::HostConfig::local(&data_dir).guest_dir.join("busybox"))?;
    write(&mut c, &id, "/usr/local/bin/busybox", &busybox).await?;
    let py_get = |addr: &str, n: u64| {
        format!(
            "python3 -c \"import socket; h,p='{addr}'.split(':'); s=socket.create_connection((h,int(p))); s.sendall(b'GET /{n} HTTP/1.0\\r\\n\\r\\n'); b=bytearray(1<<20); t=0\nwhile True:\n  k=s.recv_into(b)\n  if not k: break\n  t+=k\nassert t>{n}\""
        )
    };
    let py_put = |addr: &str, n: u64| {
        format!(
            "python3 -c \"import socket; h,p='{addr}'.split(':'); s=socket.create_connection((h,int(p))); s.sendall(b'PUT {n}\\n'); b=bytes(1<<20); l={n}\nwhile l>0:\n  k=min(l,len(b)); s.sendall(b[:k]); l-=k\nassert s.makefile().readline().startswith('ok {n}')\""
        )
    };
    let bytes = args.mib << 20;
    let mut rows = Vec::new();
    for (nic, addr) in [("outbound (passt)", out_addr.as_str()), ("host NIC (passt, own namespace)", GUEST_ADDR)] {
        let cases = [
            ("download", "busybox wget", format!("busybox wget -q -O /dev/null http://{addr}/{bytes}")),
            ("download", "python3 socket", py_get(addr, bytes)),
            (
                "upload",
                "dd | busybox nc",
                format!(
                    "(echo PUT {bytes}; dd if=/dev/zero bs=1M count={} 2>/dev/null) | busybox nc {}",
                    args.mib,
                    addr.replace(':', " ")
                ),
            ),
            ("upload", "python3 socket", py_put(addr, bytes)),
        ];
        for (dir, tool, cmd) in cases {
            let cell = transfer(&mut c, &id, &cmd, bytes, args.runs).await?;
            eprintln!("bench: {nic} {dir} {tool}: {cell} MiB/s");
            rows.push(vec![nic.to_owned(), dir.to_owned(), tool.to_owned(), cell]);
        }
    }
    // The outbound NIC at the Ethernet default MTU instead of passt's (what init sets).
    let nic = format!(
        "for d in /sys/class/net/*; do [ \"$(cat $d/address)\" = {OUTBOUND_MAC} ] && ip link set dev ${{d##*/}} mtu 1500; done; true"
    );
    exec(&mut c, &id, &nic).await?;
    for (dir, tool, cmd) in [
        ("download", "busybox wget", format!("busybox wget -q -O /dev/null http://{out_addr}/{bytes}")),
        ("upload", "python3 socket", py_put(&out_addr, bytes)),
    ] {
        let cell = transfer(&mut c, &id, &cmd, bytes, args.runs).await?;
        eprintln!("bench: MTU 1500 {dir} {tool}: {cell} MiB/s");
        rows.push(vec!["outbound (passt), MTU 1500".into(), dir.into(), tool.into(), cell]);
    }
    exec(&mut c, &id, &nic.replace("1500", "65520")).await?;
    print_table(
        &format!("Guest network throughput ({} {}, {} MiB, median of {})", sb.hypervisor, sb.accelerator, args.mib, args.runs),
        &["path", "direction", "guest tool", "MiB/s"],
        &rows,
    );

    // Connection setup: small round trips, one connection each.
    let mut rows = Vec::new();
    for (nic, addr) in [("outbound (passt)", out_addr.as_str()), ("host NIC (passt, own namespace)", GUEST_ADDR)] {
        let cmd = format!(
            "python3 -c \"import socket,time; h,p='{addr}'.split(':'); t=time.monotonic()\nfor i in range({n}):\n  s=socket.create_connection((h,int(p))); s.sendall(b'GET /16 HTTP/1.0\\r\\n\\r\\n'); d=b''\n  while True:\n    k=s.recv(4096)\n    if not k: break\n    d+=k\n  s.close()\nprint((time.monotonic()-t)/{n}*1000)\"",
            n = args.requests
        );
        let r = exec(&mut c, &id, &cmd).await?;
        let per: f64 = String::from_utf8_lossy(&r.stdout).trim().parse().unwrap_or(-1.0);
        anyhow::ensure!(per >= 0.0, "round trips failed: {}", String::from_utf8_lossy(&r.stderr));
        rows.push(vec![nic.to_owned(), format!("{per:.2}")]);
    }
    print_table(
        &format!("Connection setup: request/response on a new connection ({} each, guest-timed)", args.requests),
        &["path", "ms per connection"],
        &rows,
    );

    // Ingress: the guest's HTTP server behind both.
    exec(&mut c, &id, "mkdir -p /srv && head -c 1024 /dev/zero > /srv/small && head -c 64M /dev/zero > /srv/big").await?;
    let h = c
        .exec(pb::ExecRequest {
            sailbox_id: id.clone(),
            command: "cd /srv && python3 -m http.server 8080 >/dev/null 2>&1".into(),
            background: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    c.wait_exec(pb::WaitExecRequest { exec_id: h.exec_id, timeout_ms: 0 }).await?;
    let listeners =
        c.listeners(pb::ListenersRequest { sailbox_id: id.clone(), port: 8080, wait_routed_ms: 60_000 }).await?.into_inner();
    let listener = listeners.listeners.first().ok_or_else(|| anyhow::anyhow!("no listener"))?;
    anyhow::ensure!(listener.routed, "the guest server did not start");
    let ours = listener.host_addr.clone();
    let mut rows = Vec::new();
    for (name, addr) in [("vmm-host ingress listener", ours.as_str())] {
        let rps = requests_per_s(addr, args.requests, args.concurrency)?;
        let mut times = Vec::new();
        for _ in 0..args.runs {
            let t = Instant::now();
            let n = http_get(addr, "/big")?;
            anyhow::ensure!(n >= 64 << 20, "{name}: short body {n}");
            times.push(t.elapsed().as_secs_f64());
        }
        let s = median(times);
        rows.push(vec![name.to_owned(), format!("{rps:.0}"), format!("{:.1}", mib_per_s(64 << 20, Duration::from_secs_f64(s)))]);
    }
    print_table(
        &format!(
            "Ingress to a guest python3 http.server ({} requests of 1 KiB, {} clients; 64 MiB body, median of {})",
            args.requests, args.concurrency, args.runs
        ),
        &["path", "requests/s", "64 MiB body MiB/s"],
        &rows,
    );
    c.terminate(pb::TerminateRequest { sailbox_id: id }).await?;
    host.shutdown().await;
    Ok(())
}

/// One HTTP/1.0 GET; the bytes received (headers included).
fn http_get(addr: &str, path: &str) -> anyhow::Result<u64> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match s.read(&mut buf)? {
            0 => return Ok(n),
            k => n += k as u64,
        }
    }
}

/// `total` small GETs from `clients` threads; requests per second.
fn requests_per_s(addr: &str, total: usize, clients: usize) -> anyhow::Result<f64> {
    let t = Instant::now();
    let per = total / clients;
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let addr = addr.to_owned();
            std::thread::spawn(move || -> anyhow::Result<()> {
                for _ in 0..per {
                    anyhow::ensure!(http_get(&addr, "/small")? > 1024, "short answer");
                }
                Ok(())
            })
        })
        .collect();
    for th in threads {
        th.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    Ok((per * clients) as f64 / t.elapsed().as_secs_f64())
}
