//! The agent binary on the host, serving on Unix sockets instead of vsock: the same code a
//! guest runs, exercised without booting a VM.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use proto::agent as pb;
use proto::agent::agent_client::AgentClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint, Uri};

struct Agent {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start() -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), &[])
    }

    /// Starts the agent with extra arguments, its socket in `dir`.
    fn start_in(dir: tempfile::TempDir, extra: &[&OsStr]) -> Self {
        Self::start_with(dir, extra, &[])
    }

    /// [`Agent::start_in`] with environment variables (its volume helpers inherit them).
    fn start_with(dir: tempfile::TempDir, extra: &[&OsStr], env: &[(&str, String)]) -> Self {
        let api = dir.path().join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_sail-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", api.display()))
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !api.exists() {
            assert!(Instant::now() < deadline, "agent did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn client(&self) -> AgentClient<Channel> {
        let path = self.path("api.sock");
        let channel = Endpoint::from_static("http://agent")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
            }))
            .await
            .unwrap();
        AgentClient::new(channel).max_decoding_message_size(64 << 20)
    }
}

fn exec(id: &str, command: &str) -> pb::StartExecRequest {
    pb::StartExecRequest { request_id: id.into(), command: command.into(), ..Default::default() }
}

async fn run(c: &mut AgentClient<Channel>, req: pb::StartExecRequest) -> pb::ExecResult {
    let id = req.request_id.clone();
    c.start_exec(req).await.unwrap();
    c.wait_exec(pb::WaitExecRequest { request_id: id, ..Default::default() }).await.unwrap().into_inner()
}

#[tokio::test]
async fn hello_reports_versions() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let h = c.hello(pb::HelloRequest::default()).await.unwrap().into_inner();
    assert_eq!(h.protocol_version, 1);
    assert!(h.guest_schema_version >= 1);
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(!h.clock_adjusted, "a zero host time leaves the clock alone");
}

#[tokio::test]
async fn exec_captures_output_code_cwd_and_env() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let mut req = exec("e1", "echo out; echo err >&2; pwd; echo \"$GREETING\"; exit 7");
    req.cwd = agent.dir.path().display().to_string();
    req.env = vec![pb::EnvVar { name: "GREETING".into(), value: "hi there".into() }];
    let r = run(&mut c, req).await;
    assert_eq!(r.return_code, 7);
    assert_eq!(String::from_utf8(r.stdout).unwrap(), format!("out\n{}\nhi there\n", agent.dir.path().display()));
    assert_eq!(r.stderr, b"err\n");
    assert!(!r.timed_out && !r.stdout_truncated);
    assert!(r.finished_unix_ms >= r.started_unix_ms);

    let r = run(&mut c, exec("e2", "kill -9 $$")).await;
    assert_eq!((r.return_code, r.signal), (128 + 9, 9));

    // The same id again is the same request, not a second run.
    let again = c.start_exec(exec("e2", "echo twice")).await.unwrap().into_inner();
    assert!(again.already_started);
    let err = c.wait_exec(pb::WaitExecRequest { request_id: "nope".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    for (bad, why) in [("", "empty command"), ("a\0b", "NUL")] {
        let e = c.start_exec(exec("bad", bad)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{why}");
    }
    let mut relative = exec("bad2", "true");
    relative.cwd = "tmp".into();
    assert_eq!(c.start_exec(relative).await.unwrap_err().code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let pidfile = agent.path("child.pid");
    let mut req = exec("t1", &format!("sleep 60 & echo $! > {}; wait", pidfile.display()));
    req.timeout_ms = 300;
    let r = run(&mut c, req).await;
    assert!(r.timed_out);
    assert_eq!(r.return_code, 124);
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    // The background sleep was in the command's process group: it is gone (or a zombie
    // about to be reaped by its parent's exit). SIGKILL may still be in flight when the
    // result arrives, so allow it a moment to land; a sleep that was never killed stays
    // alive for 60 s and fails this.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state.is_empty() || state.contains(") Z") {
            break;
        }
        assert!(Instant::now() < deadline, "sleep survived the timeout: {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn leftover_children_do_not_hold_the_request_open() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    // The grandchild keeps stdout open; the request still finishes when the shell exits,
    // long before the grandchild would.
    let r = tokio::time::timeout(Duration::from_secs(10), run(&mut c, exec("g1", "sleep 600 & echo started")))
        .await
        .expect("the leftover grandchild held the request open");
    assert_eq!(r.return_code, 0);
    assert_eq!(r.stdout, b"started\n");
}

#[tokio::test]
async fn background_returns_at_once_and_keeps_running() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let marker = agent.path("marker");
    let mut req = exec("b1", &format!("sleep 3; echo done > {}", marker.display()));
    req.background = true;
    // A foreground run would take 3 s; a background one returns at once.
    let r = tokio::time::timeout(Duration::from_secs(2), run(&mut c, req))
        .await
        .expect("a background request waited for its command");
    assert_eq!(r.return_code, 0);
    assert!(!marker.exists(), "the request returned only after the command finished");
    // Meanwhile the background command runs on: wait for its marker (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the background command never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn output_is_capped_and_counted() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let r = run(&mut c, exec("o1", "head -c 20000000 /dev/zero; echo tail >&2")).await;
    assert_eq!(r.stdout.len(), 16 << 20);
    assert!(r.stdout_truncated && !r.stderr_truncated);
    assert_eq!(r.stdout_bytes, 20_000_000);
    assert_eq!(r.stderr, b"tail\n");
}

#[tokio::test]
async fn streaming_delivers_output_then_the_result() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    c.start_exec(exec("s1", "echo one; sleep 0.1; echo two >&2; echo three")).await.unwrap();
    let req = pb::WaitExecRequest { request_id: "s1".into(), ..Default::default() };
    let mut events = c.stream_exec(req).await.unwrap().into_inner();
    let (mut out, mut err, mut results) = (Vec::new(), Vec::new(), Vec::new());
    let mut order = Vec::new();
    while let Some(ev) = events.next().await {
        match ev.unwrap().event.unwrap() {
            pb::exec_event::Event::Stdout(b) => {
                order.push("stdout");
                out.extend(b)
            }
            pb::exec_event::Event::Stderr(b) => {
                order.push("stderr");
                err.extend(b)
            }
            pb::exec_event::Event::Result(r) => {
                order.push("result");
                results.push(r)
            }
        }
    }
    assert_eq!(out, b"one\nthree\n");
    assert_eq!(err, b"two\n");
    // Exactly one result, and nothing after it.
    assert_eq!(results.len(), 1, "events: {order:?}");
    assert_eq!(order.last(), Some(&"result"), "events: {order:?}");
    assert_eq!(results[0].return_code, 0);
    // Reattaching from offsets replays only what is past them.
    let req = pb::WaitExecRequest { request_id: "s1".into(), stdout_offset: 4, stderr_offset: 4 };
    let mut events = c.stream_exec(req).await.unwrap().into_inner();
    let first = events.next().await.unwrap().unwrap().event.unwrap();
    assert_eq!(first, pb::exec_event::Event::Stdout(b"three\n".to_vec()));
}

async fn write(c: &mut AgentClient<Channel>, path: &str, mode: u32, data: &[u8], announced: u64) -> Result<u64, tonic::Status> {
    let mut msgs = vec![pb::WriteFileRequest {
        header: Some(pb::WriteFileHeader { path: path.into(), mode, size: announced, make_parents: true }),
        data: Vec::new(),
    }];
    for piece in data.chunks(1 << 20) {
        msgs.push(pb::WriteFileRequest { header: None, data: piece.to_vec() });
    }
    c.write_file(tokio_stream::iter(msgs)).await.map(|r| r.into_inner().bytes_written)
}

async fn read(c: &mut AgentClient<Channel>, path: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = c.read_file(pb::ReadFileRequest { path: path.into(), max_bytes: 0 }).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.next().await {
        out.extend(m?.data);
    }
    Ok(out)
}

#[tokio::test]
async fn files_stream_in_and_out() {
    use std::os::unix::fs::PermissionsExt;
    let agent = Agent::start();
    let mut c = agent.client().await;
    let data: Vec<u8> = (0..10 << 20).map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let path = agent.path("a/b/c.bin");
    let p = path.to_str().unwrap();
    assert_eq!(write(&mut c, p, 0o600, &data, data.len() as u64).await.unwrap(), data.len() as u64);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(read(&mut c, p).await.unwrap(), data);
    // An empty file works too.
    let empty = agent.path("empty");
    write(&mut c, empty.to_str().unwrap(), 0, b"", 0).await.unwrap();
    assert_eq!(read(&mut c, empty.to_str().unwrap()).await.unwrap(), b"");

    // A short upload fails and leaves the old file as it was.
    let err = write(&mut c, p, 0o644, b"short", 100).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(read(&mut c, p).await.unwrap(), data);
    assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "temp file left behind");

    assert_eq!(write(&mut c, "relative", 0, b"x", 1).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(read(&mut c, "/a/../b").await.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(read(&mut c, agent.path("missing").to_str().unwrap()).await.unwrap_err().code(), tonic::Code::NotFound);
    let dir = agent.path("a");
    assert_eq!(read(&mut c, dir.to_str().unwrap()).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
}

/// Opens a forwarded connection: sends `first` after the port, returns the reply stream.
async fn forward(
    c: &mut AgentClient<Channel>,
    port: u16,
    first: &[u8],
    then_close: bool,
) -> Result<tonic::Streaming<pb::ForwardResponse>, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ForwardRequest { port: port.into(), data: first.to_vec() }).await.unwrap();
    if !then_close {
        // Keep the request stream open for the test's lifetime.
        std::mem::forget(tx);
    }
    Ok(c.forward(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner())
}

async fn collect(mut s: tonic::Streaming<pb::ForwardResponse>) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        out.extend(m.unwrap().data);
    }
    out
}

#[tokio::test]
async fn forwards_ingress_and_probes_ports() {
    let agent = Agent::start();
    let mut c = agent.client().await;
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        // A server that reads the request to EOF (the client's half-close), then answers.
        let (mut s, _) = server.accept().await.unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        s.write_all(&req.to_ascii_uppercase()).await.unwrap();
    });
    let replies = forward(&mut c, port, b"ping", true).await.unwrap();
    assert_eq!(collect(replies).await, b"PING", "half-close reached the server, its answer came back");

    let probe = |port: u16| pb::ProbePortRequest { port: port.into() };
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = server.local_addr().unwrap().port();
    assert!(c.probe_port(probe(open)).await.unwrap().into_inner().accepting);
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    assert!(!c.probe_port(probe(closed)).await.unwrap().into_inner().accepting);
    let err = forward(&mut c, closed, b"", false).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(forward(&mut c, 0, b"", false).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(c.probe_port(probe(0)).await.unwrap_err().code(), tonic::Code::InvalidArgument);
}

// ---- Volume mounts: the real volumed and the real `sail-volume-fuse` helper. ----

/// A binary of the workspace's release build (the directory above this test's `deps/`),
/// unless `env` names one.
fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not found: build it first (`cargo build --release -p volumed -p guest-fuse`) or set {env}",
        p.display()
    );
    p
}

/// A volumed process on a temp data dir and a free port; killed on drop.
struct Volumed {
    child: Child,
    endpoint: String,
    /// Its operator key (the volumes here live in org `agent-tests`).
    key: String,
    _dir: tempfile::TempDir,
}

impl Volumed {
    async fn start() -> Self {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(workspace_bin("volumed", "SAIL_VOLUMED_BIN"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--print-addr"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("volumed starts");
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await
        .unwrap()
        .unwrap();
        let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("volumed printed {line:?}"));
        let key = std::fs::read_to_string(dir.path().join("data/keys/operator.key")).unwrap().trim().to_owned();
        Self { child, endpoint: format!("http://{addr}"), key, _dir: dir }
    }

    /// Creates a volume in `org`.
    async fn create(&self, org: &str, name: &str) {
        use proto::volume as vpb;
        let channel = tonic::transport::Channel::from_shared(self.endpoint.clone()).unwrap().connect().await.unwrap();
        let key: tenancy::ApiKey = self.key.parse().unwrap();
        let mut c = vpb::volume_service_client::VolumeServiceClient::new(tenancy::client::authed(channel, Some(&key)));
        let req = vpb::GetVolumeRequest {
            volume: Some(vpb::VolumeRef { org: org.into(), name: name.into() }),
            mint_if_missing: true,
            ..Default::default()
        };
        c.get_volume(req).await.unwrap();
    }
}

impl Drop for Volumed {
    fn drop(&mut self) {
        let _ = sysutil::process::terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// An agent with volume mounts configured under its temp dir (helper from the workspace
/// build), plus a volumed. On drop every helper started under the dir is killed and every
/// mount under it detached, so a failed test leaves nothing behind.
struct VolEnv {
    agent: Agent,
    volumed: Volumed,
}

impl VolEnv {
    async fn start(helper: Option<&Path>) -> Self {
        let volumed = Volumed::start().await;
        let dir = tempfile::tempdir().unwrap();
        let helper = helper.map(Path::to_path_buf).unwrap_or_else(|| workspace_bin("sail-volume-fuse", "SAIL_VOLUME_FUSE_BIN"));
        let (volumes, run) = (dir.path().join("volumes"), dir.path().join("run"));
        let key = volumed.key.clone();
        let agent = Agent::start_with(
            dir,
            &[
                "--volume-helper".as_ref(),
                helper.as_os_str(),
                "--volumes-dir".as_ref(),
                volumes.as_os_str(),
                "--mounts-run-dir".as_ref(),
                run.as_os_str(),
            ],
            &[("SAIL_API_KEY", key)],
        );
        Self { agent, volumed }
    }

    fn mount_req(&self, path: &Path, volume: &str) -> pb::MountRequest {
        pb::MountRequest {
            path: path.display().to_string(),
            volume: volume.into(),
            org: "agent-tests".into(),
            endpoint: self.volumed.endpoint.clone(),
            trusted_endpoint: false,
        }
    }

    /// The control socket of the mount at `path` (the helper's naming: BLAKE3 of the path).
    fn socket(&self, path: &Path) -> PathBuf {
        let hash = blake3::hash(path.as_os_str().as_encoded_bytes()).to_hex();
        self.agent.path("run").join(format!("{}.sock", &hash[..16]))
    }
}

impl Drop for VolEnv {
    fn drop(&mut self) {
        let _ = self.agent.child.kill();
        let _ = self.agent.child.wait();
        let root = self.agent.dir.path().display().to_string();
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else { continue };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() && String::from_utf8_lossy(&cmdline).contains(&root) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        for point in mounts_under(&root) {
            let _ = sysutil::mount::lazy_unmount(Path::new(&point));
        }
    }
}

/// Mount points under `root`, per /proc/self/mountinfo.
fn mounts_under(root: &str) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| p.starts_with(root)).map(str::to_owned).collect()
}

fn is_mount(path: &Path) -> bool {
    let p = path.display().to_string();
    mounts_under(&p).contains(&p)
}

async fn list(c: &mut AgentClient<Channel>) -> Vec<pb::MountInfo> {
    c.list_mounts(pb::ListMountsRequest {}).await.unwrap().into_inner().mounts
}

/// Polls ListMounts until `ok` holds for the single mount (at most 60 s).
async fn wait_mount(c: &mut AgentClient<Channel>, what: &str, ok: impl Fn(&pb::MountInfo) -> bool) -> pb::MountInfo {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mounts = list(c).await;
        if let [m] = mounts.as_slice()
            && ok(m)
        {
            return m.clone();
        }
        assert!(Instant::now() < deadline, "{what}: {mounts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn mounts_are_supervised_restarted_and_unmounted() {
    let env = VolEnv::start(None).await;
    env.volumed.create("agent-tests", "work").await;
    env.volumed.create("agent-tests", "other").await;
    let mut c = env.agent.client().await;
    // A mount point that does not exist yet: the agent creates it.
    let mnt = env.agent.path("mnt/work");
    let info = c.mount(env.mount_req(&mnt, "work")).await.unwrap().into_inner();
    assert_eq!((info.state.as_str(), info.volume.as_str(), info.restarts), ("mounted", "work", 0));
    assert!(info.pid > 0);
    assert!(is_mount(&mnt));

    // The same volume again is the same mount; another volume at the path is refused.
    let again = c.mount(env.mount_req(&mnt, "work")).await.unwrap().into_inner();
    assert_eq!(again.pid, info.pid);
    let err = c.mount(env.mount_req(&mnt, "other")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");

    // Writes show up as dirty bytes; a commit through the control socket clears them.
    std::fs::write(mnt.join("committed.txt"), b"kept by the commit\n").unwrap();
    let m = list(&mut c).await.remove(0);
    assert_eq!(m.state, "mounted");
    assert!(m.dirty_bytes > 0, "{m:?}");
    let base = m.head_commit.clone();
    assert!(!base.is_empty());
    let socket = env.socket(&mnt);
    let outcome = tokio::task::spawn_blocking(move || {
        control_wire::call(&socket, &serde_json::json!({"op": "commit"}), Some(Duration::from_secs(60)))
    })
    .await
    .unwrap()
    .unwrap();
    let commit = outcome["commit"].as_str().unwrap().to_owned();
    assert!(!commit.is_empty() && commit != base, "{outcome}");
    let m = list(&mut c).await.remove(0);
    assert_eq!((m.head_commit.as_str(), m.dirty_bytes), (commit.as_str(), 0));

    // An uncommitted write, then the helper dies: the agent detaches the dead mount and
    // starts a new helper, which serves the committed tree.
    std::fs::write(mnt.join("uncommitted.txt"), b"only in the overlay\n").unwrap();
    assert!(list(&mut c).await[0].dirty_bytes > 0);
    let status = Command::new("kill").args(["-9", &info.pid.to_string()]).status().unwrap();
    assert!(status.success());
    let m = wait_mount(&mut c, "helper restarted", |m| m.restarts == 1 && m.state == "mounted" && m.pid != info.pid).await;
    assert!(m.last_error.is_empty(), "{m:?}");
    assert!(is_mount(&mnt));
    assert_eq!(std::fs::read(mnt.join("committed.txt")).unwrap(), b"kept by the commit\n");
    assert_eq!(m.head_commit, commit);
    // The helper keeps its overlay in anonymous files: what was not committed died with it
    // (the durability boundary is commit()).
    assert!(!mnt.join("uncommitted.txt").exists());

    // Unmount: the helper exits, the path is no mount any more.
    let done = c.unmount(pb::UnmountRequest { path: mnt.display().to_string() }).await.unwrap().into_inner();
    assert_eq!(done.state, "unmounted");
    assert!(!is_mount(&mnt));
    assert!(!Path::new(&format!("/proc/{}", m.pid)).exists(), "helper {} still runs", m.pid);
    assert!(list(&mut c).await.is_empty());
    let err = c.unmount(pb::UnmountRequest { path: mnt.display().to_string() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Mounted again, the committed file is there (read through the helper from volumed).
    c.mount(env.mount_req(&mnt, "work")).await.unwrap();
    assert_eq!(std::fs::read(mnt.join("committed.txt")).unwrap(), b"kept by the commit\n");
    c.unmount(pb::UnmountRequest { path: mnt.display().to_string() }).await.unwrap();
    assert!(!is_mount(&mnt));
}

#[tokio::test]
async fn mount_requests_are_checked_and_bounded() {
    let env = VolEnv::start(None).await;
    env.volumed.create("agent-tests", "vol").await;
    let mut c = env.agent.client().await;
    let base = env.agent.path("m");
    let req = |path: &str, volume: &str| {
        let mut r = env.mount_req(Path::new(path), volume);
        r.path = path.to_owned();
        r
    };
    let long = format!("/{}", "a".repeat(5000));
    for (path, volume) in
        [("relative/x", "vol"), ("/", "vol"), ("/a/../b", "vol"), ("/a//b", "vol"), (&long, "vol"), ("/tmp/x", "../v")]
    {
        let err = c.mount(req(path, volume)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{path:?} {volume:?}: {err:?}");
    }
    let mut bad_endpoint = env.mount_req(&base.join("x"), "vol");
    bad_endpoint.endpoint = "10.0.3.2:7420".into();
    assert_eq!(c.mount(bad_endpoint).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    // A helper that fails (the volume does not exist): its stderr tail is in the error.
    let err = c.mount(env.mount_req(&base.join("missing"), "no-such-volume")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("exited with status"), "{}", err.message());
    assert!(err.message().contains("no-such-volume"), "the helper's stderr is quoted: {}", err.message());
    assert!(list(&mut c).await.is_empty(), "a failed mount is forgotten");

    // 16 mounts at once, not 17.
    let mut infos = Vec::new();
    for i in 0..16 {
        infos.push(c.mount(env.mount_req(&base.join(format!("v{i}")), "vol")).await.unwrap().into_inner());
    }
    let err = c.mount(env.mount_req(&base.join("v16"), "vol")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let listed = list(&mut c).await;
    assert_eq!(listed.len(), 16);
    assert!(listed.iter().all(|m| m.state == "mounted"), "{listed:?}");
    for i in 0..16 {
        c.unmount(pb::UnmountRequest { path: base.join(format!("v{i}")).display().to_string() }).await.unwrap();
    }
    assert!(mounts_under(&base.display().to_string()).is_empty());
}

#[tokio::test]
async fn a_missing_helper_is_a_clear_error() {
    let env = VolEnv::start(Some(Path::new("/nonexistent/sail-volume-fuse"))).await;
    let mut c = env.agent.client().await;
    let err = c.mount(env.mount_req(&env.agent.path("m"), "vol")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("/nonexistent/sail-volume-fuse"), "{}", err.message());
}
