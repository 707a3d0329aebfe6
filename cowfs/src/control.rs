//! The control wire: JSON lines over the daemon's Unix socket, one request and one reply per
//! line. The daemon (`cowfsd`) serves it; [`crate::client::CowClient`] speaks it.
//!
//! | request | reply `result` |
//! |---|---|
//! | `{"op":"ping"}` | `{"files": N, "pid": P}` |
//! | `{"op":"create","name":N,"size":S}` | `{"size": S}` (an all-zero file) |
//! | `{"op":"create","name":N,"base":ID}` | `{"size": S}` (over the manifest stored as chunk ID) |
//! | `{"op":"create","name":N,"base":ID,"readonly":true}` | `{"size": S}` (and refusing writes) |
//! | `{"op":"remove","name":N}` | `{}` |
//! | `{"op":"freeze","name":N}` | `{"regions": R}` (dirty regions now frozen) |
//! | `{"op":"export","name":N}` | `{"manifest": ID, "regions", "zero_regions", "chunks_uploaded", "bytes_uploaded", "bytes_frozen"}` |
//! | `{"op":"stats","name":N}` | file counters plus the daemon's chunk counters under `chunks` |
//! | `{"op":"list"}` | `{"names": [...]}` |
//! | `{"op":"stop"}` | `{"stopping": B, "files": N}` (unmounts and exits only with no file left) |
//!
//! Replies: `{"ok":true,"result":{...}}` or
//! `{"ok":false,"error":{"kind":"not_found","message":"no file named x"}}`. The kind
//! ([`ErrorKind`]) is what callers decide on; the message is for people.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest request line the daemon accepts.
pub const MAX_LINE: u64 = 64 << 10;

/// A request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Whether the daemon answers; its file count and pid.
    Ping,
    /// Every file's name.
    List,
    /// A new file: all zeros of `size` bytes, or over the manifest stored as chunk `base`.
    Create {
        /// The file's name: 1..=128 of `[A-Za-z0-9._-]`, not starting with a dot.
        name: String,
        /// Size of an all-zero file (ignored with `base`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        /// Chunk id (hex) of the manifest the file starts from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        base: Option<String>,
        /// Refuse writes and opens for writing (`EROFS`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        readonly: bool,
    },
    /// Removes a file (open descriptors keep working until closed).
    Remove {
        /// The file.
        name: String,
    },
    /// Freezes the regions written since the last checkpoint.
    Freeze {
        /// The file.
        name: String,
    },
    /// Stores the frozen regions as chunks and the new manifest.
    Export {
        /// The file.
        name: String,
    },
    /// A file's counters and the daemon's chunk counters.
    Stats {
        /// The file.
        name: String,
    },
    /// Unmounts and exits, if no file is left.
    Stop,
}

/// What a failed request failed with. Serialized in snake case (`"not_found"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A bad request: an unreadable line, an unknown op, a bad name, size or manifest id.
    Invalid,
    /// No file of that name.
    NotFound,
    /// A file of that name exists already.
    Exists,
    /// Stored bytes or a manifest failed verification.
    Corrupt,
    /// A write to a read-only file.
    ReadOnly,
    /// The chunk store failed (reading a manifest, storing an export's chunks).
    Chunks,
    /// Local I/O failed on the daemon's side.
    Io,
}

/// The `error` of a failed reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// What to decide on.
    pub kind: ErrorKind,
    /// What happened, for people.
    pub message: String,
}

/// A reply line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result of a request that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error of one that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

impl Reply {
    /// A success carrying `result`.
    pub fn success(result: Value) -> Self {
        Self { ok: true, result: Some(result), error: None }
    }

    /// A failure of `kind`.
    pub fn failure(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { ok: false, result: None, error: Some(WireError { kind, message: message.into() }) }
    }
}

/// The result of `ping`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Pong {
    /// Files the daemon holds.
    pub files: u64,
    /// The daemon's process id.
    pub pid: u32,
}

/// The result of `create`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Created {
    /// The new file's size.
    pub size: u64,
}

/// The result of `freeze`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Frozen {
    /// Regions frozen (written since the last checkpoint).
    pub regions: u64,
}

/// The result of `list`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Names {
    /// Every file's name, sorted.
    pub names: Vec<String>,
}

/// The result of `stop`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Stopping {
    /// Whether the daemon unmounts and exits (it had no file).
    pub stopping: bool,
    /// Files it holds.
    pub files: u64,
}

/// The result of `export`: what a checkpoint of one file stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_have_the_documented_shape() {
        let req = Request::Create { name: "a".into(), size: Some(4096), base: None, readonly: false };
        assert_eq!(serde_json::to_value(&req).unwrap(), json!({"op": "create", "name": "a", "size": 4096}));
        let req: Request = serde_json::from_value(json!({"op": "create", "name": "v", "base": "ab", "readonly": true})).unwrap();
        assert_eq!(req, Request::Create { name: "v".into(), size: None, base: Some("ab".into()), readonly: true });
        assert_eq!(serde_json::to_value(Request::Ping).unwrap(), json!({"op": "ping"}));
        assert!(serde_json::from_value::<Request>(json!({"op": "format"})).is_err(), "unknown ops are refused");

        let reply = Reply::failure(ErrorKind::NotFound, "no file named x");
        assert_eq!(
            serde_json::to_value(&reply).unwrap(),
            json!({"ok": false, "error": {"kind": "not_found", "message": "no file named x"}})
        );
        assert_eq!(serde_json::to_value(Reply::success(json!({}))).unwrap(), json!({"ok": true, "result": {}}));
        let kinds = [
            (ErrorKind::Invalid, "invalid"),
            (ErrorKind::NotFound, "not_found"),
            (ErrorKind::Exists, "exists"),
            (ErrorKind::Corrupt, "corrupt"),
            (ErrorKind::ReadOnly, "read_only"),
            (ErrorKind::Chunks, "chunks"),
            (ErrorKind::Io, "io"),
        ];
        for (kind, name) in kinds {
            assert_eq!(serde_json::to_value(kind).unwrap(), json!(name));
        }
    }
}
