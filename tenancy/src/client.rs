//! Sending the key: an interceptor that puts `authorization: Bearer <key>` on every call.
//!
//! ```
//! use tenancy::client::{KeyInterceptor, authed};
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let channel = tonic::transport::Channel::from_static("http://127.0.0.1:7420").connect_lazy();
//! let key = tenancy::credentials::find_key("http://127.0.0.1:7420")?;
//! let client = proto::tenancy::key_service_client::KeyServiceClient::new(authed(channel, key.as_ref()));
//! # Ok(()) }
//! ```

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::ApiKey;

/// The metadata key the API key travels in.
pub const HEADER: &str = "authorization";

/// Adds the key (when there is one) to every request.
#[derive(Clone, Default)]
pub struct KeyInterceptor {
    value: Option<AsciiMetadataValue>,
}

impl KeyInterceptor {
    /// Sends `key`; `None` sends nothing (a guest's helper, whose gateway knows it by the
    /// listener it reached).
    pub fn new(key: Option<&ApiKey>) -> Self {
        // A key is ASCII by construction (prefix, hex, underscores), so this cannot fail.
        let value = key.and_then(|k| MetadataValue::try_from(format!("Bearer {k}")).ok());
        Self { value }
    }
}

impl std::fmt::Debug for KeyInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyInterceptor").field("has_key", &self.value.is_some()).finish()
    }
}

impl Interceptor for KeyInterceptor {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.value {
            req.metadata_mut().insert(HEADER, v.clone());
        }
        Ok(req)
    }
}

/// A channel that sends a key on every call.
pub type AuthedChannel = InterceptedService<Channel, KeyInterceptor>;

/// Wraps `channel` so every call carries `key`.
pub fn authed(channel: Channel, key: Option<&ApiKey>) -> AuthedChannel {
    InterceptedService::new(channel, KeyInterceptor::new(key))
}

/// The key a request's metadata carries: `Ok(None)` without one, `Err` for one that is not a
/// key (so a typo is told apart from a missing key).
pub fn key_of(metadata: &tonic::metadata::MetadataMap) -> Result<Option<ApiKey>, crate::KeyError> {
    key_in(metadata.get(HEADER).map(|v| v.as_bytes()))
}

/// The key in an `authorization` value (`Bearer <key>` or the bare key); `Ok(None)` for none.
/// What the server layer reads straight from the HTTP headers, without copying them.
pub fn key_in(value: Option<&[u8]>) -> Result<Option<ApiKey>, crate::KeyError> {
    let Some(v) = value else { return Ok(None) };
    let s = std::str::from_utf8(v).map_err(|_| crate::KeyError)?;
    let token = s.strip_prefix("Bearer ").unwrap_or(s);
    token.parse().map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interceptor_sends_the_key_it_was_given() {
        let k = ApiKey::generate();
        let req = KeyInterceptor::new(Some(&k)).call(tonic::Request::new(())).unwrap();
        assert_eq!(key_of(req.metadata()).unwrap(), Some(k));
        let req = KeyInterceptor::new(None).call(tonic::Request::new(())).unwrap();
        assert_eq!(key_of(req.metadata()).unwrap(), None);
        let mut req = tonic::Request::new(());
        req.metadata_mut().insert(HEADER, "Bearer nonsense".parse().unwrap());
        assert!(key_of(req.metadata()).is_err());
    }
}
