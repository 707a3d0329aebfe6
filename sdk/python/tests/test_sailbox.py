"""The SDK's sailbox, app, function and volume API against a real `sail up` booting real VMs
(the Debian image, under QEMU; TCG here). One sailbox is shared by the module; the lifecycle
test forks it once more."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import pytest

import sail

PORT = 8080


@pytest.fixture(scope="module")
def ws(service):
    """A volume, mounted at /mnt/ws in the shared sailbox."""
    return sail.Volume.get("ws-" + uuid.uuid4().hex[:6], mint_if_missing=True)


@pytest.fixture(scope="module")
def box(debian_image, ws):
    app = sail.App.find(name="sdk-tests")
    sb = sail.Sailbox.create(app=app, image="debian", name="main", ingress_ports=[PORT],
                             volumes={"/mnt/ws": ws}, image_build_timeout=1800)
    yield sb
    try:
        sb.terminate()
    except sail.SailError:
        pass


# -- apps and arguments ---------------------------------------------------------------------


def test_app_find_mints_and_finds(service):
    name = "app-" + uuid.uuid4().hex[:6]
    with pytest.raises(sail.SailboxError) as e:
        sail.App.find(name=name, mint_if_missing=False)
    assert e.value.code == "NOT_FOUND" and name in e.value.message
    a = sail.App.find(name=name)
    assert (a.name, a.minted) == (name, True) and a.created_unix_ms > 0
    b = sail.App.find(name=name, mint_if_missing=False)
    assert (b.name, b.minted, b.created_unix_ms) == (name, False, a.created_unix_ms)
    with pytest.raises(sail.SailboxError, match="must be"):
        sail.App.find(name="../etc")


def test_out_of_range_create_arguments_fail_before_anything_is_created(box):
    before = {s.id for s in sail.Sailbox.list()}
    for kwargs in ({"memory_mib": 10}, {"disk_gib": 65}, {"cpu": -1}, {"ingress_ports": [22]},
                   {"ingress_ports": [80, 80]}, {"ingress_ports": [70000]}):
        with pytest.raises(sail.SailboxCreationError):
            sail.Sailbox.create(app="sdk-tests", image="debian", **kwargs)
    with pytest.raises(sail.SailboxCreationError, match="/"):
        sail.Sailbox.create(app="sdk-tests", image="debian", volumes={"/": sail.Volume.get("ws-x", mint_if_missing=True)})
    assert {s.id for s in sail.Sailbox.list()} == before


def test_connect_list_and_attributes(box):
    again = sail.Sailbox.connect(box.id)
    assert again == box and again.name == "main" and again.app == "sdk-tests"
    assert again.state is sail.SailboxState.RUNNING
    assert again.guest_schema_version >= 1 and again.image.startswith("im-")
    listed = sail.Sailbox.list(app="sdk-tests")
    assert box.id in [s.id for s in listed]
    assert sail.Sailbox.list(app="no-such-app-" + uuid.uuid4().hex[:6]) == []
    assert box.id in [s.id for s in sail.Sailbox.list(max_guest_schema_version=box.guest_schema_version)]
    with pytest.raises(sail.SailboxError) as e:
        sail.Sailbox.connect("sb-doesnotexist")
    assert e.value.code == "NOT_FOUND"


# -- exec -----------------------------------------------------------------------------------


def test_exec_output_exit_codes_cwd_env_and_quoting(box):
    r = box.exec("echo out; echo err >&2; exit 3").wait()
    assert (r.stdout, r.stderr, r.returncode) == ("out\n", "err\n", 3)
    assert isinstance(r, sail.SailboxExecResult) and r.exec_id
    assert box.exec("pwd", cwd="/tmp").wait().stdout == "/tmp\n"
    assert box.exec("echo $GREETING", env={"GREETING": "hi there"}).wait().stdout == "hi there\n"
    words = ["printf", "%s|", "a b", "it's", "$HOME", "*"]
    assert box.exec(words).wait().stdout == "a b|it's|$HOME|*|"


def test_exec_timeout_kills_the_command(box):
    t = time.monotonic()
    r = box.exec("sleep 30", timeout=1).wait()
    assert r.timed_out and r.returncode == 124
    assert time.monotonic() - t < 25


def test_exec_request_is_durable_and_waitable_by_id_from_another_process(box):
    req = box.exec("sleep 1; echo done")
    code = f"import sail; r = sail.SailboxExecRequest.from_id({req.id!r}).wait(); print(r.stdout.strip(), r.returncode)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done 0"
    # Waiting again (here, on the original handle and on a new one) gives the same result.
    assert req.wait().stdout == "done\n"
    assert sail.SailboxExecRequest.from_id(req.id).wait().stdout == "done\n"
    with pytest.raises(sail.SailboxExecRequestNotFoundError):
        sail.SailboxExecRequest.from_id("ex-nosuchrequest").wait()


def test_one_exec_at_a_time_and_a_bounded_wait(box):
    req = box.exec("sleep 4; echo slow")
    with pytest.raises(sail.SailboxExecAlreadyRunningError) as e:
        box.exec("true")
    assert req.id in e.value.message
    with pytest.raises(sail.SailTimeoutError):
        req.wait(timeout=0.5)
    assert req.wait().stdout == "slow\n"


def test_exec_output_streams_as_it_arrives(box):
    req = box.exec("for i in 1 2 3; do echo $i; sleep 0.5; done; echo e >&2")
    seen: list[tuple[str, bytes, float]] = []
    for kind, data in req.stream():
        seen.append((kind, data, time.monotonic()))
    out = b"".join(d for k, d, _ in seen if k == "stdout")
    assert out == b"1\n2\n3\n"
    assert b"".join(d for k, d, _ in seen if k == "stderr") == b"e\n"
    stdout_times = [t for k, _, t in seen if k == "stdout"]
    assert len(stdout_times) >= 2 and stdout_times[-1] - stdout_times[0] > 0.5, "output came all at once"
    assert req.wait().returncode == 0


# -- files ----------------------------------------------------------------------------------


def test_write_and_read_bytes_text_files_and_pipes(box, tmp_path):
    assert box.write("/root/deep/a/b.txt", "héllo") == len("héllo".encode())
    assert box.read("/root/deep/a/b.txt") == "héllo".encode()
    assert box.exec("stat -c %a /root/deep/a/b.txt").wait().stdout == "644\n"
    box.write("/root/run.sh", b"#!/bin/sh\necho ran\n", mode=0o755)
    assert box.exec("/root/run.sh").wait().stdout == "ran\n"

    big = os.urandom(5 << 20) + b"tail"
    src = tmp_path / "big.bin"
    src.write_bytes(big)
    with open(src, "rb") as f:
        f.seek(7)
        assert box.write("/root/big.bin", f) == len(big) - 7  # from the current position
    assert box.read("/root/big.bin") == big[7:]
    chunks = list(box.read_stream("/root/big.bin"))
    assert len(chunks) > 1 and b"".join(chunks) == big[7:]

    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as out:
            for i in range(64):
                out.write(bytes([i]) * 65536)

    threading.Thread(target=feed, daemon=True).start()
    with os.fdopen(r, "rb") as pipe:
        assert box.write("/root/piped.bin", pipe) == 64 * 65536
    assert box.read("/root/piped.bin") == b"".join(bytes([i]) * 65536 for i in range(64))

    class Shrinking(io.BytesIO):
        """Claims 100 bytes more than it holds (a file truncated while it is sent)."""

        def seek(self, offset: int, whence: int = 0) -> int:
            pos = super().seek(offset, whence)
            return pos + 100 if whence == io.SEEK_END else pos

    with pytest.raises(sail.SailError, match="ended after 5 of 105 bytes"):
        box.write("/root/short.bin", Shrinking(b"12345"))
    assert box.exec("test -e /root/short.bin").wait().returncode == 1, "a partial file appeared"

    with pytest.raises(sail.SailboxError) as e:
        box.read("/root/missing")
    assert e.value.code == "NOT_FOUND"
    with pytest.raises(sail.SailboxError):
        box.write("relative.txt", b"x")
    with pytest.raises(sail.SailboxError, match="binary"):
        with open(src, "r") as text:
            box.write("/root/t.txt", text)  # type: ignore[arg-type]


# -- ingress --------------------------------------------------------------------------------


def test_background_server_and_its_listener(box):
    req = box.exec(f"cd /root && exec python3 -m http.server {PORT}", background=True)
    assert req.wait(timeout=60).returncode == 0  # only the launcher
    listeners = box.listeners()
    assert [l.port for l in listeners] == [PORT]
    l = box.listener(PORT).wait(timeout=120)
    assert l.routed and l.route_status == "routed" and l.url.startswith("http://")
    box.write("/root/hello.txt", "served")
    with urllib.request.urlopen(l.url + "/hello.txt", timeout=30) as resp:
        assert resp.read() == b"served"
    with pytest.raises(sail.SailError):
        box.listener(9999)


# -- functions ------------------------------------------------------------------------------


@sail.function()
def add(a, b, scale=1):
    return (a + b) * scale


@sail.function()
def where():
    import platform
    import socket

    print("a print goes to stderr")
    return {"python": platform.python_version(), "host": socket.gethostname(), "pid": os.getpid()}


@sail.function()
def fails(n):
    def inner():
        raise ValueError(f"bad value {n}")

    inner()


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


@sail.function()
def make_point():
    return Point(1, 2)


@sail.function(trusted=True)
def make_point_trusted():
    return Point(3, 4)


@sail.function()
def returns_a_lock():
    import threading

    return threading.Lock()


@sail.function()
def big_result(n):
    return b"x" * n


def test_a_function_returns_its_value(box):
    assert isinstance(add, sail.SailFunction) and add(1, 2) == 3  # still callable locally
    assert box.exec(add, 2, 3) == 5
    assert box.exec(add, "a", "b", scale=2) == "abab"
    info = box.exec(where)
    assert info["host"] == "main" and info["pid"] != os.getpid()
    # A runtime removed behind the handle's back (a reboot empties /tmp) is sent again.
    assert box.exec("rm -rf /tmp/.sail-fn").wait().returncode == 0
    assert box.exec(add, 4, 5) == 9
    # More than the inline limit comes back through a file.
    assert box.exec(big_result, 9 << 20) == b"x" * (9 << 20)


def test_a_remote_exception_carries_its_traceback(box):
    with pytest.raises(sail.SailboxFunctionError) as e:
        box.exec(fails, 7)
    err = e.value
    assert isinstance(err.remote_exception, ValueError) and str(err.remote_exception) == "bad value 7"
    assert err.remote_type == "builtins.ValueError"
    assert "in inner" in err.remote_traceback and "bad value 7" in str(err)


def test_unserializable_arguments_and_results(box):
    with pytest.raises(sail.SailboxFunctionSerializationError, match="cannot serialize"):
        box.exec(add, threading.Lock(), 1)
    with pytest.raises(sail.SailboxFunctionSerializationError, match="cannot serialize the result"):
        box.exec(returns_a_lock)
    # A guest's result is data: a class instance is refused unless the function is trusted.
    with pytest.raises(sail.SailboxFunctionSerializationError, match="trusted=True"):
        box.exec(make_point)
    p = box.exec(make_point_trusted)
    assert (p.x, p.y) == (3, 4)
    with pytest.raises(sail.SailboxError, match="background"):
        box.exec(add, 1, 2, background=True)


def test_a_python_version_mismatch_is_a_serialization_error(box, monkeypatch):
    fn_module = sys.modules["sail.functions"]

    monkeypatch.setattr(fn_module, "_python_version", lambda: (3, 7))
    with pytest.raises(sail.SailboxFunctionSerializationError, match=r"Python 3\.7 .*3\.11"):
        box.exec(add, 1, 2)


def test_a_function_timeout(box):
    @sail.function()
    def slow():
        import time

        time.sleep(30)

    with pytest.raises(sail.SailboxFunctionError, match="did not finish"):
        box.exec(slow, timeout=1)


# -- volumes --------------------------------------------------------------------------------


def test_volumes_get_list_and_log_and_the_mount_inside(box, ws):
    with pytest.raises(sail.VolumeNotFoundError):
        sail.Volume.get("never-made-" + uuid.uuid4().hex[:6])
    assert ws.name in [v.name for v in sail.Volume.list()]
    assert [c.seq for c in ws.log()] == [0]
    box.write("/mnt/ws/notes.txt", "from the sdk")
    r = box.exec("python3 -c 'import sail; print(sail.Volume.from_mount(\"/mnt/ws\").commit())'").wait()
    assert r.returncode == 0, r.stderr
    log = ws.log()
    assert log[0].id == r.stdout.strip() and log[0].seq == 1 and log[0].change_count >= 1
    assert sail.Volume.get(ws.name).head == log[0].id
    entries = {e.name: e for e in ws.listdir()}
    assert entries["notes.txt"].kind == "file" and entries["notes.txt"].size == len("from the sdk")
    st = ws.stat("notes.txt", commit=log[0].id)
    assert (st.kind, st.size, st.mode & 0o777) == ("file", 12, 0o644)
    with pytest.raises(sail.VolumePathNotFoundError):
        ws.stat("missing.txt")
    with pytest.raises(sail.VolumeFuseUnavailableError, match="not mounted here"):
        ws.commit()


# -- lifecycle ------------------------------------------------------------------------------


def test_lifecycle_checkpoint_fork_pause_sleep_upgrade_terminate(box):
    box.write("/root/state.txt", "before")
    ck = box.checkpoint()
    assert isinstance(ck, sail.Checkpoint) and ck.id.startswith("ck-") and ck.sailbox_id == box.id

    with box.fork() as child:
        assert child.id != box.id and child.state is sail.SailboxState.RUNNING
        assert child.read("/root/state.txt") == b"before"
        child.write("/root/state.txt", "child")
        assert box.read("/root/state.txt") == b"before"
    # The context manager terminated it.
    assert child.state is sail.SailboxState.TERMINATED
    assert child.id in [s.id for s in sail.Sailbox.list(states=[sail.SailboxState.TERMINATED])]
    with pytest.raises(sail.SailboxTerminatedError):
        child.exec("true")

    box.pause()
    assert box.state is sail.SailboxState.PAUSED
    with pytest.raises(sail.SailboxExecutionError):
        box.exec("true")
    assert box.upgrade() is False  # recorded for the next wake
    assert box.resume().state is sail.SailboxState.RUNNING
    assert box.read("/root/state.txt") == b"before"

    box.sleep()
    assert box.state is sail.SailboxState.SLEEPING
    assert box.exec("cat /root/state.txt").wait().stdout == "before"  # an exec wakes it
    assert box.state is sail.SailboxState.RUNNING
    assert box.upgrade() is True  # current: no reboot

    box.pause()
    again = sail.Sailbox.connect(box.id)  # connect resumes it
    assert again.state is sail.SailboxState.RUNNING


# -- transport and image errors -------------------------------------------------------------


def test_an_unreachable_service_is_a_clear_connection_error(monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SAIL_API_URL", f"http://127.0.0.1:{port}")
    t = time.monotonic()
    with pytest.raises(sail.SailConnectionError, match="sail up"):
        sail.Sailbox.list()
    assert time.monotonic() - t < 30, "idempotent calls retry a bounded number of times"
    with pytest.raises(sail.SailConnectionError):
        sail.Sailbox.create(app="x")
    monkeypatch.setenv("SAIL_API_URL", "ftp://nowhere")
    with pytest.raises(sail.SailError, match="http://host:port"):
        sail.Sailbox.list()


def test_image_errors(service, tmp_path, monkeypatch):
    with pytest.raises(sail.SailboxCreationError, match="unknown image"):
        sail.Sailbox.create(app="sdk-tests", image="no-such-image")
    # A Debian build whose mirror refuses connections fails on the server: ImageBuildError.
    import socket

    from conftest import Service

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = closed.getsockname()[1]
    hung = socket.socket()  # accepts connections and never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    other = Service(str(tmp_path), env={"SAIL_DEBIAN_MIRROR": f"http://127.0.0.1:{refused}/debian"})
    try:
        monkeypatch.setenv("SAIL_API_URL", other.endpoint)
        with pytest.raises(sail.ImageBuildError):
            sail.Sailbox.create(app="sdk-tests", image="debian")
        assert sail.Sailbox.list() == [], "nothing was created"
    finally:
        other.stop()
    # A build that does not finish within image_build_timeout: ImageBuildError, nothing created.
    slow = Service(str(tmp_path / "slow"), env={"SAIL_DEBIAN_MIRROR": f"http://127.0.0.1:{hung.getsockname()[1]}/debian"})
    try:
        monkeypatch.setenv("SAIL_API_URL", slow.endpoint)
        t = time.monotonic()
        with pytest.raises(sail.ImageBuildError, match="within 3"):
            sail.Sailbox.create(app="sdk-tests", image="debian", image_build_timeout=3)
        assert time.monotonic() - t < 60
        assert sail.Sailbox.list() == []
    finally:
        hung.close()  # the stalled debootstrap fails now
        slow.stop()


def _vmm_pids(sailbox_id: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if b"qemu" in cmd and f"/vmm/run/{sailbox_id}/".encode() in cmd:
            pids.append(int(entry))
    return pids


def test_a_sailbox_whose_host_side_vm_died_without_a_checkpoint_is_lost(box):
    sb = sail.Sailbox.create(app="sdk-tests", image="minimal", name="doomed")
    try:
        assert sb.exec("echo up").wait().stdout == "up\n"
        pids = _vmm_pids(sb.id)
        assert pids, "no VMM process found for the sailbox"
        for pid in pids:
            os.kill(pid, 9)
        deadline = time.monotonic() + 60
        while sb.state is not sail.SailboxState.LOST:
            assert time.monotonic() < deadline, f"still {sb.state} after its VMM was killed"
            time.sleep(0.5)
        with pytest.raises(sail.SailboxWorkerLostError):
            sb.exec("true")
    finally:
        try:
            sb.terminate()
        except sail.SailError:
            pass
