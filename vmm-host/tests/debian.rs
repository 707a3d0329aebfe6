//! The default image: Debian (debootstrap, built once per host and stored as chunks) with
//! python3, booted for real. The first run on a data directory builds the image (about a
//! minute here); a second `EnsureImage` reuses it.

mod common;

use common::{error_name, run, serve, write};
use proto::sailbox as pb;
use tokio_stream::StreamExt;

async fn ensure(
    c: &mut proto::sailbox::sailbox_service_client::SailboxServiceClient<tonic::transport::Channel>,
) -> (String, Vec<String>) {
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
    assert!(common::vm_processes(dir.path()).is_empty());
    drop(c);
    served.stop().await;
}
