"""`Volume`: a named volume in the service (:meth:`Volume.get`, over gRPC) and a handle to a
mounted one (:meth:`Volume.from_mount`), which talks to the mount's FUSE helper over its
control socket (one JSON object per line each way; see docs/guest-fuse.md).

The mount half uses the standard library only: it runs inside guests, where the SDK's gRPC
dependencies are not installed."""

from __future__ import annotations

import errno
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, List, Optional

from .errors import SailError, VolumeFuseUnavailableError, error_for

#: Extended attribute on the mount root that holds the control socket's path.
CONTROL_XATTR = "user.sail.control"


def _unavailable(mount: str, why: str) -> VolumeFuseUnavailableError:
    return VolumeFuseUnavailableError(f"FUSE helper unavailable for {mount}: {why}")


def _socket_path(mount: str) -> str:
    """Reads the control socket path from the mount root's extended attribute."""
    try:
        raw = os.getxattr(mount, CONTROL_XATTR)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            why = "the helper is not running (dead mount; unmount it with `umount -l` and mount again)"
        elif e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            why = "not a sail volume mount"
        else:
            why = f"cannot read {CONTROL_XATTR}: {e.strerror or e}"
        raise _unavailable(mount, why) from None
    path = os.fsdecode(raw.rstrip(b"\0"))
    if not path:
        raise _unavailable(mount, f"{CONTROL_XATTR} is empty")
    return path


@dataclass(frozen=True)
class VolumeCommit:
    """One commit of a volume's history (:meth:`Volume.log`)."""

    #: The commit id (64 hex digits).
    id: str
    #: Its sequence number in the volume (0: the initial empty commit).
    seq: int
    #: The commit it was made on (its first parent).
    parent: str
    #: When it was published (Unix ms).
    time_unix_ms: int
    #: Changed paths.
    change_count: int
    #: Its message ("" if none).
    message: str = ""
    #: Who made it.
    author: str = ""


@dataclass(frozen=True)
class VolumeEntry:
    """A file, directory or symlink in a volume's commit (:meth:`Volume.listdir`,
    :meth:`Volume.stat`)."""

    #: Its name in the directory (for :meth:`Volume.stat`, the path asked for).
    name: str
    #: ``"file"``, ``"dir"`` or ``"symlink"``.
    kind: str
    #: Bytes (files; 0 otherwise).
    size: int
    #: Permission bits.
    mode: int
    #: Modification time, nanoseconds since the Unix epoch.
    mtime_ns: int
    #: A symlink's target ("" otherwise).
    target: str = ""

    @classmethod
    def _from_pb(cls, name: str, e: Any) -> "VolumeEntry":
        kind = e.WhichOneof("kind") or "file"
        size = e.file.size if kind == "file" else 0
        return cls(name=name, kind=kind, size=int(size), mode=int(e.mode), mtime_ns=int(e.mtime_ns),
                   target=e.symlink.target if kind == "symlink" else "")


class Volume:
    """A volume: either named in the service (:meth:`get`, :meth:`list`; ``name``, ``org``,
    ``id`` and ``head`` set), or mounted at ``path`` by the sail FUSE helper
    (:meth:`from_mount`; then :meth:`commit`, :meth:`reload` and :meth:`status` work).

    Mount calls reconnect each time, re-reading the socket path from the mount, so a helper
    that was restarted on the same mount point is found. Calls on one mount are served one
    at a time.
    """

    def __init__(self, path: str = "", *, name: str = "", org: str = "", id: str = "", head: str = "") -> None:
        #: Absolute path of the mount point ("" for a volume that is not mounted here).
        self.path = path
        #: The volume's name (from :meth:`get`; "" from :meth:`from_mount`).
        self.name = name
        #: Its org.
        self.org = org
        #: Its id (32 hex digits, stable for the volume's life).
        self.id = id
        #: Its head commit when it was looked up.
        self.head = head

    @classmethod
    def get(cls, name: str, mint_if_missing: bool = False, *, org: Optional[str] = None) -> "Volume":
        """The volume called ``name`` in ``org`` (default ``SAIL_ORG``, else ``default``);
        created when missing only if ``mint_if_missing``, else :class:`VolumeNotFoundError`."""
        from ._client import client
        from ._pb import volume_pb2 as pb

        c = client()
        ref = pb.VolumeRef(org=org or c.config.org, name=name)
        v = c.call(c.volumes.GetVolume, pb.GetVolumeRequest(volume=ref, mint_if_missing=mint_if_missing),
                   idempotent=True)
        return cls(name=v.name, org=v.org, id=v.id, head=v.head)

    @classmethod
    def list(cls, *, org: Optional[str] = None) -> List["Volume"]:
        """Every volume of ``org``."""
        from ._client import client
        from ._pb import volume_pb2 as pb

        c = client()
        r = c.call(c.volumes.ListVolumes, pb.ListVolumesRequest(org=org or c.config.org), idempotent=True)
        return [cls(name=v.name, org=v.org, id=v.id, head=v.head) for v in r.volumes]

    def log(self, limit: int = 100) -> List[VolumeCommit]:
        """The newest ``limit`` commits (at most 1000), newest first."""
        from ._client import client
        from ._pb import volume_pb2 as pb

        name, org = self._ref()
        c = client()
        r = c.call(c.volumes.Log, pb.LogRequest(volume=pb.VolumeRef(org=org or c.config.org, name=name),
                                                limit=limit), idempotent=True)
        return [VolumeCommit(id=x.id, seq=x.seq, parent=x.parent, time_unix_ms=x.time_unix_ms,
                             change_count=x.change_count, message=x.message, author=x.author) for x in r.commits]

    def listdir(self, path: str = "", *, commit: str = "") -> List[VolumeEntry]:
        """The entries of a directory in the head (or in ``commit``), by name; metadata only.
        A missing path raises :class:`VolumePathNotFoundError`."""
        from ._client import client
        from ._pb import volume_pb2 as pb

        name, org = self._ref()
        c = client()
        r = c.call(c.volumes.ListDir, pb.ListDirRequest(volume=pb.VolumeRef(org=org or c.config.org, name=name),
                                                        commit=commit, path=path), idempotent=True)
        return [VolumeEntry._from_pb(e.name, e.entry) for e in r.entries]

    def stat(self, path: str, *, commit: str = "") -> VolumeEntry:
        """One entry of the head (or of ``commit``); a missing path raises
        :class:`VolumePathNotFoundError`."""
        from ._client import client
        from ._pb import volume_pb2 as pb

        name, org = self._ref()
        c = client()
        r = c.call(c.volumes.Stat, pb.StatRequest(volume=pb.VolumeRef(org=org or c.config.org, name=name),
                                                  commit=commit, path=path), idempotent=True)
        return VolumeEntry._from_pb(path, r.entry)

    def delete(self) -> None:
        """Deletes the volume (its mounts keep their view until they reload)."""
        from ._client import client
        from ._pb import volume_pb2 as pb

        name, org = self._ref()
        c = client()
        c.call(c.volumes.DeleteVolume, pb.DeleteVolumeRequest(volume=pb.VolumeRef(org=org or c.config.org, name=name)),
               idempotent=True)

    def _ref(self) -> "tuple[str, str]":
        if self.name:
            return self.name, self.org
        if self.path:
            st = self.status()
            return str(st["volume"]), str(st["org"])
        raise VolumeFuseUnavailableError("this Volume names no volume: use Volume.get(name) or Volume.from_mount(path)")

    @classmethod
    def from_mount(cls, path: str | os.PathLike[str]) -> Volume:
        """The volume mounted at ``path`` (relative paths are resolved against the current
        directory).

        Raises :class:`VolumeFuseUnavailableError` if ``path`` is not a sail mount or its FUSE
        helper is gone.
        """
        abspath = os.path.abspath(os.fspath(path))
        _socket_path(abspath)
        return cls(abspath)

    def _call(self, op: str, timeout: float | None) -> dict[str, Any]:
        """Sends one request and returns the reply's result, or raises the reply's error."""
        if not self.path:
            raise _unavailable(self.name or "?", f"volume {self.name!r} is not mounted here: use Volume.from_mount(path)")
        sock_path = _socket_path(self.path)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(sock_path)
                s.sendall(json.dumps({"op": op}).encode() + b"\n")
                with s.makefile("rb") as r:
                    line = r.readline()
        except TimeoutError:
            raise _unavailable(
                self.path, f"no reply to {op!r} within {timeout} s (the helper may still finish it)"
            ) from None
        except OSError as e:
            raise _unavailable(self.path, f"control socket {sock_path}: {e.strerror or e}") from None
        if not line.strip():
            raise _unavailable(self.path, f"the helper closed the connection without replying to {op!r}")
        try:
            reply = json.loads(line)
        except ValueError as e:
            raise SailError(f"malformed reply from the FUSE helper of {self.path}: {e}") from None
        if not isinstance(reply, dict):
            raise SailError(f"malformed reply from the FUSE helper of {self.path}: {line!r}")
        if reply.get("ok") is True:
            result = reply.get("result")
            return result if isinstance(result, dict) else {}
        err = reply.get("error")
        err = err if isinstance(err, dict) else {}
        message = err.get("message") or line.decode(errors="replace").strip()
        raise error_for(str(err.get("name") or "SailError"), str(message))

    def commit_details(self, timeout: float | None = None) -> dict[str, Any]:
        """Commits the mount's local changes and returns the full result: ``commit``, ``seq``
        (0 when there was nothing to commit), ``merged``, ``upserts``, ``deletes``,
        ``chunks_hashed``, ``chunks_uploaded``, ``bytes_uploaded``, ``elapsed_ms``.

        Waits without limit unless ``timeout`` (seconds) is given: big commits take minutes.
        """
        return self._call("commit", timeout)

    def commit(self, timeout: float | None = None) -> str:
        """Commits the mount's local changes and returns the commit id (64 hex digits; the
        current head when nothing changed)."""
        return str(self.commit_details(timeout)["commit"])

    def reload_details(self, timeout: float | None = None) -> dict[str, Any]:
        """Switches the mount to the volume's newest commit, discarding its uncommitted
        changes, and returns the full result: ``commit``, ``previous``, ``discarded``,
        ``elapsed_ms``. Waits without limit unless ``timeout`` (seconds) is given."""
        return self._call("reload", timeout)

    def reload(self, timeout: float | None = None) -> str:
        """Switches the mount to the newest commit (discarding uncommitted changes) and
        returns its id."""
        return str(self.reload_details(timeout)["commit"])

    def status(self, timeout: float | None = 30.0) -> dict[str, Any]:
        """The mount's state: ``mountpoint``, ``endpoint``, ``org``, ``volume``, ``head``,
        ``dirty_entries``, ``dirty_files``, ``dirty_bytes``, ``pending_deletes``, the memory
        and disk cache counters, and the helper's ``pid``."""
        return self._call("status", timeout)

    def unmount(self, timeout: float | None = 30.0) -> None:
        """Asks the helper to unmount and exit (uncommitted changes are lost)."""
        self._call("unmount", timeout)

    def __repr__(self) -> str:
        if self.path:
            return f"Volume.from_mount({self.path!r})"
        return f"Volume.get({self.name!r})"
