//! cowfs: copy-on-write files over chunks (sailbox memory and disks), the library half.
//!
//! Sailbox memory and disks are files of a cowfs mount, served by the `sail-cowfs` daemon
//! (package `cowfsd`): QEMU maps guest memory from one (shared) and opens the disk image from
//! another (raw). Each file's bytes are a base manifest of chunks (an image, or a
//! checkpoint), fetched lazily and verified, overlaid with a local layer of written pages. A
//! checkpoint freezes the regions written since the last one (while the VM is paused) and
//! exports them as chunks (after it runs again), giving a new manifest: the file of any
//! checkpoint can be rebuilt on any host from the chunk store.
//!
//! This crate is what the daemon's users link (vmm-host): no FUSE, no command line.
//! - [`manifest`]: the region table and its encoding;
//! - [`control`]: the control wire (requests, replies, error kinds);
//! - [`client`]: the control socket's client, with typed errors.
//!
//! Detaching a mount whose daemon died is `sysutil::mount::clean_dead_mount`.
#![warn(missing_docs)]

pub mod client;
pub mod control;
pub mod manifest;

pub use client::{ClientError, CowClient};
pub use control::{ErrorKind, Exported};
pub use manifest::{Manifest, ManifestError, REGION_SIZE, RegionRef};
