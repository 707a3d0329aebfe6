//! Test harness: an in-process volumed on loopback and real FUSE mounts served by the
//! `sail-volume-fuse` binary (a real process, so tests can kill it). Every mount is
//! unmounted on drop, and a mount whose helper died is detached, so no test leaves a mount.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use guest_fuse::{CommitOutcome, ControlClient, MountStatus, ReloadOutcome};
use volume_client::VolumeClient;
use volumed::server::{RunningServer, Server, ServerConfig};

/// A volumed plus a scratch directory.
pub struct Env {
    pub rt: tokio::runtime::Runtime,
    pub server: Option<RunningServer>,
    pub dir: tempfile::TempDir,
    pub endpoint: String,
    /// The server's admin key (org `default`), which helpers and clients send.
    pub key: tenancy::ApiKey,
    next: AtomicUsize,
}

impl Env {
    /// Starts volumed and creates `volume`.
    pub fn new(volume: &str) -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let server = rt.block_on(async {
            Server::bind(ServerConfig::local(&data, "127.0.0.1:0".parse().unwrap())).await.expect("volumed starts").spawn()
        });
        let endpoint = server.endpoint();
        let key = server.admin_key().clone();
        let env = Env { rt, server: Some(server), dir, endpoint, key, next: AtomicUsize::new(0) };
        let v = volume.to_owned();
        env.client_do(|mut c| async move { c.get_volume("default", &v, true).await.map(|_| ()) });
        env
    }

    fn client_do<T, F, Fut>(&self, f: F) -> T
    where
        F: FnOnce(VolumeClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, volume_client::ClientError>>,
    {
        self.rt.block_on(async {
            let c = VolumeClient::connect_with_key(&self.endpoint, Some(&self.key)).await.expect("connect");
            f(c).await.expect("volumed call")
        })
    }

    /// The volume's head commit id.
    pub fn head(&self, volume: &str) -> String {
        let v = volume.to_owned();
        self.client_do(|mut c| async move { c.head("default", &v).await.map(|h| h.commit) })
    }

    /// The authors of the volume's commits, newest first.
    pub fn log_authors(&self, volume: &str) -> Vec<String> {
        let v = volume.to_owned();
        self.client_do(|mut c| async move {
            let req = proto::volume::LogRequest {
                volume: Some(proto::volume::VolumeRef { org: "default".into(), name: v }),
                limit: 0,
                before_seq: 0,
            };
            let log = c.grpc().log(req).await.map_err(volume_client::ClientError::from)?;
            Ok(log.into_inner().commits.into_iter().map(|c| c.author).collect())
        })
    }

    /// Reads a file at the head straight from volumed (not through a mount).
    pub fn read_file(&self, volume: &str, path: &str) -> Vec<u8> {
        let (v, p) = (volume.to_owned(), path.to_owned());
        self.client_do(|mut c| async move { c.read_file("default", &v, &p).await })
    }

    /// Mounts `volume` with its own (cold) cache.
    pub fn mount(&self, volume: &str) -> Mount {
        self.mount_with(volume, &[])
    }

    /// Mounts with extra helper arguments.
    pub fn mount_with(&self, volume: &str, extra: &[&str]) -> Mount {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.mount_slot(volume, n, extra)
    }

    /// Starts a new helper on the mount point, overlay directory, cache and control socket
    /// of slot `n` (whose helper must be gone and its mount cleaned up).
    pub fn remount_slot(&self, volume: &str, n: usize, extra: &[&str]) -> Mount {
        self.mount_slot(volume, n, extra)
    }

    /// The overlay directory of mount slot `n`.
    pub fn overlay_dir(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("overlay{n}"))
    }

    fn mount_slot(&self, volume: &str, n: usize, extra: &[&str]) -> Mount {
        let root = self.dir.path();
        let path = root.join(format!("mnt{n}"));
        std::fs::create_dir_all(&path).unwrap();
        let socket = root.join(format!("ctl{n}.sock"));
        let log = std::fs::File::options().create(true).append(true).open(root.join(format!("helper{n}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sail-volume-fuse"))
            .args(["--endpoint", &self.endpoint, "--threads", "4"])
            .env("SAIL_API_KEY", self.key.to_string())
            .arg("--cache-dir")
            .arg(root.join(format!("cache{n}")))
            .arg("--overlay-dir")
            .arg(self.overlay_dir(n))
            .arg("--control-socket")
            .arg(&socket)
            .args(extra)
            .arg(volume)
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("helper starts");
        let mut m = Mount {
            path: std::fs::canonicalize(root.join(format!("mnt{n}"))).unwrap(),
            child,
            log: root.join(format!("helper{n}.log")),
            n,
        };
        m.wait_ready();
        m
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Show what the helpers said: the temp directory goes away with us.
            for n in 0..self.next.load(Ordering::Relaxed) {
                let log = std::fs::read_to_string(self.dir.path().join(format!("helper{n}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!("--- helper {n} log (last lines) ---");
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        if let Some(s) = self.server.take() {
            self.rt.block_on(s.stop()).ok();
        }
    }
}

/// A live mount.
pub struct Mount {
    pub path: PathBuf,
    pub child: Child,
    pub log: PathBuf,
    /// Its slot: mount point, overlay directory, cache and socket are named after it.
    pub n: usize,
}

impl Mount {
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("helper exited ({status}): {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            if let Ok(c) = ControlClient::for_mount(&self.path)
                && c.status().is_ok_and(|s| s.pid == self.child.id())
            {
                return;
            }
            assert!(Instant::now() < deadline, "mount not ready in 30 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A path inside the mount.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    pub fn ctl(&self) -> ControlClient {
        ControlClient::for_mount(&self.path).expect("control socket")
    }

    pub fn commit(&self) -> CommitOutcome {
        self.ctl().commit().expect("commit")
    }

    pub fn reload(&self) -> ReloadOutcome {
        self.ctl().reload().expect("reload")
    }

    pub fn status(&self) -> MountStatus {
        self.ctl().status().expect("status")
    }

    /// SIGKILLs the helper and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub use guest_fuse::is_mounted;

impl Drop for Mount {
    fn drop(&mut self) {
        if let Ok(c) = ControlClient::for_mount(&self.path) {
            let _ = c.unmount();
        }
        let _ = sysutil::process::wait_or_kill(&mut self.child, Duration::from_secs(10));
        if is_mounted(&self.path) {
            let _ = sysutil::mount::lazy_unmount(&self.path);
        }
        assert!(!is_mounted(&self.path) || std::thread::panicking(), "mount {} left behind", self.path.display());
    }
}

/// Deterministic pseudo-random bytes.
pub fn bytes_for(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    out
}

/// BLAKE3 of a file, streamed.
pub fn hash_file(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path).unwrap();
    h.update_reader(&mut f).unwrap();
    h.finalize()
}
