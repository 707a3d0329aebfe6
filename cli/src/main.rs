//! `sail`: the command-line tool for volumes and sailboxes.
//!
//! Exit codes: 0 success, 1 server or transport error (the service not running included),
//! 2 user error (bad arguments, not found, invalid input).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use guest_fuse::ControlError;
use proto::volume as pb;
use volume_client::{ClientError, FileUpload, VolumeClient};
use volumed::server::{Server, ServerConfig};

mod box_cmd;
mod help;
mod image_cmd;
mod key_cmd;
mod mount_cmd;
mod output;

pub(crate) use output::{UserError, human, note, quiet, short};

/// Default address of `sail up`, and of clients when SAIL_ENDPOINT is unset.
const DEFAULT_LISTEN: &str = "127.0.0.1:7420";

#[derive(Parser)]
#[command(name = "sail", version, about = "Volumes and sailboxes", after_help = help::SAIL)]
struct Cli {
    /// volumed endpoint.
    #[arg(long, global = true, env = "SAIL_ENDPOINT", default_value = "http://127.0.0.1:7420")]
    endpoint: String,
    /// Org to act in (default: the API key's own; only an operator key names another).
    #[arg(long, global = true, env = "SAIL_ORG", default_value = "")]
    org: String,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Print only results (ids, data): no progress, notes or summaries.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Read chunks through this verified cache directory (shared by every reader on the host).
    #[arg(long, global = true, env = "SAIL_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Capacity of the cache, in MiB.
    #[arg(long, global = true, env = "SAIL_CACHE_MIB", default_value_t = 10240)]
    cache_mib: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the services in the foreground on the embedded local defaults.
    #[command(after_help = help::UP)]
    Up {
        /// Data directory (default: $XDG_DATA_HOME/sail or ~/.local/share/sail).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Address to listen on.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
    },
    /// Manage volumes.
    #[command(subcommand, after_help = help::VOLUME)]
    Volume(VolumeCmd),
    /// Manage API keys (admin keys; `sail up` keeps the first one where this CLI finds it).
    #[command(subcommand)]
    Key(key_cmd::KeyCmd),
    /// Manage sailboxes (microVMs).
    #[command(subcommand, name = "box", after_help = help::BOX)]
    Sailbox(box_cmd::BoxCmd),
    /// Build, list and inspect images (docs/images.md).
    #[command(subcommand)]
    Image(image_cmd::ImageCmd),
    /// Check what this host needs to run sailboxes (accelerator, VMM, kernel, agent, passt, iproute2).
    #[command(after_help = help::DOCTOR)]
    Doctor,
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell).
    #[command(after_help = help::COMPLETIONS)]
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume (no error if it exists).
    #[command(after_help = help::VOLUME_CREATE)]
    Create { name: String },
    /// List volumes.
    #[command(after_help = help::VOLUME_LS)]
    Ls,
    /// Delete a volume (its chunks stay until garbage collection).
    #[command(after_help = help::VOLUME_RM)]
    Rm { name: String },
    /// Show the commit log, newest first.
    #[command(after_help = help::VOLUME_LOG)]
    Log {
        name: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Upload local files or directories into a volume as one commit.
    #[command(after_help = help::VOLUME_PUT)]
    Put {
        name: String,
        /// Local files or directories.
        #[arg(required = true)]
        local: Vec<PathBuf>,
        /// Directory inside the volume to put them under.
        #[arg(long, default_value = "")]
        dest: String,
    },
    /// Write a file of the volume's head to stdout.
    #[command(after_help = help::VOLUME_CAT)]
    Cat { name: String, path: String },
    /// List a directory of the volume's head.
    #[command(after_help = help::VOLUME_LIST)]
    List {
        name: String,
        #[arg(default_value = "")]
        path: String,
    },
    /// Mount a volume lazily through FUSE (detached unless --foreground).
    #[command(after_help = help::VOLUME_MOUNT)]
    Mount(mount_cmd::MountArgs),
    /// Commit a mount's local changes; prints the commit id.
    #[command(after_help = help::VOLUME_COMMIT)]
    Commit { path: PathBuf },
    /// Switch a mount to the newest commit (discards its uncommitted changes).
    #[command(after_help = help::VOLUME_RELOAD)]
    Reload { path: PathBuf },
    /// Show a mount's head, dirty files and cache counters.
    #[command(after_help = help::VOLUME_STATUS)]
    Status { path: PathBuf },
    /// Unmount (a mount whose helper died is detached).
    #[command(after_help = help::VOLUME_UNMOUNT)]
    Unmount { path: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    output::init(cli.quiet, cli.json);
    let default_filter = if cli.quiet { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let name = e
                .downcast_ref::<ControlError>()
                .map(|c| c.name.clone())
                .or_else(|| e.downcast_ref::<ClientError>().map(|c| c.name().unwrap_or("SailError").to_owned()))
                .or_else(|| e.downcast_ref::<box_cmd::BoxError>().map(|b| b.name.clone()));
            if json {
                let name = name.clone().unwrap_or_else(|| "SailError".into());
                eprintln!("{}", serde_json::json!({"error": {"name": name, "message": format!("{e:#}")}}));
            } else {
                eprintln!("error: {e:#}");
            }
            let user_error = name.as_deref().is_some_and(|n| USER_ERRORS.contains(&n)) || e.downcast_ref::<UserError>().is_some();
            let user_error = user_error
                || e.downcast_ref::<ClientError>().is_some_and(|c| {
                    matches!(c, ClientError::Server { code, .. } if matches!(code,
                    tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::AlreadyExists
                    | tonic::Code::FailedPrecondition | tonic::Code::Aborted | tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied))
                })
                || e.downcast_ref::<UserError>().is_some()
                || e.downcast_ref::<box_cmd::BoxError>().is_some_and(|b| b.is_user_error());
            ExitCode::from(if user_error { 2 } else { 1 })
        }
    }
}

/// Contract errors caused by the request rather than by the service (exit code 2).
const USER_ERRORS: &[&str] = &[
    "VolumeNotFoundError",
    "VolumeInvalidArgumentError",
    "VolumeCommitConflictError",
    "VolumePathNotFoundError",
    "VolumeCommitNotFoundError",
    "VolumeFuseUnavailableError",
];

fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("sail");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/sail")
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Up { data_dir, listen } => up(data_dir.unwrap_or_else(default_data_dir), listen).await,
        Command::Sailbox(cmd) => box_cmd::run(&cli.endpoint, cli.json, cmd).await,
        Command::Key(cmd) => key_cmd::run(&cli.endpoint, &cli.org, cli.json, cmd).await,
        Command::Doctor => box_cmd::doctor(&cli.endpoint, cli.json).await,
        Command::Image(cmd) => image_cmd::run(&mut box_cmd::client(&cli.endpoint).await?, cli.json, cli.quiet, cmd).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "sail", &mut std::io::stdout());
            Ok(0)
        }
        Command::Volume(cmd) => {
            let g = mount_cmd::Globals {
                endpoint: cli.endpoint,
                org: cli.org,
                cache_dir: cli.cache_dir,
                cache_mib: cli.cache_mib,
                json: cli.json,
            };
            volume_command(g, cmd).await?;
            Ok(0)
        }
    }
}

/// `sail up`: volumed and vmm-host on one endpoint until Ctrl-C or SIGTERM.
async fn up(data_dir: PathBuf, listen: std::net::SocketAddr) -> anyhow::Result<u8> {
    let server = Server::bind(ServerConfig::local(&data_dir, listen))
        .await
        .with_context(|| format!("starting volumed on {listen} (data in {})", data_dir.display()))?;
    let mut config = vmm_host::HostConfig::local(data_dir.join("vmm"));
    // Guests reach volumes through vmm-host's gateway, which forwards to this volumed with
    // the operator key (it names each sailbox's org).
    config.volumed_endpoint = Some(format!("http://{}", server.addr));
    config.volumed_key = Some(server.bootstrap.operator.clone());
    // The local CLI and SDK find the first admin key without a step of their own.
    let endpoint = format!("http://{}", server.addr);
    let key_file = tenancy::credentials::save_key(&endpoint, &server.bootstrap.admin)
        .with_context(|| format!("keeping the admin key for {endpoint}"))?;
    let host = vmm_host::Host::open(config)
        .await
        .with_context(|| format!("starting vmm-host (data in {})", data_dir.join("vmm").display()))?;
    let server = server.with_grpc(|r| r.add_service(vmm_host::GrpcSailboxes::new(host.clone()).into_server()));
    println!("sail up: volumed and vmm-host listening on http://{} (data in {})", server.addr, data_dir.display());
    println!("sail up: admin key of org default in {} (clients on this machine use it)", key_file.display());
    server
        .serve(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        })
        .await?;
    // Running and sleeping sailboxes keep running (the next `sail up` re-attaches
    // them); with none left, the cowfs mount under the data directory goes too.
    host.shutdown().await;
    Ok(0)
}

/// `sail volume ...`: the mount commands talk to a FUSE helper and block, so they run off the
/// async runtime; the others are calls to volumed.
async fn volume_command(g: mount_cmd::Globals, cmd: VolumeCmd) -> anyhow::Result<()> {
    let blocking: Box<dyn FnOnce() -> anyhow::Result<()> + Send> = match cmd {
        VolumeCmd::Mount(a) => Box::new(move || mount_cmd::mount(&g, a)),
        VolumeCmd::Commit { path } => Box::new(move || mount_cmd::commit(&g, &path)),
        VolumeCmd::Reload { path } => Box::new(move || mount_cmd::reload(&g, &path)),
        VolumeCmd::Status { path } => Box::new(move || mount_cmd::status(&g, &path)),
        VolumeCmd::Unmount { path } => Box::new(move || mount_cmd::unmount(&g, &path)),
        cmd => {
            let mut client = VolumeClient::connect(&g.endpoint).await.map_err(|e| match e {
                ClientError::Connect { .. } => anyhow::Error::new(output::ServiceUnreachable::new(&g.endpoint, &e)),
                e => e.into(),
            })?;
            if let Some(dir) = &g.cache_dir {
                let cache = chunkstore::ChunkCache::open(dir, g.cache_mib << 20)
                    .with_context(|| format!("opening chunk cache {}", dir.display()))?;
                client = client.with_cache(cache);
            }
            // `sail volume put` commits as this host's CLI (like git's author, declared by
            // the caller until API keys say who it is).
            let client = client.with_author(format!("cli/{}", sysutil::host::hostname()));
            return volume(client, g.org, g.json, cmd).await;
        }
    };
    tokio::task::spawn_blocking(blocking).await?
}

async fn volume(mut c: VolumeClient, org: String, json: bool, cmd: VolumeCmd) -> anyhow::Result<()> {
    let vref = |name: &str| Some(pb::VolumeRef { org: org.clone(), name: name.to_owned() });
    match cmd {
        VolumeCmd::Create { name } => {
            let v = c.get_volume(&org, &name, true).await?;
            if json {
                println!("{}", volume_json(&v));
            } else if !quiet() {
                println!("volume {}/{} (id {}, head {})", v.org, v.name, v.id, short(&v.head));
            }
        }
        VolumeCmd::Ls => volume_ls(&mut c, &org, json).await?,
        VolumeCmd::Rm { name } => {
            // Looked up first so the message names the org the key resolved to.
            let v = c.get_volume(&org, &name, false).await?;
            c.grpc().delete_volume(pb::DeleteVolumeRequest { volume: vref(&name) }).await.map_err(ClientError::from)?;
            if !json && !quiet() {
                println!("deleted {}/{name}", v.org);
            }
        }
        VolumeCmd::Log { name, limit } => volume_log(&mut c, vref(&name), limit, json).await?,
        VolumeCmd::Put { name, local, dest } => volume_put(&mut c, &org, &name, &local, &dest, json).await?,
        VolumeCmd::Cat { name, path } => {
            let data = c.read_file(&org, &name, &path).await?;
            use std::io::Write;
            std::io::stdout().write_all(&data)?;
        }
        VolumeCmd::Mount(_)
        | VolumeCmd::Commit { .. }
        | VolumeCmd::Reload { .. }
        | VolumeCmd::Status { .. }
        | VolumeCmd::Unmount { .. } => {
            bail!("internal error: mount commands are handled before connecting")
        }
        VolumeCmd::List { name, path } => volume_list(&mut c, vref(&name), path, json).await?,
    }
    Ok(())
}

/// `sail volume ls`.
async fn volume_ls(c: &mut VolumeClient, org: &str, json: bool) -> anyhow::Result<()> {
    let list = c.grpc().list_volumes(pb::ListVolumesRequest { org: org.to_owned() }).await.map_err(ClientError::from)?;
    let vols = list.into_inner().volumes;
    if json {
        println!("{}", serde_json::Value::Array(vols.iter().map(volume_json).collect()));
    } else {
        for v in vols {
            println!("{:<32} {:>6} commits  head {}", v.name, v.commit_count, short(&v.head));
        }
    }
    Ok(())
}

/// `sail volume log`.
async fn volume_log(c: &mut VolumeClient, volume: Option<pb::VolumeRef>, limit: u32, json: bool) -> anyhow::Result<()> {
    let log = c.grpc().log(pb::LogRequest { volume, limit, before_seq: 0 }).await.map_err(ClientError::from)?.into_inner();
    if json {
        let rows = log.commits.iter().map(|c| {
            serde_json::json!({"id": c.id, "seq": c.seq, "parent": c.parent, "base": c.base,
                "time_unix_ms": c.time_unix_ms, "changes": c.change_count, "author": c.author,
                "message": c.message})
        });
        println!("{}", serde_json::Value::Array(rows.collect()));
    } else {
        print!("{}", log_table(&log.commits));
    }
    Ok(())
}

/// The rows of `sail volume log`: seq, id, change count (and "(merged)"), an AUTHOR column as
/// wide as the longest author shown ("-" for none; control characters shown as `?`), then
/// the message.
fn log_table(commits: &[pb::CommitInfo]) -> String {
    let author = |c: &pb::CommitInfo| match c.author.as_str() {
        "" => "-".to_owned(),
        a => a.chars().map(|ch| if ch.is_control() { '?' } else { ch }).collect(),
    };
    let width = commits.iter().map(|c| author(c).chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for c in commits {
        let merged = if !c.base.is_empty() && c.base != c.parent { " (merged)" } else { "         " };
        let line = format!(
            "#{:<5} {}  {:>5} changes{merged}  {:<width$}  {}",
            c.seq,
            short(&c.id),
            c.change_count,
            author(c),
            c.message
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `sail volume put`: local files and directories as one commit onto the head.
async fn volume_put(
    c: &mut VolumeClient,
    org: &str,
    name: &str,
    local: &[PathBuf],
    dest: &str,
    json: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut files = Vec::new();
    for path in local {
        collect(path, &join(dest, &file_name(path)?), &mut files)?;
    }
    let bytes: u64 = files.iter().map(|f| f.data.len() as u64).sum();
    let count = files.len();
    let head = c.head(org, name).await?.commit;
    let work = format!("uploading {count} files ({})", human(bytes));
    let r = output::spin(work, c.commit_files(org, name, &head, files, &[])).await?;
    let up = c.last_upload;
    if json {
        println!(
            "{}",
            serde_json::json!({"commit": r.commit, "seq": r.seq, "merged": r.merged, "files": count,
            "bytes": bytes, "chunks_uploaded": up.chunks_uploaded, "bytes_uploaded": up.bytes_uploaded,
            "chunks_skipped": up.chunks_skipped, "seconds": started.elapsed().as_secs_f64()})
        );
    } else if quiet() {
        println!("{}", r.commit);
    } else {
        println!(
            "committed {count} files ({}) as #{} {} in {:.0?}: uploaded {} chunks ({}), {} already stored{}",
            human(bytes),
            r.seq,
            short(&r.commit),
            started.elapsed(),
            up.chunks_uploaded,
            human(up.bytes_uploaded),
            up.chunks_skipped,
            if r.merged { ", merged onto a newer head" } else { "" }
        );
    }
    Ok(())
}

/// `sail volume list`: a directory of the head.
async fn volume_list(c: &mut VolumeClient, volume: Option<pb::VolumeRef>, path: String, json: bool) -> anyhow::Result<()> {
    let req = pb::ListDirRequest { volume, commit: String::new(), path };
    let listing = c.grpc().list_dir(req).await.map_err(ClientError::from)?.into_inner();
    for e in listing.entries {
        let entry = e.entry.unwrap_or_default();
        let (kind, size) = match entry.kind {
            Some(pb::entry::Kind::File(f)) => ("file", human(f.size)),
            Some(pb::entry::Kind::Dir(_)) => ("dir", String::new()),
            Some(pb::entry::Kind::Symlink(s)) => ("link", format!("-> {}", s.target)),
            None => ("?", String::new()),
        };
        if json {
            println!("{}", serde_json::json!({"name": e.name, "kind": kind, "mode": entry.mode}));
        } else {
            println!("{kind:<5} {:o} {size:>10}  {}", entry.mode, e.name);
        }
    }
    Ok(())
}

fn volume_json(v: &pb::Volume) -> serde_json::Value {
    serde_json::json!({"id": v.id, "org": v.org, "name": v.name, "head": v.head,
        "commits": v.commit_count, "created_unix_ms": v.created_unix_ms})
}

fn file_name(p: &Path) -> anyhow::Result<String> {
    let name = p
        .canonicalize()
        .map_err(|e| UserError(format!("{}: {e}", p.display())))?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    name.ok_or_else(|| UserError(format!("{} has no file name", p.display())).into())
}

fn join(dir: &str, name: &str) -> String {
    if dir.trim_matches('/').is_empty() { name.to_owned() } else { format!("{}/{name}", dir.trim_matches('/')) }
}

/// Reads a local file or directory tree (symlinks skipped) into uploads.
fn collect(local: &Path, dest: &str, out: &mut Vec<FileUpload>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(local).map_err(|e| UserError(format!("{}: {e}", local.display())))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(local)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            collect(&entry.path(), &join(dest, &name), out)?;
        }
    } else if meta.is_file() {
        let data = std::fs::read(local).with_context(|| format!("reading {}", local.display()))?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        out.push(FileUpload { path: dest.to_owned(), data: data.into(), mode: meta.permissions().mode() & 0o7777, mtime_ns });
    } else if !meta.file_type().is_symlink() {
        bail!(UserError(format!("{} is not a regular file or directory", local.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(seq: u64, author: &str, message: &str) -> pb::CommitInfo {
        pb::CommitInfo {
            id: format!("{seq:064x}"),
            seq,
            change_count: 1,
            author: author.into(),
            message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_log_table_has_an_author_column() {
        let rows = [info(2, "sailbox/sb-7f3a", "two"), info(1, "cli/h\nx", "one"), info(0, "", "volume created")];
        let table = log_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("#2 ") && lines[0].ends_with("sailbox/sb-7f3a  two"), "{table}");
        // Authors are padded to one column; a control character cannot break the row.
        let col = lines[0].find("sailbox/").unwrap();
        assert_eq!(lines[1].find("cli/h?x"), Some(col), "{table}");
        assert_eq!(lines[2].find("- "), Some(col), "{table}");
        assert!(lines[2].ends_with("volume created"), "{table}");
    }
}
