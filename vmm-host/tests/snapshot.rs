//! Checkpoints on real VMs (QEMU; TCG here): in-memory state and disk survive checkpoint,
//! terminate and restore on a fresh vmm-host data directory that shares the chunk store;
//! forks diverge; forking a sleeper leaves it asleep; ingress wakes a sleeper and gets its
//! answer; exec on a paused sailbox fails; upgrade on running and sleeping sailboxes; and the
//! host-failure drill (vmm-host, every VMM and the cowfs daemon killed, then restarted).

mod common;

use common::Client;

use std::time::Duration;

use common::{background, error_name, minimal, read, run, serve, serve_with, write};
use proto::sailbox as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A shell loop that counts in memory (the variable) and shows the count on disk.
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i > /run/count; sleep 0.1; done";

async fn count(c: &mut Client, id: &str) -> u64 {
    // The loop truncates the file before writing it: an empty read is retried.
    for _ in 0..50 {
        let r = run(c, id, "cat /run/count").await;
        if let Ok(n) = String::from_utf8_lossy(&r.stdout).trim().parse() {
            return n;
        }
    }
    panic!("no count in /run/count of {id}")
}

/// Waits (bounded) until the counter has moved past `after`.
async fn count_after(c: &mut Client, id: &str, after: u64) -> u64 {
    for _ in 0..600 {
        let n = count(c, id).await;
        if n > after {
            return n;
        }
    }
    panic!("the counter of {id} did not move past {after}")
}

async fn text(c: &mut Client, id: &str, path: &str) -> String {
    String::from_utf8(read(c, id, path).await.unwrap()).unwrap()
}

async fn state(c: &mut Client, id: &str) -> i32 {
    c.get_sailbox(pb::GetSailboxRequest { sailbox_id: id.into(), connect: false }).await.unwrap().into_inner().state
}

async fn http_get(url: &str) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n").await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(120), s.read_to_string(&mut out)).await.map_err(std::io::Error::other)??;
    Ok(out)
}

/// `chattr -R +i` / `-i`: makes the chunk directory refuse new chunks (even to root).
fn set_immutable(dir: &std::path::Path, on: bool) {
    let flag = if on { "+i" } else { "-i" };
    let st = std::process::Command::new("chattr").arg("-R").arg(flag).arg(dir).status().expect("chattr (e2fsprogs)");
    assert!(st.success(), "chattr {flag} {}", dir.display());
}

fn sid(id: &str) -> pb::SailboxIdRequest {
    pb::SailboxIdRequest { sailbox_id: id.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_fork_sleep_pause_restore() {
    let dir = common::data_dir();
    let served = serve(dir.path()).await;
    let mut c = served.client().await;
    let (a, before) = counting_web_server(&mut c).await;
    let (ck, at_checkpoint) = checkpoints_store_what_changed(&mut c, &a, before).await;
    let (b, view, in_b) = fork_a_running_sailbox(&mut c, dir.path(), &a, at_checkpoint).await;

    // A vmm-host restart re-attaches to the fork on its view (and keeps the view).
    drop(c);
    served.stop().await;
    let served = serve(dir.path()).await;
    let mut c = served.client().await;
    assert!(view.exists(), "a restart keeps the view a running fork maps");
    let in_b = count_after(&mut c, &b, in_b).await;

    fork_a_sleeper(&mut c, dir.path(), &b, in_b, &ck, &view).await;
    exec_wakes_and_upgrade(&mut c, &b).await;
    let url = ingress_and_calls_wake_sleepers(&mut c, &a).await;
    pause_holds_until_resumed(&mut c, &a, &url, at_checkpoint).await;
    failed_pause_loses_nothing(&mut c, dir.path(), &a).await;
    restore_on_a_fresh_data_dir(c, served, dir.path(), &a).await;
}

/// A sailbox running the counter and a web server, with a note on its disk; returns it and
/// a count it reached.
async fn counting_web_server(c: &mut Client) -> (String, u64) {
    let a = c.create_sailbox(minimal(vec![8080])).await.unwrap().into_inner().sailbox_id;
    background(c, &a, COUNTER).await;
    write(c, &a, "/data/note.txt", b"written before the checkpoint\n").await.unwrap();
    write(c, &a, "/www/index.html", b"hello from a\n").await.unwrap();
    background(c, &a, "httpd -f -p 8080 -h /www").await;
    let before = count_after(c, &a, 3).await;

    (a, before)
}

/// Checkpoint while running: the guest keeps going; a second checkpoint stores only what
/// changed. Returns the first checkpoint and a count reached after it.
async fn checkpoints_store_what_changed(c: &mut Client, a: &str, before: u64) -> (pb::Checkpoint, u64) {
    let ck = c.checkpoint_sailbox(sid(a)).await.unwrap().into_inner();
    assert!(ck.checkpoint_id.starts_with("ck-"));
    assert!(ck.memory_bytes_changed > 0 && ck.memory_bytes_uploaded <= ck.memory_bytes_changed, "{ck:?}");
    assert!(ck.memory_bytes_changed < ck.memory_bytes, "only written regions are stored: {ck:?}");
    let at_checkpoint = count_after(c, a, before).await;
    let ck2 = c.checkpoint_sailbox(sid(a)).await.unwrap().into_inner();
    assert_eq!(ck2.parent_checkpoint, ck.checkpoint_id);
    assert!(
        ck2.memory_bytes_changed < ck.memory_bytes_changed,
        "the second checkpoint stores only what changed since the first: {ck2:?} vs {ck:?}"
    );

    (ck, at_checkpoint)
}

/// Fork a running sailbox: two independent machines from one state. Returns the child, the
/// checkpoint's memory view it maps and a count it reached.
async fn fork_a_running_sailbox(
    c: &mut Client,
    dir: &std::path::Path,
    a: &str,
    at_checkpoint: u64,
) -> (String, std::path::PathBuf, u64) {
    let fork = c.fork(sid(a)).await.unwrap().into_inner();
    let b = fork.child.unwrap().sailbox_id;
    assert_ne!(a, b);
    // The child maps the checkpoint's shared memory view privately: no memory file of its own.
    let mnt = dir.join("vmm/cowfs/mnt");
    let view = mnt.join(format!("{}.mem", fork.checkpoint.as_ref().unwrap().checkpoint_id));
    assert!(view.exists(), "the fork maps the checkpoint's view");
    assert!(!mnt.join(format!("{b}.mem")).exists() && mnt.join(format!("{b}.disk")).exists());
    let in_b = count(c, &b).await;
    assert!(in_b >= at_checkpoint, "the child's counter carries on from the parent's memory ({in_b} < {at_checkpoint})");
    assert_eq!(text(c, &b, "/data/note.txt").await, "written before the checkpoint\n");
    write(c, a, "/data/who", b"a").await.unwrap();
    write(c, &b, "/data/who", b"b").await.unwrap();
    assert_eq!(text(c, a, "/data/who").await, "a");
    assert_eq!(text(c, &b, "/data/who").await, "b");
    let host_a = run(c, a, "hostname").await.stdout;
    let host_b = run(c, &b, "hostname").await.stdout;
    assert_ne!(host_a, host_b, "each fork has its own hostname");
    let rand_a = run(c, a, "head -c 16 /dev/urandom | od -An -tx1").await.stdout;
    let rand_b = run(c, &b, "head -c 16 /dev/urandom | od -An -tx1").await.stdout;
    assert_ne!(rand_a, rand_b);

    (b, view, in_b)
}

/// Fork a sleeping sailbox: the child runs, the parent stays asleep. The child's sleep
/// saves all of its (private) memory; its counter goes on in the grandchild.
async fn fork_a_sleeper(c: &mut Client, dir: &std::path::Path, b: &str, in_b: u64, ck: &pb::Checkpoint, view: &std::path::Path) {
    let b_before_sleep = count_after(c, b, in_b).await;
    c.sleep(pb::SleepRequest { sailbox_id: b.to_owned(), call: String::new() }).await.unwrap();
    assert_eq!(state(c, b).await, pb::SailboxState::Sleeping as i32);
    assert!(!view.exists(), "the view goes with the last VM mapping it");
    let fork_b = c.fork(sid(b)).await.unwrap().into_inner();
    let ck_b = fork_b.checkpoint.unwrap();
    assert!(
        ck_b.memory_bytes_uploaded <= ck_b.memory_bytes_changed && ck_b.memory_bytes_changed < ck.memory_bytes_changed,
        "a fork's checkpoint stores what the fork changed, not all its memory: {ck_b:?} vs the first {ck:?}"
    );
    let grandchild = fork_b.child.unwrap().sailbox_id;
    count_after(c, &grandchild, b_before_sleep).await;
    assert_eq!(text(c, &grandchild, "/data/who").await, "b");
    // A sleep whose chunks cannot be stored fails and loses nothing: the guest runs on.
    // (The grandchild is a fork: its memory goes through the mapped-ram path.)
    let chunks = dir.join("vmm/chunks");
    let at = count(c, &grandchild).await;
    set_immutable(&chunks, true);
    let failed = c.sleep(pb::SleepRequest { sailbox_id: grandchild.clone(), call: String::new() }).await;
    set_immutable(&chunks, false);
    let e = failed.expect_err("a sleep that cannot store its checkpoint must fail");
    assert_eq!(error_name(&e), "SailboxCreationError", "{e:?}");
    assert_eq!(state(c, &grandchild).await, pb::SailboxState::Running as i32);
    count_after(c, &grandchild, at).await;
    assert_eq!(state(c, b).await, pb::SailboxState::Sleeping as i32, "forking a sleeper must not wake it");
    c.terminate(pb::TerminateRequest { sailbox_id: grandchild.clone() }).await.unwrap();
}

/// An exec wakes a sleeper; upgrade of a current agent needs no reboot, of a sleeper waits
/// for its wake.
async fn exec_wakes_and_upgrade(c: &mut Client, b: &str) {
    assert_eq!(run(c, b, "cat /data/who").await.stdout, b"b");
    assert_eq!(state(c, b).await, pb::SailboxState::Running as i32);
    let up = c.upgrade(sid(b)).await.unwrap().into_inner();
    assert!(up.applied);
    c.sleep(pb::SleepRequest { sailbox_id: b.to_owned(), call: String::new() }).await.unwrap();
    let up = c.upgrade(sid(b)).await.unwrap().into_inner();
    assert!(!up.applied && up.sailbox.unwrap().pending_upgrade, "recorded for the next wake");
    let woken = c.resume(sid(b)).await.unwrap().into_inner();
    assert!(!woken.pending_upgrade && woken.state == pb::SailboxState::Running as i32);
    assert_eq!(text(c, b, "/data/who").await, "b", "an upgrade reboots on the same disk");
    c.terminate(pb::TerminateRequest { sailbox_id: b.to_string() }).await.unwrap();
}

/// Sleep, then an HTTP request to the listener wakes it and gets its answer; a sleep during
/// an external call ends when the call completes. Returns the listener's URL.
async fn ingress_and_calls_wake_sleepers(c: &mut Client, a: &str) -> String {
    let url =
        c.get_sailbox(pb::GetSailboxRequest { sailbox_id: a.to_owned(), connect: false }).await.unwrap().into_inner().listeners
            [0]
        .url
        .clone();
    c.sleep(pb::SleepRequest { sailbox_id: a.to_owned(), call: "llm-call-1".into() }).await.unwrap();
    assert_eq!(state(c, a).await, pb::SailboxState::Sleeping as i32);
    let page = http_get(&url).await.unwrap();
    assert!(page.ends_with("hello from a\n"), "{page}");
    assert_eq!(state(c, a).await, pb::SailboxState::Running as i32);
    // Sleep during an external call: completing the call wakes it.
    c.sleep(pb::SleepRequest { sailbox_id: a.to_owned(), call: "llm-call-2".into() }).await.unwrap();
    let e = c.complete_call(pb::CompleteCallRequest { sailbox_id: a.to_owned(), call: "other".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let sb = c
        .complete_call(pb::CompleteCallRequest { sailbox_id: a.to_owned(), call: "llm-call-2".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sb.state, pb::SailboxState::Running as i32);

    url
}

/// Pause: exec fails with the execution error, ingress does not wake it; connect resumes.
async fn pause_holds_until_resumed(c: &mut Client, a: &str, url: &str, at_checkpoint: u64) {
    c.pause(sid(a)).await.unwrap();
    let e = c.exec(pb::ExecRequest { sailbox_id: a.to_owned(), command: "true".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(error_name(&e), "SailboxExecutionError");
    assert!(http_get(url).await.map(|p| p.is_empty()).unwrap_or(true), "a paused sailbox answered");
    assert_eq!(state(c, a).await, pb::SailboxState::Paused as i32);
    let resumed = c.get_sailbox(pb::GetSailboxRequest { sailbox_id: a.to_owned(), connect: true }).await.unwrap().into_inner();
    assert_eq!(resumed.state, pb::SailboxState::Running as i32, "connect resumes");
    count_after(c, a, at_checkpoint).await;
}

/// A pause whose chunks cannot be stored fails and loses nothing, for a sailbox with its own
/// memory file (exported by cowfs).
async fn failed_pause_loses_nothing(c: &mut Client, dir: &std::path::Path, a: &str) {
    let chunks = dir.join("vmm/chunks");
    let at = count(c, a).await;
    set_immutable(&chunks, true);
    let failed = c.pause(sid(a)).await;
    set_immutable(&chunks, false);
    assert_eq!(error_name(&failed.expect_err("a pause that cannot store its checkpoint must fail")), "SailboxCreationError");
    assert_eq!(state(c, a).await, pb::SailboxState::Running as i32);
    count_after(c, a, at).await;
}

/// Checkpoint, terminate, restore on a fresh data directory sharing the chunk store.
async fn restore_on_a_fresh_data_dir(mut c: Client, served: common::Served, dir: &std::path::Path, a: &str) {
    let last = c.checkpoint_sailbox(sid(a)).await.unwrap().into_inner();
    let counted = count(&mut c, a).await;
    c.terminate(pb::TerminateRequest { sailbox_id: a.to_string() }).await.unwrap();
    drop(c);
    served.stop().await;
    let fresh = common::data_dir();
    let chunks = dir.join("vmm/chunks");
    let served = serve_with(fresh.path(), |cfg| cfg.chunks_dir = chunks.clone()).await;
    let mut c = served.client().await;
    let req = pb::RestoreRequest { checkpoint_id: last.checkpoint_id.clone(), ..Default::default() };
    let r = c.restore_sailbox(req).await.unwrap().into_inner().sailbox_id;
    let restored = count_after(&mut c, &r, 0).await;
    assert!(restored + 20 >= counted, "the counter goes on from the checkpoint ({restored} vs {counted} at it)");
    assert_eq!(text(&mut c, &r, "/data/note.txt").await, "written before the checkpoint\n");
    // Tenancy: another org sees none of it (issue 19, item 2).
    let exec = c.exec(pb::ExecRequest { sailbox_id: r.clone(), command: "true".into(), ..Default::default() }).await.unwrap();
    let app = c.get_sailbox(pb::GetSailboxRequest { sailbox_id: r.clone(), connect: false }).await.unwrap().into_inner().app;
    common::assert_invisible_to_another_org(&served, &r, &exec.into_inner().exec_id, &last.checkpoint_id, &app).await;
    let e = c.restore_sailbox(pb::RestoreRequest { checkpoint_id: "ck-00".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // The checkpoint's own record, unsealed, stored as a chunk (what a guest can plant: its
    // disk regions are stored verbatim) is no checkpoint (vmm_host::seal).
    {
        use chunkstore::Backend;
        let store = chunkstore::LocalBackend::open(&chunks).unwrap();
        let sealed = store.get(last.checkpoint_id.strip_prefix("ck-").unwrap().parse().unwrap()).await.unwrap();
        let planted = sealed.slice(sealed.iter().position(|&b| b == b'{').unwrap()..);
        let planted_id = chunkstore::ChunkId::of(&planted);
        store.put(planted_id, planted).await.unwrap();
        let req = pb::RestoreRequest { checkpoint_id: format!("ck-{}", planted_id.to_hex()), ..Default::default() };
        let e = c.restore_sailbox(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        // Ports a restore asks for are checked like create's.
        let req = pb::RestoreRequest { checkpoint_id: last.checkpoint_id.clone(), ingress_ports: vec![22], ..Default::default() };
        assert_eq!(c.restore_sailbox(req).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
    c.terminate(pb::TerminateRequest { sailbox_id: r.clone() }).await.unwrap();
    assert!(common::vm_processes(fresh.path()).is_empty());
    drop(c);
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_failure_drill() {
    let dir = common::data_dir();
    let served = serve(dir.path()).await;
    let mut c = served.client().await;
    // `running`: checkpointed, then a command that starts after the checkpoint.
    let running = c.create_sailbox(minimal(vec![])).await.unwrap().into_inner().sailbox_id;
    write(&mut c, &running, "/data/kept", b"before").await.unwrap();
    c.checkpoint_sailbox(sid(&running)).await.unwrap();
    let after = c
        .exec(pb::ExecRequest { sailbox_id: running.clone(), command: "sleep 600".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    write(&mut c, &running, "/data/lost", b"after the checkpoint").await.unwrap();
    // `paused`: paused (a checkpoint).
    let paused = c.create_sailbox(minimal(vec![])).await.unwrap().into_inner().sailbox_id;
    write(&mut c, &paused, "/data/p", b"paused").await.unwrap();
    c.pause(sid(&paused)).await.unwrap();
    // `bare`: running, never checkpointed, with a command in flight.
    let bare = c.create_sailbox(minimal(vec![])).await.unwrap().into_inner().sailbox_id;
    let bare_exec = c
        .exec(pb::ExecRequest { sailbox_id: bare.clone(), command: "sleep 600".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();

    // The host dies: vmm-host, every VMM, and the cowfs daemon, all at once.
    drop(c);
    served.stop().await;
    for p in common::vm_processes(dir.path()) {
        // SAFETY: signalling processes this test started.
        unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
    }
    for p in vmm_host::procs::find_by_cmdline(&format!("{}", dir.path().join("vmm/cowfs").display())) {
        // SAFETY: as above.
        unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
    }

    let served = serve(dir.path()).await;
    let mut c = served.client().await;
    assert_eq!(state(&mut c, &running).await, pb::SailboxState::Running as i32);
    assert_eq!(text(&mut c, &running, "/data/kept").await, "before");
    let gone = read(&mut c, &running, "/data/lost").await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound, "nothing after the checkpoint is replayed");
    let e = c.wait_exec(pb::WaitExecRequest { exec_id: after.exec_id, timeout_ms: 60_000 }).await.unwrap_err();
    assert_eq!(error_name(&e), "SailboxWorkerLostError", "a command started after the checkpoint is not replayed");
    assert_eq!(state(&mut c, &paused).await, pb::SailboxState::Paused as i32);
    c.resume(sid(&paused)).await.unwrap();
    assert_eq!(text(&mut c, &paused, "/data/p").await, "paused");
    assert_eq!(state(&mut c, &bare).await, pb::SailboxState::Lost as i32);
    let e = c.wait_exec(pb::WaitExecRequest { exec_id: bare_exec.exec_id, timeout_ms: 60_000 }).await.unwrap_err();
    assert_eq!(error_name(&e), "SailboxWorkerLostError");
    for id in [&running, &paused] {
        c.terminate(pb::TerminateRequest { sailbox_id: (id).to_string() }).await.unwrap();
    }
    assert!(common::vm_processes(dir.path()).is_empty());
    drop(c);
    served.stop().await;
}
