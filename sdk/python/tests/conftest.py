"""Fixtures: a real volumed (`sail up` on a temporary directory) and real FUSE mounts served
by `sail-volume-fuse`.

Binaries come from $SAIL_BIN_DIR (default: $CARGO_TARGET_DIR/release, else
~/.cache/sail/target/release). Missing binaries fail the tests unless SAIL_SDK_ALLOW_SKIP=1.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

# The tests import the installed package (`pip install ./sdk/python`: the build generates its
# gRPC stubs), never the source tree.
import sail  # noqa: E402

if os.path.realpath(os.path.dirname(sail.__file__)) == os.path.realpath(
        os.path.join(os.path.dirname(__file__), "..", "sail")):
    raise RuntimeError("the tests must run against the installed SDK (pip install ./sdk/python), "
                       "not the source tree: run pytest from another directory")


def _bin_dir() -> str:
    if os.environ.get("SAIL_BIN_DIR"):
        return os.environ["SAIL_BIN_DIR"]
    if os.environ.get("CARGO_TARGET_DIR"):
        return os.path.join(os.environ["CARGO_TARGET_DIR"], "release")
    return os.path.expanduser("~/.cache/sail/target/release")


def _need(name: str) -> str:
    path = os.path.join(_bin_dir(), name)
    if not os.access(path, os.X_OK):
        msg = (f"{path} not found: build it (cargo build --release) or set SAIL_BIN_DIR "
               "(SAIL_SDK_ALLOW_SKIP=1 skips instead of failing)")
        if os.environ.get("SAIL_SDK_ALLOW_SKIP") == "1":
            pytest.skip(msg)
        pytest.fail(msg, pytrace=False)
    return path


def mounted(path: str) -> bool:
    """Whether `path` is a mount point (dead FUSE mounts included)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def detach(path: str) -> None:
    """Lazily unmounts `path` if it is mounted (the way to clear a dead FUSE mount)."""
    if mounted(path):
        subprocess.run(["umount", "-l", path], check=False, capture_output=True)


class Service:
    """`sail up` on a temporary data directory; its output is drained into `self.output`."""

    def __init__(self, root: str, env: dict | None = None) -> None:
        self.root = root
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        self.proc = subprocess.Popen(
            [_need("sail"), "up", "--data-dir", os.path.join(root, "data"), "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            env={**os.environ, **(env or {})},
        )
        found = threading.Event()
        self.endpoint = ""

        def drain() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
                if m and not found.is_set():
                    self.endpoint = m.group(1)
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(30):
            self.stop()
            pytest.fail("`sail up` printed no 'listening on' line in 30 s:\n" + "".join(self.output))

    def create(self, name: str) -> None:
        r = subprocess.run([_need("sail"), "--endpoint", self.endpoint, "volume", "create", name],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"sail volume create {name} failed: {r.stderr}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Mount:
    """One `sail-volume-fuse` process serving volume `volume` at `path`."""

    def __init__(self, svc: Service, volume: str, n: int, path: str | None = None) -> None:
        self.path = path or os.path.join(svc.root, f"mnt-{n}")
        os.makedirs(self.path, exist_ok=True)
        self.log_path = os.path.join(svc.root, f"helper-{n}.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [_need("sail-volume-fuse"), "--endpoint", svc.endpoint,
                 "--cache-dir", os.path.join(svc.root, "cache"),
                 "--overlay-dir", os.path.join(svc.root, f"ovl-{n}"),
                 "--control-socket", os.path.join(svc.root, f"ctl-{n}.sock"), volume, self.path],
                stdout=log, stderr=log,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"sail-volume-fuse exited ({self.proc.returncode}) before mounting "
                            f"{self.path}:\n{self._log()}")
            try:
                os.getxattr(self.path, "user.sail.control")
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{self.path} not mounted after 15 s:\n{self._log()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILLs the helper, leaving a dead mount behind."""
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Unmounts through the control socket; kills and detaches if that does not work."""
        if self.proc.poll() is None:
            try:
                sail.Volume(self.path).unmount(timeout=10)
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        detach(self.path)


@pytest.fixture(scope="session")
def service():
    root = tempfile.mkdtemp(prefix="sail-sdk-")
    svc = None
    saved = {k: os.environ.get(k) for k in ("SAIL_API_URL", "SAIL_ENDPOINT", "SAIL_ORG")}
    try:
        svc = Service(root)
        # The SDK's gRPC half finds the service the way a user's program does.
        os.environ["SAIL_API_URL"] = svc.endpoint
        os.environ.pop("SAIL_ENDPOINT", None)
        os.environ.pop("SAIL_ORG", None)
        yield svc
    finally:
        # `sail up` leaves VMs running when it stops (a restart re-attaches them): end them.
        if svc is not None and svc.proc.poll() is None:
            try:
                for sb in sail.Sailbox.list(states=list(sail.SailboxState)):
                    if sb.info.state not in (5, 6):  # terminated, lost
                        try:
                            sb.terminate()
                        except sail.SailError:
                            pass
            except sail.SailError:
                pass
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if svc is not None:
            svc.stop()
        # Safety net: nothing may stay mounted under root (and rmtree must not enter a mount).
        with open("/proc/self/mountinfo") as f:
            for line in f:
                if line.split(" ")[4].startswith(root + "/"):
                    detach(line.split(" ")[4])
        shutil.rmtree(root, ignore_errors=True)


_numbers = itertools.count(1)


@pytest.fixture
def mounts(service):
    """A fresh volume and a factory: each `mount()` call mounts it once more and returns the
    Mount (`mount(path=...)` mounts at a given directory). All are unmounted at teardown."""
    name = "v" + uuid.uuid4().hex[:8]
    service.create(name)
    made: list[Mount] = []

    def mount(path: str | None = None) -> Mount:
        m = Mount(service, name, next(_numbers), path)
        made.append(m)
        return m

    yield mount
    for m in made:
        m.close()
    leftover = [m.path for m in made if mounted(m.path)]
    assert not leftover, f"mounts left behind: {leftover}"


def vm_kit() -> None:
    """Fails (or skips, with SAIL_SDK_ALLOW_SKIP=1) when the VM kit is missing."""
    guest = os.environ.get("SAIL_GUEST_DIR") or os.path.expanduser("~/.cache/sail/guest")
    if not os.path.isdir(guest) or not os.environ.get("SAIL_AGENT_BIN"):
        msg = ("the VM kit is missing: run `bash scripts/setup.sh vm && bash scripts/build-agent.sh` "
               "and set SAIL_AGENT_BIN")
        if os.environ.get("SAIL_SDK_ALLOW_SKIP") == "1":
            pytest.skip(msg)
        pytest.fail(msg, pytrace=False)


@pytest.fixture(scope="session")
def debian_image(service):
    """The Debian image, built once for the session (debootstrap on a new data directory:
    minutes; bounded generously)."""
    vm_kit()
    lines: list = []
    return sail.ensure_image("debian", timeout=1800, on_progress=lines.append)
