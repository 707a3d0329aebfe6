//! Org and volume names.

use crate::InvalidRequest;

/// Longest org or volume name.
pub const MAX_VOLUME_NAME: usize = 64;

/// Checks an org or volume name: 1 to 64 characters from `[A-Za-z0-9._-]`, not starting with
/// `.` or `-`.
///
/// ```
/// use volume_model::volume_name::check_volume_name;
/// assert!(check_volume_name("name", "my-vol_1.0").is_ok());
/// assert!(check_volume_name("name", "../x").is_err());
/// assert!(check_volume_name("name", "").is_err());
/// ```
pub fn check_volume_name(what: &str, name: &str) -> Result<(), InvalidRequest> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > MAX_VOLUME_NAME || !ok_chars || name.starts_with('.') || name.starts_with('-') {
        return Err(InvalidRequest::new(format!(
            "{what} {name:?} must be 1-{MAX_VOLUME_NAME} characters of [A-Za-z0-9._-], \
             not starting with '.' or '-'"
        )));
    }
    Ok(())
}
