"""`Volume`: a handle to a mounted volume, talking to the mount's FUSE helper over its
control socket (one JSON object per line; see docs/guest-fuse.md)."""

from __future__ import annotations

import errno
import json
import os
import socket
from typing import Any

from .errors import SailError, VolumeFuseUnavailableError, error_for

CONTROL_XATTR = "user.sail.control"


def _socket_path(mount: str) -> str:
    """Reads the control socket path from the mount root's extended attribute."""
    try:
        return os.getxattr(mount, CONTROL_XATTR).decode()
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            why = "the FUSE helper is not running (dead mount)"
        elif e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            why = "not a sail volume mount"
        else:
            why = f"cannot read {CONTROL_XATTR}: {e}"
        raise VolumeFuseUnavailableError(f"FUSE helper unavailable for {mount}: {why}") from None


class Volume:
    """A volume mounted at `path` (use `Volume.from_mount`)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def from_mount(cls, path: str | os.PathLike[str]) -> "Volume":
        """The volume mounted at `path`. Raises VolumeFuseUnavailableError if no FUSE helper
        serves it."""
        path = os.path.abspath(os.fspath(path))
        _socket_path(path)
        return cls(path)

    def _call(self, op: str, timeout: float | None) -> dict[str, Any]:
        sock_path = _socket_path(self.path)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(sock_path)
                s.sendall(json.dumps({"op": op}).encode() + b"\n")
                line = s.makefile("rb").readline()
        except OSError as e:
            raise VolumeFuseUnavailableError(
                f"FUSE helper unavailable for {self.path}: {sock_path}: {e}"
            ) from None
        if not line:
            raise VolumeFuseUnavailableError(
                f"FUSE helper unavailable for {self.path}: it closed the connection"
            )
        try:
            reply = json.loads(line)
        except ValueError as e:
            raise SailError(f"malformed reply from the FUSE helper: {e}") from None
        if reply.get("ok"):
            return reply.get("result") or {}
        err = reply.get("error") or {}
        raise error_for(str(err.get("name", "SailError")), str(err.get("message", "")))

    def commit_details(self, timeout: float | None = None) -> dict[str, Any]:
        """Commits local changes; returns the full result (commit, seq, merged, upserts,
        deletes, chunks_hashed, chunks_uploaded, bytes_uploaded, elapsed_ms)."""
        return self._call("commit", timeout)

    def commit(self, timeout: float | None = None) -> str:
        """Commits local changes and returns the commit id (the current head when nothing
        changed)."""
        return str(self.commit_details(timeout)["commit"])

    def reload_details(self, timeout: float | None = None) -> dict[str, Any]:
        """Switches to the newest commit, discarding uncommitted changes; returns the full
        result (commit, previous, discarded, elapsed_ms)."""
        return self._call("reload", timeout)

    def reload(self, timeout: float | None = None) -> str:
        """Switches to the newest commit (discarding uncommitted changes); returns its id."""
        return str(self.reload_details(timeout)["commit"])

    def status(self, timeout: float | None = 30.0) -> dict[str, Any]:
        """The mount's head, dirty entries/files/bytes and cache counters."""
        return self._call("status", timeout)

    def __repr__(self) -> str:
        return f"Volume.from_mount({self.path!r})"
