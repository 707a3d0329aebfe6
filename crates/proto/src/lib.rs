//! Generated protocol buffer types and gRPC stubs.
//!
//! The `.proto` files under `crates/proto/proto/` are the wire contract; everything here is
//! generated from them at build time by `tonic-prost-build`.

/// The volume service API (`sail.volume.v1`).
pub mod volume {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sail.volume.v1");
}
