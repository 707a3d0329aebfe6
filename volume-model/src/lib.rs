//! volume-model: the data model of sail volumes and its wire formats, shared by the server
//! (volumed), the client (volume-client), the FUSE helper and the fuzz targets.
//!
//! - [`path`], [`entry`], [`node`], [`commit`], ids and changes: what a volume holds, with the
//!   binary encodings ([`codec`]) that give tree nodes and commits their content ids.
//! - [`batch`]: the body format of batch uploads (many small chunks in one signed request).
//! - [`convert`]: protobuf conversion and the validation of everything a client sends.
//! - [`volume_name`]: org and volume names.
//!
//! Everything here is pure: no I/O, no async runtime, no database, no transport, so the
//! fuzz targets link it alone and a guest carries it at no cost. Errors are
//! [`InvalidRequest`] (a value breaks the rules) and [`DecodeError`] (bytes do not decode).
#![warn(missing_docs)]

pub mod batch;
pub mod codec;
pub mod commit;
pub mod convert;
pub mod entry;
mod error;
mod ids;
pub mod node;
pub mod path;
pub mod volume_name;

pub use codec::DecodeError;
pub use commit::Commit;
pub use entry::{Entry, EntryKind, FileData};
pub use error::InvalidRequest;
pub use ids::{Change, ChangeOp, CommitId, TreeId, VolumeId};
pub use node::TreeNode;
pub use path::VolPath;
