//! Volumes inside sailboxes, on real VMs: a real volumed, two Debian sailboxes mounting the
//! same volume through their gateways, the in-guest SDK committing and reloading, the host
//! reading what the guests committed, a helper killed and restarted, a guest trying another
//! volume, and the mounts across sleep, wake and fork. One test shares the built image and the
//! booted VMs (boots cost tens of seconds under TCG).

mod common;

use common::Client;

use std::time::{Duration, Instant};

use common::{background, error_name, run, serve_with};
use proto::sailbox as pb;
use volume_client::VolumeClient;

const ORG: &str = "default";
const VOLUME: &str = "shared-data";

fn mounts(path: &str, volume: &str, mint: bool) -> std::collections::HashMap<String, pb::VolumeMount> {
    [(path.to_owned(), pb::VolumeMount { volume: volume.into(), org: String::new(), mint_if_missing: mint })].into()
}

fn request(name: &str, path: &str, mint: bool) -> pb::CreateSailboxRequest {
    pb::CreateSailboxRequest { app: "tests".into(), name: name.into(), volumes: mounts(path, VOLUME, mint), ..Default::default() }
}

/// Runs `command` and returns its stdout, failing with its output when it exits non-zero.
async fn ok(c: &mut Client, id: &str, command: &str) -> String {
    let r = run(c, id, command).await;
    assert_eq!(
        r.return_code,
        0,
        "{command}: stdout {} stderr {}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).trim().to_owned()
}

fn commit_py(path: &str) -> String {
    format!("python3 -c 'import sail; print(sail.Volume.from_mount(\"{path}\").commit())'")
}

fn reload_py(path: &str) -> String {
    format!("python3 -c 'import sail; print(sail.Volume.from_mount(\"{path}\").reload())'")
}

async fn info(c: &mut Client, id: &str) -> pb::Sailbox {
    c.get_sailbox(pb::GetSailboxRequest { sailbox_id: id.into(), connect: false }).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_shared_by_two_sailboxes_and_the_host() {
    let dir = common::data_dir();
    let config = volumed::server::ServerConfig::local(dir.path().join("volumed"), "127.0.0.1:0".parse().unwrap());
    let volumed = volumed::server::Server::bind(config).await.unwrap().spawn();
    let endpoint = volumed.endpoint();
    let key = volumed.operator_key().clone();
    let served = serve_with(dir.path(), |c| {
        c.volumed_endpoint = Some(endpoint);
        c.volumed_key = Some(key);
    })
    .await;
    let mut c = served.client().await;
    let mut host = VolumeClient::connect_with_key(&volumed.endpoint(), Some(volumed.operator_key())).await.unwrap();

    // Refused before anything is made: an unknown volume without minting, too many mounts.
    let e = c.create_sailbox(request("w0", "/mnt/shared", false)).await.unwrap_err();
    assert_eq!(error_name(&e), "SailboxCreationError", "{e:?}");
    assert!(e.message().contains("does not exist"), "{e:?}");
    let many = (0..17).map(|i| (format!("/mnt/v{i}"), pb::VolumeMount { volume: format!("v{i}"), ..Default::default() }));
    let e =
        c.create_sailbox(pb::CreateSailboxRequest { volumes: many.collect(), ..request("w0", "/x", true) }).await.unwrap_err();
    assert_eq!(error_name(&e), "SailboxCreationError");
    assert!(host.get_volume(ORG, VOLUME, false).await.is_err(), "a refused create minted the volume");

    // Two sailboxes mount the same volume (the first mints it); create returns mounted.
    let a = c.create_sailbox(request("worker-1", "/mnt/shared", true)).await.unwrap().into_inner().sailbox_id;
    let b = c.create_sailbox(request("worker-2", "/mnt/s", false)).await.unwrap().into_inner().sailbox_id;
    let ia = info(&mut c, &a).await;
    assert_eq!(ia.mounts.len(), 1, "{ia:?}");
    assert_eq!(
        (ia.mounts[0].path.as_str(), ia.mounts[0].volume.as_str(), ia.mounts[0].state.as_str()),
        ("/mnt/shared", VOLUME, "mounted")
    );

    // A commits with the in-guest SDK; the host and B (after a reload) see it.
    let commit = ok(&mut c, &a, &format!("echo '{{}}' > /mnt/shared/nb.ipynb && {}", commit_py("/mnt/shared"))).await;
    assert_eq!(host.head(ORG, VOLUME).await.unwrap().commit, commit);
    assert_eq!(host.read_file(ORG, VOLUME, "nb.ipynb").await.unwrap(), b"{}\n");
    let reloaded = ok(&mut c, &b, &reload_py("/mnt/s")).await;
    assert_eq!(reloaded, commit);
    assert_eq!(ok(&mut c, &b, "cat /mnt/s/nb.ipynb").await, "{}");

    // Concurrent commits to different paths merge.
    ok(&mut c, &a, &format!("echo a > /mnt/shared/a.txt && {}", commit_py("/mnt/shared"))).await;
    ok(&mut c, &b, &format!("echo b > /mnt/s/b.txt && {}", commit_py("/mnt/s"))).await;
    assert_eq!(host.read_file(ORG, VOLUME, "a.txt").await.unwrap(), b"a\n");
    assert_eq!(host.read_file(ORG, VOLUME, "b.txt").await.unwrap(), b"b\n");

    // Without a helper for the path the SDK says so.
    let r = ok(
        &mut c,
        &a,
        "python3 -c 'import sail\ntry:\n    sail.Volume.from_mount(\"/root\")\nexcept sail.VolumeFuseUnavailableError:\n    print(\"unavailable\")'",
    )
    .await;
    assert_eq!(r, "unavailable");

    // A guest cannot reach a volume it did not mount, even by running a helper of its own.
    host.get_volume(ORG, "private", true).await.unwrap();
    let r = run(
        &mut c,
        &a,
        "mkdir -p /tmp/m && timeout 60 /run/sail/sail-volume-fuse --endpoint http://10.0.3.2:7420 \
         --cache-dir /tmp/c --overlay-dir /tmp/o --control-socket /tmp/x.sock private /tmp/m",
    )
    .await;
    assert_ne!(r.return_code, 0);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("not found") || stderr.contains("NotFound"), "{stderr}");

    // Sleep and wake: the mount reads and commits afterwards, with what was uncommitted.
    ok(&mut c, &a, "echo asleep > /mnt/shared/asleep.txt").await;
    c.sleep(pb::SleepRequest { sailbox_id: a.clone(), call: String::new() }).await.unwrap();
    let commit = ok(&mut c, &a, &format!("cat /mnt/shared/nb.ipynb >/dev/null && {}", commit_py("/mnt/shared"))).await;
    assert_eq!(host.read_file(ORG, VOLUME, "asleep.txt").await.unwrap(), b"asleep\n");
    assert_eq!(host.head(ORG, VOLUME).await.unwrap().commit, commit);

    // A fork keeps the mount; it and its parent commit their own changes, which merge.
    let child = c.fork(pb::SailboxIdRequest { sailbox_id: a.clone() }).await.unwrap().into_inner().child.unwrap().sailbox_id;
    ok(&mut c, &child, &format!("echo c > /mnt/shared/child.txt && {}", commit_py("/mnt/shared"))).await;
    ok(&mut c, &a, &format!("echo p > /mnt/shared/parent.txt && {}", commit_py("/mnt/shared"))).await;
    assert_eq!(host.read_file(ORG, VOLUME, "child.txt").await.unwrap(), b"c\n");
    assert_eq!(host.read_file(ORG, VOLUME, "parent.txt").await.unwrap(), b"p\n");

    // The helper dies: the agent restarts it; uncommitted data on the guest disk survives.
    ok(&mut c, &a, "echo pending > /mnt/shared/pending.txt && sync /mnt/shared/pending.txt && kill -9 $(pidof sail-volume-fuse)")
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = info(&mut c, &a).await.mounts.remove(0);
        if m.restarts >= 1 && m.state == "mounted" {
            break;
        }
        assert!(Instant::now() < deadline, "the helper was not restarted: {m:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(ok(&mut c, &a, "cat /mnt/shared/pending.txt").await, "pending");
    let m = info(&mut c, &a).await.mounts.remove(0);
    assert!(m.dirty_bytes > 0, "{m:?}");

    for id in [a, b, child] {
        c.terminate(pb::TerminateRequest { sailbox_id: id }).await.unwrap();
    }
    assert!(common::vm_processes(dir.path()).is_empty());
    drop(c);
    served.stop().await;
}

// ---------------------------------------------------------------------------------------
// A mounted volume across pause, checkpoint and restore, host failure and faults.

const MNT: &str = "/mnt/v";

/// The CLI every image has: commit or reload the mount, printing the commit id.
fn cli(op: &str) -> String {
    format!("timeout 300 /run/sail/sail-volume-fuse {op} {MNT}")
}

/// Commits the mount from the guest and checks the host sees the new head.
async fn guest_commit(c: &mut Client, host: &mut VolumeClient, id: &str, volume: &str) -> String {
    let commit = ok(c, id, &cli("commit")).await;
    assert_eq!(host.head(ORG, volume).await.unwrap().commit, commit, "the guest's commit is the head");
    commit
}

/// Waits (bounded) until the sailbox's only mount is `mounted` after at least `restarts`
/// helper restarts; returns it.
async fn mounted(c: &mut Client, id: &str, restarts: u32) -> pb::MountStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // No mounts while the VM is (re)starting.
        let sb = info(c, id).await;
        assert!(sb.mounts.len() <= 1, "{sb:?}");
        if let Some(m) = sb.mounts.first()
            && m.state == "mounted"
            && m.restarts >= restarts
        {
            assert_eq!(m.path, MNT);
            return m.clone();
        }
        assert!(Instant::now() < deadline, "the mount is not mounted (restarts >= {restarts}): {sb:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The pid of the sailbox VM's QEMU among the processes under `dir`.
fn qemu_pid(dir: &std::path::Path) -> u32 {
    let qemu: Vec<u32> = common::vm_processes(dir)
        .into_iter()
        .map(|p| p.pid)
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("qemu")))
        .collect();
    assert_eq!(qemu.len(), 1, "one QEMU under {}: {qemu:?}", dir.display());
    qemu[0]
}

fn kill9(pid: u32) {
    // SAFETY: signalling a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0, "kill -9 {pid}");
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// `len` bytes no chunker dedups (xorshift).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Binds volumed again on `addr` and `dir` (retrying while the old one lets go of its
/// port and its metadata store).
async fn restart_volumed(dir: &std::path::Path, addr: std::net::SocketAddr) -> volumed::server::RunningServer {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match volumed::server::Server::bind(volumed::server::ServerConfig::local(dir, addr)).await {
            Ok(s) => return s.spawn(),
            Err(e) => {
                assert!(Instant::now() < deadline, "volumed did not start again on {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// One minimal sailbox with a mounted volume (uncommitted changes written before each
/// step): pause and resume; checkpoint, terminate and restore on a fresh data directory;
/// vmm-host restarted while the VM runs (re-attach); QEMU killed with vmm-host down and with
/// vmm-host up (restart from the last checkpoint); the helper killed mid-commit; volumed
/// restarted during a cold read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_across_snapshots_host_failure_and_faults() {
    const VOL: &str = "faults";
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let dir = common::data_dir();
    let volumed_dir = dir.path().join("volumed");
    let config = volumed::server::ServerConfig::local(&volumed_dir, "127.0.0.1:0".parse().unwrap());
    let mut volumed = volumed::server::Server::bind(config).await.unwrap().spawn();
    let (volumed_addr, endpoint) = (volumed.addr, volumed.endpoint());
    let e = endpoint.clone();
    let key = volumed.operator_key().clone();
    let k = key.clone();
    let served = serve_with(dir.path(), |c| {
        c.volumed_endpoint = Some(e);
        c.volumed_key = Some(k);
    })
    .await;
    let mut c = served.client().await;
    let mut host = VolumeClient::connect_with_key(&endpoint, Some(&key)).await.unwrap();

    let req = pb::CreateSailboxRequest { name: "faults".into(), volumes: mounts(MNT, VOL, true), ..common::minimal(vec![]) };
    let a = c.create_sailbox(req).await.unwrap().into_inner().sailbox_id;
    mounted(&mut c, &a, 0).await;
    ok(&mut c, &a, &format!("echo init > {MNT}/init.txt")).await;
    guest_commit(&mut c, &mut host, &a, VOL).await;
    step("created and committed");

    // 1. Pause, resume: the mount reads, the uncommitted file is there, a commit lands.
    ok(&mut c, &a, &format!("echo paused > {MNT}/paused.txt")).await;
    c.pause(pb::SailboxIdRequest { sailbox_id: a.clone() }).await.unwrap();
    c.resume(pb::SailboxIdRequest { sailbox_id: a.clone() }).await.unwrap();
    assert_eq!(ok(&mut c, &a, &format!("cat {MNT}/init.txt {MNT}/paused.txt")).await, "init\npaused");
    guest_commit(&mut c, &mut host, &a, VOL).await;
    assert_eq!(host.read_file(ORG, VOL, "paused.txt").await.unwrap(), b"paused\n");
    mounted(&mut c, &a, 0).await;
    step("pause and resume");

    // 2. Checkpoint, terminate, restore on a fresh data directory sharing the chunk store:
    // the restored guest's mount has the uncommitted change and commits.
    ok(&mut c, &a, &format!("echo checkpointed > {MNT}/ck.txt")).await;
    let ck = c.checkpoint_sailbox(pb::SailboxIdRequest { sailbox_id: a.clone() }).await.unwrap().into_inner();
    c.terminate(pb::TerminateRequest { sailbox_id: a.clone() }).await.unwrap();
    drop(c);
    served.stop().await;
    let fresh = common::data_dir();
    let chunks = dir.path().join("vmm/chunks");
    let serve_fresh = || {
        let (chunks, endpoint, key) = (chunks.clone(), endpoint.clone(), key.clone());
        serve_with(fresh.path(), move |cfg| {
            cfg.chunks_dir = chunks;
            cfg.volumed_endpoint = Some(endpoint);
            cfg.volumed_key = Some(key);
        })
    };
    let served = serve_fresh().await;
    let mut c = served.client().await;
    let req = pb::RestoreRequest { checkpoint_id: ck.checkpoint_id.clone(), ..Default::default() };
    let r = c.restore_sailbox(req).await.unwrap().into_inner().sailbox_id;
    let m = mounted(&mut c, &r, 0).await;
    assert!(m.dirty_bytes > 0, "the uncommitted change is still uncommitted: {m:?}");
    assert_eq!(ok(&mut c, &r, &format!("cat {MNT}/paused.txt {MNT}/ck.txt")).await, "paused\ncheckpointed");
    guest_commit(&mut c, &mut host, &r, VOL).await;
    assert_eq!(host.read_file(ORG, VOL, "ck.txt").await.unwrap(), b"checkpointed\n");
    step("checkpoint, terminate, restore on a fresh data dir");

    // 3a. vmm-host stops while the VM runs; a new one re-attaches: the mount commits.
    ok(&mut c, &r, &format!("echo reattached > {MNT}/reattach.txt")).await;
    drop(c);
    served.stop().await;
    let served = serve_fresh().await;
    let mut c = served.client().await;
    assert_eq!(info(&mut c, &r).await.state, pb::SailboxState::Running as i32);
    let m = mounted(&mut c, &r, 0).await;
    assert!(m.dirty_bytes > 0, "the uncommitted change is still uncommitted: {m:?}");
    guest_commit(&mut c, &mut host, &r, VOL).await;
    assert_eq!(host.read_file(ORG, VOL, "reattach.txt").await.unwrap(), b"reattached\n");
    step("vmm-host restart (re-attach)");

    // 3b. The host fails: vmm-host down and QEMU killed; the new vmm-host starts the sailbox
    // from its last checkpoint (its memory: the helper carries on). What was written after
    // that checkpoint is gone; what was uncommitted at it is there and commits.
    ok(&mut c, &r, &format!("echo at-checkpoint > {MNT}/b1.txt")).await;
    c.checkpoint_sailbox(pb::SailboxIdRequest { sailbox_id: r.clone() }).await.unwrap();
    ok(&mut c, &r, &format!("echo after-checkpoint > {MNT}/b2.txt")).await;
    drop(c);
    served.stop().await;
    kill9(qemu_pid(fresh.path()));
    let served = serve_fresh().await;
    let mut c = served.client().await;
    let sb = info(&mut c, &r).await;
    assert_eq!(sb.state, pb::SailboxState::Running as i32, "{sb:?}");
    assert!(sb.state_reason.contains("restored from checkpoint"), "{sb:?}");
    let m = mounted(&mut c, &r, 0).await;
    assert!(m.dirty_bytes > 0, "the uncommitted change is still uncommitted: {m:?}");
    assert_eq!(ok(&mut c, &r, &format!("cat {MNT}/b1.txt; ls {MNT}")).await.lines().next(), Some("at-checkpoint"));
    assert_ne!(run(&mut c, &r, &format!("cat {MNT}/b2.txt")).await.return_code, 0, "written after the checkpoint");
    guest_commit(&mut c, &mut host, &r, VOL).await;
    assert_eq!(host.read_file(ORG, VOL, "b1.txt").await.unwrap(), b"at-checkpoint\n");
    step("QEMU killed with vmm-host down");

    // 3b'. QEMU dies under a running vmm-host: it restarts the sailbox from that checkpoint.
    ok(&mut c, &r, &format!("echo again > {MNT}/b3.txt")).await;
    kill9(qemu_pid(fresh.path()));
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        // Restarted from the checkpoint: running again, with the reason saying why.
        let sb = info(&mut c, &r).await;
        if sb.state == pb::SailboxState::Running as i32 && sb.state_reason.contains("exited unexpectedly") {
            break;
        }
        assert!(Instant::now() < deadline, "the sailbox was not restarted: {sb:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    mounted(&mut c, &r, 0).await;
    ok(&mut c, &r, &format!("echo once-more > {MNT}/b4.txt")).await;
    guest_commit(&mut c, &mut host, &r, VOL).await;
    assert_eq!(host.read_file(ORG, VOL, "b4.txt").await.unwrap(), b"once-more\n");
    assert_eq!(host.read_file(ORG, VOL, "b1.txt").await.unwrap(), b"at-checkpoint\n");
    step("QEMU killed under a running vmm-host");

    // 4. The helper is killed mid-commit of ~100 MiB: the head is the old one or a complete
    // commit; the restarted helper's next commit holds the file.
    let restarts = mounted(&mut c, &r, 0).await.restarts;
    let sum = ok(
        &mut c,
        &r,
        &format!("dd if=/dev/urandom of={MNT}/big bs=1M count=100 conv=fsync 2>/dev/null && sha256sum {MNT}/big | cut -d' ' -f1"),
    )
    .await;
    let before = host.head(ORG, VOL).await.unwrap().commit;
    background(&mut c, &r, &format!("{} > /tmp/commit.out 2>&1; echo $? > /tmp/commit.rc", cli("commit"))).await;
    let killed = ok(
        &mut c,
        &r,
        "sleep 2; if [ -e /tmp/commit.rc ]; then echo finished; else echo running; fi; kill -9 $(pidof sail-volume-fuse)",
    )
    .await;
    assert_eq!(killed, "running", "the commit finished before the kill");
    let after = host.head(ORG, VOL).await.unwrap().commit;
    let rc = ok(&mut c, &r, "sleep 1; cat /tmp/commit.rc").await;
    eprintln!("the killed commit exited {rc}; the head {}", if after == before { "did not move" } else { "moved" });
    if after != before {
        let big = host.read_file(ORG, VOL, "big").await.unwrap();
        assert_eq!(sha256_hex(&big), sum, "the head moved to a commit with a partial file");
    }
    mounted(&mut c, &r, restarts + 1).await;
    assert_eq!(ok(&mut c, &r, &format!("sha256sum {MNT}/big | cut -d' ' -f1")).await, sum);
    let started = Instant::now();
    guest_commit(&mut c, &mut host, &r, VOL).await;
    eprintln!("the 100 MiB commit took {:?}", started.elapsed());
    assert_eq!(sha256_hex(&host.read_file(ORG, VOL, "big").await.unwrap()), sum);
    step("helper killed mid-commit");

    // 5. volumed restarts during a cold read: the read ends (done or an I/O error) within
    // bounded time; a fresh read afterwards has the right bytes.
    let huge = noise(256 << 20, 0x5eed);
    let huge_sum = sha256_hex(&huge);
    let base = host.head(ORG, VOL).await.unwrap().commit;
    let files = vec![volume_client::FileUpload::from_bytes("huge", huge, 0o644)];
    let committed = host.commit_files(ORG, VOL, &base, files, &[]).await.unwrap();
    drop(committed);
    ok(&mut c, &r, &cli("reload")).await;
    background(&mut c, &r, &format!("cat {MNT}/huge > /dev/null; echo $? > /tmp/read.rc")).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(run(&mut c, &r, "cat /tmp/read.rc").await.return_code, 0, "the read finished before volumed stopped");
    let stopped = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), volumed.stop()).await.expect("volumed stops within 60 s").unwrap();
    step("volumed stopped");
    tokio::time::sleep(Duration::from_secs(5)).await;
    volumed = restart_volumed(&volumed_dir, volumed_addr).await;
    step("volumed started again");
    let rc = loop {
        let r = run(&mut c, &r, "cat /tmp/read.rc").await;
        if r.return_code == 0 {
            break String::from_utf8_lossy(&r.stdout).trim().to_owned();
        }
        assert!(stopped.elapsed() < Duration::from_secs(90), "the read still runs 90 s after volumed stopped");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    eprintln!("the read across the volumed restart ended with {rc} after {:?}", stopped.elapsed());
    assert!(rc == "0" || rc == "1", "cat ends with success or an I/O error: {rc}");
    assert_eq!(ok(&mut c, &r, &format!("sha256sum {MNT}/huge | cut -d' ' -f1")).await, huge_sum);
    mounted(&mut c, &r, 0).await;
    step("volumed restarted mid-read");

    c.terminate(pb::TerminateRequest { sailbox_id: r }).await.unwrap();
    assert!(common::vm_processes(fresh.path()).is_empty());
    drop(c);
    served.stop().await;
    volumed.stop().await.unwrap();
}
