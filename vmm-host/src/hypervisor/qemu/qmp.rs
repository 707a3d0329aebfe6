//! A minimal client of QEMU's QMP (JSON lines over a Unix socket): connect, negotiate
//! capabilities, execute commands, keep asynchronous events for the caller.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// Socket path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// QEMU answered with an error.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The reply was not what QMP sends.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// No reply in time.
    #[error("QMP {0} timed out")]
    Timeout(String),
}

/// Longest line accepted from QEMU (a `query-*` reply is a few KiB).
const MAX_LINE: usize = 1 << 20;

/// One QMP session.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    path: String,
    /// Asynchronous events seen while waiting for replies (kept, oldest first, bounded).
    events: Vec<Value>,
}

/// Most events kept between [`Qmp::take_events`] calls.
const MAX_EVENTS: usize = 256;

impl Qmp {
    /// Connects and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let p = path.display().to_string();
        let io = |source| QmpError::Io { path: p.clone(), source };
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout("connect".into()))?
            .map_err(io)?;
        let (r, w) = stream.into_split();
        let mut qmp = Self { reader: BufReader::new(r), writer: w, path: p.clone(), events: Vec::new() };
        // QEMU may put events it emitted meanwhile (a netdev stream connecting, say) ahead of
        // the greeting on a new connection: keep them, as any event, and read on.
        let greet = async {
            loop {
                let msg = qmp.read_message().await?;
                if msg.get("QMP").is_some() {
                    return Ok::<_, QmpError>(());
                }
                if msg.get("event").is_none() {
                    return Err(QmpError::Protocol(format!("expected a greeting, got {msg}")));
                }
                qmp.events.push(msg);
            }
        };
        tokio::time::timeout(timeout, greet).await.map_err(|_| QmpError::Timeout("greeting".into()))??;
        qmp.execute("qmp_capabilities", json!({}), timeout).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|source| QmpError::Io { path: self.path.clone(), source })?;
        if n == 0 {
            return Err(QmpError::Io {
                path: self.path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "QEMU closed the socket"),
            });
        }
        serde_json::from_slice(&line).map_err(|e| QmpError::Protocol(format!("bad JSON from QEMU: {e}")))
    }

    /// The events seen so far on this session (`{"event", "data", "timestamp"}`), emptied.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value, timeout: Duration) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await.map_err(|source| QmpError::Io { path: self.path.clone(), source })?;
        let reply = async {
            loop {
                let m = self.read_message().await?;
                if m.get("event").is_some() {
                    if self.events.len() < MAX_EVENTS {
                        self.events.push(m);
                    }
                    continue;
                }
                if let Some(ret) = m.get("return") {
                    return Ok(ret.clone());
                }
                if let Some(err) = m.get("error") {
                    let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    return Err(QmpError::Command { command: command.to_owned(), class: field("class"), desc: field("desc") });
                }
                return Err(QmpError::Protocol(format!("unexpected message {m}")));
            }
        };
        tokio::time::timeout(timeout, reply).await.map_err(|_| QmpError::Timeout(command.to_owned()))?
    }
}
