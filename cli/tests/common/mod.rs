//! The real `sail` binary against a real `sail up` (volumed + vmm-host) on a temp data
//! directory and a free loopback port.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const SAIL: &str = env!("CARGO_BIN_EXE_sail");

/// A `sail up` child process; killed (SIGTERM, then SIGKILL) on drop.
pub struct Up {
    child: Child,
    pub endpoint: String,
    pub dir: tempfile::TempDir,
    /// An admin key of org `cli-tests`, made with `sail key create` and the data directory's
    /// operator key; every [`Up::sail`] run sends it (`SAIL_API_KEY`).
    pub key: String,
    /// The data directory's operator key (acts for any org it names).
    pub operator_key: String,
}

impl Up {
    pub fn start() -> Up {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(SAIL)
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting sail up");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(120)).expect("sail up printed nothing");
        let endpoint = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no endpoint in {line:?}"))
            .to_owned();
        let operator_key =
            std::fs::read_to_string(dir.path().join("data/keys/operator.key")).expect("operator key").trim().to_owned();
        let made = sail_with(
            &[("SAIL_ENDPOINT", &endpoint), ("SAIL_API_KEY", &operator_key)],
            &["--org", "cli-tests", "key", "create", "--role", "admin", "--name", "cli tests", "-q"],
            None,
        );
        let key = made.ok().trim().to_owned();
        assert!(key.starts_with("sail_"), "sail key create printed {key:?}");
        Up { child, endpoint, dir, key, operator_key }
    }

    /// `sail ARGS` against this service.
    pub fn sail(&self, args: &[&str]) -> Run {
        self.sail_in(args, None)
    }

    /// `sail ARGS` with `stdin` as its standard input.
    pub fn sail_in(&self, args: &[&str], stdin: Option<&[u8]>) -> Run {
        sail_with(&[("SAIL_ENDPOINT", &self.endpoint), ("SAIL_API_KEY", &self.key)], args, stdin)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = sysutil::process::terminate(&mut self.child, Duration::from_secs(30));
    }
}

/// One finished run of `sail`.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Run {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Asserts exit 0 and returns stdout.
    pub fn ok(&self) -> String {
        assert_eq!(self.code, 0, "sail {:?} exited {}: stderr {}", self.args, self.code, self.stderr);
        self.out()
    }

    /// Asserts `code`, returns stderr.
    pub fn fails(&self, code: i32) -> &str {
        assert_eq!(
            self.code,
            code,
            "sail {:?}: expected exit {code}, got {}: stdout {} stderr {}",
            self.args,
            self.code,
            self.out(),
            self.stderr
        );
        &self.stderr
    }

    /// Stdout parsed as one JSON value.
    pub fn json(&self) -> serde_json::Value {
        let out = self.ok();
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("sail {:?}: stdout is not JSON ({e}): {out}", self.args))
    }

    /// With `--json`, the error object on stderr: (name, message).
    pub fn json_error(&self) -> (String, String) {
        let line = self
            .stderr
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON error line in {:?}", self.stderr));
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON error line");
        let name = v["error"]["name"].as_str().expect("error.name").to_owned();
        let message = v["error"]["message"].as_str().expect("error.message").to_owned();
        (name, message)
    }
}

pub fn sail_with(env: &[(&str, &str)], args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut cmd = Command::new(SAIL);
    cmd.args(args).env("RUST_LOG", "warn").env_remove("SAIL_ENDPOINT").env_remove("SAIL_ORG").env_remove("SAIL_API_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn sail");
    if let Some(data) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        w.write_all(data).expect("writing stdin");
    }
    let Output { status, stdout, stderr } = child.wait_with_output().expect("sail output");
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        code: status.code().unwrap_or(-1),
        stdout,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// A loopback port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

pub fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub fn write_file(path: &Path, data: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("mkdir");
    }
    std::fs::write(path, data).expect("write");
}
