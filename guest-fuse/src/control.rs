//! The per-mount control channel: a Unix socket speaking one JSON object per line.
//!
//! Discovery: the mount root carries the extended attribute `user.sail.control` whose value
//! is the socket's path (`getfattr -n user.sail.control /mnt/vol`). Reading it goes through the
//! helper, so a dead helper is detected at once (ENOTCONN) instead of hanging on a socket.
//!
//! The protocol is `control_wire`'s (the server, the replies and the client are that crate's).
//! Requests: `{"op":"status"}`, `{"op":"commit"}`, `{"op":"reload"}`, `{"op":"unmount"}`.
//! Replies: `{"ok":true,"result":{...}}` or `{"ok":false,"error":{"name":..,"message":..}}`
//! where `name` is a contract error name (for example `VolumeCommitConflictError`; a
//! malformed request or an unknown op is a `SailError`).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use control_wire::{Answer, CallError, Request, Server, WireError};
use serde::Serialize;
use serde_json::Value;

use crate::commit::{CommitOutcome, MountStatus, ReloadOutcome};
use crate::error::FuseError;
use crate::mount::{CONTROL_XATTR, MountCore};

/// Error name when no helper answers for a mount.
pub const FUSE_UNAVAILABLE: &str = "VolumeFuseUnavailableError";

/// Error name of failures that have no contract name of their own (a bad request, a
/// malformed reply).
const SAIL_ERROR: &str = "SailError";

/// How long a client waits for a reply (big commits take minutes).
const CALL_TIMEOUT: Duration = Duration::from_secs(3600);

/// A boxed local cause of a [`ControlError`].
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error of a control call: the helper's error reply, or a local failure to reach it.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {message}")]
pub struct ControlError {
    /// Contract error name.
    pub name: String,
    /// Human message.
    pub message: String,
    /// The local cause (socket or attribute I/O, a malformed reply); none for a reply.
    #[source]
    pub source: Option<Cause>,
}

impl ControlError {
    fn unavailable(message: impl Into<String>, source: Option<Cause>) -> Self {
        ControlError { name: FUSE_UNAVAILABLE.into(), message: message.into(), source }
    }

    fn sail(message: impl Into<String>, source: Cause) -> Self {
        ControlError { name: SAIL_ERROR.into(), message: message.into(), source: Some(source) }
    }
}

impl From<CallError> for ControlError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Remote(w) => ControlError { name: w.name, message: w.message, source: None },
            e @ CallError::Io { .. } => Self::unavailable(format!("FUSE helper unavailable: {e}"), Some(Box::new(e))),
            e @ CallError::NoReply { .. } => {
                Self::unavailable("FUSE helper unavailable: it closed the connection (did it die?)", Some(Box::new(e)))
            }
            e @ CallError::Malformed { .. } => Self::sail(e.to_string(), Box::new(e)),
        }
    }
}

/// Serves the control socket of `core` until the process exits (one thread per connection,
/// the protocol of `control_wire`). `unmount` is called for the "unmount" request, after the
/// reply is sent.
pub fn serve(listener: UnixListener, core: Arc<MountCore>, unmount: Arc<dyn Fn() + Send + Sync>) {
    Server::new("sail-control").bad_request_name(SAIL_ERROR).serve(listener, move |req: Request| handle(&req, &core, &unmount));
}

fn handle(req: &Request, core: &MountCore, unmount: &Arc<dyn Fn() + Send + Sync>) -> Answer {
    let span = tracing::info_span!("control", op = %req.op, volume = core.remote.volume());
    let _e = span.enter();
    match req.op.as_str() {
        "status" => Answer::Reply(to_value(&core.status())),
        "commit" => Answer::Reply(outcome(core.commit())),
        "reload" => Answer::Reply(outcome(core.reload())),
        "unmount" => {
            let unmount = unmount.clone();
            Answer::ReplyThen(Ok(serde_json::json!({"unmounting": true})), Box::new(move || unmount()))
        }
        other => Answer::Reply(Err(WireError::new(SAIL_ERROR, format!("unknown op {other:?}")))),
    }
}

/// A commit's or reload's reply: its outcome, or its error under the contract name.
fn outcome<T: Serialize>(r: Result<T, FuseError>) -> Result<Value, WireError> {
    r.map_err(|e| WireError::new(e.name(), e.to_string())).and_then(|v| to_value(&v))
}

fn to_value<T: Serialize>(v: &T) -> Result<Value, WireError> {
    control_wire::to_value(v).map_err(|e| WireError::new(SAIL_ERROR, e.message))
}

/// The control socket path of the mount at `mountpoint`, read from its root's xattr.
pub fn socket_of(mountpoint: &Path) -> Result<PathBuf, ControlError> {
    use rustix::io::Errno;
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|e| ControlError::unavailable("mount path contains NUL", Some(Box::new(e))))?;
    let c_name = std::ffi::CString::new(CONTROL_XATTR)
        .map_err(|e| ControlError::unavailable("attribute name contains NUL", Some(Box::new(e))))?;
    let mut buf = vec![0u8; 4096];
    let n = match rustix::fs::getxattr(&c_path, &c_name, &mut buf[..]) {
        Ok(n) => n,
        Err(errno) => {
            let why = match errno {
                Errno::NOTCONN => "the FUSE helper is not running (the mount is dead; unmount it and mount again)".to_owned(),
                Errno::NODATA | Errno::NOTSUP => "not a sail volume mount (no control socket attribute)".to_owned(),
                _ => format!("cannot read {CONTROL_XATTR}: {}", std::io::Error::from(errno)),
            };
            return Err(ControlError::unavailable(
                format!("FUSE helper unavailable for {}: {why}", mountpoint.display()),
                Some(Box::new(std::io::Error::from(errno))),
            ));
        }
    };
    buf.truncate(n);
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
        Ok(control_wire::call(&self.socket, &serde_json::json!({"op": op}), Some(CALL_TIMEOUT))?)
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
    serde_json::from_value(v).map_err(|e| ControlError::sail(format!("malformed reply: {e}"), Box::new(e)))
}
