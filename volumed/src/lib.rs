//! volumed: the volume service.
//!
//! - [`model`]: paths, entries, Merkle tree nodes and commits with their binary encodings.
//! - [`meta`]: the RocksDB store and the merge that applies commits onto the head.
//! - [`datapath`]: signed-URL chunk transfer (volumed's own HTTP endpoint, or S3 presigning);
//!   [`batch`]: the body format of batch uploads (many small chunks in one signed request).
//! - [`service`]: the operations and their gRPC binding; [`server`] runs them.
//! - [`client`] (feature `client`, implied by the default `server`): the typed client used by the CLI, the FUSE helper, tests and benches.
#![warn(missing_docs)]

pub mod batch;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod datapath;
pub mod error;
pub mod meta;
pub mod model;
#[cfg(feature = "server")]
pub mod server;
pub mod service;

pub use error::{Result, VolumeError};
