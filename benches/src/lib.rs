//! Shared helpers for the benchmark binaries: timing, percentiles, tables, test data.
//!
//! Every bench prints a table with a same-run baseline and the ratio to it; none asserts on
//! time (figures are reported, and docs/benchmarks.md records them with the command).
#![warn(missing_docs)]

use std::time::{Duration, Instant};

/// Pseudo-random bytes, fast to generate (xorshift64*), incompressible.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for word in out.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
    out
}

/// Runs `f` `runs` times and returns the median duration.
pub fn median_of<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// The `p`-th percentile (0..=100) of `samples` (sorted in place).
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[idx.min(samples.len() - 1)]
}

/// Throughput in MiB/s.
pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

/// Milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// Prints a table with a header row, columns padded to their widest cell.
pub fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    println!("\n{title}");
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("| {} |", padded.join(" | "));
    };
    line(header.iter().map(|s| s.to_string()).collect());
    println!("|{}|", widths.iter().map(|w| "-".repeat(w + 2)).collect::<Vec<_>>().join("|"));
    for row in rows {
        line(row.clone());
    }
}

/// Kills every process whose command line mentions a directory (VMMs and the cowfs daemon a
/// bench started) and detaches mounts under it, when dropped: a failing bench leaves no VM
/// behind.
pub struct KillUnder(pub std::path::PathBuf);

impl Drop for KillUnder {
    fn drop(&mut self) {
        let needle = self.0.display().to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        let me = std::process::id().to_string();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == me || !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = std::process::Command::new("kill").args(["-9", &name]).status();
            }
        }
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        for m in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|m| m.starts_with(&needle)) {
            let _ = std::process::Command::new("umount").args(["-l", m]).status();
        }
    }
}

/// Opens a vmm-host on `data_dir`, serves it on a loopback port, and returns it with a
/// connected client (what the sailbox benches drive).
pub async fn serve_host(data_dir: &std::path::Path) -> anyhow::Result<(vmm_host::Host, SailboxClient)> {
    serve_host_with(vmm_host::HostConfig::local(data_dir)).await
}

/// [`serve_host`] with a config of the caller's (volumed's endpoint, for benches with volumes).
pub async fn serve_host_with(config: vmm_host::HostConfig) -> anyhow::Result<(vmm_host::Host, SailboxClient)> {
    let host = vmm_host::Host::open(config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let svc = vmm_host::GrpcSailboxes::new(host.clone()).into_server();
    // Served as in production: every call's key checked (one admin key of org `default`).
    let key = tenancy::ApiKey::generate();
    let keys = tenancy::server::StaticKeys::default().with(&key, "default", tenancy::Role::Admin);
    let auth = tenancy::server::AuthLayer::new(std::sync::Arc::new(keys));
    tokio::spawn(async move {
        let incoming = vmm_host::service::incoming_nodelay(listener);
        let _ = tonic::transport::Server::builder().layer(auth).add_service(svc).serve_with_incoming(incoming).await;
    });
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true).connect().await?;
    let client = proto::sailbox::sailbox_service_client::SailboxServiceClient::new(tenancy::client::authed(ch, Some(&key)))
        .max_decoding_message_size(64 << 20);
    Ok((host, client))
}

/// The sailbox client the VM benches drive.
pub type SailboxClient = proto::sailbox::sailbox_service_client::SailboxServiceClient<tenancy::client::AuthedChannel>;

/// Runs `command` in sailbox `id` to completion (whatever its exit code).
pub async fn exec(c: &mut SailboxClient, id: &str, command: &str) -> anyhow::Result<proto::sailbox::ExecResult> {
    use proto::sailbox as pb;
    let h = c.exec(pb::ExecRequest { sailbox_id: id.into(), command: command.into(), ..Default::default() }).await?.into_inner();
    Ok(c.wait_exec(pb::WaitExecRequest { exec_id: h.exec_id, timeout_ms: 0 }).await?.into_inner())
}

/// Writes `data` to `path` (mode 0755) in sailbox `id`, streamed in 1 MiB messages.
pub async fn write_file(c: &mut SailboxClient, id: &str, path: &str, data: &[u8]) -> anyhow::Result<()> {
    use proto::sailbox as pb;
    let mut msgs = vec![pb::WriteFileRequest {
        sailbox_id: id.into(),
        path: path.into(),
        mode: 0o755,
        size: data.len() as u64,
        data: vec![],
    }];
    msgs.extend(data.chunks(1 << 20).map(|p| pb::WriteFileRequest { data: p.to_vec(), ..Default::default() }));
    c.write_file(tokio_stream::iter(msgs)).await?;
    Ok(())
}
