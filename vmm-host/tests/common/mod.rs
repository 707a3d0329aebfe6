//! Test harness: a real vmm-host (QEMU, TCG here) serving gRPC on 127.0.0.1, with a client.
//! Needs root, qemu-system-x86, the guest kit and the static agent
//! (`bash scripts/setup.sh vm && bash scripts/build-agent.sh`); missing pieces fail the
//! test with that instruction.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use proto::sailbox as pb;
use proto::sailbox::sailbox_service_client::SailboxServiceClient;
use tokio_stream::StreamExt;
use vmm_host::{GrpcSailboxes, Host, HostConfig};

/// A client of a served host, sending a key.
pub type Client = SailboxServiceClient<tenancy::client::AuthedChannel>;

/// The org the harness's main key belongs to.
pub const ORG_A: &str = "default";
/// Another org, for cross-org checks.
pub const ORG_B: &str = "globex";

/// A served host.
pub struct Served {
    pub host: Host,
    pub addr: SocketAddr,
    /// An admin key of [`ORG_A`] (what [`Served::client`] sends).
    pub key_a: tenancy::ApiKey,
    /// A member key of [`ORG_B`].
    pub key_b: tenancy::ApiKey,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    /// Stops serving and shuts the host down (its VMs keep running, as after a crash of
    /// vmm-host); the data directory can be opened again.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        self.host.shutdown().await;
    }

    /// A client with [`Served::key_a`].
    pub async fn client(&self) -> Client {
        self.client_with(Some(&self.key_a)).await
    }

    /// A client sending `key` (or none).
    pub async fn client_with(&self, key: Option<&tenancy::ApiKey>) -> Client {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap();
        SailboxServiceClient::new(tenancy::client::authed(ch, key)).max_decoding_message_size(64 << 20)
    }
}

/// Fails the test unless everything a VM needs is installed.
pub fn require_vm_tools(config: &HostConfig) {
    let fix = "run `bash scripts/setup.sh vm && bash scripts/build-agent.sh`";
    assert!(config.guest_dir.join("vmlinux").is_file(), "no guest kernel in {}: {fix}", config.guest_dir.display());
    assert!(config.agent_binary.is_file(), "no static agent at {}: {fix}", config.agent_binary.display());
    assert!(std::process::Command::new(&config.qemu_binary).arg("--version").output().is_ok(), "no QEMU: {fix}");
}

/// A short data directory (Unix socket paths are limited to 107 bytes) that kills every VM
/// process started under it when dropped, so a failing test leaves nothing running.
pub struct TestDir(tempfile::TempDir);

impl TestDir {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        for p in vm_processes(self.0.path()) {
            // SAFETY: signalling processes started under this test's own directory.
            unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
        }
        // The cowfs daemon: stop it and detach its mount.
        let cow = self.0.path().join("vmm/cowfs");
        for p in vmm_host::procs::find_by_cmdline(&cow.display().to_string()) {
            // SAFETY: as above.
            unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
        }
        let mnt = std::ffi::CString::new(cow.join("mnt").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: detaching a mount this test made, if it is there.
        unsafe { libc::umount2(mnt.as_ptr(), libc::MNT_DETACH) };
    }
}

pub fn data_dir() -> TestDir {
    TestDir(tempfile::Builder::new().prefix("sbx").tempdir_in("/tmp").unwrap())
}

pub fn config(dir: &Path) -> HostConfig {
    let config = HostConfig::local(dir.join("vmm"));
    require_vm_tools(&config);
    config
}

/// Opens a host on `dir` and serves it.
pub async fn serve(dir: &Path) -> Served {
    serve_with(dir, |_| {}).await
}

/// Like [`serve`], with the configuration adjusted first.
pub async fn serve_with(dir: &Path, adjust: impl FnOnce(&mut HostConfig)) -> Served {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let mut cfg = config(dir);
    adjust(&mut cfg);
    let host = Host::open(cfg).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let svc = GrpcSailboxes::new(host.clone()).into_server();
    let (key_a, key_b) = (tenancy::ApiKey::generate(), tenancy::ApiKey::generate());
    let keys = tenancy::server::StaticKeys::default().with(&key_a, ORG_A, tenancy::Role::Admin).with(
        &key_b,
        ORG_B,
        tenancy::Role::Member,
    );
    let auth = tenancy::server::AuthLayer::new(std::sync::Arc::new(keys));
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(auth)
            .add_service(svc)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Served { host, addr, key_a, key_b, stop: Some(tx), task }
}

/// The contract error name in a status.
pub fn error_name(s: &tonic::Status) -> String {
    use prost::Message;
    pb::ErrorDetail::decode(s.details()).map(|d| d.name).unwrap_or_default()
}

/// Runs a command to completion.
pub async fn run(c: &mut Client, id: &str, command: &str) -> pb::ExecResult {
    let h = c
        .exec(pb::ExecRequest { sailbox_id: id.into(), command: command.into(), ..Default::default() })
        .await
        .unwrap_or_else(|e| panic!("exec {command:?}: {e:?}"))
        .into_inner();
    c.wait_exec(pb::WaitExecRequest { exec_id: h.exec_id, timeout_ms: 0 }).await.unwrap().into_inner()
}

/// Starts `cmd` in the guest in the background (it outlives the exec).
pub async fn background(c: &mut Client, id: &str, cmd: &str) {
    let h = c
        .exec(pb::ExecRequest { sailbox_id: id.into(), command: cmd.into(), background: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let r = c.wait_exec(pb::WaitExecRequest { exec_id: h.exec_id, timeout_ms: 0 }).await.unwrap().into_inner();
    assert_eq!(r.return_code, 0, "{cmd}");
}

/// Writes `data` to `path` in the sailbox.
pub async fn write(c: &mut Client, id: &str, path: &str, data: &[u8]) -> Result<u64, tonic::Status> {
    let mut msgs = vec![pb::WriteFileRequest {
        sailbox_id: id.into(),
        path: path.into(),
        mode: 0o644,
        size: data.len() as u64,
        data: Vec::new(),
    }];
    for piece in data.chunks(1 << 20) {
        msgs.push(pb::WriteFileRequest { data: piece.to_vec(), ..Default::default() });
    }
    c.write_file(tokio_stream::iter(msgs)).await.map(|r| r.into_inner().bytes_written)
}

/// Reads `path` from the sailbox.
pub async fn read(c: &mut Client, id: &str, path: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut s = c.read_file(pb::ReadFileRequest { sailbox_id: id.into(), path: path.into() }).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        out.extend(m?.data);
    }
    Ok(out)
}

/// Processes whose command line mentions the host's run directory.
pub fn vm_processes(dir: &Path) -> Vec<vmm_host::model::ProcRef> {
    vmm_host::procs::find_by_cmdline(&format!("{}/", dir.join("vmm/run").display()))
}

pub fn run_dir(dir: &Path) -> PathBuf {
    dir.join("vmm/run")
}

/// A minimal-image create request.
pub fn minimal(ports: Vec<u32>) -> pb::CreateSailboxRequest {
    pb::CreateSailboxRequest {
        app: "tests".into(),
        image: "minimal".into(),
        cpu: 1.0,
        memory_mib: 1024,
        disk_gib: 2,
        ingress_ports: ports,
        ..Default::default()
    }
}

/// Every sailbox-scoped call, made by org B (`b`) on org A's sailbox, exec request and
/// checkpoint, gets exactly what org A (`a`) gets for ids that do not exist: the same code
/// and the same contract error name. Then a call without a key is refused, and A's own calls
/// still work. Table-driven: one row per RPC of `sail.sailbox.v1` that names an object.
pub async fn assert_invisible_to_another_org(served: &Served, sailbox: &str, exec: &str, checkpoint: &str, app: &str) {
    let mut a = served.client().await;
    let mut b = served.client_with(Some(&served.key_b)).await;
    const NO_SAILBOX: &str = "sb-000000000000000000000000";
    const NO_EXEC: &str = "ex-000000000000000000000000";
    const NO_CHECKPOINT: &str = "ck-0000000000000000000000000000000000000000000000000000000000000000";
    type Outcome = Result<(), (tonic::Code, String)>;
    fn outcome<T>(r: Result<T, tonic::Status>) -> Outcome {
        r.map(|_| ()).map_err(|s| (s.code(), error_name(&s)))
    }
    async fn call(c: &mut Client, rpc: &str, sailbox: &str, exec: &str, checkpoint: &str, app: &str) -> Outcome {
        let sid = || pb::SailboxIdRequest { sailbox_id: sailbox.into() };
        match rpc {
            "GetSailbox" => outcome(c.get_sailbox(pb::GetSailboxRequest { sailbox_id: sailbox.into(), connect: true }).await),
            "Exec" => outcome(
                c.exec(pb::ExecRequest { sailbox_id: sailbox.into(), command: "true".into(), ..Default::default() }).await,
            ),
            "WaitExec" => outcome(c.wait_exec(pb::WaitExecRequest { exec_id: exec.into(), timeout_ms: 1 }).await),
            "StreamExec" => outcome(c.stream_exec(pb::WaitExecRequest { exec_id: exec.into(), timeout_ms: 1 }).await),
            "WriteFile" => {
                let first = pb::WriteFileRequest {
                    sailbox_id: sailbox.into(),
                    path: "/tmp/x".into(),
                    size: 1,
                    mode: 0o644,
                    data: vec![1],
                };
                outcome(c.write_file(tokio_stream::iter(vec![first])).await)
            }
            "ReadFile" => {
                outcome(c.read_file(pb::ReadFileRequest { sailbox_id: sailbox.into(), path: "/etc/hostname".into() }).await)
            }
            "Listeners" => outcome(c.listeners(pb::ListenersRequest { sailbox_id: sailbox.into(), ..Default::default() }).await),
            "CheckpointSailbox" => outcome(c.checkpoint_sailbox(sid()).await),
            "Pause" => outcome(c.pause(sid()).await),
            "Sleep" => outcome(c.sleep(pb::SleepRequest { sailbox_id: sailbox.into(), ..Default::default() }).await),
            "Resume" => outcome(c.resume(sid()).await),
            "CompleteCall" => {
                outcome(c.complete_call(pb::CompleteCallRequest { sailbox_id: sailbox.into(), call: "c".into() }).await)
            }
            "Fork" => outcome(c.fork(sid()).await),
            "Upgrade" => outcome(c.upgrade(sid()).await),
            "Terminate" => outcome(c.terminate(pb::TerminateRequest { sailbox_id: sailbox.into() }).await),
            "RestoreSailbox" => {
                outcome(c.restore_sailbox(pb::RestoreRequest { checkpoint_id: checkpoint.into(), ..Default::default() }).await)
            }
            "GetApp" => {
                outcome(c.get_app(pb::GetAppRequest { name: app.into(), mint_if_missing: false, org: String::new() }).await)
            }
            other => panic!("no row for {other}"),
        }
    }
    let rows = [
        "GetSailbox",
        "Exec",
        "WaitExec",
        "StreamExec",
        "WriteFile",
        "ReadFile",
        "Listeners",
        "CheckpointSailbox",
        "Pause",
        "Sleep",
        "Resume",
        "CompleteCall",
        "Fork",
        "Upgrade",
        "RestoreSailbox",
        "GetApp",
        "Terminate",
    ];
    let missing_app = "no-such-app-anywhere";
    for rpc in rows {
        let by_b = call(&mut b, rpc, sailbox, exec, checkpoint, app).await;
        let nonexistent = call(&mut a, rpc, NO_SAILBOX, NO_EXEC, NO_CHECKPOINT, missing_app).await;
        assert!(by_b.is_err(), "{rpc}: org B reached org A's object");
        assert_eq!(by_b, nonexistent, "{rpc}: org B's answer differs from the answer for an id that does not exist");
    }
    // Listings leave it out; naming org A is refused outright.
    let listed = b.list_sailboxes(pb::ListSailboxesRequest::default()).await.unwrap().into_inner().sailboxes;
    assert!(listed.iter().all(|s| s.sailbox_id != sailbox), "org B lists org A's sailbox");
    let e = b.create_sailbox(pb::CreateSailboxRequest { org: ORG_A.into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = b.get_app(pb::GetAppRequest { name: app.into(), mint_if_missing: true, org: ORG_A.into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // No key at all: nothing is served.
    let mut anonymous = served.client_with(None).await;
    let e = anonymous.get_sailbox(pb::GetSailboxRequest { sailbox_id: sailbox.into(), connect: false }).await.unwrap_err();
    assert_eq!((e.code(), error_name(&e).as_str()), (tonic::Code::Unauthenticated, "SailAuthenticationError"));
    // Org A still has it, untouched.
    let s = a.get_sailbox(pb::GetSailboxRequest { sailbox_id: sailbox.into(), connect: false }).await.unwrap().into_inner();
    assert_eq!((s.org.as_str(), s.state), (ORG_A, pb::SailboxState::Running as i32));
}
