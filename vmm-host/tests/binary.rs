//! The `vmm-host` binary on its own: it opens a fresh data directory (starting the cowfs
//! daemon), serves `sail.sailbox.v1` on a loopback port, answers `GetHostInfo`, and on
//! SIGTERM shuts down cleanly: exit status 0, and the cowfs mount (no sailbox holds files on
//! it) is gone. No VM is started. Callers' keys are checked through a `volumed` sharing its
//! data directory: a call without a key is refused, one with the directory's admin key
//! served. Needs `sail-cowfs` and `volumed` built beside it (`cargo build --release -p cowfsd
//! -p volumed`), root and /dev/fuse.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use proto::sailbox::HostInfoRequest;
use proto::sailbox::sailbox_service_client::SailboxServiceClient;

/// The binary under test; killed (and its cowfs mount detached) if the test fails midway.
struct Running {
    child: Child,
    volumed: Child,
    data: tempfile::TempDir,
}

impl Running {
    fn mount(&self) -> PathBuf {
        self.data.path().join("vmm/cowfs/mnt")
    }

    /// Waits for the process to exit, at most `limit`.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.volumed.kill();
        let _ = self.volumed.wait();
        let cow = self.data.path().join("vmm/cowfs");
        for p in vmm_host::procs::find_by_cmdline(&cow.display().to_string()) {
            // SAFETY: killing the cowfs daemon this test's binary started.
            unsafe { libc::kill(p.pid as i32, libc::SIGKILL) };
        }
        if let Ok(c) = std::ffi::CString::new(self.mount().as_os_str().as_encoded_bytes()) {
            // SAFETY: detaching a mount this test made, if it is still there.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(path.to_str().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_host_info_and_stops_on_sigterm() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_vmm-host"));
    let cowfs = exe.with_file_name("sail-cowfs");
    assert!(cowfs.is_file(), "{} is missing: build it with cargo build --release -p cowfsd", cowfs.display());
    let volumed_exe = exe.with_file_name("volumed");
    assert!(volumed_exe.is_file(), "{} is missing: build it with cargo build --release -p volumed", volumed_exe.display());
    let data = tempfile::tempdir().unwrap();
    let volumed_port = free_port();
    let volumed = Command::new(&volumed_exe)
        .arg("--data-dir")
        .arg(data.path())
        .arg("--listen")
        .arg(format!("127.0.0.1:{volumed_port}"))
        .spawn()
        .unwrap();
    // volumed writes the data directory's keys before it listens.
    let operator_key = data.path().join("keys/operator.key");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(operator_key.is_file() && std::net::TcpStream::connect(("127.0.0.1", volumed_port)).is_ok()) {
        assert!(Instant::now() < deadline, "volumed did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let port = free_port();
    let child = Command::new(&exe)
        .arg("--data-dir")
        .arg(data.path())
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--volumed")
        .arg(format!("http://127.0.0.1:{volumed_port}"))
        .env("SAIL_COWFS_BIN", &cowfs)
        .spawn()
        .unwrap();
    let mut running = Running { child, volumed, data };
    let admin = tenancy::credentials::read_key_file(&running.data.path().join("keys/admin.key")).unwrap().unwrap();

    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let channel = tonic::transport::Channel::from_shared(endpoint.clone()).unwrap().connect_lazy();
    let mut client = SailboxServiceClient::new(tenancy::client::authed(channel.clone(), Some(&admin)));
    let info = loop {
        if let Ok(r) = client.get_host_info(HostInfoRequest {}).await {
            break r.into_inner();
        }
        assert!(running.child.try_wait().unwrap().is_none(), "vmm-host exited before serving");
        assert!(Instant::now() < deadline, "vmm-host did not answer GetHostInfo in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(info.host, sysutil::host::hostname());
    assert_eq!(info.running, 0, "a fresh data directory runs no sailbox: {info:?}");
    assert!(matches!(info.accelerator.as_str(), "kvm" | "tcg"), "{info:?}");
    assert!(mounted(&running.mount()), "vmm-host started the cowfs daemon");
    // Without a key, or with one volumed does not know, nothing is served.
    let mut anonymous = SailboxServiceClient::new(channel.clone());
    let refused = anonymous.get_host_info(HostInfoRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert_eq!(proto::error_name(&refused).as_deref(), Some("SailAuthenticationError"));
    let stranger = tenancy::ApiKey::generate();
    let mut forged = SailboxServiceClient::new(tenancy::client::authed(channel, Some(&stranger)));
    assert_eq!(forged.get_host_info(HostInfoRequest {}).await.unwrap_err().code(), tonic::Code::Unauthenticated);

    // SAFETY: signalling the child this test started.
    assert_eq!(unsafe { libc::kill(running.child.id() as i32, libc::SIGTERM) }, 0);
    let status = running.wait_exit(Duration::from_secs(30)).expect("vmm-host did not exit on SIGTERM");
    assert!(status.success(), "vmm-host exited with {status}");
    assert!(!mounted(&running.mount()), "with no sailbox left, the cowfs daemon is stopped and unmounted");
}
