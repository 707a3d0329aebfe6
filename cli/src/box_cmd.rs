//! `sail box ...` and `sail doctor`: sailboxes through vmm-host's gRPC API.

use std::io::{Read, Write};

use anyhow::Context;
use clap::{Args, Subcommand};
use proto::sailbox as pb;
use proto::sailbox::sailbox_service_client::SailboxServiceClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// A sailbox call failed with a contract error.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {message}")]
pub struct BoxError {
    /// Contract error name.
    pub name: String,
    /// Message.
    pub message: String,
    /// gRPC code.
    pub code: tonic::Code,
}

impl BoxError {
    /// Whether the request (not the service) was at fault: exit code 2.
    pub fn is_user_error(&self) -> bool {
        use tonic::Code::*;
        matches!(self.code, InvalidArgument | NotFound | AlreadyExists | FailedPrecondition | Unauthenticated | PermissionDenied)
            || matches!(
                self.name.as_str(),
                "SailboxExecAlreadyRunningError" | "SailboxExecRequestNotFoundError" | "SailboxTerminatedError"
            )
    }
}

impl From<tonic::Status> for BoxError {
    fn from(s: tonic::Status) -> Self {
        let name = proto::error_name(&s).unwrap_or_else(|| "SailError".into());
        Self { name, message: s.message().to_owned(), code: s.code() }
    }
}

#[derive(Subcommand)]
pub enum BoxCmd {
    /// Create a sailbox; returns once it runs (prints its id, or the sailbox with --json).
    #[command(after_help = crate::help::BOX_CREATE)]
    Create(CreateArgs),
    /// List sailboxes (not terminated ones, unless --all).
    #[command(after_help = crate::help::BOX_LS)]
    Ls {
        #[arg(long)]
        app: Option<String>,
        /// Include terminated and lost ones.
        #[arg(long)]
        all: bool,
        /// Only sailboxes whose agent is at most this version.
        #[arg(long)]
        max_guest_schema_version: Option<u32>,
    },
    /// Show one sailbox (`--connect` resumes a paused or sleeping one first).
    #[command(after_help = crate::help::BOX_INFO)]
    Info {
        id: String,
        #[arg(long)]
        connect: bool,
    },
    /// Show a sailbox's listeners and whether they route; --wait waits until PORT routes.
    #[command(after_help = crate::help::BOX_LISTENERS)]
    Listeners {
        id: String,
        #[arg(long)]
        port: Option<u32>,
        /// Seconds to wait until --port routes.
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Run a command; streams its output and exits with its exit code.
    #[command(after_help = crate::help::BOX_EXEC)]
    Exec(ExecArgs),
    /// Wait for an exec request by id (after the client went away); prints its output.
    #[command(after_help = crate::help::BOX_WAIT)]
    Wait {
        exec_id: String,
        /// Give up after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Write stdin to a file in the sailbox (parents are created).
    #[command(after_help = crate::help::BOX_WRITE)]
    Write {
        id: String,
        path: String,
        /// Permission bits, octal.
        #[arg(long, default_value = "644")]
        mode: String,
    },
    /// Write a file of the sailbox to stdout.
    #[command(after_help = crate::help::BOX_READ)]
    Read { id: String, path: String },
    /// Terminate a sailbox for good.
    #[command(after_help = crate::help::BOX_TERMINATE)]
    Terminate { id: String },
    /// Snapshot memory and disk while it keeps running (prints the checkpoint).
    #[command(after_help = crate::help::BOX_CHECKPOINT)]
    Checkpoint { id: String },
    /// Checkpoint and power down until `resume` (exec fails, ingress does not wake it).
    #[command(after_help = crate::help::BOX_PAUSE)]
    Pause { id: String },
    /// Checkpoint and power down until ingress, an exec, `resume` or `--call` completing.
    #[command(after_help = crate::help::BOX_SLEEP)]
    Sleep {
        id: String,
        /// Sleep while this external call is in flight (`complete-call` wakes it).
        #[arg(long)]
        call: Option<String>,
    },
    /// Start a paused or sleeping sailbox again.
    #[command(after_help = crate::help::BOX_RESUME)]
    Resume { id: String },
    /// The external call a sleep waits on completed.
    #[command(after_help = crate::help::BOX_COMPLETE_CALL)]
    CompleteCall { id: String, call: String },
    /// A new running sailbox from this one's state (prints the child like `create`).
    #[command(after_help = crate::help::BOX_FORK)]
    Fork { id: String },
    /// A new running sailbox from a checkpoint id (from any host sharing the chunk store).
    #[command(after_help = crate::help::BOX_RESTORE)]
    Restore {
        checkpoint: String,
        #[arg(long, default_value = "")]
        app: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long = "port")]
        ports: Vec<u32>,
    },
    /// Reboot onto the newest agent (recorded for the next wake if paused or sleeping).
    #[command(after_help = crate::help::BOX_UPGRADE)]
    Upgrade { id: String },
}

#[derive(Args, Clone)]
pub struct CreateArgs {
    #[arg(long, default_value = "default")]
    app: String,
    #[arg(long)]
    name: Option<String>,
    /// "debian" (the default, built once per host), "minimal" (busybox), or an image id.
    #[arg(long, default_value = "debian")]
    image: String,
    #[arg(long, default_value_t = 1.0)]
    cpu: f64,
    #[arg(long, default_value_t = 1024)]
    memory_mib: u32,
    #[arg(long, default_value_t = 8)]
    disk_gib: u32,
    /// An ingress port (repeat for more).
    #[arg(long = "port")]
    ports: Vec<u32>,
    /// Mount a volume in the guest: NAME:/absolute/path (repeat for more).
    #[arg(long = "volume", value_name = "NAME:/PATH")]
    volumes: Vec<String>,
    /// Create the --volume volumes that do not exist yet.
    #[arg(long)]
    mint: bool,
    /// "outbound" (the default): code inside can reach the network; "none": no outbound
    /// network device (the volume gateway is reachable either way).
    #[arg(long, default_value = "outbound", value_parser = ["outbound", "none"])]
    network: String,
}

/// The `--volume NAME:/PATH` arguments as the request's map (the server checks the paths).
fn volume_mounts(args: &[String], mint: bool) -> anyhow::Result<std::collections::HashMap<String, pb::VolumeMount>> {
    let mut out = std::collections::HashMap::new();
    for a in args {
        let Some((name, path)) = a.split_once(':').filter(|(n, p)| !n.is_empty() && !p.is_empty()) else {
            return Err(crate::output::UserError(format!("--volume {a:?} must be NAME:/absolute/path")).into());
        };
        let mount = pb::VolumeMount { volume: name.to_owned(), org: String::new(), mint_if_missing: mint };
        if out.insert(path.to_owned(), mount).is_some() {
            return Err(crate::output::UserError(format!("--volume: {path} is given twice")).into());
        }
    }
    Ok(out)
}

#[derive(Args, Clone)]
pub struct ExecArgs {
    id: String,
    #[arg(long)]
    cwd: Option<String>,
    /// Seconds the command may run.
    #[arg(long)]
    timeout: Option<u64>,
    /// Launch detached (servers); returns once launched.
    #[arg(long)]
    background: bool,
    /// Print only the exec id and return at once (wait later with `sail box wait`).
    #[arg(long)]
    detach: bool,
    /// The program and its arguments, passed as given; a single word is a shell command line.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// A connection to the service at `endpoint` (an unreachable one names what to run).
pub(crate) async fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .with_context(|| format!("bad endpoint {endpoint}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| crate::output::ServiceUnreachable::new(endpoint, &e))?)
}

/// The sailbox client of `endpoint`, sending this machine's key for it
/// (`tenancy::credentials::find_key`: `SAIL_API_KEY`, else the file `sail up` wrote).
pub(crate) async fn client(endpoint: &str) -> anyhow::Result<Client> {
    let key = tenancy::credentials::find_key(endpoint)?;
    let channel = channel(endpoint).await?;
    Ok(SailboxServiceClient::new(tenancy::client::authed(channel, key.as_ref())).max_decoding_message_size(64 << 20))
}

fn state_name(v: i32) -> &'static str {
    match pb::SailboxState::try_from(v).unwrap_or(pb::SailboxState::Unspecified) {
        pb::SailboxState::Creating => "creating",
        pb::SailboxState::Running => "running",
        pb::SailboxState::Paused => "paused",
        pb::SailboxState::Sleeping => "sleeping",
        pb::SailboxState::Terminated => "terminated",
        pb::SailboxState::Lost => "lost",
        pb::SailboxState::Unspecified => "unknown",
    }
}

/// The JSON form of a sailbox (`sailbox_id` first, as scripts expect).
pub fn sailbox_json(s: &pb::Sailbox) -> serde_json::Value {
    serde_json::json!({
        "sailbox_id": s.sailbox_id, "app": s.app, "name": s.name, "image": s.image,
        "state": state_name(s.state), "state_reason": s.state_reason, "cpu": s.cpu, "vcpus": s.vcpus,
        "memory_mib": s.memory_mib, "disk_gib": s.disk_gib,
        "listeners": s.listeners.iter().map(listener_json).collect::<Vec<_>>(),
        "created_unix_ms": s.created_unix_ms, "guest_schema_version": s.guest_schema_version,
        "agent_version": s.agent_version, "hypervisor": s.hypervisor, "accelerator": s.accelerator,
        "host": s.host, "boot_ms": s.boot_ms, "last_checkpoint": s.last_checkpoint,
        "pending_upgrade": s.pending_upgrade, "sleeping_on_call": s.sleeping_on_call, "forked_from": s.forked_from,
        "volumes": s.volumes.iter().map(|(p, v)| (p.clone(), serde_json::json!({"volume": v.volume, "org": v.org}))).collect::<serde_json::Map<_, _>>(),
        "mounts": s.mounts.iter().map(|m| serde_json::json!({
            "path": m.path, "volume": m.volume, "org": m.org, "state": m.state, "head_commit": m.head_commit,
            "dirty_bytes": m.dirty_bytes, "restarts": m.restarts, "last_error": m.last_error,
        })).collect::<Vec<_>>(),
        "network": s.network,
    })
}

fn checkpoint_json(c: &pb::Checkpoint) -> serde_json::Value {
    serde_json::json!({
        "checkpoint_id": c.checkpoint_id, "sailbox_id": c.sailbox_id, "pause_ms": c.pause_ms, "total_ms": c.total_ms,
        "memory_bytes": c.memory_bytes, "memory_bytes_changed": c.memory_bytes_changed,
        "memory_bytes_uploaded": c.memory_bytes_uploaded, "disk_bytes_changed": c.disk_bytes_changed,
        "disk_bytes_uploaded": c.disk_bytes_uploaded, "parent_checkpoint": c.parent_checkpoint,
    })
}

fn print_state(s: pb::Sailbox, json: bool) {
    if json {
        println!("{}", sailbox_json(&s));
    } else {
        crate::note!("{} {}", s.sailbox_id, state_name(s.state));
    }
}

fn listener_json(l: &pb::Listener) -> serde_json::Value {
    serde_json::json!({"port": l.port, "url": l.url, "routed": l.routed})
}

fn print_sailbox(s: &pb::Sailbox, json: bool) {
    if json {
        println!("{}", sailbox_json(s));
        return;
    }
    println!("{}  {}  app={} name={} image={}", s.sailbox_id, state_name(s.state), s.app, s.name, s.image);
    println!(
        "  {} vCPU, {} MiB, {} GiB disk, network {}; {} on {} ({}); agent {} (schema {}); booted in {} ms",
        s.vcpus,
        s.memory_mib,
        s.disk_gib,
        s.network,
        s.hypervisor,
        s.host,
        s.accelerator,
        s.agent_version,
        s.guest_schema_version,
        s.boot_ms
    );
    for l in &s.listeners {
        println!("  port {:<5} -> {}", l.port, l.url);
    }
    for m in &s.mounts {
        let head = if m.head_commit.is_empty() { "-" } else { crate::output::short(&m.head_commit) };
        let restarts = if m.restarts > 0 { format!(", {} restarts", m.restarts) } else { String::new() };
        let error = if m.last_error.is_empty() { String::new() } else { format!(" ({})", m.last_error) };
        println!(
            "  volume {} at {}: {} at {head}, {} uncommitted{restarts}{error}",
            m.volume,
            m.path,
            m.state,
            crate::output::human(m.dirty_bytes)
        );
    }
    if !s.state_reason.is_empty() {
        println!("  reason: {}", s.state_reason);
    }
}

/// The gRPC client of vmm-host's sailbox service.
pub(crate) type Client = SailboxServiceClient<tenancy::client::AuthedChannel>;

/// Runs a `sail box` command; returns the process exit code.
pub async fn run(endpoint: &str, json: bool, cmd: BoxCmd) -> anyhow::Result<u8> {
    let mut c = client(endpoint).await?;
    match cmd {
        BoxCmd::Create(a) => create(&mut c, a, json).await?,
        BoxCmd::Ls { app, all, max_guest_schema_version } => ls(&mut c, app, all, max_guest_schema_version, json).await?,
        BoxCmd::Info { id, connect } => {
            let s = c.get_sailbox(pb::GetSailboxRequest { sailbox_id: id, connect }).await.map_err(BoxError::from)?.into_inner();
            print_sailbox(&s, json);
        }
        BoxCmd::Checkpoint { id } => checkpoint(&mut c, id, json).await?,
        BoxCmd::Pause { id } => {
            print_state(c.pause(pb::SailboxIdRequest { sailbox_id: id }).await.map_err(BoxError::from)?.into_inner(), json)
        }
        BoxCmd::Sleep { id, call } => {
            let req = pb::SleepRequest { sailbox_id: id, call: call.unwrap_or_default() };
            print_state(c.sleep(req).await.map_err(BoxError::from)?.into_inner(), json)
        }
        BoxCmd::Resume { id } => {
            print_state(c.resume(pb::SailboxIdRequest { sailbox_id: id }).await.map_err(BoxError::from)?.into_inner(), json)
        }
        BoxCmd::CompleteCall { id, call } => {
            let req = pb::CompleteCallRequest { sailbox_id: id, call };
            print_state(c.complete_call(req).await.map_err(BoxError::from)?.into_inner(), json)
        }
        BoxCmd::Fork { id } => fork(&mut c, id, json).await?,
        BoxCmd::Restore { checkpoint, app, name, ports } => {
            let req = pb::RestoreRequest { checkpoint_id: checkpoint, app, name, ingress_ports: ports };
            let s = crate::output::spin("restoring", c.restore_sailbox(req)).await.map_err(BoxError::from)?.into_inner();
            if json {
                println!("{}", sailbox_json(&s));
            } else {
                println!("{}", s.sailbox_id);
            }
        }
        BoxCmd::Upgrade { id } => upgrade(&mut c, id, json).await?,
        BoxCmd::Listeners { id, port, wait } => return listeners(&mut c, id, port, wait, json).await,
        BoxCmd::Exec(a) => return exec(&mut c, a, json).await,
        BoxCmd::Wait { exec_id, timeout } => {
            if let Some(t) = timeout {
                let req = pb::WaitExecRequest { exec_id: exec_id.clone(), timeout_ms: t * 1000 };
                c.wait_exec(req).await.map_err(BoxError::from)?;
            }
            return stream_output(&mut c, &exec_id, json).await;
        }
        BoxCmd::Write { id, path, mode } => write(&mut c, id, path, mode, json).await?,
        BoxCmd::Read { id, path } => read(&mut c, id, path).await?,
        BoxCmd::Terminate { id } => {
            let s = c.terminate(pb::TerminateRequest { sailbox_id: id }).await.map_err(BoxError::from)?.into_inner();
            print_state(s, json);
        }
    }
    Ok(0)
}

/// `sail box create`: builds the image if needed, then creates the sailbox.
async fn create(c: &mut Client, a: CreateArgs, json: bool) -> anyhow::Result<()> {
    ensure_image(c, &a.image).await?;
    let req = pb::CreateSailboxRequest {
        app: a.app,
        image: a.image,
        name: a.name.unwrap_or_default(),
        cpu: a.cpu,
        memory_mib: a.memory_mib,
        disk_gib: a.disk_gib,
        ingress_ports: a.ports,
        volumes: volume_mounts(&a.volumes, a.mint)?,
        network: a.network,
        org: String::new(),
    };
    let s = crate::output::spin("booting the sailbox", c.create_sailbox(req)).await.map_err(BoxError::from)?.into_inner();
    if json {
        println!("{}", sailbox_json(&s));
    } else {
        println!("{}", s.sailbox_id);
        crate::note!("sailbox {} running ({} in {} ms)", s.sailbox_id, s.accelerator, s.boot_ms);
    }
    Ok(())
}

/// `sail box ls`.
async fn ls(c: &mut Client, app: Option<String>, all: bool, max_schema: Option<u32>, json: bool) -> anyhow::Result<()> {
    let mut states = Vec::new();
    if all {
        states = [
            pb::SailboxState::Creating,
            pb::SailboxState::Running,
            pb::SailboxState::Paused,
            pb::SailboxState::Sleeping,
            pb::SailboxState::Terminated,
            pb::SailboxState::Lost,
        ]
        .iter()
        .map(|s| *s as i32)
        .collect();
    }
    let req =
        pb::ListSailboxesRequest { app: app.unwrap_or_default(), states, max_guest_schema_version: max_schema.unwrap_or(0) };
    let list = c.list_sailboxes(req).await.map_err(BoxError::from)?.into_inner().sailboxes;
    if json {
        println!("{}", serde_json::Value::Array(list.iter().map(sailbox_json).collect()));
    } else {
        for s in list {
            println!("{:<28} {:<10} {:<12} {:<16} {}", s.sailbox_id, state_name(s.state), s.app, s.name, s.image);
        }
    }
    Ok(())
}

/// `sail box checkpoint`.
async fn checkpoint(c: &mut Client, id: String, json: bool) -> anyhow::Result<()> {
    let call = c.checkpoint_sailbox(pb::SailboxIdRequest { sailbox_id: id });
    let ck = crate::output::spin("checkpointing memory and disk", call).await.map_err(BoxError::from)?.into_inner();
    if json {
        println!("{}", checkpoint_json(&ck));
    } else {
        println!("{}", ck.checkpoint_id);
        crate::note!(
            "paused {} ms, durable after {} ms; memory: {} changed, {} uploaded of {}; disk: {} changed, {} uploaded",
            ck.pause_ms,
            ck.total_ms,
            crate::human(ck.memory_bytes_changed),
            crate::human(ck.memory_bytes_uploaded),
            crate::human(ck.memory_bytes),
            crate::human(ck.disk_bytes_changed),
            crate::human(ck.disk_bytes_uploaded)
        );
    }
    Ok(())
}

/// `sail box fork`.
async fn fork(c: &mut Client, id: String, json: bool) -> anyhow::Result<()> {
    let call = c.fork(pb::SailboxIdRequest { sailbox_id: id });
    let r = crate::output::spin("forking", call).await.map_err(BoxError::from)?.into_inner();
    let child = r.child.unwrap_or_default();
    if json {
        let mut v = sailbox_json(&child);
        v["checkpoint"] = r.checkpoint.as_ref().map(checkpoint_json).unwrap_or_default();
        println!("{v}");
    } else {
        println!("{}", child.sailbox_id);
        crate::note!("forked from {} ({} ms to the child's agent)", child.forked_from, child.boot_ms);
    }
    Ok(())
}

/// `sail box upgrade`.
async fn upgrade(c: &mut Client, id: String, json: bool) -> anyhow::Result<()> {
    let r = c.upgrade(pb::SailboxIdRequest { sailbox_id: id }).await.map_err(BoxError::from)?.into_inner();
    let s = r.sailbox.unwrap_or_default();
    if json {
        let mut v = sailbox_json(&s);
        v["applied"] = serde_json::json!(r.applied);
        println!("{v}");
    } else if r.applied {
        crate::note!("{} runs agent schema {}", s.sailbox_id, s.guest_schema_version);
    } else {
        crate::note!("{} is {}: the upgrade applies at its next wake", s.sailbox_id, state_name(s.state));
    }
    Ok(())
}

/// `sail box listeners`; exit code 1 when `--port` with `--wait` did not route in time.
async fn listeners(c: &mut Client, id: String, port: Option<u32>, wait: Option<u64>, json: bool) -> anyhow::Result<u8> {
    let req =
        pb::ListenersRequest { sailbox_id: id, port: port.unwrap_or(0), wait_routed_ms: wait.map(|s| s * 1000).unwrap_or(0) };
    let ls = c.listeners(req).await.map_err(BoxError::from)?.into_inner().listeners;
    if json {
        println!("{}", serde_json::Value::Array(ls.iter().map(listener_json).collect()));
    } else {
        for l in &ls {
            println!("port {:<5} {}  {}", l.port, l.url, if l.routed { "routed" } else { "not routed yet" });
        }
    }
    if port.is_some() && wait.is_some() && !ls.iter().all(|l| l.routed) {
        return Ok(1);
    }
    Ok(0)
}

/// `sail box exec`: starts the command, then streams its output (or prints its id with
/// `--detach`); returns the command's exit code.
async fn exec(c: &mut Client, a: ExecArgs, json: bool) -> anyhow::Result<u8> {
    let req = pb::ExecRequest {
        sailbox_id: a.id,
        command: command_line(&a.command),
        cwd: a.cwd.unwrap_or_default(),
        timeout_ms: a.timeout.map(|s| s * 1000).unwrap_or(0),
        background: a.background,
        env: Default::default(),
    };
    let handle = c.exec(req).await.map_err(BoxError::from)?.into_inner();
    if a.detach {
        println!("{}", if json { serde_json::json!({"exec_id": handle.exec_id}).to_string() } else { handle.exec_id });
        return Ok(0);
    }
    stream_output(c, &handle.exec_id, json).await
}

/// The shell command line the wire carries for the words after `--`: one word is a command
/// line as typed (`-- 'make && echo ok'`); several words are a program and its arguments,
/// each quoted for the guest's POSIX shell so it reaches the program unchanged (as
/// `docker exec` and `kubectl exec` pass them).
pub(crate) fn command_line(words: &[String]) -> String {
    match words {
        [one] => one.clone(),
        words => words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" "),
    }
}

/// `word` as one POSIX shell word: left bare when it has only characters no shell treats
/// specially, otherwise single-quoted (a `'` inside becomes `'\''`).
fn shell_quote(word: &str) -> String {
    // No `=`: a bare `A=b` first word would be an assignment, not a program name.
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-.,/:@%+".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// `sail box write`: stdin to a file in the sailbox.
async fn write(c: &mut Client, id: String, path: String, mode: String, json: bool) -> anyhow::Result<()> {
    let mode = u32::from_str_radix(mode.trim_start_matches("0o"), 8)
        .map_err(|_| crate::UserError(format!("mode {mode:?} is not octal")))?;
    let written = write_stdin(c, id, path, mode).await?;
    if json {
        println!("{}", serde_json::json!({"bytes_written": written}));
    } else {
        crate::note!("wrote {}", crate::human(written));
    }
    Ok(())
}

/// `sail box read`: a file of the sailbox to stdout.
async fn read(c: &mut Client, id: String, path: String) -> anyhow::Result<()> {
    let mut stream = c.read_file(pb::ReadFileRequest { sailbox_id: id, path }).await.map_err(BoxError::from)?.into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(msg) = stream.next().await {
        out.write_all(&msg.map_err(BoxError::from)?.data)?;
    }
    out.flush()?;
    Ok(())
}

/// Builds the image on the host if needed, showing its progress.
async fn ensure_image(c: &mut Client, image: &str) -> anyhow::Result<()> {
    let mut stream =
        c.ensure_image(pb::EnsureImageRequest { image: image.to_owned() }).await.map_err(BoxError::from)?.into_inner();
    let bar = crate::output::spinner("image");
    let mut saw_work = false;
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(BoxError::from)?;
        if msg.image_id.is_empty() {
            saw_work = true;
        }
        if let Some(b) = &bar {
            b.set_message(msg.message.clone());
        }
    }
    if let Some(b) = bar {
        if saw_work {
            b.finish_with_message("image ready");
        } else {
            b.finish_and_clear();
        }
    }
    Ok(())
}

/// Prints an exec's output as it comes and returns its exit code.
async fn stream_output(c: &mut Client, exec_id: &str, json: bool) -> anyhow::Result<u8> {
    use pb::exec_output::Event;
    let req = pb::WaitExecRequest { exec_id: exec_id.to_owned(), timeout_ms: 0 };
    let mut stream = c.stream_exec(req).await.map_err(BoxError::from)?.into_inner();
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(ev) = stream.next().await {
        match ev.map_err(BoxError::from)?.event {
            Some(Event::Stdout(b)) if !json => {
                out.write_all(&b)?;
                out.flush()?;
            }
            Some(Event::Stderr(b)) if !json => {
                err.write_all(&b)?;
                err.flush()?;
            }
            Some(Event::Result(r)) => {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "exec_id": r.exec_id, "return_code": r.return_code,
                            "stdout": String::from_utf8_lossy(&r.stdout), "stderr": String::from_utf8_lossy(&r.stderr),
                            "stdout_truncated": r.stdout_truncated, "stderr_truncated": r.stderr_truncated,
                            "timed_out": r.timed_out, "elapsed_ms": r.finished_unix_ms.saturating_sub(r.started_unix_ms),
                        })
                    );
                } else {
                    for (what, truncated, total) in
                        [("stdout", r.stdout_truncated, r.stdout_bytes), ("stderr", r.stderr_truncated, r.stderr_bytes)]
                    {
                        if truncated {
                            eprintln!("[sail: {what} truncated: {} produced, the first 16 MiB kept]", crate::human(total));
                        }
                    }
                    if r.timed_out {
                        eprintln!("[sail: timed out; the command was killed]");
                    }
                }
                return Ok(u8::try_from(r.return_code.clamp(0, 255)).unwrap_or(1));
            }
            _ => {}
        }
    }
    anyhow::bail!("the exec stream ended without a result")
}

/// Streams stdin to a file in the sailbox. The size must be known first: a regular file's
/// length is used as is; a pipe is spooled to a temporary file (never held in memory).
async fn write_stdin(c: &mut Client, id: String, path: String, mode: u32) -> anyhow::Result<u64> {
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let fd = stdin.as_fd().try_clone_to_owned()?;
    let mut file = std::fs::File::from(fd);
    let meta = file.metadata()?;
    let (mut source, size) = if meta.is_file() {
        (file, meta.len())
    } else {
        let mut spool = tempfile::tempfile().context("creating a spool file")?;
        let n = std::io::copy(&mut file, &mut spool)?;
        use std::io::Seek;
        spool.seek(std::io::SeekFrom::Start(0))?;
        (spool, n)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::WriteFileRequest>(4);
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let first = pb::WriteFileRequest { sailbox_id: id, path, mode, size, data: Vec::new() };
        if tx.blocking_send(first).is_err() {
            return Ok(());
        }
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = source.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            buf.truncate(n);
            if tx.blocking_send(pb::WriteFileRequest { data: buf, ..Default::default() }).is_err() {
                return Ok(());
            }
        }
    });
    let resp = c.write_file(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(BoxError::from);
    reader.await??;
    Ok(resp?.into_inner().bytes_written)
}

/// `sail doctor`: what this host can run, checked locally, plus the service's view.
pub async fn doctor(endpoint: &str, json: bool) -> anyhow::Result<u8> {
    let probe = vmm_host::accel::detect(std::env::var("SAIL_ACCEL").ok().and_then(|s| s.parse().ok()).unwrap_or_default());
    let config = vmm_host::HostConfig::local("/nonexistent");
    let kit = vmm_host::guest::GuestKit::load(&config.guest_dir);
    let agent = vmm_host::guest::describe_agent(&config.agent_binary);
    let qemu = std::process::Command::new(&config.qemu_binary).arg("--version").output();
    // Both NICs' network stack, and what configures the host NIC's namespace
    // (docs/networking.md).
    let passt = std::process::Command::new("passt").arg("--version").output();
    let ip = std::process::Command::new("ip").arg("-V").output();
    let tool = |name: &str, o: &std::io::Result<std::process::Output>| match o {
        Ok(o) if o.status.success() => {
            Ok(String::from_utf8_lossy(&o.stdout).lines().find(|l| l.contains("version")).unwrap_or(name).trim().to_owned())
        }
        Ok(o) => Err(format!("{name}: exit {}", o.status)),
        Err(e) => Err(format!("{name}: {e} (bash scripts/setup.sh vm)")),
    };
    let service = match client(endpoint).await {
        Ok(mut c) => c.get_host_info(pb::HostInfoRequest {}).await.ok().map(|r| r.into_inner()),
        Err(_) => None,
    };
    let first_line = |o: &std::io::Result<std::process::Output>| match o {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_owned()),
        Ok(o) => Err(format!("exit {}", o.status)),
        Err(e) => Err(e.to_string()),
    };
    let rows: Vec<(&str, Result<String, String>)> = vec![
        ("accelerator", Ok(format!("{} ({})", probe.accel.as_str(), probe.reason))),
        ("qemu", first_line(&qemu).map_err(|e| format!("{}: {e}", config.qemu_binary.display()))),
        ("guest kernel", kit.as_ref().map(|k| format!("{} ({})", k.vmlinux.display(), k.release)).map_err(|e| e.to_string())),
        (
            "agent",
            agent
                .as_ref()
                .map(|a| format!("{} schema {} ({})", a.agent_version, a.guest_schema_version, config.agent_binary.display()))
                .map_err(|e| e.to_string()),
        ),
        ("passt", tool("passt", &passt)),
        ("iproute2", tool("ip", &ip)),
        (
            "service",
            service
                .as_ref()
                .map(|s| format!("{endpoint}: {} running, images {:?}", s.running, s.images))
                .ok_or_else(|| format!("{endpoint} not reachable")),
        ),
    ];
    let ok = rows.iter().filter(|(k, _)| *k != "service").all(|(_, r)| r.is_ok());
    if json {
        let obj: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(k, r)| {
                (
                    k.to_string(),
                    match r {
                        Ok(v) => serde_json::json!({"ok": true, "detail": v}),
                        Err(e) => serde_json::json!({"ok": false, "detail": e}),
                    },
                )
            })
            .collect();
        println!("{}", serde_json::Value::Object(obj));
    } else {
        for (k, r) in &rows {
            match r {
                Ok(v) => println!("ok    {k:<20} {v}"),
                Err(e) => println!("FAIL  {k:<20} {e}"),
            }
        }
        if !ok {
            println!("\nrun `bash scripts/setup.sh vm` to install what sailboxes need");
        }
    }
    Ok(if ok { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::command_line;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    /// What a real POSIX shell hands the program for the line: one argument per line.
    fn argv_seen_by_sh(line: &str) -> Vec<String> {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printargs() {{ for a in \"$@\"; do printf '%s\\0' \"$a\"; done; }}; printargs {line}"))
            .output()
            .expect("running /bin/sh");
        assert!(out.status.success(), "sh failed on {line:?}: {}", String::from_utf8_lossy(&out.stderr));
        let s = String::from_utf8(out.stdout).expect("utf-8");
        s.split_terminator('\0').map(str::to_owned).collect()
    }

    #[test]
    fn several_words_reach_the_program_unchanged() {
        let cases: &[&[&str]] = &[
            &["ls", "-la", "/srv/a b"],
            &["sh", "-c", "echo hi"],
            &["printf", "%s|", "a", "b c", "it's", "$HOME", "*", "", "back\\slash", "new\nline", "A=b", "~", "`id`", "\"q\""],
            &["--", "-n", ";", "&&", "|", ">", "(", "#x"],
        ];
        for case in cases {
            let line = command_line(&words(case));
            assert_eq!(argv_seen_by_sh(&line), words(case), "line {line:?}");
        }
    }

    #[test]
    fn one_word_is_a_shell_command_line() {
        assert_eq!(command_line(&words(&["make test && echo ok"])), "make test && echo ok");
        assert_eq!(argv_seen_by_sh(&command_line(&words(&["a 'b c'"]))), ["a", "b c"]);
    }

    #[test]
    fn plain_words_stay_bare() {
        assert_eq!(command_line(&words(&["ls", "-la", "/srv/x.txt"])), "ls -la /srv/x.txt");
        assert_eq!(command_line(&words(&["echo", "A=b"])), "echo 'A=b'");
    }
}
