//! Org and volume names.

use crate::InvalidRequest;

pub use proto::volume::MAX_VOLUME_NAME;

/// Checks an org or volume name: 1 to 64 characters from `[A-Za-z0-9._-]`, not starting with
/// `.` or `-` (the rule is `proto`'s, shared with the guest agent).
///
/// ```
/// use volume_model::volume_name::check_volume_name;
/// assert!(check_volume_name("name", "my-vol_1.0").is_ok());
/// assert!(check_volume_name("name", "../x").is_err());
/// assert!(check_volume_name("name", "").is_err());
/// ```
pub fn check_volume_name(what: &str, name: &str) -> Result<(), InvalidRequest> {
    proto::volume::check_volume_name(what, name).map_err(InvalidRequest::new)
}
