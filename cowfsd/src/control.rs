//! The control socket's server: one thread per connection, one JSON line in, one out (the
//! wire is `cowfs::control`). A failed request is answered with its error's kind
//! ([`CowError::kind`]) and message, and the connection goes on.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use bytes::Bytes;
use cowfs::control::{Created, Exported, Frozen, MAX_LINE, Names, Pong, Reply, Request, Stopping};
use cowfs::manifest::Manifest;
use serde::Serialize;
use serde_json::Value;

use crate::error::{CowError, Result};
use crate::fs::Registry;

/// Fetches and decodes a manifest stored as a chunk.
pub fn load_manifest(reg: &Registry, id: &str) -> Result<Manifest> {
    let id: chunkstore::ChunkId = id.parse().map_err(CowError::BadManifestId)?;
    Ok(Manifest::decode(&reg.chunks.get(id)?)?)
}

/// Stores a manifest as a chunk; returns its id.
pub fn store_manifest(reg: &Registry, m: &Manifest) -> Result<chunkstore::ChunkId> {
    Ok(reg.chunks.put(Bytes::from(m.encode()))?.0)
}

/// A reply's result as JSON.
fn result(v: impl Serialize) -> Result<Value> {
    serde_json::to_value(v).map_err(CowError::BadRequest)
}

fn create(reg: &Registry, name: &str, size: Option<u64>, base: Option<&str>, readonly: bool) -> Result<Value> {
    let base = match (base, size) {
        (Some(id), _) => load_manifest(reg, id)?,
        (None, Some(size)) => Manifest::zeros(size)?,
        (None, None) => return Err(CowError::Invalid("create needs base or size".into())),
    };
    let size = base.size;
    reg.create_with(name, base, readonly)?;
    result(Created { size })
}

fn export(reg: &Registry, name: &str) -> Result<Value> {
    let file = reg.get(name)?;
    let (manifest, stats) = file.export()?;
    let id = store_manifest(reg, &manifest)?;
    result(Exported {
        manifest: id.to_hex(),
        regions: stats.regions,
        zero_regions: stats.zero_regions,
        chunks_uploaded: stats.chunks_uploaded,
        bytes_uploaded: stats.bytes_uploaded,
        bytes_frozen: stats.bytes_frozen,
    })
}

fn stats(reg: &Registry, name: &str) -> Result<Value> {
    let file = reg.get(name)?;
    let mut v = result(file.stats())?;
    v["chunks"] = result(reg.chunks.stats())?;
    Ok(v)
}

/// Unmounts and exits, but only when no file is left: a running or sleeping sailbox's
/// memory and disk live here, and the daemon outlives vmm-host restarts for them.
fn stop(reg: &Registry) -> Result<Value> {
    let files = reg.names().len() as u64;
    if files == 0 {
        tracing::info!("stop requested with no files; unmounting");
        // SAFETY: sends a signal to this process; the SIGTERM task unmounts the session.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    }
    result(Stopping { stopping: files == 0, files })
}

fn handle(reg: &Registry, req: Request) -> Result<Value> {
    match req {
        Request::Ping => result(Pong { files: reg.names().len() as u64, pid: std::process::id() }),
        Request::List => result(Names { names: reg.names() }),
        Request::Create { name, size, base, readonly } => create(reg, &name, size, base.as_deref(), readonly),
        Request::Remove { name } => {
            reg.remove(&name)?;
            Ok(serde_json::json!({}))
        }
        Request::Freeze { name } => result(Frozen { regions: reg.get(&name)?.freeze()? }),
        Request::Export { name } => export(reg, &name),
        Request::Stats { name } => stats(reg, &name),
        Request::Stop => stop(reg),
    }
}

/// The reply to one request line.
fn reply(reg: &Registry, line: &str) -> Reply {
    let answered = serde_json::from_str::<Request>(line).map_err(CowError::BadRequest).and_then(|req| handle(reg, req));
    match answered {
        Ok(result) => Reply::success(result),
        Err(e) => Reply::failure(e.kind(), e.to_string()),
    }
}

fn serve_conn(reg: &Registry, stream: UnixStream) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let mut out = serde_json::to_vec(&reply(reg, &line)).map_err(std::io::Error::other)?;
        out.push(b'\n');
        writer.write_all(&out)?;
    }
}

/// Serves the control socket until the listener fails.
pub fn serve(listener: UnixListener, reg: Arc<Registry>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let reg = reg.clone();
                let _ = std::thread::Builder::new().name("cowfs-control".into()).spawn(move || {
                    if let Err(e) = serve_conn(&reg, stream) {
                        tracing::debug!(error = %e, "control connection ended");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "control accept failed"),
        }
    }
}
