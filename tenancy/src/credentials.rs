//! Where a client finds its key.
//!
//! In order: the `SAIL_API_KEY` environment variable; else the key file for the endpoint,
//! `<config>/keys/<host>_<port>`, where `<config>` is `$SAIL_CONFIG_DIR`, else
//! `$XDG_CONFIG_HOME/sail`, else `~/.config/sail`. `sail up` writes that file (mode 0600)
//! with its first admin key, so the CLI and the SDK on the same machine need no extra step;
//! any loopback spelling of the host (`127.0.0.1`, `localhost`, `::1`, `0.0.0.0`) names the
//! same file. The Python SDK reads the same places (sdk/python/sail/_client.py).

use std::path::{Path, PathBuf};

use crate::ApiKey;

/// The environment variable a key is taken from first.
pub const ENV: &str = "SAIL_API_KEY";

/// A key that was found but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// `SAIL_API_KEY` or the key file holds something that is not a key.
    #[error("{from} does not hold a sail API key (expected sail_<16 hex>_<64 hex>)")]
    NotAKey {
        /// Where it came from.
        from: String,
    },
    /// The key file exists but cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// `$SAIL_CONFIG_DIR`, else `$XDG_CONFIG_HOME/sail`, else `~/.config/sail`.
pub fn config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SAIL_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(x).join("sail");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".config/sail")
}

/// The file name an endpoint's key is kept under: `<host>_<port>`, every loopback host
/// spelled `loopback`.
///
/// ```
/// use tenancy::credentials::endpoint_file_name as n;
/// assert_eq!(n("http://127.0.0.1:7420"), "loopback_7420");
/// assert_eq!(n("http://localhost:7420/"), "loopback_7420");
/// assert_eq!(n("http://[::1]:7420"), "loopback_7420");
/// assert_eq!(n("https://sail.example.com"), "sail.example.com_443");
/// assert_eq!(n("10.0.0.5:9000"), "10.0.0.5_9000");
/// ```
pub fn endpoint_file_name(endpoint: &str) -> String {
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("http", endpoint));
    let authority = rest.split('/').next().unwrap_or("");
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (!h.contains(':') || h.ends_with(']')) => {
            (h, p.to_owned())
        }
        _ => (authority, if scheme == "https" { "443".into() } else { "80".into() }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let loopback = host == "localhost"
        || host == "0.0.0.0"
        || host == "::"
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    let host = if loopback { "loopback".to_owned() } else { host };
    let safe: String = host.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    format!("{safe}_{port}")
}

/// The key file for `endpoint` under [`config_dir`].
pub fn key_file(endpoint: &str) -> PathBuf {
    config_dir().join("keys").join(endpoint_file_name(endpoint))
}

/// The key to send to `endpoint`: `SAIL_API_KEY`, else its key file; `Ok(None)` when there
/// is neither (calls then fail with `Unauthenticated`, which says where a key is looked for).
pub fn find_key(endpoint: &str) -> Result<Option<ApiKey>, CredentialsError> {
    if let Ok(v) = std::env::var(ENV)
        && !v.trim().is_empty()
    {
        return v.parse().map(Some).map_err(|_| CredentialsError::NotAKey { from: ENV.into() });
    }
    read_key_file(&key_file(endpoint))
}

/// The key in `path`, `Ok(None)` if there is no such file.
pub fn read_key_file(path: &Path) -> Result<Option<ApiKey>, CredentialsError> {
    match std::fs::read_to_string(path) {
        Ok(s) => s.parse().map(Some).map_err(|_| CredentialsError::NotAKey { from: path.display().to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CredentialsError::Read { path: path.into(), source }),
    }
}

/// Writes `key` to `path` (mode 0600, directories 0700, replaced atomically).
pub fn write_key_file(path: &Path, key: &ApiKey) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    sysutil::keyfile::write_private(path, format!("{key}\n").as_bytes())
}

/// Keeps `key` as the one clients of `endpoint` on this machine use; returns the file.
pub fn save_key(endpoint: &str, key: &ApiKey) -> std::io::Result<PathBuf> {
    let path = key_file(endpoint);
    write_key_file(&path, key)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/loopback_1");
        let k = ApiKey::generate();
        write_key_file(&path, &k).unwrap();
        assert_eq!(read_key_file(&path).unwrap(), Some(k.clone()));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        // Replaced, not appended.
        let k2 = ApiKey::generate();
        write_key_file(&path, &k2).unwrap();
        assert_eq!(read_key_file(&path).unwrap(), Some(k2));
        assert!(read_key_file(&dir.path().join("none")).unwrap().is_none());
        std::fs::write(&path, "junk").unwrap();
        assert!(matches!(read_key_file(&path), Err(CredentialsError::NotAKey { .. })));
    }

    #[test]
    fn endpoints_name_their_files() {
        assert_eq!(endpoint_file_name("http://0.0.0.0:1"), "loopback_1");
        assert_eq!(endpoint_file_name("http://127.0.0.2:1"), "loopback_1");
        assert_eq!(endpoint_file_name("http://host.example:8080/x"), "host.example_8080");
        assert_eq!(endpoint_file_name("http://[2001:db8::1]:9"), "2001_db8__1_9");
    }
}
