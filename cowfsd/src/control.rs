//! The control socket's server: `control_wire::Server` (one thread per connection, one JSON
//! line in, one out) with the requests of `cowfs::control`. A failed request is answered with
//! its error's kind ([`CowError::kind`]) as the error's name, and the connection goes on.

use std::os::unix::net::UnixListener;
use std::sync::Arc;

use bytes::Bytes;
use control_wire::{Answer, Server};
use cowfs::control::{Created, ErrorKind, Exported, Frozen, Names, Pong, Request, Stopping};
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
/// memory and disk live here, and the daemon outlives vmm-host restarts for them. The
/// unmount starts once the reply is written.
fn stop(reg: &Registry) -> Answer {
    let files = reg.names().len() as u64;
    let stopping = result(Stopping { stopping: files == 0, files });
    if files != 0 {
        return reply(stopping);
    }
    tracing::info!("stop requested with no files; unmounting");
    Answer::ReplyThen(
        stopping.map_err(|e| e.kind().wire(e.to_string())),
        Box::new(|| {
            // The SIGTERM task unmounts the session.
            let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM);
        }),
    )
}

/// A reply carrying `result`, or the error's kind and message.
fn reply(result: Result<Value>) -> Answer {
    Answer::Reply(result.map_err(|e| e.kind().wire(e.to_string())))
}

/// The answer to one request.
fn answer(reg: &Registry, req: control_wire::Request) -> Answer {
    let req = match serde_json::from_value::<Request>(req.body) {
        Ok(req) => req,
        Err(e) => return reply(Err(CowError::BadRequest(e))),
    };
    let result = match req {
        Request::Stop => return stop(reg),
        Request::Ping => result(Pong { files: reg.names().len() as u64, pid: std::process::id() }),
        Request::List => result(Names { names: reg.names() }),
        Request::Create { name, size, base, readonly } => create(reg, &name, size, base.as_deref(), readonly),
        Request::Remove { name } => reg.remove(&name).map(|()| serde_json::json!({})),
        Request::Freeze { name } => reg.get(&name).and_then(|f| f.freeze()).and_then(|regions| result(Frozen { regions })),
        Request::Export { name } => export(reg, &name),
        Request::Stats { name } => stats(reg, &name),
    };
    reply(result)
}

/// Serves the control socket until the listener fails.
pub fn serve(listener: UnixListener, reg: Arc<Registry>) {
    Server::new("cowfs-control").bad_request_name(ErrorKind::Invalid.name()).serve(listener, move |req| answer(&reg, req));
}
