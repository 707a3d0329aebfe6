"""The SDK against real FUSE mounts."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import threading

import pytest

import sail

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def test_from_mount_on_a_plain_directory_is_unavailable(tmp_path):
    with pytest.raises(sail.VolumeFuseUnavailableError, match="FUSE helper unavailable"):
        sail.Volume.from_mount(tmp_path)


def test_commit_returns_the_head_and_reload_shows_it(mounts):
    _, mount = mounts
    a, b = mount(), mount()
    with open(os.path.join(a.path, "notes.txt"), "w") as f:
        f.write("hello")
    va, vb = sail.Volume.from_mount(a.path), sail.Volume.from_mount(b.path)
    commit = va.commit()
    assert HEX64.match(commit)
    assert va.status()["head"] == commit
    assert not os.path.exists(os.path.join(b.path, "notes.txt"))
    assert vb.reload() == commit
    with open(os.path.join(b.path, "notes.txt")) as f:
        assert f.read() == "hello"
    details = va.commit_details()
    assert details["commit"] == commit and details["seq"] == 0, "nothing to commit returns the head"


def test_reload_discards_uncommitted_changes(mounts):
    _, mount = mounts
    a = mount()
    v = sail.Volume.from_mount(a.path)
    head = v.commit()
    scratch = os.path.join(a.path, "scratch.txt")
    with open(scratch, "w") as f:
        f.write("draft")
    assert v.status()["dirty_files"] == 1
    result = v.reload_details()
    assert result["commit"] == head and result["discarded"] == 1
    assert not os.path.exists(scratch)


def test_concurrent_commits_from_two_mounts_merge(mounts):
    _, mount = mounts
    a, b = mount(), mount()
    for m, name in ((a, "from_a"), (b, "from_b")):
        with open(os.path.join(m.path, name), "w") as f:
            f.write(name)
    results = {}

    def commit(m):
        results[m.path] = sail.Volume.from_mount(m.path).commit_details()

    threads = [threading.Thread(target=commit, args=(m,)) for m in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r["merged"] for r in results.values()) == 1
    for m in (a, b):
        sail.Volume.from_mount(m.path).reload()
        assert sorted(os.listdir(m.path)) == ["from_a", "from_b"]


def test_a_killed_helper_raises_fuse_unavailable(mounts):
    _, mount = mounts
    a = mount()
    v = sail.Volume.from_mount(a.path)
    a.kill()
    with pytest.raises(sail.VolumeFuseUnavailableError, match="FUSE helper unavailable"):
        v.commit()
    with pytest.raises(sail.VolumeFuseUnavailableError):
        sail.Volume.from_mount(a.path)
    subprocess.run(["umount", "-l", a.path], check=True)


def test_server_error_names_map_to_exception_classes(tmp_path, monkeypatch):
    # A stand-in socket that answers with a contract error: checks the name -> class mapping.
    path = str(tmp_path / "ctl.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def answer():
        conn, _ = srv.accept()
        conn.makefile("rb").readline()
        reply = {"ok": False, "error": {"name": "VolumeCommitConflictError", "message": "a is a file"}}
        conn.sendall(json.dumps(reply).encode() + b"\n")
        conn.close()

    t = threading.Thread(target=answer)
    t.start()
    monkeypatch.setattr(sail.volume, "_socket_path", lambda _: path)
    with pytest.raises(sail.VolumeCommitConflictError, match="a is a file") as e:
        sail.Volume(tempfile.gettempdir()).commit()
    assert isinstance(e.value, sail.VolumeError) and isinstance(e.value, sail.SailError)
    t.join()
    srv.close()
    assert sail.errors.error_for("NoSuchName", "x").__class__ is sail.SailError
