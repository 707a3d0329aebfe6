//! The per-mount control channel: a Unix socket speaking one JSON object per line.
//!
//! Discovery: the mount root carries the extended attribute `user.sail.control` whose value
//! is the socket's path (`getfattr -n user.sail.control /mnt/vol`). Reading it goes through the
//! helper, so a dead helper is detected at once (ENOTCONN) instead of hanging on a socket.
//!
//! Requests: `{"op":"status"}`, `{"op":"commit"}`, `{"op":"reload"}`, `{"op":"unmount"}`.
//! Replies: `{"ok":true,"result":{...}}` or `{"ok":false,"error":{"name":..,"message":..}}`
//! where `name` is a contract error name (for example `VolumeCommitConflictError`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::commit::{CommitOutcome, MountStatus, ReloadOutcome};
use crate::mount::{CONTROL_XATTR, MountCore};

/// Error name when no helper answers for a mount.
pub const FUSE_UNAVAILABLE: &str = "VolumeFuseUnavailableError";

/// A request on the control socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    /// "status", "commit", "reload" or "unmount".
    pub op: String,
}

/// An error reply.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
#[error("{name}: {message}")]
pub struct ControlError {
    /// Contract error name.
    pub name: String,
    /// Human message.
    pub message: String,
}

impl ControlError {
    fn unavailable(message: impl Into<String>) -> Self {
        ControlError { name: FUSE_UNAVAILABLE.into(), message: message.into() }
    }
}

/// Serves the control socket of `core` until the process exits. `unmount` is called for
/// the "unmount" request.
pub fn serve(listener: UnixListener, core: Arc<MountCore>, unmount: Arc<dyn Fn() + Send + Sync>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let core = core.clone();
        let unmount = unmount.clone();
        std::thread::spawn(move || {
            if let Err(e) = handle(conn, &core, &*unmount) {
                tracing::debug!(error = %e, "control connection ended");
            }
        });
    }
}

fn handle(conn: UnixStream, core: &MountCore, unmount: &(dyn Fn() + Send + Sync)) -> std::io::Result<()> {
    let mut writer = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => err("SailError", format!("bad request: {e}")),
            Ok(req) => {
                let span = tracing::info_span!("control", op = %req.op, volume = core.remote.volume());
                let _e = span.enter();
                match req.op.as_str() {
                    "status" => ok(&core.status()),
                    "commit" => match core.commit() {
                        Ok(o) => ok(&o),
                        Err(e) => err(e.name(), e.to_string()),
                    },
                    "reload" => match core.reload() {
                        Ok(o) => ok(&o),
                        Err(e) => err(e.name(), e.to_string()),
                    },
                    "unmount" => {
                        let r = ok(&serde_json::json!({"unmounting": true}));
                        writer.write_all(format!("{r}\n").as_bytes())?;
                        unmount();
                        return Ok(());
                    }
                    other => err("SailError", format!("unknown op {other:?}")),
                }
            }
        };
        writer.write_all(format!("{reply}\n").as_bytes())?;
    }
    Ok(())
}

fn ok<T: Serialize>(v: &T) -> Value {
    serde_json::json!({"ok": true, "result": v})
}

fn err(name: &str, message: String) -> Value {
    serde_json::json!({"ok": false, "error": {"name": name, "message": message}})
}

/// The control socket path of the mount at `mountpoint`, read from its root's xattr.
pub fn socket_of(mountpoint: &Path) -> Result<PathBuf, ControlError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| ControlError::unavailable("mount path contains NUL"))?;
    let c_name = std::ffi::CString::new(CONTROL_XATTR).expect("constant has no NUL");
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated; buf is valid for buf.len() bytes.
    let n = unsafe { libc::getxattr(c_path.as_ptr(), c_name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        let why = match e.raw_os_error() {
            Some(libc::ENOTCONN) => "the FUSE helper is not running (the mount is dead; unmount it and mount again)".to_owned(),
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => "not a sail volume mount (no control socket attribute)".to_owned(),
            _ => format!("cannot read {CONTROL_XATTR}: {e}"),
        };
        return Err(ControlError::unavailable(format!("FUSE helper unavailable for {}: {why}", mountpoint.display())));
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(String::from_utf8_lossy(&buf).into_owned()))
}

/// A client of one mount's control socket.
pub struct ControlClient {
    socket: PathBuf,
}

impl ControlClient {
    /// Finds the socket of the mount at `mountpoint`.
    pub fn for_mount(mountpoint: &Path) -> Result<Self, ControlError> {
        Ok(ControlClient { socket: socket_of(mountpoint)? })
    }

    /// A client of a known socket path.
    pub fn at(socket: PathBuf) -> Self {
        ControlClient { socket }
    }

    /// Sends one request and returns its result.
    pub fn call(&self, op: &str) -> Result<Value, ControlError> {
        let conn = UnixStream::connect(&self.socket)
            .map_err(|e| ControlError::unavailable(format!("FUSE helper unavailable: {}: {e}", self.socket.display())))?;
        let _ = conn.set_read_timeout(Some(Duration::from_secs(3600)));
        let mut w = conn.try_clone().map_err(|e| ControlError::unavailable(e.to_string()))?;
        w.write_all(format!("{}\n", serde_json::json!({"op": op})).as_bytes())
            .map_err(|e| ControlError::unavailable(format!("FUSE helper unavailable: {e}")))?;
        let mut line = String::new();
        BufReader::new(conn)
            .read_line(&mut line)
            .map_err(|e| ControlError::unavailable(format!("FUSE helper unavailable: {e}")))?;
        if line.is_empty() {
            return Err(ControlError::unavailable("FUSE helper unavailable: it closed the connection (did it die?)"));
        }
        let v: Value =
            serde_json::from_str(&line).map_err(|e| ControlError { name: "SailError".into(), message: e.to_string() })?;
        if v["ok"].as_bool() == Some(true) {
            Ok(v["result"].clone())
        } else {
            Err(ControlError {
                name: v["error"]["name"].as_str().unwrap_or("SailError").to_owned(),
                message: v["error"]["message"].as_str().unwrap_or("").to_owned(),
            })
        }
    }

    /// Status of the mount.
    pub fn status(&self) -> Result<MountStatus, ControlError> {
        parse(self.call("status")?)
    }

    /// Commits the mount's changes.
    pub fn commit(&self) -> Result<CommitOutcome, ControlError> {
        parse(self.call("commit")?)
    }

    /// Reloads the mount to the newest commit.
    pub fn reload(&self) -> Result<ReloadOutcome, ControlError> {
        parse(self.call("reload")?)
    }

    /// Asks the helper to unmount and exit.
    pub fn unmount(&self) -> Result<(), ControlError> {
        self.call("unmount").map(|_| ())
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ControlError> {
    serde_json::from_value(v).map_err(|e| ControlError { name: "SailError".into(), message: format!("malformed reply: {e}") })
}
