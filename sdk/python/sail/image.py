"""Image definitions: a Debian base and chained steps, built by the service (docs/images.md).

    image = (
        sail.Image.debian()
        .apt_install("curl")
        .pip_install("requests==2.32.3")
        .env({"APP_ENV": "prod"})
        .add_local_dir("./src", "/app", ignore=["*.pyc", "__pycache__/"])
    )
    image_id = image.build(timeout=600)            # cached layers make an unchanged build instant
    sb = sail.Sailbox.create(app=app, image=image)  # builds first when needed

An :class:`Image` is an immutable value: every step method returns a new one. Added files are
packed when the image is built (a deterministic tar: sorted entries, modes and numeric owners
kept, modification times fixed, symlinks and special files skipped), uploaded, and named by
their BLAKE3 in the definition, so a one-byte change in an added file gives a new image id and
rebuilds from that step only.
"""

import os
import re
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from ._client import client
from .errors import ImageBuildError, SailTimeoutError

PathLike = Union[str, "os.PathLike[str]"]

# Bytes per UploadContext message.
_PART = 1 << 20


@dataclass(frozen=True)
class ImageBuildEvent:
    """One event of a build: the start (``planned_image_id``: the id it makes), a log line, a
    step starting (``cached`` when its layer existed), a layer stored (``stored_bytes`` of new
    chunks), or the end (``image_id`` set)."""

    log: str = ""
    step: int = 0
    steps: int = 0
    what: str = ""
    layer_id: str = ""
    cached: bool = False
    layer_stored: bool = False
    stored_bytes: int = 0
    layer_size: int = 0
    run_ms: int = 0
    image_id: str = ""
    size: int = 0
    planned_image_id: str = ""


@dataclass(frozen=True)
class _Step:
    kind: str
    items: Tuple[str, ...] = ()
    env: Tuple[Tuple[str, str], ...] = ()
    local: str = ""
    remote: str = ""
    mode: Optional[int] = None
    ignore: Tuple[str, ...] = ()
    ignore_file: str = ""


class Image:
    """An image definition. Start from :meth:`debian` (or :meth:`from_base`)."""

    def __init__(self, base: str = "debian_amd64", python_version: Optional[str] = None,
                 _steps: Tuple[_Step, ...] = ()) -> None:
        self._base = base
        self._python_version = python_version
        self._steps = _steps

    @classmethod
    def debian(cls, python_version: Optional[str] = None) -> "Image":
        """The Debian base (bookworm, amd64) with python3; ``python_version`` must be what it
        provides ("3.11") or None."""
        return cls("debian_amd64", python_version)

    @classmethod
    def from_base(cls, base: str, python_version: Optional[str] = None) -> "Image":
        """A named base: ``"debian_amd64"``; ``"debian_arm64"`` is refused by an x86_64 host
        with :class:`ImageBuildError` when built."""
        return cls(base, python_version)

    def _with(self, step: _Step) -> "Image":
        return Image(self._base, self._python_version, self._steps + (step,))

    def apt_install(self, *packages: str) -> "Image":
        return self._with(_Step("apt_install", tuple(_flat(packages))))

    def pip_install(self, *packages: str) -> "Image":
        return self._with(_Step("pip_install", tuple(_flat(packages))))

    def run_commands(self, *commands: str) -> "Image":
        return self._with(_Step("run_commands", tuple(_flat(commands))))

    def env(self, vars: Mapping[str, str]) -> "Image":
        return self._with(_Step("env", env=tuple(sorted((str(k), str(v)) for k, v in vars.items()))))

    def add_local_file(self, local: PathLike, remote: str, mode: Optional[int] = None) -> "Image":
        """Adds one file at ``remote`` (an absolute file path), with ``mode`` if given."""
        return self._with(_Step("add_local_file", local=os.fspath(local), remote=remote, mode=mode))

    def add_local_dir(self, local: PathLike, remote: str,
                      ignore: Union[Sequence[str], "os.PathLike[str]", None] = None) -> "Image":
        """Adds a directory's contents under ``remote``. ``ignore`` is a list of gitignore-style
        patterns, or a path (``pathlib.Path``) to a file of them; symlinks are skipped."""
        if ignore is None:
            patterns: Tuple[str, ...] = ()
            ignore_file = ""
        elif isinstance(ignore, os.PathLike):
            patterns, ignore_file = (), os.fspath(ignore)
        elif isinstance(ignore, str):
            patterns, ignore_file = (ignore,), ""
        else:
            patterns, ignore_file = tuple(ignore), ""
        return self._with(_Step("add_local_dir", local=os.fspath(local), remote=remote, ignore=patterns,
                                ignore_file=ignore_file))

    def __repr__(self) -> str:
        return f"Image({self._base!r}, steps={[s.kind for s in self._steps]})"

    def _definition(self) -> Any:
        from ._pb import sailbox_pb2 as pb

        c = client()
        steps = []
        for s in self._steps:
            if s.kind in ("apt_install", "pip_install", "run_commands"):
                steps.append(pb.ImageStep(**{s.kind: pb.StringList(items=list(s.items))}))
            elif s.kind == "env":
                steps.append(pb.ImageStep(env=pb.EnvVars(vars=dict(s.env))))
            else:
                remote_dir, context = _upload(c, s)
                steps.append(pb.ImageStep(add_files=pb.AddFiles(remote=remote_dir, context=context)))
        return pb.ImageDefinition(base=self._base, python_version=self._python_version or "", steps=steps)

    def build_events(self, timeout: Optional[float] = None) -> Iterator[ImageBuildEvent]:
        """Builds the image, yielding events as the service reports them (log lines as the
        steps print them); the last event has ``image_id``. Raises :class:`ImageBuildError`
        for a bad definition, a failing step (its number and log tail in the message) or a
        build past ``timeout`` seconds (default 1800)."""
        from ._pb import sailbox_pb2 as pb

        c = client()
        limit = 1800.0 if timeout is None else float(timeout)
        req = pb.BuildImageRequest(definition=self._definition(), timeout_secs=max(1, int(limit + 0.999)))
        try:
            # The service enforces the timeout; the stream's own deadline is a backstop.
            for e in c.stream(c.sailboxes.BuildImage, req, timeout=limit + 60):
                yield ImageBuildEvent(
                    log=e.log, step=e.step, steps=e.steps, what=e.what, layer_id=e.layer_id, cached=e.cached,
                    layer_stored=e.layer_stored, stored_bytes=e.stored_bytes, layer_size=e.layer_size,
                    run_ms=e.run_ms, image_id=e.image_id, size=e.size, planned_image_id=e.planned_image_id,
                )
        except SailTimeoutError as e:
            raise ImageBuildError(f"the image was not built within {limit} s: {e.message}", code=e.code) from None

    def build(self, timeout: Optional[float] = None,
              on_log: Optional[Callable[[str], None]] = None) -> str:
        """Builds the image (or finds it built) and returns its id; ``on_log`` receives each
        log line. See :meth:`build_events` for errors."""
        for e in self.build_events(timeout):
            if e.log and on_log is not None:
                on_log(e.log)
            if e.image_id:
                return e.image_id
        raise ImageBuildError("the service ended the build without an image id")


def _flat(items: Sequence[Any]) -> List[str]:
    out: List[str] = []
    for i in items:
        if isinstance(i, (list, tuple)):
            out.extend(str(x) for x in i)
        else:
            out.append(str(i))
    return out


def _upload(c: Any, s: _Step) -> Tuple[str, str]:
    """Packs a local file or directory and uploads it; returns (remote dir, BLAKE3 hex)."""
    from ._pb import sailbox_pb2 as pb

    with tempfile.TemporaryFile() as f:
        remote_dir = _pack(s, f)
        f.seek(0)

        def parts() -> Iterator[Any]:
            while True:
                data = f.read(_PART)
                if not data:
                    return
                yield pb.UploadContextRequest(data=data)

        r = c.call(c.sailboxes.UploadContext, parts(), idempotent=False, timeout=float("inf"))
    return remote_dir, r.context


def _tarinfo(name: str, st: os.stat_result, kind: bytes, size: int, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = size
    ti.mode = mode & 0o7777
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.uname = ti.gname = ""
    ti.mtime = 0
    return ti


def _pack(s: _Step, out: Any) -> str:
    """Writes the tar of a step's local files to ``out``; returns the remote directory."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        if s.kind == "add_local_file":
            st = os.stat(s.local)
            if not stat.S_ISREG(st.st_mode):
                raise ImageBuildError(f"{s.local} is not a regular file")
            remote_dir, _, name = s.remote.rpartition("/")
            if not s.remote.startswith("/") or not name:
                raise ImageBuildError(f"remote {s.remote!r} must be an absolute file path")
            mode = s.mode if s.mode is not None else st.st_mode
            with open(s.local, "rb") as f:
                tar.addfile(_tarinfo(name, st, tarfile.REGTYPE, st.st_size, mode), f)
            return remote_dir or "/"
        root = Path(s.local)
        if not root.is_dir():
            raise ImageBuildError(f"{s.local} is not a directory")
        patterns = list(s.ignore)
        if s.ignore_file:
            patterns = Path(s.ignore_file).read_text().splitlines() + patterns
        ignored = IgnoreMatcher(patterns)
        # A directory's entries in name order, then its subdirectories' (as the CLI packs).
        stack = [""]
        while stack:
            rel = stack.pop()
            subdirs = []
            for name in sorted(os.listdir(root / rel) if rel else os.listdir(root)):
                rel_path = f"{rel}/{name}" if rel else name
                st = os.lstat(root / rel_path)
                is_dir = stat.S_ISDIR(st.st_mode)
                if ignored.matches(rel_path, is_dir):
                    continue
                if is_dir:
                    tar.addfile(_tarinfo(rel_path, st, tarfile.DIRTYPE, 0, st.st_mode))
                    subdirs.append(rel_path)
                elif stat.S_ISREG(st.st_mode):
                    with open(root / rel_path, "rb") as f:
                        tar.addfile(_tarinfo(rel_path, st, tarfile.REGTYPE, st.st_size, st.st_mode), f)
                # symlinks, fifos, sockets and devices are skipped
            stack.extend(reversed(subdirs))
        return s.remote


class IgnoreMatcher:
    """gitignore-style patterns: ``#`` comments, ``!`` negation (the last match wins), a
    trailing ``/`` for directories only, a ``/`` elsewhere anchors the pattern to the added
    directory (else it matches a name at any depth), ``*``, ``?``, ``[...]`` and ``**``."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self._rules: List[Tuple[re.Pattern, bool, bool, bool]] = []
        for raw in patterns:
            p = raw.rstrip("\n").rstrip(" ") if not raw.endswith("\\ ") else raw
            if not p or p.startswith("#"):
                continue
            negate = p.startswith("!")
            if negate:
                p = p[1:]
            elif p.startswith("\\"):
                p = p[1:]
            dir_only = p.endswith("/")
            p = p.rstrip("/")
            if not p:
                continue
            anchored = "/" in p
            p = p.lstrip("/")
            self._rules.append((re.compile(_translate(p)), negate, dir_only, anchored))

    def matches(self, rel_path: str, is_dir: bool) -> bool:
        """Whether ``rel_path`` (relative, ``/``-separated) is ignored; callers do not descend
        into ignored directories, so a parent's match covers its contents."""
        name = rel_path.rsplit("/", 1)[-1]
        ignored = False
        for rx, negate, dir_only, anchored in self._rules:
            if dir_only and not is_dir:
                continue
            if rx.fullmatch(rel_path if anchored else name):
                ignored = not negate
        return ignored


def _translate(p: str) -> str:
    out = []
    i, n = 0, len(p)
    while i < n:
        c = p[i]
        if p.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif p.startswith("/**", i) and i + 3 == n:
            out.append("/.*")
            i += 3
        elif p.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = p.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = p[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j + 1
        elif c == "\\" and i + 1 < n:
            out.append(re.escape(p[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


__all__ = ["Image", "ImageBuildEvent", "IgnoreMatcher"]
