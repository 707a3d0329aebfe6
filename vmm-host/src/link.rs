//! The host end of the link to a guest's agent: a Unix socket that leads to it, and the
//! handshake that turns a fresh connection into a byte stream to the agent.
//!
//! - [`GuestLink::Serial`]: QEMU's chardev socket behind the guest's `sail.agent`
//!   virtio-serial port. virtio-serial is migratable, which vhost-user-vsock is not in QEMU
//!   (a snapshot with it fails: "State blocked by non-migratable device ...
//!   vhost-user-vsock"), so it is the QEMU backend's link. The host writes
//!   `SAIL-CONNECT <nonce>\n` and reads until `SAIL-OK <nonce>\n` (skipping anything an
//!   earlier session left in the port); one host connection at a time.
//! - [`GuestLink::HybridVsock`]: the "hybrid vsock" Unix socket that Cloud Hypervisor and
//!   Firecracker expose: write `CONNECT <port>\n`, read `OK <host port>\n`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest handshake reply line accepted.
const MAX_REPLY: usize = 256;
/// Most bytes skipped while looking for a serial handshake reply.
const MAX_SKIP: usize = 1 << 20;

/// How the host reaches a guest's agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestLink {
    /// A virtio-serial port behind a Unix socket (QEMU).
    Serial(PathBuf),
    /// A hybrid-vsock Unix socket and the guest port (Cloud Hypervisor, Firecracker).
    HybridVsock(PathBuf, u32),
}

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The Unix socket could not be reached (the VMM is not running).
    #[error("guest link {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The other end refused or closed during the handshake (nothing listens yet).
    #[error("the guest end refused the connection")]
    Refused,
    /// The handshake took too long.
    #[error("the guest did not answer the handshake in time")]
    Timeout,
}

impl GuestLink {
    /// The Unix socket behind the link.
    pub fn socket(&self) -> &Path {
        match self {
            Self::Serial(p) | Self::HybridVsock(p, _) => p,
        }
    }

    /// Connects and performs the handshake within `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<UnixStream, LinkError> {
        let attempt = async {
            let path = self.socket();
            let mut stream = UnixStream::connect(path)
                .await
                .map_err(|source| LinkError::Socket { path: path.display().to_string(), source })?;
            match self {
                Self::Serial(_) => serial_handshake(&mut stream).await?,
                Self::HybridVsock(_, port) => {
                    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(|_| LinkError::Refused)?;
                    let line = read_line(&mut stream).await?;
                    if !line.starts_with(b"OK") {
                        return Err(LinkError::Refused);
                    }
                }
            }
            Ok(stream)
        };
        tokio::time::timeout(timeout, attempt).await.map_err(|_| LinkError::Timeout)?
    }
}

/// How often the serial greeting is repeated until answered.
const GREET_EVERY: Duration = Duration::from_millis(200);

/// Greets the agent and waits for its answer. The greeting is repeated: when a host comes
/// back quickly, the agent's previous session may not have noticed the old host leaving and
/// swallow the first greeting (then fail on it and start listening for the next). The agent
/// skips repeats that arrive after it answered.
async fn serial_handshake(stream: &mut UnixStream) -> Result<(), LinkError> {
    let nonce = format!("{:016x}", rand::random::<u64>());
    let greeting = format!("SAIL-CONNECT {nonce}\n");
    let want = format!("SAIL-OK {nonce}\n");
    let (mut rd, mut wr) = stream.split();
    let answer = skip_until(&mut rd, want.as_bytes());
    tokio::pin!(answer);
    loop {
        wr.write_all(greeting.as_bytes()).await.map_err(|_| LinkError::Refused)?;
        tokio::select! {
            r = &mut answer => return r,
            _ = tokio::time::sleep(GREET_EVERY) => {}
        }
    }
}

/// Reads one line a byte at a time (what follows belongs to the guest).
async fn read_line(stream: &mut UnixStream) -> Result<Vec<u8>, LinkError> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match stream.read(&mut b).await {
            Ok(1) if b[0] == b'\n' => return Ok(line),
            Ok(1) if line.len() < MAX_REPLY => line.push(b[0]),
            _ => return Err(LinkError::Refused),
        }
    }
}

/// Reads a byte at a time until `marker` has been read (bytes before it are dropped).
async fn skip_until<R: tokio::io::AsyncRead + Unpin>(stream: &mut R, marker: &[u8]) -> Result<(), LinkError> {
    let mut tail: Vec<u8> = Vec::with_capacity(marker.len());
    for _ in 0..MAX_SKIP {
        let mut b = [0u8; 1];
        match stream.read(&mut b).await {
            Ok(1) => {
                if tail.len() == marker.len() {
                    tail.remove(0);
                }
                tail.push(b[0]);
                if tail == marker {
                    return Ok(());
                }
            }
            _ => return Err(LinkError::Refused),
        }
    }
    Err(LinkError::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;

    #[tokio::test]
    async fn both_handshakes_leave_the_stream_at_the_first_guest_byte() {
        let dir = tempfile::tempdir().unwrap();
        // Serial: the guest answers after stale bytes, then sends data.
        let serial = dir.path().join("serial");
        let listener = tokio::net::UnixListener::bind(&serial).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = tokio::io::BufReader::new(s);
            let mut greeting = String::new();
            s.read_line(&mut greeting).await.unwrap();
            let nonce = greeting.trim().strip_prefix("SAIL-CONNECT ").unwrap().to_owned();
            let reply = format!("old bytes SAIL-OK 0000\nSAIL-OK {nonce}\nDATA");
            s.get_mut().write_all(reply.as_bytes()).await.unwrap();
        });
        let mut s = GuestLink::Serial(serial).connect(Duration::from_secs(5)).await.unwrap();
        let mut data = [0u8; 4];
        s.read_exact(&mut data).await.unwrap();
        assert_eq!(&data, b"DATA");

        // Hybrid vsock: CONNECT and OK, then data; a refusal is an error.
        let vsock = dir.path().join("vsock");
        let listener = tokio::net::UnixListener::bind(&vsock).unwrap();
        tokio::spawn(async move {
            for answer in ["OK 1073741824\nDATA", ""] {
                let (s, _) = listener.accept().await.unwrap();
                let mut s = tokio::io::BufReader::new(s);
                let mut line = String::new();
                s.read_line(&mut line).await.unwrap();
                assert_eq!(line, "CONNECT 10000\n");
                s.get_mut().write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let link = GuestLink::HybridVsock(vsock, proto::agent::VSOCK_PORT);
        let mut s = link.connect(Duration::from_secs(5)).await.unwrap();
        s.read_exact(&mut data).await.unwrap();
        assert_eq!(&data, b"DATA");
        assert!(matches!(link.connect(Duration::from_secs(5)).await, Err(LinkError::Refused)));
        let missing = GuestLink::Serial(dir.path().join("nothing"));
        assert!(matches!(missing.connect(Duration::from_secs(1)).await, Err(LinkError::Socket { .. })));
    }
}
