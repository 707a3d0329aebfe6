//! A gRPC client of a guest's `sail-agent`, over its guest link (one HTTP/2 connection
//! carrying every call and every ingress stream).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use proto::agent as pb;
use proto::agent::agent_client::AgentClient as RawClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::link::GuestLink;

/// How long one link handshake may take (once the guest is up).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a `Mount` may take: the agent gives its helper 120 s to answer (it reaches
/// volumed and fetches the head first), plus room for the link.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(150);

/// How long an `Unmount` may take (the agent waits up to 10 s for the helper to exit, then
/// kills it and waits again).
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a `ListMounts` may take (the agent asks every helper in parallel, 2 s each).
const LIST_MOUNTS_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of one guest's agent; cheap to clone (one HTTP/2 connection, re-established on
/// demand).
///
/// A serial link takes one host connection at a time, so a VM must have exactly one client:
/// create it once and clone it.
#[derive(Clone)]
pub struct AgentClient {
    raw: RawClient<Channel>,
    link: GuestLink,
    handshake_ms: Arc<AtomicU64>,
}

impl AgentClient {
    /// A lazily connecting client for the guest behind `link`.
    pub fn new(link: &GuestLink) -> Self {
        Self::with_handshake_timeout(link, HANDSHAKE_TIMEOUT)
    }

    fn with_handshake_timeout(link: &GuestLink, timeout: Duration) -> Self {
        let l = link.clone();
        let handshake_ms = Arc::new(AtomicU64::new(timeout.as_millis() as u64));
        let limit = handshake_ms.clone();
        let connector = tower::service_fn(move |_: Uri| {
            let l = l.clone();
            let timeout = Duration::from_millis(limit.load(Ordering::Relaxed));
            async move {
                let stream =
                    l.connect(timeout).await.map_err(|e| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e))?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        // The URI is a placeholder: the connector decides where bytes go.
        let channel = Endpoint::from_static("http://sail-agent")
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect_with_connector_lazy(connector);
        let raw = RawClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20);
        Self { raw, link: link.clone(), handshake_ms }
    }

    /// Sets how long later handshakes may take (short once the guest has booted, so a hung
    /// guest fails calls instead of stalling them).
    pub fn set_handshake_timeout(&self, timeout: Duration) {
        self.handshake_ms.store(timeout.as_millis() as u64, Ordering::Relaxed);
    }

    /// The generated client (clone it per call).
    pub fn raw(&self) -> RawClient<Channel> {
        self.raw.clone()
    }

    /// The link this client uses.
    pub fn link(&self) -> &GuestLink {
        &self.link
    }

    /// Says hello until the agent answers or `deadline` passes; `alive` is polled while
    /// waiting and ends the wait early when it returns false (the VMM died). The link has one
    /// host connection at a time (a serial port), so this waits on the client's own channel.
    pub async fn wait_ready(
        &self,
        req: pb::HelloRequest,
        deadline: Instant,
        mut alive: impl FnMut() -> bool,
    ) -> Result<pb::HelloResponse, String> {
        let mut last_error = String::from("no answer yet");
        let mut pause = Duration::from_millis(20);
        while Instant::now() < deadline {
            let mut raw = self.raw.clone();
            let attempt = raw.hello(req.clone());
            tokio::pin!(attempt);
            let outcome = loop {
                tokio::select! {
                    r = &mut attempt => break Some(r),
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        if !alive() {
                            return Err(format!("the VM exited while booting (last error: {last_error})"));
                        }
                        if Instant::now() >= deadline {
                            break None;
                        }
                    }
                }
            };
            match outcome {
                Some(Ok(resp)) => return Ok(resp.into_inner()),
                Some(Err(status)) => last_error = status.message().to_owned(),
                None => break,
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
        Err(format!("the agent did not answer in time (last error: {last_error})"))
    }

    /// A client whose handshakes may take until the guest has booted (`timeout`); lower it
    /// with [`AgentClient::set_handshake_timeout`] once it answered.
    pub fn for_boot(link: &GuestLink, timeout: Duration) -> Self {
        Self::with_handshake_timeout(link, timeout)
    }

    /// The handshake timeout used after boot.
    pub const RUNNING_HANDSHAKE: Duration = HANDSHAKE_TIMEOUT;

    /// Mounts a volume in the guest (`Mount`, docs/vmm-host.md "Volume mounts"): returns
    /// once the guest's helper answers, or the agent's error (INVALID_ARGUMENT,
    /// ALREADY_EXISTS, RESOURCE_EXHAUSTED, FAILED_PRECONDITION with the helper's stderr tail,
    /// DEADLINE_EXCEEDED). The same volume at the same path again returns the existing mount.
    pub async fn mount(&self, req: pb::MountRequest) -> Result<pb::MountInfo, tonic::Status> {
        let mut raw = self.raw();
        bounded(MOUNT_TIMEOUT, "Mount", raw.mount(req)).await
    }

    /// Unmounts the volume at `path` (`Unmount`; NOT_FOUND if nothing is mounted there).
    /// Uncommitted changes of the mount are dropped.
    pub async fn unmount(&self, path: &str) -> Result<pb::MountInfo, tonic::Status> {
        let mut raw = self.raw();
        bounded(UNMOUNT_TIMEOUT, "Unmount", raw.unmount(pb::UnmountRequest { path: path.to_owned() })).await
    }

    /// The guest's mounts with their state, head commit and dirty bytes (`ListMounts`).
    pub async fn list_mounts(&self) -> Result<Vec<pb::MountInfo>, tonic::Status> {
        let mut raw = self.raw();
        bounded(LIST_MOUNTS_TIMEOUT, "ListMounts", raw.list_mounts(pb::ListMountsRequest {})).await.map(|r| r.mounts)
    }
}

/// One unary call bounded by `limit` (DEADLINE_EXCEEDED past it).
async fn bounded<T>(
    limit: Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!("the agent did not answer {what} within {}s", limit.as_secs()))),
    }
}
