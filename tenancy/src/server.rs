//! Checking the key: a tower layer in front of every gRPC service, and the authenticators it
//! asks.
//!
//! The layer reads `authorization`, asks its [`Authenticator`] who the key belongs to, and
//! puts the [`Identity`] in the request's extensions before any handler runs; a call without
//! a key, with a malformed one, or with one the authenticator does not know ends there with
//! `Unauthenticated` (contract name `SailAuthenticationError`). Handlers then scope what they do
//! with [`Identity::of`] and [`Identity::scope`]. It is a layer rather than a
//! `tonic::service::Interceptor` because an authenticator may have to ask another service
//! (a vmm-host on its own asks volumed), which a synchronous interceptor cannot.
//!
//! Authenticators: volumed's key store (in-process, `sail up` and volumed), and
//! [`RemoteAuthenticator`], which asks volumed's `WhoAmI` and keeps answers for
//! [`REMOTE_CACHE_TTL`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::client::{AuthedChannel, authed, key_in};
use crate::{ApiKey, Identity, Role, unauthenticated};

/// A boxed future, as authenticators return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a key was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No such key (never created, or revoked), or its secret is wrong.
    #[error("unknown or revoked API key {0}")]
    UnknownKey(String),
    /// The authenticator could not decide (its store or the service it asks failed).
    #[error("could not check the API key: {0}")]
    Unavailable(String),
}

/// Resolves a key to who it belongs to.
pub trait Authenticator: Send + Sync + 'static {
    /// The identity of `key`, or why not.
    fn authenticate<'a>(&'a self, key: &'a ApiKey) -> BoxFuture<'a, Result<Identity, AuthError>>;
}

/// Checks the key of every request before the services behind it see it.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<dyn Authenticator>,
}

impl AuthLayer {
    /// A layer that asks `auth`.
    pub fn new(auth: Arc<dyn Authenticator>) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, auth: self.auth.clone() }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<dyn Authenticator>,
}

/// The refusal of a request without a usable key, as a gRPC response.
fn refuse<B: Default>(status: tonic::Status) -> http::Response<B> {
    status.into_http()
}

const NO_KEY: &str = "this call needs an API key: set SAIL_API_KEY, or run `sail up` on this machine \
    (it keeps a key where the CLI and SDK find it), or create one with `sail key create`";

impl<S, ReqB, ResB> tower::Service<http::Request<ReqB>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
    ResB: Default,
{
    type Response = http::Response<ResB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqB>) -> Self::Future {
        // The service that was polled ready serves this request; its clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let key = match key_in(req.headers().get(crate::client::HEADER).map(|v| v.as_bytes())) {
                Ok(Some(k)) => k,
                Ok(None) => return Ok(refuse(unauthenticated(NO_KEY))),
                Err(e) => return Ok(refuse(unauthenticated(e.to_string()))),
            };
            match auth.authenticate(&key).await {
                Ok(identity) => {
                    req.extensions_mut().insert(identity);
                    inner.call(req).await
                }
                Err(AuthError::UnknownKey(id)) => Ok(refuse(unauthenticated(format!("unknown or revoked API key {id}")))),
                Err(e @ AuthError::Unavailable(_)) => Ok(refuse(tonic::Status::unavailable(e.to_string()))),
            }
        })
    }
}

/// How long [`RemoteAuthenticator`] keeps an answer: a revoked key keeps working on a
/// vmm-host on its own for at most this long.
pub const REMOTE_CACHE_TTL: Duration = Duration::from_secs(10);
/// Answers it keeps at most (then the oldest go).
const REMOTE_CACHE_MAX: usize = 4096;

/// A remembered answer: when, and the identity or the key id refused.
type Answer = (Instant, Result<Identity, String>);

/// Asks volumed's `WhoAmI` who a key belongs to (for a vmm-host serving on its own), keeping
/// each answer, good or bad, for [`REMOTE_CACHE_TTL`].
pub struct RemoteAuthenticator {
    channel: tonic::transport::Channel,
    cache: Mutex<std::collections::HashMap<String, Answer>>,
}

impl RemoteAuthenticator {
    /// Asks the volumed at `endpoint` (connected lazily, reconnecting as needed).
    pub fn new(endpoint: &str) -> Result<Self, http::uri::InvalidUri> {
        let channel = tonic::transport::Channel::from_shared(endpoint.to_owned())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(Self { channel, cache: Mutex::default() })
    }

    fn client(&self, key: &ApiKey) -> proto::tenancy::key_service_client::KeyServiceClient<AuthedChannel> {
        proto::tenancy::key_service_client::KeyServiceClient::new(authed(self.channel.clone(), Some(key)))
    }
}

impl Authenticator for RemoteAuthenticator {
    fn authenticate<'a>(&'a self, key: &'a ApiKey) -> BoxFuture<'a, Result<Identity, AuthError>> {
        Box::pin(async move {
            // Cached by the whole key's hash: a wrong secret for a known id is its own entry.
            let cache_key = key.hash().to_hex().to_string();
            if let Some((at, answer)) = self.cache.lock().get(&cache_key).cloned()
                && at.elapsed() < REMOTE_CACHE_TTL
            {
                return answer.map_err(AuthError::UnknownKey);
            }
            let answer = match self.client(key).who_am_i(proto::tenancy::WhoAmIRequest {}).await {
                Ok(resp) => {
                    let info = resp.into_inner().key.unwrap_or_default();
                    let role = Role::from_proto(info.role)
                        .ok_or_else(|| AuthError::Unavailable("volumed sent an unknown role".into()))?;
                    Ok(Identity { org: info.org, role, key_id: info.id })
                }
                Err(s) if s.code() == tonic::Code::Unauthenticated => Err(key.id().to_owned()),
                Err(s) => return Err(AuthError::Unavailable(format!("asking volumed: {}", s.message()))),
            };
            let mut cache = self.cache.lock();
            if cache.len() >= REMOTE_CACHE_MAX {
                cache.retain(|_, (at, _)| at.elapsed() < REMOTE_CACHE_TTL);
                if cache.len() >= REMOTE_CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(cache_key, (Instant::now(), answer.clone()));
            answer.map_err(AuthError::UnknownKey)
        })
    }
}

/// A fixed table of keys (tests, and a service whose only callers are known in advance).
#[derive(Default)]
pub struct StaticKeys {
    keys: std::collections::HashMap<String, (crate::KeyHash, Identity)>,
}

impl StaticKeys {
    /// Adds `key` as `identity`.
    pub fn with(mut self, key: &ApiKey, org: &str, role: Role) -> Self {
        let identity = Identity { org: org.to_owned(), role, key_id: key.id().to_owned() };
        self.keys.insert(key.id().to_owned(), (key.hash(), identity));
        self
    }
}

impl Authenticator for StaticKeys {
    fn authenticate<'a>(&'a self, key: &'a ApiKey) -> BoxFuture<'a, Result<Identity, AuthError>> {
        let found = match self.keys.get(key.id()) {
            Some((hash, identity)) if *hash == key.hash() => Ok(identity.clone()),
            _ => Err(AuthError::UnknownKey(key.id().to_owned())),
        };
        Box::pin(std::future::ready(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    #[derive(Clone)]
    struct Echo;
    impl Service<http::Request<()>> for Echo {
        type Response = http::Response<String>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let who = req.extensions().get::<Identity>().map(|i| format!("{}:{}", i.org, i.role.as_str()));
            std::future::ready(Ok(http::Response::new(who.unwrap_or_default())))
        }
    }

    fn grpc_status(resp: &http::Response<String>) -> Option<String> {
        resp.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn only_known_keys_reach_the_service_and_carry_their_identity() {
        let good = ApiKey::generate();
        let layer = AuthLayer::new(Arc::new(StaticKeys::default().with(&good, "acme", Role::Admin)));
        let svc = layer.layer(Echo);
        let req = |auth: Option<String>| {
            let mut b = http::Request::builder();
            if let Some(a) = auth {
                b = b.header("authorization", a);
            }
            b.body(()).unwrap()
        };
        let ok = svc.clone().oneshot(req(Some(format!("Bearer {good}")))).await.unwrap();
        assert_eq!((grpc_status(&ok), ok.body().as_str()), (None, "acme:admin"));
        // Same id, wrong secret; another key; garbage; nothing.
        let forged = format!("sail_{}_{}", good.id(), "0".repeat(64));
        for auth in
            [Some(format!("Bearer {forged}")), Some(format!("Bearer {}", ApiKey::generate())), Some("Bearer x".into()), None]
        {
            let resp = svc.clone().oneshot(req(auth.clone())).await.unwrap();
            assert_eq!(grpc_status(&resp).as_deref(), Some("16"), "{auth:?} is refused as Unauthenticated");
            assert_eq!(resp.body(), "", "the service never ran");
        }
    }
}
