"""The SDK against real FUSE mounts served by `sail-volume-fuse` and a real `sail up`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading

import pytest

import sail
from conftest import mounted

HEX64 = re.compile(r"^[0-9a-f]{64}$")
STATUS_KEYS = {
    "mountpoint", "endpoint", "org", "volume", "head", "dirty_entries", "dirty_files",
    "dirty_bytes", "pending_deletes", "memory_hits", "memory_misses", "prefetched",
    "cache_hits", "cache_misses", "cache_bytes", "cache_capacity", "pid",
}
COMMIT_KEYS = {"commit", "seq", "merged", "upserts", "deletes", "chunks_hashed",
               "chunks_uploaded", "bytes_uploaded", "elapsed_ms"}
RELOAD_KEYS = {"commit", "previous", "discarded", "elapsed_ms"}


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_from_mount_on_a_plain_directory_is_unavailable(tmp_path):
    with pytest.raises(sail.VolumeFuseUnavailableError, match="FUSE helper unavailable") as e:
        sail.Volume.from_mount(tmp_path)
    assert str(tmp_path) in str(e.value)
    assert isinstance(e.value, sail.VolumeError) and isinstance(e.value, sail.SailError)
    with pytest.raises(sail.VolumeFuseUnavailableError, match="FUSE helper unavailable"):
        sail.Volume.from_mount(tmp_path / "missing")


def test_from_mount_resolves_relative_paths(mounts, monkeypatch):
    a = mounts()
    monkeypatch.chdir(os.path.dirname(a.path))
    v = sail.Volume.from_mount(os.path.basename(a.path))
    assert v.path == a.path
    status = v.status()
    assert STATUS_KEYS <= status.keys()
    assert status["mountpoint"] == a.path and status["pid"] == a.proc.pid


def test_commit_returns_the_head_and_reload_on_another_mount_shows_it(mounts):
    a, b = mounts(), mounts()
    va, vb = sail.Volume.from_mount(a.path), sail.Volume.from_mount(b.path)
    write(os.path.join(a.path, "notes.txt"), "hello")
    details = va.commit_details()
    assert COMMIT_KEYS <= details.keys()
    commit = details["commit"]
    assert HEX64.match(commit) and details["seq"] > 0 and details["upserts"] == 1
    assert va.status()["head"] == commit
    assert va.status()["dirty_files"] == 0

    assert not os.path.exists(os.path.join(b.path, "notes.txt"))
    reloaded = vb.reload_details()
    assert RELOAD_KEYS <= reloaded.keys()
    assert reloaded["commit"] == commit and reloaded["previous"] != commit
    assert vb.status()["head"] == commit
    assert read(os.path.join(b.path, "notes.txt")) == "hello"


def test_reload_discards_uncommitted_changes(mounts):
    a, b = mounts(), mounts()
    write(os.path.join(a.path, "kept.txt"), "kept")
    head = sail.Volume.from_mount(a.path).commit()
    vb = sail.Volume.from_mount(b.path)
    scratch = os.path.join(b.path, "scratch.txt")
    write(scratch, "draft")
    assert vb.status()["dirty_files"] == 1
    assert vb.reload() == head
    assert not os.path.exists(scratch)
    assert read(os.path.join(b.path, "kept.txt")) == "kept"
    assert vb.status()["dirty_files"] == 0


def test_commit_with_nothing_changed_returns_the_current_head(mounts):
    v = sail.Volume.from_mount(mounts().path)
    empty_head = v.status()["head"]
    assert v.commit() == empty_head
    write(os.path.join(v.path, "f"), "x")
    head = v.commit()
    assert head != empty_head
    details = v.commit_details()
    assert details["commit"] == head and details["seq"] == 0
    assert v.commit() == head == v.status()["head"]


def test_a_killed_helper_raises_fuse_unavailable(mounts):
    a = mounts()
    v = sail.Volume.from_mount(a.path)
    a.kill()
    try:
        with pytest.raises(sail.VolumeFuseUnavailableError, match="FUSE helper unavailable") as e:
            v.commit()
        assert a.path in str(e.value)
        with pytest.raises(sail.VolumeFuseUnavailableError, match="FUSE helper unavailable"):
            sail.Volume.from_mount(a.path)
        with pytest.raises(sail.VolumeFuseUnavailableError):
            v.reload()
    finally:
        subprocess.run(["umount", "-l", a.path], check=True)
    assert not mounted(a.path)


def test_a_handle_finds_a_helper_remounted_on_the_same_path(mounts):
    a = mounts()
    v = sail.Volume.from_mount(a.path)
    write(os.path.join(a.path, "f"), "x")
    head = v.commit()
    a.close()
    with pytest.raises(sail.VolumeFuseUnavailableError):
        v.status()
    again = mounts(path=a.path)  # another helper, another control socket
    assert v.status()["pid"] == again.proc.pid
    assert v.reload() == head and read(os.path.join(a.path, "f")) == "x"


def test_concurrent_commits_from_two_mounts_merge(mounts):
    a, b = mounts(), mounts()
    write(os.path.join(a.path, "from_a"), "A")
    write(os.path.join(b.path, "from_b"), "B")
    barrier = threading.Barrier(2)
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def commit(path: str) -> None:
        try:
            v = sail.Volume.from_mount(path)
            barrier.wait(10)
            results[path] = v.commit_details(timeout=60)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(m.path,)) for m in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert results[a.path]["commit"] != results[b.path]["commit"]
    assert sorted(r["merged"] for r in results.values()) == [False, True]
    heads = set()
    for m in (a, b):
        heads.add(sail.Volume.from_mount(m.path).reload())
        assert sorted(os.listdir(m.path)) == ["from_a", "from_b"]
        assert read(os.path.join(m.path, "from_a")) == "A" and read(os.path.join(m.path, "from_b")) == "B"
    assert len(heads) == 1


def _fake_helper(tmp_path, monkeypatch, reply: bytes | None) -> sail.Volume:
    """A stand-in control socket that answers one request with `reply` (None: closes)."""
    path = str(tmp_path / "ctl.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.makefile("rb").readline()
            if reply is not None:
                conn.sendall(reply)
        srv.close()

    threading.Thread(target=answer, daemon=True).start()
    monkeypatch.setattr(sail.volume, "_socket_path", lambda _: path)
    return sail.Volume(str(tmp_path))


@pytest.mark.parametrize("name, cls, expected_name", [
    ("VolumeCommitConflictError", sail.VolumeCommitConflictError, "VolumeCommitConflictError"),
    ("VolumeNotFoundError", sail.VolumeNotFoundError, "VolumeNotFoundError"),
    ("VolumeIntegrityError", sail.VolumeIntegrityError, "VolumeIntegrityError"),
    ("VolumeMissingChunksError", sail.VolumeMissingChunksError, "VolumeMissingChunksError"),
    ("VolumeFuseUnavailableError", sail.VolumeFuseUnavailableError, "VolumeFuseUnavailableError"),
    ("SomethingNewError", sail.SailError, "SailError"),
])
def test_error_names_map_to_exception_classes(tmp_path, monkeypatch, name, cls, expected_name):
    reply = {"ok": False, "error": {"name": name, "message": "a is a file"}}
    v = _fake_helper(tmp_path, monkeypatch, json.dumps(reply).encode() + b"\n")
    with pytest.raises(sail.SailError, match="a is a file") as e:
        v.commit()
    assert type(e.value) is cls
    assert e.value.name == expected_name


def test_a_helper_that_closes_without_replying_is_unavailable(tmp_path, monkeypatch):
    v = _fake_helper(tmp_path, monkeypatch, None)
    with pytest.raises(sail.VolumeFuseUnavailableError, match="FUSE helper unavailable"):
        v.reload()


def test_an_unconnectable_socket_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(sail.volume, "_socket_path", lambda _: str(tmp_path / "nobody.sock"))
    with pytest.raises(sail.VolumeFuseUnavailableError, match=f"FUSE helper unavailable for {tmp_path}"):
        sail.Volume(str(tmp_path)).status()


def test_the_key_file_names_match_the_cli(tmp_path, monkeypatch):
    from sail._client import Config, _key_file_name

    # The same names as tenancy::credentials::endpoint_file_name (its doc test).
    assert _key_file_name("http://127.0.0.1:7420") == "loopback_7420"
    assert _key_file_name("http://localhost:7420/") == "loopback_7420"
    assert _key_file_name("http://[::1]:7420") == "loopback_7420"
    assert _key_file_name("https://sail.example.com") == "sail.example.com_443"
    assert _key_file_name("10.0.0.5:9000") == "10.0.0.5_9000"
    key = "sail_0123456789abcdef_" + "ab" * 32
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "loopback_9").write_text(key + "\n")
    monkeypatch.setenv("SAIL_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("SAIL_API_KEY", raising=False)
    monkeypatch.setenv("SAIL_API_URL", "http://127.0.0.1:9")
    assert Config.from_env().api_key == key
    monkeypatch.setenv("SAIL_API_KEY", "sail_fedcba9876543210_" + "cd" * 32)
    assert Config.from_env().api_key.startswith("sail_fedcba9876543210_")


def test_a_key_the_service_does_not_know_is_refused(service):
    from sail._client import Client, Config
    from sail._pb import volume_pb2 as pb

    c = Client(Config(endpoint=service.endpoint, api_key="sail_0123456789abcdef_" + "0" * 64))
    with pytest.raises(sail.SailAuthenticationError) as e:
        c.call(c.volumes.ListVolumes, pb.ListVolumesRequest(), idempotent=True)
    assert "unknown or revoked" in str(e.value)
    # The key `sail up` kept for this endpoint is found without SAIL_API_KEY.
    assert all(v.org == "default" for v in sail.Volume.list())
