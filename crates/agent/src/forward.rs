//! Ingress forwarding. The host opens a raw stream to the forwarding port and sends one line,
//! `FORWARD <port>\n`; the agent connects to that TCP port on the guest's loopback and answers
//! `OK\n` (then bytes flow both ways until either side closes) or `ERR <reason>\n`.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest accepted request line.
const MAX_LINE: usize = 64;

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

/// Serves one forwarding stream from the host.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(stream: S) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let read = (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut line).await;
    let port = match read {
        Ok(_) => parse_request(&line),
        Err(e) => Err(format!("reading request: {e}")),
    };
    let port = match port {
        Ok(p) => p,
        Err(why) => {
            let _ = reader.get_mut().write_all(format!("ERR {why}\n").as_bytes()).await;
            return;
        }
    };
    let mut target = match connect_local(port).await {
        Ok(t) => t,
        Err(e) => {
            let _ = reader.get_mut().write_all(format!("ERR port {port}: {e}\n").as_bytes()).await;
            return;
        }
    };
    let _ = target.set_nodelay(true);
    if reader.get_mut().write_all(b"OK\n").await.is_err() {
        return;
    }
    // Bytes the host sent right after the request line are already in the reader's buffer.
    let buffered = reader.buffer().to_vec();
    let stream = reader.into_inner();
    if !buffered.is_empty() && target.write_all(&buffered).await.is_err() {
        return;
    }
    // The host is the front, the guest server the back: the server closing ends it.
    if let Err(e) = proto::relay::relay(stream, target).await {
        tracing::debug!(port, error = %e, "forwarded connection ended");
    }
}

fn parse_request(line: &[u8]) -> Result<u16, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_owned())?;
    let text = text.strip_suffix('\n').ok_or("request line too long or unterminated")?;
    let port = text.strip_prefix("FORWARD ").ok_or("expected FORWARD <port>")?;
    match port.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("bad port {port:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_strictly() {
        assert_eq!(parse_request(b"FORWARD 8080\n"), Ok(8080));
        assert!(parse_request(b"FORWARD 0\n").is_err());
        assert!(parse_request(b"FORWARD 70000\n").is_err());
        assert!(parse_request(b"FORWARD 80").is_err());
        assert!(parse_request(b"CONNECT 80\n").is_err());
        assert!(parse_request(&[0xff, b'\n']).is_err());
    }

    #[tokio::test]
    async fn forwards_both_ways_and_refuses_closed_ports() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf.map(|b| b.to_ascii_uppercase())).await.unwrap();
        });
        let (mut host, agent) = tokio::io::duplex(1024);
        tokio::spawn(serve(agent));
        host.write_all(format!("FORWARD {port}\nhello").as_bytes()).await.unwrap();
        let mut reply = [0u8; 8];
        host.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"OK\nHELLO");

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let (mut host, agent) = tokio::io::duplex(1024);
        tokio::spawn(serve(agent));
        host.write_all(format!("FORWARD {closed}\n").as_bytes()).await.unwrap();
        let mut reply = String::new();
        host.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("ERR port"), "{reply}");
    }
}
