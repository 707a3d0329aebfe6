//! control-wire: the protocol of sail's local control sockets, written once.
//!
//! Two daemons take requests on a Unix socket: the volume mount helper (`guest-fuse`:
//! status, commit, reload, unmount; the Python SDK and the CLI are its clients) and cowfs
//! (files of sailbox memory and disks; vmm-host is its client). Both speak this:
//!
//! - A request is one JSON object on one line, at most [`MAX_LINE`] bytes, with an `"op"`
//!   field naming the operation and whatever fields that operation takes.
//! - A reply is one JSON object on one line: `{"ok":true,"result":<value>}` or
//!   `{"ok":false,"error":{"name":<name>,"message":<text>}}`. `name` is a stable machine
//!   name (a contract error name for mounts, an error kind for cowfs): clients decide on it,
//!   never on the message.
//! - A connection carries any number of request/reply pairs, in order.
//!
//! The server side is blocking (one thread per connection: these sockets see a handful of
//! callers); the client is blocking ([`call`]) or async ([`call_async`], feature `tokio`).
#![warn(missing_docs)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest request or reply line, in bytes (newline included). A longer request is refused
/// without reading it whole, so a caller cannot make a daemon buffer without bound.
pub const MAX_LINE: u64 = 1 << 20;

/// The error half of a reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{name}: {message}")]
pub struct WireError {
    /// Stable machine name: what callers match on.
    pub name: String,
    /// For people.
    pub message: String,
}

impl WireError {
    /// An error reply with this name and message.
    pub fn new(name: impl Into<String>, message: impl Into<String>) -> Self {
        Self { name: name.into(), message: message.into() }
    }
}

/// Default name of the error a server replies with when a request line is not a JSON object
/// with an `"op"` string, or is too long ([`Server::bad_request_name`] changes it).
pub const BAD_REQUEST: &str = "bad_request";

/// What a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Connecting, writing or reading the socket failed.
    #[error("control socket {socket}: {source}")]
    Io {
        /// The socket.
        socket: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The daemon closed the connection without a reply.
    #[error("control socket {socket}: closed without a reply")]
    NoReply {
        /// The socket.
        socket: String,
    },
    /// The reply was not this protocol.
    #[error("control socket {socket}: malformed reply: {source}")]
    Malformed {
        /// The socket.
        socket: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon answered with an error.
    #[error(transparent)]
    Remote(#[from] WireError),
}

#[derive(Serialize, Deserialize)]
struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<WireError>,
}

impl Reply {
    fn line(result: Result<Value, WireError>) -> String {
        let reply = match result {
            Ok(v) => Reply { ok: true, result: Some(v), error: None },
            Err(e) => Reply { ok: false, result: None, error: Some(e) },
        };
        // A Value and two strings always serialise.
        let mut s = serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"ok":false}"#.to_owned());
        s.push('\n');
        s
    }

    fn into_result(self) -> Result<Value, WireError> {
        if self.ok {
            Ok(self.result.unwrap_or(Value::Null))
        } else {
            Err(self.error.unwrap_or_else(|| WireError::new("unknown", "error reply without an error")))
        }
    }
}

/// A parsed request: its operation and the whole object (for the operation's fields).
#[derive(Debug)]
pub struct Request {
    /// The `"op"` field.
    pub op: String,
    /// The request object.
    pub body: Value,
}

impl Request {
    /// A string field of the request, or a [`BAD_REQUEST`] error naming it.
    pub fn str_field(&self, name: &str) -> Result<&str, WireError> {
        self.body
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| WireError::new(BAD_REQUEST, format!("op {:?} needs a string field {name:?}", self.op)))
    }

    /// An unsigned integer field of the request, or a [`BAD_REQUEST`] error naming it.
    pub fn u64_field(&self, name: &str) -> Result<u64, WireError> {
        self.body
            .get(name)
            .and_then(Value::as_u64)
            .ok_or_else(|| WireError::new(BAD_REQUEST, format!("op {:?} needs an integer field {name:?}", self.op)))
    }
}

/// What a handler answers.
pub enum Answer {
    /// Reply and keep the connection.
    Reply(Result<Value, WireError>),
    /// Reply, close the connection, then run the action (an unmount that must not race its
    /// own reply).
    ReplyThen(Result<Value, WireError>, Box<dyn FnOnce() + Send>),
}

impl From<Result<Value, WireError>> for Answer {
    fn from(r: Result<Value, WireError>) -> Self {
        Answer::Reply(r)
    }
}

/// Serialises a handler's successful result.
pub fn to_value<T: Serialize>(v: &T) -> Result<Value, WireError> {
    serde_json::to_value(v).map_err(|e| WireError::new("internal", format!("reply does not serialise: {e}")))
}

/// A control-socket server: how it names its threads and its bad-request errors.
#[derive(Clone, Debug)]
pub struct Server {
    thread_name: String,
    bad_request: &'static str,
}

impl Server {
    /// A server whose connection threads are called `thread_name`.
    pub fn new(thread_name: impl Into<String>) -> Self {
        Self { thread_name: thread_name.into(), bad_request: BAD_REQUEST }
    }

    /// The error name for malformed or oversized requests (a protocol whose clients expect
    /// contract error names sets one of those).
    pub fn bad_request_name(mut self, name: &'static str) -> Self {
        self.bad_request = name;
        self
    }

    /// Serves `listener` until it fails: one thread per connection, each request passed to
    /// `handler`.
    pub fn serve<H>(&self, listener: UnixListener, handler: H)
    where
        H: Fn(Request) -> Answer + Send + Sync + Clone + 'static,
    {
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    let handler = handler.clone();
                    let server = self.clone();
                    let spawned = std::thread::Builder::new().name(self.thread_name.clone()).spawn(move || {
                        if let Err(e) = server.serve_conn(stream, &handler) {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                    });
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "control connection thread not started");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "control accept failed"),
            }
        }
    }

    /// Serves one connection until the peer closes it.
    pub fn serve_conn<H>(&self, stream: UnixStream, handler: &H) -> io::Result<()>
    where
        H: Fn(Request) -> Answer,
    {
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = Vec::new();
            let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
            if n == 0 {
                return Ok(());
            }
            if line.last() != Some(&b'\n') && n as u64 == MAX_LINE {
                let e = WireError::new(self.bad_request, format!("request longer than {MAX_LINE} bytes"));
                writer.write_all(Reply::line(Err(e)).as_bytes())?;
                return Ok(());
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match parse(&line, self.bad_request) {
                Err(e) => writer.write_all(Reply::line(Err(e)).as_bytes())?,
                Ok(req) => match handler(req) {
                    Answer::Reply(r) => writer.write_all(Reply::line(r).as_bytes())?,
                    Answer::ReplyThen(r, then) => {
                        writer.write_all(Reply::line(r).as_bytes())?;
                        drop(writer);
                        then();
                        return Ok(());
                    }
                },
            }
        }
    }
}

fn parse(line: &[u8], bad_request: &'static str) -> Result<Request, WireError> {
    let body: Value = serde_json::from_slice(line).map_err(|e| WireError::new(bad_request, format!("bad request: {e}")))?;
    let op = body
        .get("op")
        .and_then(Value::as_str)
        .ok_or_else(|| WireError::new(bad_request, "bad request: no \"op\" string"))?
        .to_owned();
    Ok(Request { op, body })
}

fn request_line(req: &Value) -> String {
    let mut s = req.to_string();
    s.push('\n');
    s
}

fn read_reply(socket: &Path, line: &[u8]) -> Result<Value, CallError> {
    if line.is_empty() {
        return Err(CallError::NoReply { socket: socket.display().to_string() });
    }
    let reply: Reply =
        serde_json::from_slice(line).map_err(|source| CallError::Malformed { socket: socket.display().to_string(), source })?;
    Ok(reply.into_result()?)
}

/// One blocking request/reply on a fresh connection; `timeout` bounds each read and write.
pub fn call(socket: &Path, req: &Value, timeout: Option<Duration>) -> Result<Value, CallError> {
    let io = |source| CallError::Io { socket: socket.display().to_string(), source };
    let mut stream = UnixStream::connect(socket).map_err(io)?;
    stream.set_read_timeout(timeout).map_err(io)?;
    stream.set_write_timeout(timeout).map_err(io)?;
    stream.write_all(request_line(req).as_bytes()).map_err(io)?;
    let mut line = Vec::new();
    BufReader::new(stream).take(MAX_LINE).read_until(b'\n', &mut line).map_err(io)?;
    read_reply(socket, &line)
}

/// One async request/reply on a fresh connection.
#[cfg(feature = "tokio")]
pub async fn call_async(socket: &Path, req: &Value) -> Result<Value, CallError> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let io = |source| CallError::Io { socket: socket.display().to_string(), source };
    let mut stream = tokio::net::UnixStream::connect(socket).await.map_err(io)?;
    stream.write_all(request_line(req).as_bytes()).await.map_err(io)?;
    let mut line = Vec::new();
    tokio::io::BufReader::new(stream).take(MAX_LINE).read_until(b'\n', &mut line).await.map_err(io)?;
    read_reply(socket, &line)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, mpsc};

    use serde_json::json;

    use super::*;

    fn start<H>(handler: H) -> (tempfile::TempDir, std::path::PathBuf)
    where
        H: Fn(Request) -> Answer + Send + Sync + Clone + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || Server::new("test-control").serve(listener, handler));
        (dir, path)
    }

    fn echo(req: Request) -> Answer {
        match req.op.as_str() {
            "echo" => Answer::Reply(req.str_field("text").map(|t| json!({ "text": t }))),
            other => Answer::Reply(Err(WireError::new("unknown_op", format!("unknown op {other:?}")))),
        }
    }

    #[test]
    fn replies_and_errors_round_trip() {
        let (_d, sock) = start(echo);
        let t = Some(Duration::from_secs(5));
        assert_eq!(call(&sock, &json!({"op": "echo", "text": "hi"}), t).unwrap(), json!({"text": "hi"}));
        match call(&sock, &json!({"op": "nope"}), t) {
            Err(CallError::Remote(e)) => assert_eq!(e.name, "unknown_op"),
            other => panic!("expected a remote error, got {other:?}"),
        }
        match call(&sock, &json!({"op": "echo"}), t) {
            Err(CallError::Remote(e)) => {
                assert_eq!(e.name, BAD_REQUEST);
                assert!(e.message.contains("\"text\""), "{}", e.message);
            }
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn malformed_and_oversized_requests_are_refused() {
        let (_d, sock) = start(echo);
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"not json\n{\"no_op\":1}\n").unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        for _ in 0..2 {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let reply: Reply = serde_json::from_str(&line).unwrap();
            assert_eq!(reply.into_result().unwrap_err().name, BAD_REQUEST);
        }
        // Longer than MAX_LINE without a newline: refused, connection closed.
        let big = vec![b'x'; MAX_LINE as usize + 10];
        let _ = s.write_all(&big);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let reply: Reply = serde_json::from_str(&line).unwrap();
        assert!(reply.into_result().unwrap_err().message.contains("longer than"));
    }

    #[test]
    fn reply_then_runs_after_the_reply() {
        // The action waits for a signal the test sends only once call() has returned, and
        // records whether it got it. Were the action run before the reply, call() would
        // still be waiting, the signal would never come and the action would record false.
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<bool>();
        let go_rx = Arc::new(Mutex::new(Some(go_rx)));
        let (_d, sock) = start(move |_req: Request| {
            let go_rx = go_rx.lock().unwrap().take().expect("one request only");
            let done_tx = done_tx.clone();
            Answer::ReplyThen(
                Ok(json!({"bye": true})),
                Box::new(move || {
                    let _ = done_tx.send(go_rx.recv_timeout(Duration::from_secs(5)).is_ok());
                }),
            )
        });
        assert_eq!(call(&sock, &json!({"op": "x"}), Some(Duration::from_secs(10))).unwrap(), json!({"bye": true}));
        let _ = go_tx.send(()); // fails only if the action already gave up waiting
        let got_signal = done_rx.recv_timeout(Duration::from_secs(10)).expect("the action after the reply never ran");
        assert!(got_signal, "the action ran before the reply was delivered");
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn async_client_matches_the_blocking_one() {
        let (_d, sock) = start(echo);
        assert_eq!(call_async(&sock, &json!({"op": "echo", "text": "a"})).await.unwrap(), json!({"text": "a"}));
        assert!(matches!(call_async(&sock, &json!({"op": "z"})).await, Err(CallError::Remote(_))));
        let missing = sock.with_extension("missing");
        assert!(matches!(call_async(&missing, &json!({"op": "z"})).await, Err(CallError::Io { .. })));
    }
}
