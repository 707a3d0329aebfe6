//! Volumes inside sailboxes, on real VMs: a real volumed, two Debian sailboxes mounting the
//! same volume through their gateways, the in-guest SDK committing and reloading, the host
//! reading what the guests committed, a helper killed and restarted, a guest trying another
//! volume, and the mounts across sleep, wake and fork. One test shares the built image and the
//! booted VMs (boots cost tens of seconds under TCG).

mod common;

use std::time::{Duration, Instant};

use common::{error_name, run, serve_with};
use proto::sailbox as pb;
use proto::sailbox::sailbox_service_client::SailboxServiceClient;
use tonic::transport::Channel;
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
async fn ok(c: &mut SailboxServiceClient<Channel>, id: &str, command: &str) -> String {
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

async fn info(c: &mut SailboxServiceClient<Channel>, id: &str) -> pb::Sailbox {
    c.get_sailbox(pb::GetSailboxRequest { sailbox_id: id.into(), connect: false }).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_shared_by_two_sailboxes_and_the_host() {
    let dir = common::data_dir();
    let config = volumed::server::ServerConfig::local(dir.path().join("volumed"), "127.0.0.1:0".parse().unwrap());
    let volumed = volumed::server::Server::bind(config).await.unwrap().spawn();
    let endpoint = volumed.endpoint();
    let served = serve_with(dir.path(), |c| c.volumed_endpoint = Some(endpoint)).await;
    let mut c = served.client().await;
    let mut host = VolumeClient::connect(&volumed.endpoint()).await.unwrap();

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
