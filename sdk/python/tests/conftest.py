"""Fixtures: a real volumed (`sail up` on a temporary directory) and real FUSE mounts served
by `sail-volume-fuse`. Binaries come from $SAIL_BIN_DIR (default: the cargo release dir)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _bin_dir() -> str:
    if os.environ.get("SAIL_BIN_DIR"):
        return os.environ["SAIL_BIN_DIR"]
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/sail/target")
    return os.path.join(target, "release")


BIN = _bin_dir()


def _need(name: str) -> str:
    path = os.path.join(BIN, name)
    if not os.access(path, os.X_OK):
        msg = f"{path} not found: build it first (cargo build --release -p sail-cli -p guest-fuse)"
        if os.environ.get("SAIL_SDK_ALLOW_SKIP") == "1":
            pytest.skip(msg)
        pytest.fail(msg)
    return path


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


class Service:
    """`sail up` on a temporary data directory."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.proc = subprocess.Popen(
            [_need("sail"), "up", "--data-dir", os.path.join(root, "data"), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 30
        self.endpoint = None
        assert self.proc.stdout is not None
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(r"listening on (http://[0-9.:]+)", line)
            if m:
                self.endpoint = m.group(1)
                break
        if not self.endpoint:
            self.proc.kill()
            pytest.fail("sail up did not start")

    def create(self, name: str) -> None:
        subprocess.run([_need("sail"), "--endpoint", self.endpoint, "volume", "create", name], check=True,
                       capture_output=True)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Mount:
    """One FUSE helper process serving `path`."""

    def __init__(self, svc: Service, volume: str, n: int) -> None:
        self.path = os.path.join(svc.root, f"mnt{n}")
        os.makedirs(self.path)
        self.log = open(os.path.join(svc.root, f"helper{n}.log"), "w")
        self.proc = subprocess.Popen(
            [_need("sail-volume-fuse"), "--endpoint", svc.endpoint,
             "--cache-dir", os.path.join(svc.root, f"cache{n}"),
             "--overlay-dir", os.path.join(svc.root, f"ovl{n}"),
             "--control-socket", os.path.join(svc.root, f"ctl{n}.sock"), volume, self.path],
            stdout=self.log, stderr=self.log,
        )
        deadline = time.time() + 15
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"helper exited: {open(self.log.name).read()}")
            try:
                os.getxattr(self.path, "user.sail.control")
                break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("mount not ready in 15 s")
            time.sleep(0.02)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                import sail

                sail.Volume(self.path)._call("unmount", 10)
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        if _mounted(self.path):
            subprocess.run(["umount", "-l", self.path], check=False)
        self.log.close()


@pytest.fixture(scope="session")
def service():
    root = tempfile.mkdtemp(prefix="sail-sdk-")
    svc = Service(root)
    yield svc
    svc.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mounts(service):
    """Returns (volume name, factory): each factory() call mounts that volume once more."""
    name = "v" + uuid.uuid4().hex[:8]
    service.create(name)
    made: list[Mount] = []

    def factory() -> Mount:
        m = Mount(service, name, len(os.listdir(service.root)) + len(made))
        made.append(m)
        return m

    yield name, factory
    for m in made:
        m.close()
    leftover = [m.path for m in made if _mounted(m.path)]
    assert not leftover, f"mounts left behind: {leftover}"
