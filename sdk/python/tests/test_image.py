"""`sail.Image`: definitions built by the real service, and a sailbox of the result.

The apt and pip steps are exercised by vmm-host's own test (tests/debian.rs); here the SDK's
part: immutable definitions, packing (ignores, modes, symlinks skipped), the build iterator,
caching, errors, and `Sailbox.create(image=Image)`.
"""

from __future__ import annotations

import os
import pathlib
import time

import pytest

import sail
from sail.image import IgnoreMatcher


def test_ignore_patterns_follow_gitignore_rules():
    m = IgnoreMatcher(["# comment", "*.pyc", "!keep.pyc", "build/", "/top.txt", "docs/**/*.md", "a?c", "[xy].log"])
    cases = [
        ("x.pyc", False, True), ("pkg/x.pyc", False, True), ("pkg/keep.pyc", False, False),
        ("build", True, True), ("build", False, False), ("src/build", True, True),
        ("top.txt", False, True), ("src/top.txt", False, False),
        ("docs/a.md", False, True), ("docs/x/y/a.md", False, True), ("a.md", False, False),
        ("abc", False, True), ("abbc", False, False), ("x.log", False, True), ("z.log", False, False),
    ]
    for path, is_dir, want in cases:
        assert m.matches(path, is_dir) is want, (path, is_dir, want)


def test_definitions_are_immutable_values():
    base = sail.Image.debian()
    a = base.run_commands("true")
    b = a.env({"A": "1"})
    assert base is not a and a is not b
    assert repr(base) == "Image('debian_amd64', steps=[])"
    assert repr(b) == "Image('debian_amd64', steps=['run_commands', 'env'])"


def test_an_image_builds_caches_and_runs(debian_image, tmp_path: pathlib.Path):
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text("VALUE = 1\n")
    (src / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"junk")
    (src / "debug.log").write_text("ignored")
    os.symlink("/etc/shadow", src / "link")
    (tmp_path / "ignores").write_text("*.log\n")
    (tmp_path / "app.conf").write_text("secret=1\n")

    def image(value: int) -> sail.Image:
        (src / "pkg" / "mod.py").write_text(f"VALUE = {value}\n")
        return (
            sail.Image.debian(python_version="3.11")
            .run_commands("mkdir -p /data", "echo built > /data/marker")
            .env({"APP_ENV": "test", "GREETING": "hello there"})
            .add_local_file(tmp_path / "app.conf", "/etc/app/app.conf", mode=0o600)
            .add_local_dir(src, "/app", ignore=["__pycache__/"])
            .add_local_dir(src, "/app2", ignore=pathlib.Path(tmp_path / "ignores"))
        )

    events = list(image(1).build_events(timeout=900))
    image_id = events[-1].image_id
    assert image_id.startswith("im-"), events[-1]
    assert [e.step for e in events if e.layer_stored] == [1, 2, 3, 4, 5]

    # Unchanged: every layer cached, fast.
    t0 = time.monotonic()
    again = list(image(1).build_events(timeout=900))
    assert again[-1].image_id == image_id
    assert not any(e.layer_stored for e in again) and sum(e.cached for e in again) == 5
    assert time.monotonic() - t0 < 30

    # One byte in an added file: that step and the next rebuild, the first three do not.
    changed = list(image(2).build_events(timeout=900))
    assert changed[-1].image_id != image_id
    assert [e.step for e in changed if e.layer_stored] == [4, 5]

    app = sail.App.find(name="sdk-image-tests", mint_if_missing=True)
    with sail.Sailbox.create(app=app, image=image(2), name="built", image_build_timeout=900) as sb:
        r = sb.exec(
            "cat /data/marker; echo $APP_ENV $GREETING; stat -c '%a' /etc/app/app.conf; cat /etc/app/app.conf; "
            "cd /app && find . | sort; cd /app2 && find . | sort; "
            "PYTHONDONTWRITEBYTECODE=1 python3 -c 'import sys; sys.path.insert(0, \"/app\"); from pkg import mod; print(mod.VALUE)'"
        ).wait()
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [
            "built", "test hello there", "600", "secret=1",
            ".", "./debug.log", "./pkg", "./pkg/mod.py",
            ".", "./pkg", "./pkg/__pycache__", "./pkg/__pycache__/mod.cpython-311.pyc", "./pkg/mod.py",
            "2",
        ], r.stdout


def test_build_errors_are_image_build_errors(debian_image):
    with pytest.raises(sail.ImageBuildError) as e:
        sail.Image.debian().run_commands("echo about to fail", "exit 7").build(timeout=600)
    assert "step 1" in str(e.value) and "about to fail" in str(e.value)
    with pytest.raises(sail.ImageBuildError) as e:
        sail.Image.debian().apt_install("bad name;").build()
    assert "not a Debian package name" in str(e.value)
    with pytest.raises(sail.ImageBuildError) as e:
        sail.Image.from_base("debian_arm64").build()
    assert "arm64" in str(e.value)
    with pytest.raises(sail.ImageBuildError) as e:
        sail.Image.debian(python_version="3.8").build()
    assert "3.11" in str(e.value)
    with pytest.raises(sail.ImageBuildError) as e:
        sail.Image.debian().run_commands("sleep 300").build(timeout=3)
    assert e.value.code == "DEADLINE_EXCEEDED"
