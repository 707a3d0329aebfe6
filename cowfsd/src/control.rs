//! The control socket: JSON lines, one request and one reply per line.
//!
//! | request | reply `result` |
//! |---|---|
//! | `{"op":"ping"}` | `{"files": N, "pid": P}` |
//! | `{"op":"create","name":N,"size":S}` | `{}` (an all-zero file) |
//! | `{"op":"create","name":N,"base":ID}` | `{"size": S}` (over the manifest stored as chunk ID) |
//! | `{"op":"create","name":N,"base":ID,"readonly":true}` | `{"size": S}` (and refusing writes) |
//! | `{"op":"remove","name":N}` | `{}` |
//! | `{"op":"freeze","name":N}` | `{"regions": R}` (dirty regions now frozen) |
//! | `{"op":"export","name":N}` | `{"manifest": ID, "regions", "zero_regions", "chunks_uploaded", "bytes_uploaded", "bytes_frozen"}` |
//! | `{"op":"stats","name":N}` | file counters plus the daemon's chunk counters |
//! | `{"op":"list"}` | `{"names": [...]}` |
//!
//! Replies: `{"ok":true,"result":{...}}` or `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Value, json};

use crate::fs::Registry;
use cowfs::error::{CowError, Result};
use cowfs::manifest::Manifest;

/// Longest request line accepted.
const MAX_LINE: u64 = 64 << 10;

fn field<'a>(req: &'a Value, name: &str) -> Result<&'a str> {
    req.get(name).and_then(Value::as_str).ok_or_else(|| CowError::Invalid(format!("missing string field {name:?}")))
}

/// Fetches and decodes a manifest stored as a chunk.
pub fn load_manifest(reg: &Registry, id: &str) -> Result<Manifest> {
    let id: chunkstore::ChunkId = id.parse().map_err(|e| CowError::Invalid(format!("bad manifest id: {e}")))?;
    Manifest::decode(&reg.chunks.get(id)?)
}

/// Stores a manifest as a chunk; returns its id.
pub fn store_manifest(reg: &Registry, m: &Manifest) -> Result<chunkstore::ChunkId> {
    Ok(reg.chunks.put(Bytes::from(m.encode()))?.0)
}

fn handle(reg: &Registry, req: &Value) -> Result<Value> {
    let op = field(req, "op")?;
    Ok(match op {
        "ping" => json!({"files": reg.names().len(), "pid": std::process::id()}),
        "list" => json!({"names": reg.names()}),
        "create" => {
            let name = field(req, "name")?;
            let base = match req.get("base").and_then(Value::as_str) {
                Some(id) => load_manifest(reg, id)?,
                None => {
                    let size = req
                        .get("size")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| CowError::Invalid("create needs base or size".into()))?;
                    Manifest::zeros(size)?
                }
            };
            let size = base.size;
            let readonly = req.get("readonly").and_then(Value::as_bool).unwrap_or(false);
            reg.create_with(name, base, readonly)?;
            json!({"size": size})
        }
        "remove" => {
            reg.remove(field(req, "name")?)?;
            json!({})
        }
        "freeze" => json!({"regions": reg.get(field(req, "name")?)?.freeze()?}),
        "export" => {
            let file = reg.get(field(req, "name")?)?;
            let (manifest, stats) = file.export()?;
            let id = store_manifest(reg, &manifest)?;
            let mut v = serde_json::to_value(stats).map_err(|e| CowError::Invalid(e.to_string()))?;
            v["manifest"] = json!(id.to_hex());
            v
        }
        "stats" => {
            let file = reg.get(field(req, "name")?)?;
            let mut v = serde_json::to_value(file.stats()).map_err(|e| CowError::Invalid(e.to_string()))?;
            v["chunks"] = serde_json::to_value(reg.chunks.stats()).map_err(|e| CowError::Invalid(e.to_string()))?;
            v
        }
        // Unmount and exit, but only when no file is left: a running or sleeping sailbox's
        // memory and disk live here, and the daemon outlives vmm-host restarts for them.
        "stop" => {
            let files = reg.names().len();
            if files == 0 {
                tracing::info!("stop requested with no files; unmounting");
                // SAFETY: sends a signal to this process; the SIGTERM task unmounts the session.
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            }
            json!({"stopping": files == 0, "files": files})
        }
        other => return Err(CowError::Invalid(format!("unknown op {other:?}"))),
    })
}

fn serve_conn(reg: &Registry, stream: UnixStream) -> std::io::Result<()> {
    use std::io::Read;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(req) => match handle(reg, &req) {
                Ok(result) => json!({"ok": true, "result": result}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            },
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        writer.write_all(format!("{reply}\n").as_bytes())?;
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
