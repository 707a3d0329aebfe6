//! A client of a cowfs daemon's control socket (what vmm-host uses).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{CowError, Result};

/// What an export stored.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Exported {
    /// The new manifest's chunk id (hex).
    pub manifest: String,
    /// Regions written since the previous checkpoint.
    pub regions: u64,
    /// Of those, all-zero.
    pub zero_regions: u64,
    /// Chunks uploaded.
    pub chunks_uploaded: u64,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Bytes of the regions written since the previous checkpoint.
    pub bytes_frozen: u64,
}

/// The control socket of one daemon.
#[derive(Clone, Debug)]
pub struct CowClient {
    socket: PathBuf,
}

impl CowClient {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self { socket: socket.to_path_buf() }
    }

    /// One request, one reply.
    pub async fn call(&self, req: Value) -> Result<Value> {
        let mut s = UnixStream::connect(&self.socket).await?;
        s.write_all(format!("{req}\n").as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).await?;
        let reply: Value = serde_json::from_str(&line).map_err(|e| CowError::Corrupt(format!("bad reply from cowfs: {e}")))?;
        if reply.get("ok").and_then(Value::as_bool) == Some(true) {
            return Ok(reply.get("result").cloned().unwrap_or(Value::Null));
        }
        let msg = reply.get("error").and_then(Value::as_str).unwrap_or("unknown error").to_owned();
        Err(if msg.starts_with("no file named") {
            CowError::NotFound(msg)
        } else if msg.contains("already exists") {
            CowError::Exists(msg)
        } else {
            CowError::Invalid(msg)
        })
    }

    /// Whether the daemon answers.
    pub async fn ping(&self) -> bool {
        self.call(json!({"op": "ping"})).await.is_ok()
    }

    /// Asks the daemon to unmount and exit if it holds no files; returns whether it will.
    pub async fn stop_if_unused(&self) -> Result<bool> {
        let v = self.call(json!({"op": "stop"})).await?;
        Ok(v.get("stopping").and_then(Value::as_bool).unwrap_or(false))
    }

    /// Creates an all-zero file.
    pub async fn create_zeros(&self, name: &str, size: u64) -> Result<()> {
        self.call(json!({"op": "create", "name": name, "size": size})).await.map(|_| ())
    }

    /// Creates a file over a stored manifest.
    pub async fn create_from(&self, name: &str, manifest: &str) -> Result<()> {
        self.call(json!({"op": "create", "name": name, "base": manifest})).await.map(|_| ())
    }

    /// Creates a read-only file over a stored manifest (writes and opens for writing fail
    /// with `EROFS`).
    pub async fn create_readonly(&self, name: &str, manifest: &str) -> Result<()> {
        self.call(json!({"op": "create", "name": name, "base": manifest, "readonly": true})).await.map(|_| ())
    }

    /// Removes a file (missing is fine).
    pub async fn remove(&self, name: &str) -> Result<()> {
        match self.call(json!({"op": "remove", "name": name})).await {
            Ok(_) | Err(CowError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Freezes the regions written since the last checkpoint; returns how many.
    pub async fn freeze(&self, name: &str) -> Result<u64> {
        let v = self.call(json!({"op": "freeze", "name": name})).await?;
        Ok(v.get("regions").and_then(Value::as_u64).unwrap_or(0))
    }

    /// Stores the frozen regions and the new manifest.
    pub async fn export(&self, name: &str) -> Result<Exported> {
        let v = self.call(json!({"op": "export", "name": name})).await?;
        serde_json::from_value(v).map_err(|e| CowError::Corrupt(format!("bad export reply: {e}")))
    }

    /// A file's counters.
    pub async fn stats(&self, name: &str) -> Result<Value> {
        self.call(json!({"op": "stats", "name": name})).await
    }

    /// Every file's name.
    pub async fn list(&self) -> Result<Vec<String>> {
        let v = self.call(json!({"op": "list"})).await?;
        Ok(v.get("names")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect())
            .unwrap_or_default())
    }
}
