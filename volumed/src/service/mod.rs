//! The volume service: transport-independent operations ([`Volumes`]), request validation
//! ([`convert`]) and the gRPC binding ([`grpc`]).

pub mod convert;
#[cfg(feature = "server")]
pub mod grpc;
#[cfg(feature = "server")]
pub mod volumes;

pub use convert::{ValidCommit, validate_commit};
#[cfg(feature = "server")]
pub use grpc::{GrpcVolumes, error_name, to_status};
#[cfg(feature = "server")]
pub use volumes::{CommitOutcome, DEFAULT_URL_TTL, MissingUploads, Volumes};
