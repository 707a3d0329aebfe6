//! guest-fuse: the FUSE helper that mounts a volume lazily inside a guest or on a Linux host.
//!
//! - [`tree`]: the inode table over the base commit and the changes commit needs;
//! - [`remote`]: volumed and the chunk caches (verified chunks, readahead);
//! - [`pieced`]: large chunks read in verified 1 MiB pieces (range requests);
//! - [`file_io`]: reading a file from its overlay and its committed chunks;
//! - [`ops`]: changing operations; [`fs`]: the fuser binding;
//! - [`passthrough`]: kernel passthrough reads of fully cached, unmodified files;
//! - [`overlay`], [`persist`]: local bytes and the dirty state on disk (they survive a crash);
//! - [`commit`]: commit, reload and status; [`control`]: the per-mount control socket;
//! - [`runner`]: mounting and unmounting (the `sail-volume-fuse` binary and
//!   `sail volume mount` both call [`runner::run`]).
//!
//! See docs/guest-fuse.md for the design and the control protocol.
#![warn(missing_docs)]

pub mod commit;
pub mod control;
pub mod error;
pub mod file_io;
pub mod fs;
pub mod mount;
pub mod ops;
pub mod overlay;
pub mod passthrough;
pub mod persist;
pub mod pieced;
pub mod ranges;
pub mod remote;
pub mod runner;
pub mod tree;

pub use commit::{CommitOutcome, MountStatus, ReloadOutcome};
pub use control::{ControlClient, ControlError, FUSE_UNAVAILABLE};
pub use runner::{MountOptions, default_socket_path, is_mounted, run};
/// Re-exported for the CLI (`sail volume unmount` detaches dead mounts through this path).
pub use sysutil::mount::{clean_dead_mount, lazy_unmount};
