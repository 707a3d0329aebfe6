//! cowfsd: the cowfs daemon, `sail-cowfs`. It mounts a flat FUSE directory whose files are
//! copy-on-write over chunk manifests, and serves a control socket to create, remove, freeze
//! and export them (the wire and its client are in the `cowfs` library).
//!
//! - [`file::CowFile`]: one file (base manifest + local layer, dirty tracking, freeze and
//!   export); [`chunks`]: verified chunk access with an in-memory cache;
//!   [`fs`]: the FUSE binding and the registry of files; [`control`]: the control socket's
//!   server; [`daemon`]: the process; [`error`]: its errors and their wire kinds.
#![warn(missing_docs)]

pub mod chunks;
pub mod control;
pub mod daemon;
pub mod error;
pub mod file;
pub mod fs;
