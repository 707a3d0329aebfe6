//! The default image: Debian (debootstrap, built once per host and stored as chunks) with
//! python3, booted for real. The first run on a data directory builds the image (about a
//! minute here); a second `EnsureImage` reuses it.

mod common;

use common::Client;

use common::{error_name, run, serve, write};
use proto::sailbox as pb;
use tokio_stream::StreamExt;

async fn ensure(c: &mut Client) -> (String, Vec<String>) {
    let mut s = c.ensure_image(pb::EnsureImageRequest { image: String::new() }).await.unwrap().into_inner();
    let (mut id, mut messages) = (String::new(), Vec::new());
    while let Some(p) = s.next().await {
        let p = p.unwrap();
        messages.push(p.message);
        if !p.image_id.is_empty() {
            id = p.image_id;
        }
    }
    (id, messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_debian_image_runs_python() {
    let dir = common::data_dir();
    let served = serve(dir.path()).await;
    let mut c = served.client().await;

    let (id, built) = ensure(&mut c).await;
    assert!(id.starts_with("im-"), "{built:?}");
    assert!(built.iter().any(|m| m.contains("building")), "the first ensure builds: {built:?}");
    let (again, messages) = ensure(&mut c).await;
    assert_eq!(again, id, "an unchanged definition gives the same image id");
    assert!(!messages.iter().any(|m| m.contains("building")), "rebuilt an unchanged image: {messages:?}");

    let req = pb::CreateSailboxRequest { app: "tests".into(), name: "py-box".into(), ..Default::default() };
    let sb = c.create_sailbox(req.clone()).await.unwrap().into_inner();
    assert_eq!((sb.image.as_str(), sb.memory_mib, sb.disk_gib, sb.vcpus), (id.as_str(), 1024, 8, 1));
    let e = c.create_sailbox(req).await.unwrap_err();
    assert_eq!(error_name(&e), "SailboxCreationError", "names are unique among live sailboxes of an app");

    write(&mut c, &sb.sailbox_id, "/root/data.txt", b"21\n").await.unwrap();
    let r = run(
        &mut c,
        &sb.sailbox_id,
        "python3 -c 'import socket; print(int(open(\"/root/data.txt\").read()) * 2, socket.gethostname())'",
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&r.stdout), "42 py-box\n", "{r:?}");
    let r = run(&mut c, &sb.sailbox_id, ". /etc/os-release; echo $VERSION_CODENAME").await;
    assert_eq!(r.stdout, b"bookworm\n");

    let listed = c
        .list_sailboxes(pb::ListSailboxesRequest { app: "tests".into(), max_guest_schema_version: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .sailboxes;
    assert_eq!(listed.len(), 1);
    let none = c
        .list_sailboxes(pb::ListSailboxesRequest { app: "other".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .sailboxes;
    assert!(none.is_empty());
    c.terminate(pb::TerminateRequest { sailbox_id: sb.sailbox_id }).await.unwrap();

    // The builder, on the Debian base built above (one debootstrap per CI run).
    built_images_run_every_step(&mut c, served.addr.port()).await;

    assert!(common::vm_processes(dir.path()).is_empty());
    drop(c);
    served.stop().await;
}

async fn upload(c: &mut Client, src: vmm_host::image::context::LocalSource) -> (String, String) {
    let packed = src.pack().unwrap();
    let (hash, remote_dir) = (packed.hash.clone(), packed.remote_dir.clone());
    let r = c.upload_context(tokio_stream::iter(packed.into_requests().unwrap())).await.unwrap().into_inner();
    assert_eq!(r.context, hash);
    (remote_dir, r.context)
}

fn step(s: pb::image_step::Step) -> pb::ImageStep {
    pb::ImageStep { step: Some(s) }
}

fn list(items: &[&str]) -> pb::StringList {
    pb::StringList { items: items.iter().map(|s| s.to_string()).collect() }
}

async fn build(
    c: &mut Client,
    steps: Vec<pb::ImageStep>,
    timeout_secs: u32,
) -> Result<(String, Vec<pb::ImageBuildEvent>), tonic::Status> {
    let def = pb::ImageDefinition { base: "debian_amd64".into(), python_version: String::new(), steps };
    let mut s = c.build_image(pb::BuildImageRequest { definition: Some(def), timeout_secs }).await?.into_inner();
    let mut events = Vec::new();
    while let Some(e) = s.next().await {
        let e = e?;
        if !e.image_id.is_empty() {
            return Ok((e.image_id.clone(), events));
        }
        events.push(e);
    }
    panic!("the build stream ended without an image: {events:?}")
}

async fn built_images_run_every_step(c: &mut Client, api_port: u16) {
    use pb::image_step::Step as S;
    let ctx = tempfile::tempdir().unwrap();
    let app = ctx.path().join("app");
    std::fs::create_dir_all(app.join("pkg/__pycache__")).unwrap();
    std::fs::write(app.join("pkg/mod.py"), "VALUE = 41\n").unwrap();
    std::fs::write(app.join("pkg/__pycache__/mod.pyc"), "junk").unwrap();
    std::fs::write(app.join("notes.log"), "ignored").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", app.join("link")).unwrap();
    let dir_src = vmm_host::image::context::LocalSource::Dir {
        local: app.clone(),
        remote: "/app".into(),
        ignore: vec!["*.log".into(), "__pycache__/".into()],
        ignore_file: None,
    };
    let (remote, context) = upload(c, dir_src.clone()).await;
    let steps = |context: &str| {
        vec![
            step(S::AptInstall(list(&["hello"]))),
            step(S::PipInstall(list(&["six==1.16.0"]))),
            step(S::Env(pb::EnvVars { vars: [("GREETING".to_owned(), "hi there".to_owned())].into() })),
            step(S::RunCommands(list(&[
                "echo \"$GREETING\" > /opt/greeting",
                // Isolation, checked from inside: no device nodes, no host paths, own PIDs.
                "if mknod /tmp/disk b 8 0 2>/dev/null; then echo made > /opt/mknod; else echo refused > /opt/mknod; fi",
                "test ! -e /work && test ! -e /root/.cache/sail && echo no-host-files > /opt/hostfiles",
                "ps -e -o pid= | wc -l > /opt/pids",
            ]))),
            // The network: the registries yes (apt and pip above), the host's loopback (this
            // test's own API) and the gateway no.
            step(S::RunCommands(pb::StringList {
                items: vec![format!(
                    "for a in 127.0.0.1 10.0.2.2; do python3 -c 'import socket,sys; socket.create_connection((sys.argv[1], {api_port}), 3)' $a 2>/dev/null && echo reached $a >> /opt/api || echo unreachable >> /opt/api; done"
                )],
            })),
            step(S::AddFiles(pb::AddFiles { remote: remote.clone(), context: context.to_owned() })),
        ]
    };
    let (id, events) = build(c, steps(&context), 1800).await.unwrap();
    let stored: Vec<&pb::ImageBuildEvent> = events.iter().filter(|e| e.layer_stored).collect();
    assert_eq!(stored.len(), 6, "every step ran once: {events:?}");
    for e in &stored {
        assert!(e.stored_bytes < e.layer_size / 2, "a layer stores only what its step changed: {e:?}");
    }
    assert!(events.iter().any(|e| e.log.contains("Setting up hello")), "apt's log streamed");

    // Unchanged: every layer cached, nothing runs.
    let (again, events) = build(c, steps(&context), 1800).await.unwrap();
    assert_eq!(again, id);
    assert!(events.iter().all(|e| !e.layer_stored) && events.iter().filter(|e| e.cached).count() == 6, "{events:?}");

    // A one-byte change in an added file rebuilds exactly that layer.
    std::fs::write(app.join("pkg/mod.py"), "VALUE = 42\n").unwrap();
    let (_, context2) = upload(c, dir_src).await;
    assert_ne!(context2, context);
    let (id2, events) = build(c, steps(&context2), 1800).await.unwrap();
    assert_ne!(id2, id);
    let ran: Vec<u32> = events.iter().filter(|e| e.layer_stored).map(|e| e.step).collect();
    assert_eq!(ran, [6], "{events:?}");

    // A sailbox of the built image uses every step.
    let req = pb::CreateSailboxRequest { app: "tests".into(), name: "built".into(), image: id2.clone(), ..Default::default() };
    let sb = c.create_sailbox(req).await.unwrap().into_inner();
    let r = run(
        c,
        &sb.sailbox_id,
        "hello; PYTHONDONTWRITEBYTECODE=1 python3 -c 'import six, sys; sys.path.insert(0, \"/app\"); from pkg import mod; print(six.__version__, mod.VALUE)'; \
         cat /opt/greeting; echo \"env=$GREETING\"; cat /opt/mknod /opt/hostfiles /opt/pids /opt/api; ls -A /app; ls /app/pkg",
    )
    .await;
    let out = String::from_utf8_lossy(&r.stdout);
    assert_eq!(r.return_code, 0, "{r:?}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..5], ["Hello, world!", "1.16.0 42", "hi there", "env=hi there", "refused"], "{out}");
    assert_eq!(lines[5], "no-host-files", "{out}");
    let pids: u32 = lines[6].trim().parse().unwrap();
    assert!(pids < 10, "the step saw only its own PID namespace: {out}");
    assert_eq!(lines[7..9], ["unreachable", "unreachable"], "a step reached the host's loopback: {out}");
    assert_eq!(lines[9..], ["pkg", "mod.py"], "ignored files and symlinks are not added: {out}");
    c.terminate(pb::TerminateRequest { sailbox_id: sb.sailbox_id }).await.unwrap();

    // A failing step: ImageBuildError naming the step, with the log tail.
    let failing = vec![step(S::AptInstall(list(&["hello"]))), step(S::RunCommands(list(&["echo about to fail", "exit 3"])))];
    let e = build(c, failing, 1800).await.unwrap_err();
    assert_eq!(error_name(&e), "ImageBuildError", "{e:?}");
    assert!(e.message().contains("step 2") && e.message().contains("about to fail"), "{}", e.message());

    // A step that turns a path the sandbox mounts on into a symlink (pointing at a host path
    // before pivot_root) cannot steer the next step's mounts: refused.
    let hostile = vec![step(S::RunCommands(list(&["rm -rf /tmp && ln -s /etc /tmp"]))), step(S::RunCommands(list(&["true"])))];
    let e = build(c, hostile, 600).await.unwrap_err();
    assert!(e.message().contains("step 2") && e.message().contains("/tmp in the image is a symlink"), "{}", e.message());

    // A timeout: the step is killed, DEADLINE_EXCEEDED.
    let slow = vec![step(S::RunCommands(list(&["echo sleeping; sleep 600"])))];
    let t0 = std::time::Instant::now();
    let e = build(c, slow, 5).await.unwrap_err();
    assert_eq!((e.code(), error_name(&e).as_str()), (tonic::Code::DeadlineExceeded, "ImageBuildError"), "{e:?}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(120), "the timeout bounds the build");

    // A bad definition: refused before anything runs.
    let bad = vec![step(S::AptInstall(list(&["hello; rm -rf /"])))];
    let e = build(c, bad, 60).await.unwrap_err();
    assert_eq!((e.code(), error_name(&e).as_str()), (tonic::Code::InvalidArgument, "ImageBuildError"), "{e:?}");

    // Listing and polling.
    let info = c.get_image(pb::GetImageRequest { image_id: id2.clone() }).await.unwrap().into_inner();
    assert_eq!(info.step.as_str(), format!("add_files(/app <- {})", &context2[..12]));
    let all = c.list_images(pb::ListImagesRequest {}).await.unwrap().into_inner().images;
    assert!(all.iter().any(|i| i.image_id == id) && all.iter().any(|i| i.image_id == id2));
    let e = c.get_image(pb::GetImageRequest { image_id: "im-000000000000000000000000".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Two concurrent builds of one new definition coalesce: the step runs once.
    let slow_once = || vec![step(S::RunCommands(list(&["sleep 2; date +%s%N > /opt/built-at"])))];
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (a, b) = tokio::join!(build(&mut c1, slow_once(), 600), build(&mut c2, slow_once(), 600));
    let ((ia, ea), (ib, eb)) = (a.unwrap(), b.unwrap());
    assert_eq!(ia, ib);
    let runs = ea.iter().chain(&eb).filter(|e| e.layer_stored).count();
    assert_eq!(runs, 1, "the step ran once for both callers: {ea:?} {eb:?}");

    // Polling a build: the first event names the image; GetImage says `building` while it
    // runs, then returns the built image.
    let def = pb::ImageDefinition {
        base: "debian_amd64".into(),
        python_version: String::new(),
        steps: vec![step(S::RunCommands(list(&["sleep 3; echo polled > /opt/polled"])))],
    };
    let mut stream =
        c.build_image(pb::BuildImageRequest { definition: Some(def), timeout_secs: 600 }).await.unwrap().into_inner();
    let planned = stream.next().await.unwrap().unwrap().planned_image_id;
    assert!(planned.starts_with("im-"), "{planned:?}");
    let polled = c.get_image(pb::GetImageRequest { image_id: planned.clone() }).await.unwrap().into_inner();
    assert!(polled.building && polled.size == 0, "{polled:?}");
    let mut last = pb::ImageBuildEvent::default();
    while let Some(e) = stream.next().await {
        last = e.unwrap();
    }
    assert_eq!(last.image_id, planned);
    let done = c.get_image(pb::GetImageRequest { image_id: planned }).await.unwrap().into_inner();
    assert!(!done.building && done.size > 0, "{done:?}");

    // A step that removes python3 still leaves an image whose sailboxes boot and run commands
    // (the agent and the volume helper come from the initramfs, not the image).
    let (no_python, _) = build(c, vec![step(S::RunCommands(list(&["rm -f /usr/bin/python3*"])))], 600).await.unwrap();
    let req = pb::CreateSailboxRequest { app: "tests".into(), name: "no-python".into(), image: no_python, ..Default::default() };
    let sb = c.create_sailbox(req).await.unwrap().into_inner();
    let r =
        run(c, &sb.sailbox_id, "test ! -e /usr/bin/python3 && echo alive && test -x /run/sail/sail-volume-fuse && echo helper")
            .await;
    assert_eq!(String::from_utf8_lossy(&r.stdout), "alive\nhelper\n", "{r:?}");
    c.terminate(pb::TerminateRequest { sailbox_id: sb.sailbox_id }).await.unwrap();

    // Removing a layer: it is gone, a later build runs its step again and stores (almost)
    // nothing, since its chunks are still in the store.
    let removed = c.delete_image(pb::GetImageRequest { image_id: id2.clone() }).await.unwrap().into_inner();
    assert_eq!(removed.image_id, id2);
    assert_eq!(c.get_image(pb::GetImageRequest { image_id: id2.clone() }).await.unwrap_err().code(), tonic::Code::NotFound);
    let (again, events) = build(c, steps(&context2), 1800).await.unwrap();
    assert_eq!(again, id2);
    let ran: Vec<&pb::ImageBuildEvent> = events.iter().filter(|e| e.layer_stored).collect();
    assert_eq!(ran.len(), 1, "{events:?}");
    eprintln!("rebuilt removed layer: {} bytes stored of {}", ran[0].stored_bytes, ran[0].layer_size);
    assert!(ran[0].stored_bytes <= 16 << 20, "{:?}", ran[0]);
}
