//! cowfs: copy-on-write files over chunks, served through FUSE, with dirty tracking.
//!
//! Sailbox memory and disks are files of a cowfs mount: QEMU maps guest memory from one
//! (shared) and opens the disk image from another (raw). Each file's bytes are a base
//! manifest of chunks (an image, or a checkpoint), fetched lazily and verified, overlaid with
//! a local layer of written pages. A checkpoint freezes the regions written since the last
//! one (while the VM is paused) and exports them as chunks (after it runs again), giving a
//! new manifest: the file of any checkpoint can be rebuilt on any host from the chunk store.
//!
//! - [`manifest`]: the region table and its encoding; [`file::CowFile`]: one file;
//!   [`fs`]: the FUSE binding and the registry; [`control`] / [`client`]: the control socket;
//!   [`daemon`]: the `sail-cowfs` process.
#![warn(missing_docs)]

pub mod chunks;
pub mod client;
pub mod control;
pub mod daemon;
pub mod error;
pub mod file;
pub mod fs;
pub mod manifest;

pub use client::{CowClient, Exported};
pub use error::{CowError, Result};
pub use manifest::{Manifest, REGION_SIZE, RegionRef};
