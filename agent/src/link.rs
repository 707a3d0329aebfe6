//! The guest end of the host link over a virtio-serial port.
//!
//! A port has one host peer at a time (QEMU's chardev socket) and one opener in the guest.
//! Each host session starts with `SAIL-CONNECT <nonce>\n`; the agent answers
//! `SAIL-OK <nonce>\n` and the session is then a plain byte stream (HTTP/2). Bytes before the
//! greeting (left over from an earlier session) are skipped. When the host goes away, reads
//! return EOF, the session ends, and the port waits for the next greeting.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Greeting prefix the host sends.
const GREETING: &[u8] = b"SAIL-CONNECT ";
/// Longest nonce accepted.
const MAX_NONCE: usize = 64;
/// How often a port without a host peer is checked again.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// One host session on the port; dropping it lets the next session open the port.
pub struct SerialConn {
    fd: AsyncFd<OwnedFd>,
    /// Session bytes read while looking past repeated greetings, returned first.
    pending: Vec<u8>,
    _release: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for SerialConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

fn open_port(path: &Path) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    // Blocking for the handshake; switched to non-blocking for the session. Retried on EINTR,
    // as std's `File::open` does.
    loop {
        match rustix::fs::open(path, OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOCTTY, Mode::empty()) {
            Err(rustix::io::Errno::INTR) => continue,
            r => return Ok(r?),
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    Ok(rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?)
}

/// Registers an owned descriptor with the reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of the descriptor, so it stays open (and is not
    // reused) for as long as it is registered.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn raw_read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::io::read(fd, buf)?)
}

fn raw_write(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    Ok(rustix::io::write(fd, buf)?)
}

fn write_all_blocking(fd: &OwnedFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match raw_write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads (blocking) until a host greeting and answers it, then skips repeats of the
/// greeting (a host repeats it until answered: an earlier session may have swallowed the
/// first one before it noticed its host was gone). A greeting with another nonce is a new
/// host: it is answered too. Returns the first session bytes read past the greetings. While
/// no host is connected reads return EOF: look again every `IDLE_POLL`.
///
/// This runs on a blocking descriptor, before the port is registered with the reactor:
/// tokio treats a hang-up (what a port reports while no host is connected) as final for a
/// registration, so a session must start on a fresh registration made while a host is there.
fn handshake(fd: &OwnedFd) -> io::Result<Vec<u8>> {
    let mut window: Vec<u8> = Vec::new();
    let mut byte = [0u8; 1];
    let mut answered: Option<Vec<u8>> = None;
    loop {
        match raw_read(fd, &mut byte) {
            Ok(0) => {
                if answered.is_some() {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the host left during the handshake"));
                }
                std::thread::sleep(IDLE_POLL);
                continue;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        window.push(byte[0]);
        if answered.is_some() {
            // Past an answer: anything that does not start a greeting is session data.
            let n = window.len().min(GREETING.len());
            if window[..n] != GREETING[..n] {
                return Ok(window);
            }
        }
        let Some(at) = find(&window, GREETING) else {
            if window.len() > 4 * GREETING.len() {
                // Keep only a tail that could still begin a greeting.
                window.drain(..window.len() - GREETING.len());
            }
            continue;
        };
        let nonce = &window[at + GREETING.len()..];
        if nonce.last() == Some(&b'\n') {
            let nonce = &nonce[..nonce.len() - 1];
            let valid = !nonce.is_empty() && nonce.iter().all(u8::is_ascii_alphanumeric);
            // A repeat of the greeting just answered needs no second answer.
            if valid && answered.as_deref() != Some(nonce) {
                let mut reply = b"SAIL-OK ".to_vec();
                reply.extend_from_slice(nonce);
                reply.push(b'\n');
                write_all_blocking(fd, &reply)?;
                answered = Some(nonce.to_vec());
            }
            window.clear();
        } else if nonce.len() > MAX_NONCE {
            window.clear();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn next_session(path: &Path, sessions: &std::sync::Arc<tokio::sync::Semaphore>) -> io::Result<SerialConn> {
    // The previous session must be gone first: the port has one opener.
    let permit = sessions.clone().acquire_owned().await.map_err(io::Error::other)?;
    loop {
        let fd = match open_port(path) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let shaken =
            tokio::task::spawn_blocking(move || handshake(&fd).map(|pending| (fd, pending))).await.map_err(io::Error::other)?;
        match shaken {
            Ok((fd, pending)) => {
                set_nonblocking(&fd)?;
                return Ok(SerialConn { fd: register(fd)?, pending, _release: permit });
            }
            Err(e) => {
                tracing::debug!(error = %e, "serial handshake failed; reopening the port");
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }
}

/// Host sessions on the port at `path`, one after another, forever.
pub fn incoming(path: PathBuf) -> impl tokio_stream::Stream<Item = io::Result<SerialConn>> {
    let sessions = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
    futures::stream::unfold((path, sessions), |(path, sessions)| async move {
        let next = next_session(&path, &sessions).await;
        Some((next, (path, sessions)))
    })
}

impl AsyncRead for SerialConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending[..n]);
            self.pending.drain(..n);
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let closed = guard.ready().is_read_closed();
            match guard.try_io(|fd| raw_read(fd.get_ref(), unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // A hang-up seen on this registration is final for tokio: waiting for more
                // readiness would spin. End the session; the next one starts fresh.
                Err(_would_block) if closed => return Poll::Ready(Err(reset())),
                Err(_would_block) => continue,
            }
        }
    }
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "the host end of the serial port went away")
}

/// Whether the host end has gone: a port without its host peer reports POLLHUP, and writes
/// to it would block forever (the driver holds them until a host connects).
fn host_gone(fd: &OwnedFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut p = [PollFd::new(fd, PollFlags::OUT)];
    let n = rustix::event::poll(&mut p, Some(&Timespec { tv_sec: 0, tv_nsec: 0 }));
    n.is_ok_and(|n| n > 0) && p[0].revents().contains(PollFlags::HUP)
}

impl AsyncWrite for SerialConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let closed = guard.ready().is_write_closed();
            match guard.try_io(|fd| raw_write(fd.get_ref(), data)) {
                Ok(r) => return Poll::Ready(r),
                // End the session instead of waiting for a host that left (or spinning on a
                // registration that saw a hang-up).
                Err(_would_block) if closed || host_gone(self.fd.get_ref()) => return Poll::Ready(Err(reset())),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A socket pair stands in for the port: greetings are found among leftovers and
    /// answered, repeats skipped, a second host's greeting answered too.
    #[test]
    fn greetings_are_found_after_leftover_bytes() {
        let (mut host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
        let greetings = b"\x00\x01stale http2 bytes SAIL-CONNECT bad nonce\nSAIL-CONNECT abc123\nSAIL-CONNECT abc123\nSAIL-CONNECT xyz\nHELLO";
        host.write_all(greetings).unwrap();
        let guest = OwnedFd::from(guest);
        let pending = handshake(&guest).unwrap();
        assert_eq!(pending, b"H", "repeated greetings are skipped, the first session byte kept");
        let mut reply = [0u8; 27];
        host.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"SAIL-OK abc123\nSAIL-OK xyz\n", "a new host's greeting is answered too");
        let mut rest = [0u8; 4];
        let mut guest = std::fs::File::from(guest);
        guest.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"ELLO", "bytes after the greeting belong to the session");
    }
}
