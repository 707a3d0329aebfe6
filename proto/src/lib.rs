//! Generated protocol buffer types and gRPC stubs, plus the few constants and helpers every
//! side of a protocol must agree on.
//!
//! The `.proto` files under `proto/proto/` are the wire contract; the modules below are
//! generated from them at build time by `tonic-prost-build`. Written by hand: the error
//! detail's encoder and decoder ([`ErrorDetail::to_status`], [`ErrorDetail::from_status`],
//! [`error_name`]), so servers and clients cannot drift apart, and the agent's vsock port
//! ([`agent::VSOCK_PORT`]).

/// The error detail every sail service puts in its error statuses (`sail.error.v1`).
pub mod error {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sail.error.v1");
}

pub use error::ErrorDetail;

impl ErrorDetail {
    /// A status of `code` with `message`, whose details carry this detail (`name`, and
    /// `message` again). Every sail server builds its error statuses with this.
    pub fn to_status(code: tonic::Code, name: impl Into<String>, message: impl Into<String>) -> tonic::Status {
        use prost::Message;
        let message = message.into();
        let detail = ErrorDetail { name: name.into(), message: message.clone() };
        tonic::Status::with_details(code, message, detail.encode_to_vec().into())
    }

    /// The detail a status carries, if its details decode as one (a status from a non-sail
    /// server, or one without details, has none; empty details decode as an empty detail).
    pub fn from_status(status: &tonic::Status) -> Option<ErrorDetail> {
        use prost::Message;
        ErrorDetail::decode(status.details()).ok()
    }
}

/// The contract error name a status carries (e.g. "VolumeNotFoundError"), `None` when it
/// carries none.
pub fn error_name(status: &tonic::Status) -> Option<String> {
    ErrorDetail::from_status(status).map(|d| d.name).filter(|n| !n.is_empty())
}

/// The volume service API (`sail.volume.v1`).
pub mod volume {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sail.volume.v1");

    /// The error detail of this service's statuses (defined once, in `sail.error.v1`).
    pub use super::error::ErrorDetail;

    /// Longest org or volume name.
    pub const MAX_VOLUME_NAME: usize = 64;

    /// Checks an org or volume name, the rule every side applies (volumed, the guest agent
    /// before it puts one on a helper's command line): 1 to 64 characters from
    /// `[A-Za-z0-9._-]`, not starting with `.` or `-`. The error says which rule, for `what`.
    ///
    /// ```
    /// use proto::volume::check_volume_name;
    /// assert!(check_volume_name("name", "my-vol_1.0").is_ok());
    /// assert!(check_volume_name("name", "../x").is_err());
    /// assert!(check_volume_name("name", "-x").is_err());
    /// assert!(check_volume_name("name", "").is_err());
    /// ```
    pub fn check_volume_name(what: &str, name: &str) -> Result<(), String> {
        let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if name.is_empty() || name.len() > MAX_VOLUME_NAME || !ok_chars || name.starts_with('.') || name.starts_with('-') {
            return Err(format!(
                "{what} {name:?} must be 1-{MAX_VOLUME_NAME} characters of [A-Za-z0-9._-], not starting with '.' or '-'"
            ));
        }
        Ok(())
    }
}

/// The guest agent protocol (`sail.agent.v1`): vmm-host <-> `sail-agent` over vsock.
pub mod agent {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sail.agent.v1");

    /// The vsock port the agent listens on inside a guest (Cloud Hypervisor's link; through
    /// the VMM's hybrid-vsock socket the host sends `CONNECT 10000`). Sailboxes cannot use it
    /// as an ingress port.
    pub const VSOCK_PORT: u32 = 10000;

    /// Bytes of stdout and of stderr an exec request keeps (the contract's limit): the agent
    /// keeps the first this many and counts the rest; vmm-host holds what an agent reports to
    /// it.
    pub const OUTPUT_CAP: usize = 16 << 20;
}

/// The vmm-host API (`sail.sailbox.v1`): create, exec, files, listeners, terminate.
pub mod sailbox {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sail.sailbox.v1");

    /// The error detail of this service's statuses (defined once, in `sail.error.v1`).
    pub use super::error::ErrorDetail;
}

/// API keys and orgs (`sail.tenancy.v1`), served by volumed; see the `tenancy` crate.
pub mod tenancy {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sail.tenancy.v1");

    /// The error detail of this service's statuses (defined once, in `sail.error.v1`).
    pub use super::error::ErrorDetail;
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn error_detail_round_trips_through_a_status() {
        let s = ErrorDetail::to_status(tonic::Code::NotFound, "VolumeNotFoundError", "volume a/b not found");
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(s.message(), "volume a/b not found");
        let d = ErrorDetail::from_status(&s).unwrap();
        assert_eq!((d.name.as_str(), d.message.as_str()), ("VolumeNotFoundError", "volume a/b not found"));
        assert_eq!(error_name(&s).as_deref(), Some("VolumeNotFoundError"));
    }

    #[test]
    fn the_wire_bytes_are_those_of_the_two_old_messages() {
        // Both removed messages were `string name = 1; string message = 2;`: field 1 and 2,
        // wire type 2 (length-delimited), so tag bytes 0x0a and 0x12.
        let d = ErrorDetail { name: "N".into(), message: "mm".into() };
        assert_eq!(d.encode_to_vec(), b"\x0a\x01N\x12\x02mm");
        // What an old server sent decodes here.
        let s = tonic::Status::with_details(tonic::Code::Internal, "x", bytes_of(b"\x0a\x09SailError\x12\x01x"));
        assert_eq!(error_name(&s).as_deref(), Some("SailError"));
    }

    #[test]
    fn statuses_without_a_name_have_none() {
        assert_eq!(error_name(&tonic::Status::internal("no details")), None);
        let empty_name = ErrorDetail::to_status(tonic::Code::Internal, "", "m");
        assert_eq!(error_name(&empty_name), None);
        let garbage = tonic::Status::with_details(tonic::Code::Internal, "x", bytes_of(b"\xff\xff\xff"));
        assert_eq!(ErrorDetail::from_status(&garbage), None);
        assert_eq!(error_name(&garbage), None);
    }

    fn bytes_of(b: &'static [u8]) -> prost::bytes::Bytes {
        prost::bytes::Bytes::from_static(b)
    }
}
