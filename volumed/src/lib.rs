//! volumed: the volume service.
//!
//! - [`meta`]: the RocksDB store and the merge that applies commits onto the head.
//! - [`datapath`]: signed-URL chunk transfer (volumed's own HTTP endpoint, or S3 presigning).
//! - [`service`]: the operations and their gRPC binding; [`server`] runs them.
//!
//! The data model, its encodings, the batch frame format and request validation are the
//! `volume-model` crate; the typed client is `volume-client` (which never links this crate).
#![warn(missing_docs)]

pub mod datapath;
pub mod error;
pub mod keys;
pub mod meta;
pub mod server;
pub mod service;

pub use error::{Result, VolumeError};
