//! Ids (tree, commit, volume) and the changes of a commit request.

use std::fmt;
use std::str::FromStr;

use crate::{Entry, InvalidRequest, VolPath};

macro_rules! hash_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// BLAKE3 of `bytes`.
            pub fn of(bytes: &[u8]) -> Self {
                Self(*blake3::hash(bytes).as_bytes())
            }
            /// Wraps raw hash bytes.
            pub const fn from_bytes(b: [u8; 32]) -> Self {
                Self(b)
            }
            /// Parses a 32-byte slice from a request.
            pub fn from_slice(b: &[u8]) -> Result<Self, InvalidRequest> {
                let arr: [u8; 32] = b.try_into().map_err(|_| {
                    InvalidRequest::new(format!(concat!($what, " id must be 32 bytes, got {}"), b.len()))
                })?;
                Ok(Self(arr))
            }
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// Lower-case hex (64 characters).
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), &self.to_hex()[..12])
            }
        }

        impl FromStr for $name {
            type Err = InvalidRequest;
            fn from_str(s: &str) -> Result<Self, InvalidRequest> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|_| {
                    InvalidRequest::new(format!(concat!($what, " id {:?} is not 64 hex characters"), s))
                })?;
                Ok(Self(out))
            }
        }
    };
}

hash_id!(
    /// Id of a tree node: BLAKE3 of its encoding.
    TreeId, "tree"
);
hash_id!(
    /// Id of a commit: BLAKE3 of its encoding.
    CommitId, "commit"
);

/// A volume's stable random identity (names can be deleted and reused; ids are not).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct VolumeId(pub [u8; 16]);

impl VolumeId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// One change of a commit request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeOp {
    /// Put this entry at the path (for a directory: create it, or update its mode and mtime
    /// keeping its children; the entry's tree id is ignored).
    Upsert(Entry),
    /// Delete marker: remove whatever is at the path, subtree included.
    Delete,
}

/// A validated change: a normalised, non-root path and what to do there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Where.
    pub path: VolPath,
    /// What.
    pub op: ChangeOp,
}
