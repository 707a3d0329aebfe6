//! Volume paths: normalised, bounded, never escaping the volume root.

use std::fmt;

use crate::InvalidRequest;

/// Longest path accepted, in bytes (Linux PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest single component, in bytes (Linux NAME_MAX).
pub const MAX_NAME_BYTES: usize = 255;
/// Deepest path accepted, in components.
pub const MAX_DEPTH: usize = 256;

/// A normalised path inside a volume: zero or more non-empty components, none of them `.` or
/// `..`, none containing `/` or NUL. The empty path is the volume root.
///
/// ```
/// use volume_model::VolPath;
/// let p = VolPath::parse("/a//b/./c/").unwrap();
/// assert_eq!(p.to_string(), "a/b/c");
/// assert!(VolPath::parse("a/../b").is_err());
/// assert!(VolPath::parse("/").unwrap().is_root());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct VolPath(Vec<String>);

impl VolPath {
    /// The volume root.
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// Normalises `raw`: leading, trailing and repeated `/` and `.` components are dropped;
    /// `..`, NUL, over-long components or paths are rejected with
    /// [`InvalidRequest`].
    pub fn parse(raw: &str) -> Result<Self, InvalidRequest> {
        if raw.len() > MAX_PATH_BYTES {
            return Err(InvalidRequest::new(format!("path is {} bytes, the limit is {MAX_PATH_BYTES}", raw.len())));
        }
        if raw.contains('\0') {
            return Err(InvalidRequest::new("path contains a NUL byte"));
        }
        let mut parts = Vec::new();
        for part in raw.split('/') {
            match part {
                "" | "." => continue,
                ".." => return Err(InvalidRequest::new(format!("path {raw:?} contains '..'"))),
                name => {
                    check_name(name)?;
                    parts.push(name.to_owned());
                }
            }
        }
        if parts.len() > MAX_DEPTH {
            return Err(InvalidRequest::new(format!("path has {} components, the limit is {MAX_DEPTH}", parts.len())));
        }
        Ok(Self(parts))
    }

    /// Whether this is the volume root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The components, outermost first.
    pub fn components(&self) -> &[String] {
        &self.0
    }

    /// The last component, `None` for the root.
    pub fn file_name(&self) -> Option<&str> {
        self.0.last().map(String::as_str)
    }

    /// The parent path, `None` for the root.
    pub fn parent(&self) -> Option<VolPath> {
        if self.0.is_empty() { None } else { Some(Self(self.0[..self.0.len() - 1].to_vec())) }
    }

    /// This path with `name` appended (`name` must be a valid component).
    pub fn join(&self, name: &str) -> Result<VolPath, InvalidRequest> {
        check_name(name)?;
        let mut parts = self.0.clone();
        parts.push(name.to_owned());
        Ok(Self(parts))
    }

    /// Whether `other` is this path or lies below it.
    pub fn contains(&self, other: &VolPath) -> bool {
        other.0.starts_with(&self.0)
    }
}

/// Checks one path component (a directory entry name).
pub fn check_name(name: &str) -> Result<(), InvalidRequest> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(InvalidRequest::new(format!("invalid name {name:?}")));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(InvalidRequest::new(format!("name is {} bytes, the limit is {MAX_NAME_BYTES}", name.len())));
    }
    if name.contains('/') || name.contains('\0') {
        return Err(InvalidRequest::new(format!("name {name:?} contains '/' or NUL")));
    }
    Ok(())
}

impl fmt::Display for VolPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_rejects() {
        assert_eq!(VolPath::parse("").unwrap(), VolPath::root());
        assert_eq!(VolPath::parse("./a/./b//").unwrap().to_string(), "a/b");
        for bad in ["..", "a/..", "../x", "a/\0/b"] {
            assert!(VolPath::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(VolPath::parse(&"a/".repeat(300)).is_err());
        assert!(VolPath::parse(&"x".repeat(256)).is_err());
        assert!(VolPath::parse(&"x".repeat(255)).is_ok());
        let p = VolPath::parse("a/b").unwrap();
        assert!(VolPath::parse("a").unwrap().contains(&p));
        assert!(!VolPath::parse("b").unwrap().contains(&p));
        assert_eq!(p.parent().unwrap().to_string(), "a");
    }
}
