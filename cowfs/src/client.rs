//! A client of a cowfs daemon's control socket (what vmm-host uses). One connection per
//! request (`control_wire::call_async`); errors are typed ([`ClientError`]), and a refusal
//! carries the daemon's [`ErrorKind`], which is what callers decide on.

use std::path::{Path, PathBuf};

use control_wire::CallError;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::control::{Created, ErrorKind, Exported, Frozen, Names, Request, Stopping};

/// What a request to the daemon can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached, or the exchange broke off or was not the protocol.
    #[error("cowfs: {source}")]
    Wire {
        /// What failed.
        #[source]
        source: CallError,
    },
    /// The request could not be encoded.
    #[error("encoding a cowfs request: {source}")]
    Encode {
        /// What failed to encode.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon's result could not be decoded.
    #[error("bad reply from cowfs: {source}")]
    BadReply {
        /// What failed to decode.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon refused the request.
    #[error("cowfs: {message}")]
    Refused {
        /// Why, to decide on.
        kind: ErrorKind,
        /// Why, for people.
        message: String,
    },
}

impl ClientError {
    /// The daemon's error kind, when it refused the request.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Refused { kind, .. } => Some(*kind),
            Self::Wire { .. } | Self::Encode { .. } | Self::BadReply { .. } => None,
        }
    }
}

impl From<CallError> for ClientError {
    fn from(e: CallError) -> Self {
        match e {
            // A name this client does not know is a bad request as far as it can tell.
            CallError::Remote(w) => {
                Self::Refused { kind: ErrorKind::from_name(&w.name).unwrap_or(ErrorKind::Invalid), message: w.message }
            }
            other => Self::Wire { source: other },
        }
    }
}

/// Result alias of the client.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The control socket of one daemon.
#[derive(Clone, Debug)]
pub struct CowClient {
    socket: PathBuf,
}

impl CowClient {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: &Path) -> Self {
        Self { socket: socket.to_path_buf() }
    }

    /// One request, one reply: the reply's result, or the daemon's typed refusal.
    pub async fn call(&self, req: &Request) -> Result<Value> {
        let req = serde_json::to_value(req).map_err(|source| ClientError::Encode { source })?;
        Ok(control_wire::call_async(&self.socket, &req).await?)
    }

    /// A request whose result decodes as `T`.
    async fn call_as<T: DeserializeOwned>(&self, req: &Request) -> Result<T> {
        serde_json::from_value(self.call(req).await?).map_err(|source| ClientError::BadReply { source })
    }

    /// Whether the daemon answers.
    pub async fn ping(&self) -> bool {
        self.call(&Request::Ping).await.is_ok()
    }

    /// Asks the daemon to unmount and exit if it holds no files; returns whether it will.
    pub async fn stop_if_unused(&self) -> Result<bool> {
        Ok(self.call_as::<Stopping>(&Request::Stop).await?.stopping)
    }

    fn create(name: &str, size: Option<u64>, base: Option<&str>, readonly: bool) -> Request {
        Request::Create { name: name.to_owned(), size, base: base.map(str::to_owned), readonly }
    }

    /// Creates an all-zero file.
    pub async fn create_zeros(&self, name: &str, size: u64) -> Result<()> {
        self.call_as::<Created>(&Self::create(name, Some(size), None, false)).await.map(|_| ())
    }

    /// Creates a file over a stored manifest.
    pub async fn create_from(&self, name: &str, manifest: &str) -> Result<()> {
        self.call_as::<Created>(&Self::create(name, None, Some(manifest), false)).await.map(|_| ())
    }

    /// Creates a read-only file over a stored manifest (writes and opens for writing fail
    /// with `EROFS`).
    pub async fn create_readonly(&self, name: &str, manifest: &str) -> Result<()> {
        self.call_as::<Created>(&Self::create(name, None, Some(manifest), true)).await.map(|_| ())
    }

    /// Removes a file (missing is fine).
    pub async fn remove(&self, name: &str) -> Result<()> {
        match self.call(&Request::Remove { name: name.to_owned() }).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == Some(ErrorKind::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Freezes the regions written since the last checkpoint; returns how many.
    pub async fn freeze(&self, name: &str) -> Result<u64> {
        Ok(self.call_as::<Frozen>(&Request::Freeze { name: name.to_owned() }).await?.regions)
    }

    /// Stores the frozen regions and the new manifest.
    pub async fn export(&self, name: &str) -> Result<Exported> {
        self.call_as(&Request::Export { name: name.to_owned() }).await
    }

    /// A file's counters, and the daemon's chunk counters under `chunks`.
    pub async fn stats(&self, name: &str) -> Result<Value> {
        self.call(&Request::Stats { name: name.to_owned() }).await
    }

    /// Every file's name.
    pub async fn list(&self) -> Result<Vec<String>> {
        Ok(self.call_as::<Names>(&Request::List).await?.names)
    }
}
