//! Generated protocol buffer types and gRPC stubs.
//!
//! The `.proto` files under `proto/proto/` are the wire contract; everything here is
//! generated from them at build time by `tonic-prost-build`.

/// The volume service API (`sail.volume.v1`).
pub mod volume {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sail.volume.v1");
}

/// The guest agent protocol (`sail.agent.v1`): vmm-host <-> `sail-agent` over vsock.
pub mod agent {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sail.agent.v1");
}

/// The vmm-host API (`sail.sailbox.v1`): create, exec, files, listeners, terminate.
pub mod sailbox {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sail.sailbox.v1");
}
