//! Ingress: connections to TCP ports on the guest's loopback, for the `Forward` and
//! `ProbePort` RPCs.

use std::time::Duration;

use tokio::net::TcpStream;

/// How long a connect to a guest port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to a TCP port of the guest's loopback (IPv4, then IPv6).
pub async fn connect_local(port: u16) -> std::io::Result<TcpStream> {
    let v4 = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(("127.0.0.1", port))).await;
    match v4 {
        Ok(Ok(s)) => Ok(s),
        other => {
            let v6 = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(("::1", port))).await;
            match v6 {
                Ok(Ok(s)) => Ok(s),
                _ => match other {
                    Ok(Err(e)) => Err(e),
                    _ => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")),
                },
            }
        }
    }
}

/// Whether something accepts connections on the port (the listener's route status).
pub async fn probe(port: u16) -> bool {
    connect_local(port).await.is_ok()
}
