//! The volume service: transport-independent operations ([`Volumes`]) and the gRPC binding
//! ([`grpc`]). Request validation and protobuf conversion live in `volume_model::convert`.

pub mod grpc;
pub mod volumes;

pub use grpc::{GrpcVolumes, to_status};
pub use volumes::{CommitOutcome, DEFAULT_URL_TTL, MissingUploads, Volumes};
