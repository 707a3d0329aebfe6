//! sysutil: the few OS helpers that several sail binaries need, written once.
//!
//! - [`clock`]: wall-clock time as Unix milliseconds and nanoseconds (records, signed-URL
//!   expiries, mtimes).
//! - [`host`]: this machine's host name.
//! - [`keyfile`]: a 32-byte secret kept in a file (made once, 0600).
//! - [`mount`]: lazy unmount and the cleanup of a FUSE mount whose daemon died.
//!
//! It depends on nothing of ours and on no async runtime, so the guest agent and the FUSE
//! helper can link it as readily as the servers.
#![warn(missing_docs)]

pub mod clock;
pub mod host;
pub mod keyfile;
pub mod mount;
pub mod process;
