//! The byte relay at both ends of ingress forwarding (vmm-host's listener, the guest agent).
//!
//! vsock transports differ in half-close support: vhost-device-vsock, for one, turns a
//! one-way shutdown into nothing and only forwards a full close. So EOF is handled
//! asymmetrically: EOF from the *front* (the side that opened the connection) is passed on
//! as a write shutdown while answers keep flowing back; EOF from the *back* (the side that
//! serves) ends the whole relay, closing both. Closing after the server finished is what
//! makes an HTTP/1.0 client see the end of its response.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Relays bytes between `front` and `back` until `back` reaches EOF or either side fails.
/// Returns the bytes moved (front to back, back to front).
pub async fn relay<F, B>(front: F, back: B) -> std::io::Result<(u64, u64)>
where
    F: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut front_r, mut front_w) = tokio::io::split(front);
    let (mut back_r, mut back_w) = tokio::io::split(back);
    let mut up = 0u64;
    let forward = async {
        up = tokio::io::copy(&mut front_r, &mut back_w).await?;
        // The front is done sending: tell the back, keep relaying its answer.
        let _ = back_w.shutdown().await;
        std::future::pending::<std::io::Result<()>>().await
    };
    let backward = async {
        let n = tokio::io::copy(&mut back_r, &mut front_w).await?;
        let _ = front_w.shutdown().await;
        Ok::<u64, std::io::Error>(n)
    };
    tokio::select! {
        down = backward => Ok((up, down?)),
        err = forward => err.map(|_| (up, 0)),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn back_eof_ends_the_relay_and_front_eof_is_passed_on() {
        let (mut client, front) = tokio::io::duplex(64);
        let (back, mut server) = tokio::io::duplex(64);
        let relay = tokio::spawn(super::relay(front, back));
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "the front's EOF reached the back");
        server.write_all(b"answer").await.unwrap();
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer", "the answer after the front's EOF still arrives");
        assert_eq!(relay.await.unwrap().unwrap(), (7, 6));
    }
}
