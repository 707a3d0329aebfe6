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
//! The framing is the `control-wire` crate's (shared with the volume mount helper): replies
//! are `{"ok":true,"result":{...}}` or
//! `{"ok":false,"error":{"name":"not_found","message":"no file named x"}}`. The name is an
//! [`ErrorKind`]'s ([`ErrorKind::name`]): what callers decide on; the message is for people.

pub use control_wire::WireError;
use serde::{Deserialize, Serialize};

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

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 7] =
        [Self::Invalid, Self::NotFound, Self::Exists, Self::Corrupt, Self::ReadOnly, Self::Chunks, Self::Io];

    /// The kind's name on the wire (the `name` of a `control_wire::WireError`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::NotFound => "not_found",
            Self::Exists => "exists",
            Self::Corrupt => "corrupt",
            Self::ReadOnly => "read_only",
            Self::Chunks => "chunks",
            Self::Io => "io",
        }
    }

    /// The kind a wire name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// A wire error of this kind.
    pub fn wire(self, message: impl Into<String>) -> WireError {
        WireError::new(self.name(), message)
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

        let error = ErrorKind::NotFound.wire("no file named x");
        assert_eq!(serde_json::to_value(&error).unwrap(), json!({"name": "not_found", "message": "no file named x"}));
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
            assert_eq!(kind.name(), name);
            assert_eq!(ErrorKind::from_name(name), Some(kind));
        }
        assert_eq!(ErrorKind::from_name("bad_request"), None);
    }
}
