//! Ingress: one host TCP listener per ingress port; each connection becomes one `Forward`
//! stream to the guest agent (over the sailbox's single agent connection), which connects it
//! to the port on the guest's loopback. A listener's route status is whether something in
//! the guest accepts on the port.
//!
//! [`Ingress`] is the part of a host that owns the listeners' accept loops (as tasks of their
//! sailbox). A connection to a sleeping sailbox wakes it through the host's snapshots part,
//! which [`Ingress::set_waker`] hands it once both exist (the snapshots part starts VMs
//! whose listeners this part binds).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use proto::sailbox as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;

use crate::error::{Result, SailboxError};
use crate::model::{ListenerRecord, State};
use crate::runtime::{Live, Runtime, Vm};
use crate::snapshot::Snapshots;

/// How long one route probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The ingress listeners of a host.
pub(crate) struct Ingress {
    rt: Arc<Runtime>,
    /// Wakes sleeping sailboxes on a connection (set once the host's parts exist).
    waker: OnceLock<Weak<Snapshots>>,
}

impl Ingress {
    pub(crate) fn new(rt: Arc<Runtime>) -> Self {
        Self { rt, waker: OnceLock::new() }
    }

    /// Sets the part that wakes sleeping sailboxes (once).
    pub(crate) fn set_waker(&self, snapshots: Weak<Snapshots>) {
        let _ = self.waker.set(snapshots);
    }

    /// Binds a listener for each port (re-using the host ports in `previous` where possible,
    /// so URLs survive a vmm-host restart) and starts forwarding.
    pub(crate) async fn bind_all(
        self: &Arc<Self>,
        live: &Arc<Live>,
        ports: &[u32],
        previous: &[ListenerRecord],
    ) -> Result<Vec<ListenerRecord>> {
        let mut out = Vec::new();
        for &port in ports {
            let wanted = previous.iter().find(|l| l.port == port).map(|l| l.host_port).unwrap_or(0);
            let listener = self.bind(port, wanted).await?;
            let host_port = listener.local_addr().map_err(|e| SailboxError::io("listener address", e))?.port();
            let ingress = self.clone();
            let weak = Arc::downgrade(live);
            live.push_task(tokio::spawn(async move { ingress.accept_loop(listener, weak, port).await }));
            out.push(ListenerRecord { port, host_port });
        }
        Ok(out)
    }

    /// A listener for guest port `port` on host port `wanted` (any free one if it is taken
    /// or 0).
    async fn bind(&self, port: u32, wanted: u16) -> Result<TcpListener> {
        let addr = self.rt.config.ingress_addr;
        let failed = |e| SailboxError::io(format!("binding a listener for port {port}"), e);
        match TcpListener::bind(SocketAddr::new(addr, wanted)).await {
            Ok(l) => Ok(l),
            Err(_) if wanted != 0 => TcpListener::bind(SocketAddr::new(addr, 0)).await.map_err(failed),
            Err(e) => Err(failed(e)),
        }
    }

    /// Accepts connections for the sailbox until it is gone.
    async fn accept_loop(self: Arc<Self>, listener: TcpListener, live: Weak<Live>, port: u32) {
        loop {
            let (conn, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, usually: back off instead of spinning.
                    tracing::warn!(port, error = %e, "ingress accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(live) = live.upgrade() else { return };
            let ingress = self.clone();
            tokio::spawn(async move {
                if let Err(e) = ingress.serve_conn(&live, conn, port).await {
                    tracing::debug!(sailbox = %live.id(), port, %peer, error = %e, "ingress connection failed");
                }
            });
        }
    }

    /// One ingress connection: to a running sailbox it is forwarded; a sleeping one is woken
    /// first (the connection waits, then is served); to a paused one it is closed.
    async fn serve_conn(&self, live: &Arc<Live>, conn: TcpStream, port: u32) -> std::result::Result<(), String> {
        let state = live.snapshot().state;
        if state == State::Sleeping {
            let snapshots = self.waker.get().and_then(Weak::upgrade).ok_or("vmm-host is stopping")?;
            snapshots.wake(live, "an ingress connection").await.map_err(|e| e.to_string())?;
        }
        match (live.snapshot().state, live.vm()) {
            (State::Running, Some(vm)) => forward(&vm, conn, port).await,
            (state, _) => Err(format!("sailbox is {state:?}: connection closed")),
        }
    }
}

/// Forwards one connection to the guest's `port`: client bytes as request messages (their
/// end is the client's half-close), the guest server's bytes back until it closes.
async fn forward(vm: &Vm, conn: TcpStream, port: u32) -> std::result::Result<(), String> {
    let _ = conn.set_nodelay(true);
    let (mut rd, mut wr) = conn.into_split();
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::agent::ForwardRequest>(8);
    tx.send(proto::agent::ForwardRequest { port, data: Vec::new() }).await.map_err(|e| e.to_string())?;
    let upstream = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(proto::agent::ForwardRequest { port: 0, data: buf[..n].to_vec() }).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let result = async {
        let mut replies = vm
            .agent
            .raw()
            .forward(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        while let Some(msg) = replies.next().await {
            let msg = msg.map_err(|s| s.message().to_owned())?;
            wr.write_all(&msg.data).await.map_err(|e| e.to_string())?;
        }
        let _ = wr.shutdown().await;
        Ok(())
    }
    .await;
    upstream.abort();
    result
}

impl Ingress {
    /// The sailbox's listeners with their route status; with a port and `wait`, waits until
    /// that port routes (or the wait ends: then it is reported unrouted).
    pub(crate) async fn listeners(&self, id: &str, port: u32, wait: Option<Duration>) -> Result<Vec<pb::Listener>> {
        let live = self.rt.held(id)?;
        let rec = live.snapshot();
        let mut listeners: Vec<pb::Listener> = self.rt.to_proto(&rec).listeners;
        if port != 0 {
            listeners.retain(|l| l.port == port);
            if listeners.is_empty() {
                return Err(SailboxError::Execution(format!("sailbox {id} has no listener for port {port}")));
            }
        }
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        for l in &mut listeners {
            loop {
                // Only a running guest can route; a paused or sleeping one reports false.
                l.routed = match live.vm() {
                    Some(vm) if live.snapshot().state == State::Running => probe(&vm, l.port).await,
                    _ => false,
                };
                let waiting = port != 0 && deadline.is_some_and(|d| tokio::time::Instant::now() < d);
                if l.routed || !waiting {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(listeners)
    }
}

async fn probe(vm: &Vm, port: u32) -> bool {
    let req = proto::agent::ProbePortRequest { port };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, vm.agent.raw().probe_port(req)).await,
        Ok(Ok(resp)) if resp.get_ref().accepting
    )
}
