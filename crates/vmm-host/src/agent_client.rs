//! A gRPC client of a guest's `sail-agent`, over the VMM's hybrid-vsock socket.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use proto::agent as pb;
use proto::agent::agent_client::AgentClient as RawClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::vsock::{self, AGENT_PORT};

/// How long one vsock handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of one guest's agent; cheap to clone (one HTTP/2 connection, re-established on
/// demand).
#[derive(Clone)]
pub struct AgentClient {
    raw: RawClient<Channel>,
    uds: PathBuf,
}

impl AgentClient {
    /// A lazily connecting client for the guest behind the hybrid-vsock socket `uds`.
    pub fn new(uds: &Path) -> Self {
        let path = uds.to_path_buf();
        let connector = tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = vsock::connect(&path, AGENT_PORT, HANDSHAKE_TIMEOUT)
                    .await
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e))?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        // The URI is a placeholder: the connector decides where bytes go.
        let channel = Endpoint::from_static("http://sail-agent")
            .connect_timeout(HANDSHAKE_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect_with_connector_lazy(connector);
        let raw = RawClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
        Self { raw, uds: uds.to_path_buf() }
    }

    /// The generated client (clone it per call).
    pub fn raw(&self) -> RawClient<Channel> {
        self.raw.clone()
    }

    /// The hybrid-vsock socket this client uses.
    pub fn socket(&self) -> &Path {
        &self.uds
    }

    /// Says hello until the agent answers or `deadline` passes; `alive` is polled between
    /// attempts and ends the wait early when it returns false (the VMM died).
    pub async fn wait_ready(
        &self,
        req: pb::HelloRequest,
        deadline: Instant,
        mut alive: impl FnMut() -> bool,
    ) -> Result<pb::HelloResponse, String> {
        let mut last_error = String::from("no attempt made");
        let mut pause = Duration::from_millis(20);
        while Instant::now() < deadline {
            if !alive() {
                return Err(format!("the VM exited while booting (last error: {last_error})"));
            }
            // A fresh connection per attempt: a refused handshake poisons nothing.
            let mut fresh = Self::new(&self.uds).raw();
            let attempt = fresh.hello(req.clone());
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => last_error = status.message().to_owned(),
                Err(_) => last_error = "hello timed out".into(),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
        Err(format!("the agent did not answer in time (last error: {last_error})"))
    }

}
