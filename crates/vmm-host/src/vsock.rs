//! The host end of a guest's vsock: the "hybrid vsock" Unix-socket protocol that Cloud
//! Hypervisor, Firecracker and vhost-device-vsock all speak. The host connects to the VMM's
//! Unix socket, writes `CONNECT <port>\n`, reads `OK <host port>\n`, and from then on the
//! stream is a plain byte stream to the guest's vsock port.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The guest agent's gRPC port.
pub const AGENT_PORT: u32 = 10000;
/// The guest agent's ingress forwarding port.
pub const FORWARD_PORT: u32 = 10001;

/// Longest handshake reply we accept.
const MAX_REPLY: usize = 64;

/// Why a vsock connection failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The Unix socket could not be reached (the VMM or its vsock daemon is not running).
    #[error("vsock socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The VMM refused or closed the connection: nothing listens on the guest port yet.
    #[error("guest vsock port {port} refused the connection")]
    Refused {
        /// The guest port.
        port: u32,
    },
    /// The handshake took too long.
    #[error("vsock handshake to port {port} timed out")]
    Timeout {
        /// The guest port.
        port: u32,
    },
}

/// Connects to guest vsock `port` through the hybrid-vsock socket at `uds`.
pub async fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
    let attempt = async {
        let mut stream = UnixStream::connect(uds)
            .await
            .map_err(|source| VsockError::Socket { path: uds.display().to_string(), source })?;
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|_| VsockError::Refused { port })?;
        // Read the reply a byte at a time: anything after the newline belongs to the guest.
        let mut reply = Vec::with_capacity(16);
        loop {
            let mut b = [0u8; 1];
            match stream.read(&mut b).await {
                Ok(1) if b[0] == b'\n' => break,
                Ok(1) if reply.len() < MAX_REPLY => reply.push(b[0]),
                _ => return Err(VsockError::Refused { port }),
            }
        }
        if !reply.starts_with(b"OK") {
            return Err(VsockError::Refused { port });
        }
        Ok(stream)
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| VsockError::Timeout { port })?
}
