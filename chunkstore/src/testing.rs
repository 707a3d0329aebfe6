//! Test support: a real S3-compatible server (`s3s-fs`) on 127.0.0.1 for integration tests
//! and benches. It verifies SigV4 signatures (forged or wrong-key requests get 403) and
//! supports presigned URLs and conditional writes, so tests against it can fail for real.
//!
//! The binary is found through `SAIL_S3S_FS`, then `PATH`, then `~/.cargo/bin`;
//! `scripts/setup.sh test` installs it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backon::{ConstantBuilder, Retryable};

use crate::backend::s3::{S3Config, S3Credentials};

/// Access key the test server accepts.
pub const TEST_ACCESS_KEY: &str = "sail-test-access";
/// Secret key the test server accepts.
pub const TEST_SECRET_KEY: &str = "sail-test-secret-key-0123456789";

/// A running `s3s-fs` on a free loopback port with its own temporary root; killed on drop.
pub struct LocalS3Server {
    child: Child,
    addr: SocketAddr,
    root: tempfile_dir::TempDir,
}

mod tempfile_dir {
    //! A minimal temp dir (this crate does not depend on `tempfile` outside tests).
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> std::io::Result<Self> {
            let path = std::env::temp_dir().join(format!("sail-s3s-{}-{:016x}", std::process::id(), rand::random::<u64>()));
            std::fs::create_dir_all(&path)?;
            Ok(Self(path))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn find_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SAIL_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let on_path =
        std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("s3s-fs")).find(|p| p.is_file()));
    on_path.or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = PathBuf::from(home).join(".cargo/bin/s3s-fs");
        p.is_file().then_some(p)
    })
}

/// Why [`LocalS3Server::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No `s3s-fs` binary was found.
    #[error("s3s-fs not found (set SAIL_S3S_FS, or run `bash scripts/setup.sh test`, which installs it)")]
    NotInstalled,
    /// Creating the server's directory, reserving a port or starting or watching the process
    /// failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server exited before it accepted connections (typically: the port it was given
    /// was taken meanwhile); [`LocalS3Server::start`] tries another port.
    #[error("s3s-fs exited at start on port {port} ({status})")]
    Exited {
        /// The port it was given.
        port: u16,
        /// How it exited.
        status: std::process::ExitStatus,
    },
    /// The server did not accept connections in time.
    #[error("s3s-fs did not accept connections within {} s", READY_TIMEOUT.as_secs())]
    NotReady,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Io { what: what.into(), source }
}

/// How long a started server has to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Ports tried when the server exits at start (the reserved port was taken meanwhile).
const PORT_ATTEMPTS: usize = 5;

/// One attempt of [`LocalS3Server::start`]: a free port, the server on it (storing in
/// `root`), and the wait until it accepts connections.
async fn start_on_free_port(bin: &Path, root: &Path) -> Result<(Child, SocketAddr), StartError> {
    let reserve = || TcpListener::bind("127.0.0.1:0")?.local_addr();
    let port = reserve().map_err(io_err("reserving a port"))?.port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = Command::new(bin)
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--port")
        .arg(port.to_string())
        .arg("--access-key")
        .arg(TEST_ACCESS_KEY)
        .arg("--secret-key")
        .arg(TEST_SECRET_KEY)
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io_err(format!("starting {}", bin.display())))?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok((child, addr));
        }
        if let Some(status) = child.try_wait().map_err(io_err("watching s3s-fs"))? {
            return Err(StartError::Exited { port, status });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(StartError::NotReady);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl LocalS3Server {
    /// Starts the server and waits (at most 20 s) until it accepts connections.
    pub async fn start() -> Result<Self, StartError> {
        let bin = find_binary().ok_or(StartError::NotInstalled)?;
        let root = tempfile_dir::TempDir::new().map_err(io_err("creating the server's directory"))?;
        // Reserve a free port, then hand it to the server: the port can be taken in between
        // (a tiny race), and then the server exits and another port is tried.
        let attempt = || start_on_free_port(&bin, root.path());
        let (child, addr) = attempt
            .retry(ConstantBuilder::default().with_delay(Duration::ZERO).with_max_times(PORT_ATTEMPTS - 1))
            .sleep(tokio::time::sleep)
            .when(|e| matches!(e, StartError::Exited { .. }))
            .notify(|e, _| tracing::warn!(error = %e, "retrying on another port"))
            .await?;
        Ok(Self { child, addr, root })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The directory the server stores objects in (`<root>/<bucket>/<key>`), for tests that
    /// tamper with stored bytes.
    pub fn root_dir(&self) -> &Path {
        self.root.path()
    }

    /// A backend configuration for `bucket` on this server (path style, test credentials).
    pub fn s3_config(&self, bucket: &str) -> S3Config {
        let mut c = S3Config::new(bucket);
        c.endpoint = Some(self.endpoint());
        c.force_path_style = true;
        c.credentials = S3Credentials::Static {
            access_key_id: TEST_ACCESS_KEY.into(),
            secret_access_key: TEST_SECRET_KEY.into(),
            session_token: None,
        };
        c
    }
}

impl Drop for LocalS3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random bytes (xorshift64, low byte of each step): test data whose
/// expected content a test can recompute, and that neither compresses nor deduplicates.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
