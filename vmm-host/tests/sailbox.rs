//! Sailboxes on real VMs (QEMU; TCG on our machines): create, exec, files, ingress, durable
//! exec across a vmm-host restart, terminate, and a VMM dying under a running command. Two
//! boots in all; every wait is on an event (an answer, a routed port), never a fixed sleep.

mod common;

use common::Client;

use std::time::Duration;

use common::{error_name, minimal, read, run, serve, write};
use proto::sailbox as pb;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use chunkstore::testing::pseudo_random as random_bytes;

async fn http_get(url: &str, path: &str) -> String {
    let addr = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sailbox_end_to_end() {
    let dir = common::data_dir();
    // A small console cap, so a guest fills it quickly (the serial port is slow under TCG).
    let served = common::serve_with(dir.path(), |c| c.console_max_bytes = CONSOLE_CAP).await;
    let mut c = served.client().await;
    let id = create_one(&mut c).await;
    exec_basics(&mut c, &id).await;
    files_round_trip(&mut c, &id).await;
    ingress_serves(&mut c, &id).await;
    let mut c = one_exec_at_a_time(c, &served, &id).await;
    timeouts_kill(&mut c, &id).await;
    bad_input_gets_contract_errors(&mut c, &id).await;
    a_chatty_console_stays_bounded(&mut c, dir.path(), &id).await;
    let (served, mut c, url) = restart_keeps_running(c, served, dir.path(), &id).await;
    terminate_leaves_nothing(&mut c, dir.path(), &id, &url).await;
    vmm_death_loses_the_sailbox(&mut c, dir.path()).await;
    drop(c);
    served.stop().await;
    let _ = Duration::ZERO;
}

/// The behaviour version of the agent the guests boot (what `sail-agent --describe` says).
fn agent_schema() -> u32 {
    vmm_host::guest::describe_agent(&vmm_host::guest::default_agent_path()).unwrap().guest_schema_version
}

/// Create: returns once the agent answers.
async fn create_one(c: &mut Client) -> String {
    let sb = c.create_sailbox(minimal(vec![8080])).await.unwrap().into_inner();
    let id = sb.sailbox_id.clone();
    assert_eq!(sb.state, pb::SailboxState::Running as i32);
    assert!(["tcg", "kvm"].contains(&sb.accelerator.as_str()));
    assert_eq!((sb.hypervisor.as_str(), sb.guest_schema_version), ("qemu", agent_schema()));
    assert_eq!(sb.listeners.len(), 1);
    let got = c.get_sailbox(pb::GetSailboxRequest { sailbox_id: id.clone(), connect: false }).await.unwrap().into_inner();
    assert_eq!(got.sailbox_id, id);
    id
}

/// Exec: output, exit codes, stderr.
async fn exec_basics(c: &mut Client, id: &str) {
    let r = run(c, id, "uname -a").await;
    assert_eq!(r.return_code, 0);
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("Linux "), "{:?}", r);
    let r = run(c, id, "echo to-out; echo to-err >&2; exit 3").await;
    assert_eq!((r.return_code, r.stdout.as_slice(), r.stderr.as_slice()), (3, &b"to-out\n"[..], &b"to-err\n"[..]));
    let r = run(c, id, "df -k / | tail -1").await;
    let blocks: u64 = String::from_utf8_lossy(&r.stdout).split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(blocks > 1_500_000, "the root file system was not grown to the 2 GiB disk: {blocks} KiB");
}

/// Files: 64 MiB in and out, checked on both sides.
async fn files_round_trip(c: &mut Client, id: &str) {
    let data = random_bytes(64 << 20, 7);
    assert_eq!(write(c, id, "/data/deep/big.bin", &data).await.unwrap(), data.len() as u64);
    let back = read(c, id, "/data/deep/big.bin").await.unwrap();
    assert!(back == data, "read back differs");
    let r = run(c, id, "sha256sum /data/deep/big.bin").await;
    let guest_hash = String::from_utf8_lossy(&r.stdout).split_whitespace().next().unwrap_or("").to_owned();
    assert_eq!(guest_hash, hex::encode(sha2::Sha256::digest(&data)));
}

/// Ingress: a background web server, reached from the host through its listener.
async fn ingress_serves(c: &mut Client, id: &str) {
    write(c, id, "/www/index.html", b"hello from the guest\n").await.unwrap();
    let bg = pb::ExecRequest {
        sailbox_id: id.to_owned(),
        command: "httpd -f -p 8080 -h /www".into(),
        background: true,
        ..Default::default()
    };
    let h = c.exec(bg).await.unwrap().into_inner();
    let r = c.wait_exec(pb::WaitExecRequest { exec_id: h.exec_id, timeout_ms: 0 }).await.unwrap().into_inner();
    assert_eq!(r.return_code, 0, "the launcher returns at once");
    let req = pb::ListenersRequest { sailbox_id: id.to_owned(), port: 8080, wait_routed_ms: 60_000 };
    let l = c.listeners(req).await.unwrap().into_inner().listeners.remove(0);
    assert!(l.routed, "port 8080 never routed");
    let page = http_get(&l.url, "/index.html").await;
    assert!(page.starts_with("HTTP/1.") && page.ends_with("hello from the guest\n"), "{page}");
}

/// One exec at a time; a request outlives its client and is waited on by id. Returns the
/// new client.
async fn one_exec_at_a_time(mut c: Client, served: &common::Served, id: &str) -> Client {
    let long = pb::ExecRequest { sailbox_id: id.to_owned(), command: "sleep 2; echo slept".into(), ..Default::default() };
    let first = c.exec(long).await.unwrap().into_inner();
    let second = c.exec(pb::ExecRequest { sailbox_id: id.to_owned(), command: "true".into(), ..Default::default() }).await;
    assert_eq!(error_name(&second.unwrap_err()), "SailboxExecAlreadyRunningError");
    drop(c);
    let mut c = served.client().await;
    let r = c.wait_exec(pb::WaitExecRequest { exec_id: first.exec_id.clone(), timeout_ms: 0 }).await.unwrap().into_inner();
    assert_eq!((r.return_code, r.stdout.as_slice()), (0, &b"slept\n"[..]));
    // Waiting again returns the stored result.
    let again = c.wait_exec(pb::WaitExecRequest { exec_id: first.exec_id.clone(), timeout_ms: 0 }).await.unwrap().into_inner();
    assert_eq!(again.stdout, b"slept\n");
    // Waits on finished and on made-up requests keep nothing in the host's tables.
    for i in 0..100 {
        let _ = c.wait_exec(pb::WaitExecRequest { exec_id: first.exec_id.clone(), timeout_ms: 0 }).await.unwrap();
        let e = c.wait_exec(pb::WaitExecRequest { exec_id: format!("ex-made-up-{i}"), timeout_ms: 0 }).await.unwrap_err();
        assert_eq!(error_name(&e), "SailboxExecRequestNotFoundError");
    }
    assert_eq!(served.host.exec_waiters(), 0);
    c
}

/// Timeouts kill the command.
async fn timeouts_kill(c: &mut Client, id: &str) {
    let t = pb::ExecRequest { sailbox_id: id.to_owned(), command: "sleep 60".into(), timeout_ms: 1000, ..Default::default() };
    let h = c.exec(t).await.unwrap().into_inner();
    let r = c.wait_exec(pb::WaitExecRequest { exec_id: h.exec_id, timeout_ms: 0 }).await.unwrap().into_inner();
    assert!(r.timed_out && r.return_code == 124, "{r:?}");
}

/// Bad input gets its contract error.
async fn bad_input_gets_contract_errors(c: &mut Client, id: &str) {
    let e = write(c, id, "relative/path", b"x").await.unwrap_err();
    assert_eq!((e.code(), error_name(&e).as_str()), (tonic::Code::InvalidArgument, "SailboxError"));
    let e = write(c, id, "/a/../b", b"x").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let oversized =
        vec![pb::WriteFileRequest { sailbox_id: id.to_owned(), path: "/big".into(), size: 3 << 30, ..Default::default() }];
    let e = c.write_file(tokio_stream::iter(oversized)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "a write larger than the disk: {e:?}");
    let e = read(c, id, "/no/such/file").await.unwrap_err();
    assert_eq!((e.code(), error_name(&e).as_str()), (tonic::Code::NotFound, "SailboxError"));
    let e = read(c, id, "/www").await.unwrap_err();
    assert_eq!(error_name(&e), "SailboxExecutionError", "reading a directory");
    let e = c
        .exec(pb::ExecRequest { sailbox_id: id.to_owned(), command: "true".into(), cwd: "tmp".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), "SailboxError");
    let e = c
        .exec(pb::ExecRequest {
            sailbox_id: id.to_owned(),
            command: "true".into(),
            cwd: "/nonexistent".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e =
        c.exec(pb::ExecRequest { sailbox_id: "sb-nope".into(), command: "true".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!((e.code(), error_name(&e).as_str()), (tonic::Code::NotFound, "SailboxError"));
    let e = c.wait_exec(pb::WaitExecRequest { exec_id: "ex-nope".into(), timeout_ms: 0 }).await.unwrap_err();
    assert_eq!(error_name(&e), "SailboxExecRequestNotFoundError");
    let e = c.listeners(pb::ListenersRequest { sailbox_id: id.to_owned(), port: 9999, wait_routed_ms: 0 }).await.unwrap_err();
    assert_eq!(error_name(&e), "SailboxExecutionError");
}

/// vmm-host restarts while a command runs: the VM keeps running, the request is re-attached.
/// Returns the new server, its client and the listener's URL.
async fn restart_keeps_running(
    mut c: Client,
    served: common::Served,
    dir: &std::path::Path,
    id: &str,
) -> (common::Served, Client, String) {
    let pending = c
        .exec(pb::ExecRequest { sailbox_id: id.to_owned(), command: "sleep 3; echo survived".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    drop(c);
    served.stop().await;
    let served = serve(dir).await;
    let mut c = served.client().await;
    let r = c.wait_exec(pb::WaitExecRequest { exec_id: pending.exec_id, timeout_ms: 0 }).await.unwrap().into_inner();
    assert_eq!(r.stdout, b"survived\n");
    let sb = c.get_sailbox(pb::GetSailboxRequest { sailbox_id: id.to_owned(), connect: false }).await.unwrap().into_inner();
    assert_eq!(sb.state, pb::SailboxState::Running as i32);
    let l = c.listeners(pb::ListenersRequest { sailbox_id: id.to_owned(), port: 8080, wait_routed_ms: 30_000 }).await.unwrap();
    let l = l.into_inner().listeners.remove(0);
    assert!(http_get(&l.url, "/index.html").await.ends_with("hello from the guest\n"));
    assert_eq!(run(&mut c, id, "echo $((6 * 7))").await.stdout, b"42\n");
    (served, c, l.url)
}

const CONSOLE_CAP: u64 = 64 << 10;

/// A guest printing without end to its serial console: the host's console log is cut down to
/// its tail and never grows past its cap for long.
async fn a_chatty_console_stays_bounded(c: &mut Client, dir: &std::path::Path, id: &str) {
    let log = common::run_dir(dir).join(id).join("console.log");
    let r = common::run(c, id, "head -c 300000 /dev/zero | tr '\\0' x > /dev/console; printf '\\nconsole-end\\n' > /dev/console")
        .await;
    assert_eq!(r.return_code, 0, "{r:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let len = std::fs::metadata(&log).unwrap().len();
        let tail = vmm_host::guest_input::console_tail(&common::run_dir(dir).join(id));
        if len <= CONSOLE_CAP && tail.contains("console-end") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "console.log is {len} bytes; tail {tail:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The guest keeps printing to the same file after the cut.
    common::run(c, id, "printf '\\nafter-the-cut\\n' > /dev/console").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !vmm_host::guest_input::console_tail(&common::run_dir(dir).join(id)).contains("after-the-cut") {
        assert!(std::time::Instant::now() < deadline, "nothing reached the console after the cut");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Terminate leaves nothing behind.
async fn terminate_leaves_nothing(c: &mut Client, dir: &std::path::Path, id: &str, url: &str) {
    let t = c.terminate(pb::TerminateRequest { sailbox_id: id.to_owned() }).await.unwrap().into_inner();
    assert_eq!(t.state, pb::SailboxState::Terminated as i32);
    assert!(common::vm_processes(dir).is_empty(), "VMM processes left: {:?}", common::vm_processes(dir));
    assert!(!common::run_dir(dir).join(id).exists(), "run directory left");
    assert!(tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await.is_err(), "listener left");
    let e =
        c.exec(pb::ExecRequest { sailbox_id: id.to_owned(), command: "true".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(error_name(&e), "SailboxTerminatedError");
    let again = c.terminate(pb::TerminateRequest { sailbox_id: id.to_owned() }).await.unwrap().into_inner();
    assert_eq!(again.state, pb::SailboxState::Terminated as i32);
}

/// A VMM that dies under a running command: the sailbox is lost, the wait says so.
async fn vmm_death_loses_the_sailbox(c: &mut Client, dir: &std::path::Path) {
    let sb = c.create_sailbox(minimal(vec![])).await.unwrap().into_inner();
    let id2 = sb.sailbox_id;
    let doomed = c
        .exec(pb::ExecRequest { sailbox_id: id2.clone(), command: "sleep 600".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let qemu: Vec<_> = common::vm_processes(dir)
        .into_iter()
        .filter(|p| std::fs::read_to_string(format!("/proc/{}/comm", p.pid)).unwrap_or_default().starts_with("qemu"))
        .collect();
    assert_eq!(qemu.len(), 1);
    // SAFETY: signalling a process this test started (through the host).
    unsafe { libc::kill(qemu[0].pid as i32, libc::SIGKILL) };
    let e = c.wait_exec(pb::WaitExecRequest { exec_id: doomed.exec_id, timeout_ms: 60_000 }).await.unwrap_err();
    assert_eq!(error_name(&e), "SailboxWorkerLostError", "{e:?}");
    let sb = c.get_sailbox(pb::GetSailboxRequest { sailbox_id: id2.clone(), connect: false }).await.unwrap().into_inner();
    assert_eq!(sb.state, pb::SailboxState::Lost as i32);
    let e = c.exec(pb::ExecRequest { sailbox_id: id2, command: "true".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(error_name(&e), "SailboxWorkerLostError");
    assert!(common::vm_processes(dir).is_empty(), "processes left after the loss");
}

#[tokio::test]
async fn invalid_create_arguments_create_nothing() {
    let dir = common::data_dir();
    let served = serve(dir.path()).await;
    let mut c = served.client().await;
    let base = minimal(vec![]);
    let cases: Vec<(&str, pb::CreateSailboxRequest)> = vec![
        ("cpu 0 is the default, negative is not", pb::CreateSailboxRequest { cpu: -1.0, ..base.clone() }),
        ("memory below 1024", pb::CreateSailboxRequest { memory_mib: 512, ..base.clone() }),
        ("memory above 65536", pb::CreateSailboxRequest { memory_mib: 70000, ..base.clone() }),
        ("disk above 64", pb::CreateSailboxRequest { disk_gib: 65, ..base.clone() }),
        ("port 22", pb::CreateSailboxRequest { ingress_ports: vec![22], ..base.clone() }),
        ("port 10000", pb::CreateSailboxRequest { ingress_ports: vec![10000], ..base.clone() }),
        ("port 0", pb::CreateSailboxRequest { ingress_ports: vec![0], ..base.clone() }),
        ("port 65536", pb::CreateSailboxRequest { ingress_ports: vec![65536], ..base.clone() }),
        ("duplicate ports", pb::CreateSailboxRequest { ingress_ports: vec![80, 80], ..base.clone() }),
        ("unknown image", pb::CreateSailboxRequest { image: "no-such-image".into(), ..base.clone() }),
        (
            "volume at /",
            pb::CreateSailboxRequest {
                volumes: [("/".to_owned(), pb::VolumeMount { volume: "v".into(), ..Default::default() })].into(),
                ..base.clone()
            },
        ),
        (
            "relative volume path",
            pb::CreateSailboxRequest {
                volumes: [("data".to_owned(), pb::VolumeMount { volume: "v".into(), ..Default::default() })].into(),
                ..base.clone()
            },
        ),
    ];
    for (what, req) in cases {
        let e = c.create_sailbox(req).await.unwrap_err();
        assert_eq!(error_name(&e), "SailboxCreationError", "{what}: {e:?}");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}");
    }
    let all = pb::ListSailboxesRequest { states: (1..=6).collect(), ..Default::default() };
    assert!(c.list_sailboxes(all).await.unwrap().into_inner().sailboxes.is_empty(), "a record was created");
    assert_eq!(std::fs::read_dir(common::run_dir(dir.path())).unwrap().count(), 0);
    assert!(common::vm_processes(dir.path()).is_empty());
    drop(c);
    served.stop().await;
}
