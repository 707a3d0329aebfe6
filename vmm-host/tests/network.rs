//! Guest networking on real VMs (QEMU; TCG here; docs/networking.md): an outbound sailbox
//! fetches from a server in a network namespace on this host, cannot reach the host's
//! loopback through either NIC, reaches the volume gateway's port in its host-NIC namespace,
//! and still fetches after sleep and wake (passt relaunched with QEMU); a `network: "none"`
//! sailbox has only the host NIC and fails a fetch at once. Two boots in all.

mod common;

use common::Client;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{minimal, run};
use proto::sailbox as pb;
use vmm_host::gateway::GUEST_ADDR;
use vmm_host::host_nic::{GATEWAY_PORT, HostNic};
use vmm_host::hypervisor::qemu::{HOST_MAC, OUTBOUND_MAC};

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A network namespace joined to this host by a veth pair (host end `HOST_IP`/30), with an
/// HTTP server on `NS_IP:PORT` serving a directory; all of it removed on drop.
struct OutsideServer {
    ns: String,
    veth: String,
    server: std::process::Child,
    url: String,
    _root: tempfile::TempDir,
}

impl OutsideServer {
    fn start(body: &[u8]) -> Self {
        let tag = std::process::id() % 100_000;
        let (ns, veth, peer) = (format!("sailnt{tag}"), format!("snh{tag}"), format!("snn{tag}"));
        // A /30 picked by the pid, so concurrent runs do not collide; skipping any the host
        // already has (a run killed before its cleanup leaves its veth behind).
        let taken =
            String::from_utf8_lossy(&Command::new("ip").args(["-4", "-br", "addr"]).output().unwrap().stdout).into_owned();
        let net = (0..60)
            .map(|i| ((tag + i) % 60) * 4)
            .find(|net| !taken.contains(&format!("10.254.7.{}/30", net + 1)))
            .expect("a free /30 in 10.254.7.0/24");
        let (host_ip, ns_ip) = (format!("10.254.7.{}", net + 1), format!("10.254.7.{}", net + 2));
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &veth]).output();
        sh(&["ip", "netns", "add", &ns]);
        sh(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer]);
        sh(&["ip", "link", "set", &peer, "netns", &ns]);
        sh(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &veth]);
        sh(&["ip", "link", "set", &veth, "up"]);
        sh(&["ip", "netns", "exec", &ns, "ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &peer]);
        sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", &peer, "up"]);
        sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("page.txt"), body).unwrap();
        let port = 18_000 + (tag % 1000) as u16;
        let server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-m", "http.server", &port.to_string(), "--bind", &ns_ip, "--directory"])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://{ns_ip}:{port}/page.txt");
        let me = Self { ns, veth, server, url, _root: root };
        // Ready when the host itself can fetch it.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(format!("{ns_ip}:{port}")).is_err() {
            assert!(Instant::now() < deadline, "the HTTP server in {} did not start", me.ns);
            std::thread::sleep(Duration::from_millis(50));
        }
        me
    }
}

impl Drop for OutsideServer {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["link", "del", &self.veth]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A TCP server on the host's loopback that counts the connections it accepts.
fn loopback_server() -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            h.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut s) = s {
                let _ = s.write_all(b"LOOPBACK-REACHED\n");
            }
        }
    });
    (port, hits)
}

/// A stand-in for the volume gateway on the sailbox's `volumes.sock`: answers each
/// connection's first line with `gateway got <line>`.
/// A line-echo server where the VM of `run_dir` finds its gateway: in its host-NIC namespace
/// (no volumed is configured here, so the port is free).
fn gateway_server(run_dir: &std::path::Path) {
    let nic = HostNic::of_running_vm(run_dir).unwrap().expect("the VM's host-NIC passt runs");
    let l = nic.listen(GATEWAY_PORT).unwrap();
    l.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                let _ = s.write_all(format!("gateway got {}\n", String::from_utf8_lossy(&line)).as_bytes());
            });
        }
    });
}

async fn stdout(c: &mut Client, id: &str, cmd: &str) -> String {
    let r = run(c, id, cmd).await;
    String::from_utf8_lossy(&r.stdout).into_owned()
}

async fn procs_of(c: &mut Client, dir: &std::path::Path, id: &str) -> Vec<u32> {
    let _ = c;
    // The VMM and its passts.
    common::vm_processes(dir).into_iter().filter(|p| cmdline(p.pid).contains(id)).map(|p| p.pid).collect()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline")).map(|b| String::from_utf8_lossy(&b).replace('\0', " ")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_networking() {
    let body = b"hello from outside the host\n";
    let outside = OutsideServer::start(body);
    let (lo_port, lo_hits) = loopback_server();
    let dir = common::data_dir();
    let served = common::serve(dir.path()).await;
    let mut c = served.client().await;

    let sb = c.create_sailbox(minimal(vec![])).await.unwrap().into_inner();
    let a = sb.sailbox_id.clone();
    assert_eq!(sb.network, "outbound");
    let run_dir = common::run_dir(dir.path()).join(&a);
    gateway_server(&run_dir);
    let passt: Vec<String> =
        procs_of(&mut c, dir.path(), &a).await.into_iter().map(cmdline).filter(|c| c.contains("passt")).collect();
    assert_eq!(passt.len(), 2, "a passt per NIC: {passt:?}");
    assert_eq!(passt.iter().filter(|c| c.contains("--no-map-gw")).count(), 1, "the outbound one: {passt:?}");
    // The host NIC's passt is in a network namespace of its own, not the host's.
    let host_passt = procs_of(&mut c, dir.path(), &a).await.into_iter().find(|p| cmdline(*p).contains("host-nic.log")).unwrap();
    assert_ne!(
        std::fs::read_link(format!("/proc/{host_passt}/ns/net")).unwrap(),
        std::fs::read_link("/proc/self/ns/net").unwrap()
    );

    // Outbound: the guest fetches from the server in the namespace.
    let fetch = format!("wget -q -T 10 -O - {}", outside.url);
    let r = run(&mut c, &a, &fetch).await;
    assert_eq!((r.return_code, r.stdout.as_slice()), (0, &body[..]), "{r:?}");
    let addrs = stdout(&mut c, &a, "ip -4 addr show; ip route").await;
    assert!(addrs.contains("inet 10.0.2.15/24") && addrs.contains("inet 10.0.3.15/24"), "{addrs}");
    assert!(addrs.contains("default via 10.0.2.2"), "{addrs}");
    assert!(stdout(&mut c, &a, "ip link").await.contains("mtu 65520"), "the outbound NIC has passt's MTU");
    assert_eq!(stdout(&mut c, &a, "cat /etc/resolv.conf").await, "nameserver 10.0.2.3\n");

    // The host NIC leads to the volume gateway's socket and nowhere else.
    let (gw_ip, gw_port) = GUEST_ADDR.split_once(':').unwrap();
    let r = run(&mut c, &a, &format!("echo ping | nc -w 10 {gw_ip} {gw_port}")).await;
    assert_eq!(String::from_utf8_lossy(&r.stdout), "gateway got ping\n", "{r:?}");

    // The host's loopback is out of reach through either NIC.
    for ip in ["10.0.2.2", "10.0.3.2", "10.0.3.1", "10.0.3.3", "10.0.2.3"] {
        let r = run(&mut c, &a, &format!("echo x | nc -w 3 {ip} {lo_port}")).await;
        assert!(!String::from_utf8_lossy(&r.stdout).contains("LOOPBACK"), "{ip}:{lo_port} reached the host's loopback");
    }
    assert_eq!(lo_hits.load(Ordering::SeqCst), 0, "a guest connection reached the host's loopback");

    // network "none": only the host NIC; a fetch fails at once; the gateway still answers.
    let none =
        c.create_sailbox(pb::CreateSailboxRequest { network: "none".into(), ..minimal(vec![]) }).await.unwrap().into_inner();
    let b = none.sailbox_id.clone();
    assert_eq!(none.network, "none");
    let passt: Vec<String> =
        procs_of(&mut c, dir.path(), &b).await.into_iter().map(cmdline).filter(|c| c.contains("passt")).collect();
    assert!(passt.len() == 1 && passt[0].contains("host-nic.log"), "only the host NIC's passt: {passt:?}");
    let macs = stdout(&mut c, &b, "cat /sys/class/net/*/address").await;
    assert!(macs.contains(HOST_MAC) && !macs.contains(OUTBOUND_MAC), "{macs}");
    let started = Instant::now();
    let r = run(&mut c, &b, &fetch).await;
    assert_ne!(r.return_code, 0, "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "the fetch took {:?} to fail", started.elapsed());
    assert!(!stdout(&mut c, &b, "ip route").await.contains("default"));
    gateway_server(&common::run_dir(dir.path()).join(&b));
    let r = run(&mut c, &b, &format!("echo pong | nc -w 10 {gw_ip} {gw_port}")).await;
    assert_eq!(String::from_utf8_lossy(&r.stdout), "gateway got pong\n", "{r:?}");
    for ip in ["10.0.3.2", "10.0.3.1", "10.0.3.3"] {
        let _ = run(&mut c, &b, &format!("echo x | nc -w 3 {ip} {lo_port}")).await;
    }
    assert_eq!(lo_hits.load(Ordering::SeqCst), 0, "a guest connection reached the host's loopback");
    let e = c.create_sailbox(pb::CreateSailboxRequest { network: "host".into(), ..minimal(vec![]) }).await.unwrap_err();
    assert_eq!(common::error_name(&e), "SailboxCreationError");
    assert!(e.message().contains("network"), "{e:?}");
    c.terminate(pb::TerminateRequest { sailbox_id: b.clone() }).await.unwrap();

    // Sleep and wake (an exec wakes it): a new passt, and outbound still works.
    let before = procs_of(&mut c, dir.path(), &a).await;
    c.sleep(pb::SleepRequest { sailbox_id: a.clone(), call: String::new() }).await.unwrap();
    assert!(procs_of(&mut c, dir.path(), &a).await.is_empty(), "sleep left processes behind");
    let r = run(&mut c, &a, &fetch).await;
    assert_eq!((r.return_code, r.stdout.as_slice()), (0, &body[..]), "after wake: {r:?}");
    let after = procs_of(&mut c, dir.path(), &a).await;
    assert_eq!(after.len(), 3, "both passts and QEMU again");
    assert!(after.iter().all(|p| !before.contains(p)));
    let r = run(&mut c, &a, &format!("echo again | nc -w 10 {gw_ip} {gw_port}")).await;
    assert_eq!(String::from_utf8_lossy(&r.stdout), "gateway got again\n", "{r:?}");

    c.terminate(pb::TerminateRequest { sailbox_id: a }).await.unwrap();
    assert!(common::vm_processes(dir.path()).is_empty());
    drop(c);
    served.stop().await;
}
