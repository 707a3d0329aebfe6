"""Sailboxes: persistent Linux microVMs (DESIGN 2.2) and the apps that name them.

    import sail

    app = sail.App.find(name="demo", mint_if_missing=True)
    with sail.Sailbox.create(app=app, image="debian") as sb:
        print(sb.exec("echo hi").wait().stdout)
        sb.write("/tmp/x.txt", "hello")
        assert sb.read("/tmp/x.txt") == b"hello"
"""

from __future__ import annotations

import enum
import io
import os
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)

from ._client import Client, client
from .errors import (
    ImageBuildError,
    SailboxError,
    SailboxTerminatedError,
    SailError,
    SailTimeoutError,
)

if TYPE_CHECKING:
    from .functions import SailFunction
    from .volume import Volume

#: Bytes per WriteFile message (the service accepts up to 4 MiB).
WRITE_CHUNK = 1 << 20
#: Extra seconds a client deadline allows past a server-side wait.
_GRACE = 30.0
_INF = float("inf")


class SailboxState(str, enum.Enum):
    """Where a sailbox is in its life."""

    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    SLEEPING = "sleeping"
    TERMINATED = "terminated"
    #: Its host failed and there was no checkpoint to restore it from.
    LOST = "lost"
    UNKNOWN = "unknown"

    @classmethod
    def _from_pb(cls, value: int) -> "SailboxState":
        from ._pb import sailbox_pb2 as pb

        names: Dict[int, SailboxState] = {
            pb.SAILBOX_STATE_CREATING: cls.CREATING,
            pb.SAILBOX_STATE_RUNNING: cls.RUNNING,
            pb.SAILBOX_STATE_PAUSED: cls.PAUSED,
            pb.SAILBOX_STATE_SLEEPING: cls.SLEEPING,
            pb.SAILBOX_STATE_TERMINATED: cls.TERMINATED,
            pb.SAILBOX_STATE_LOST: cls.LOST,
        }
        return names.get(value, cls.UNKNOWN)


@dataclass(frozen=True)
class App:
    """A namespace of sailboxes, found or minted by name."""

    #: The app's name.
    name: str
    #: When it was minted (Unix ms).
    created_unix_ms: int = 0
    #: Whether the call that returned it minted it.
    minted: bool = False

    @classmethod
    def find(cls, name: str, mint_if_missing: bool = True, *, timeout: Optional[float] = None) -> "App":
        """The app called ``name``; minted when missing unless ``mint_if_missing=False``,
        in which case an unknown app raises :class:`SailboxError` (code ``NOT_FOUND``)."""
        from ._pb import sailbox_pb2 as pb

        c = client()
        r = c.call(
            c.sailboxes.GetApp, pb.GetAppRequest(name=name, mint_if_missing=mint_if_missing),
            idempotent=True, timeout=timeout,
        )
        return cls(name=r.name, created_unix_ms=r.created_unix_ms, minted=r.minted)


@dataclass(frozen=True)
class SailboxExecResult:
    """What a finished exec request produced."""

    #: Standard output, decoded as UTF-8 (undecodable bytes replaced).
    stdout: str
    #: Standard error, decoded the same way.
    stderr: str
    #: The exit code: 124 when the timeout killed it, 128+N when signal N did.
    returncode: int
    #: The exec request's id.
    exec_id: str = ""
    #: The raw bytes of stdout (at most 16 MiB are kept; see ``stdout_truncated``).
    stdout_bytes: bytes = b""
    #: The raw bytes of stderr.
    stderr_bytes: bytes = b""
    #: Whether the timeout ended the command.
    timed_out: bool = False
    #: Whether stdout produced more than the 16 MiB kept.
    stdout_truncated: bool = False
    #: Whether stderr produced more than the 16 MiB kept.
    stderr_truncated: bool = False
    #: The command line that ran.
    command: str = ""

    @classmethod
    def _from_pb(cls, r: Any) -> "SailboxExecResult":
        return cls(
            stdout=r.stdout.decode("utf-8", "replace"),
            stderr=r.stderr.decode("utf-8", "replace"),
            returncode=r.return_code,
            exec_id=r.exec_id,
            stdout_bytes=bytes(r.stdout),
            stderr_bytes=bytes(r.stderr),
            timed_out=r.timed_out,
            stdout_truncated=r.stdout_truncated,
            stderr_truncated=r.stderr_truncated,
            command=r.command,
        )


class SailboxExecRequest:
    """A durable exec request: it runs whether or not anyone waits, and can be waited on
    again by id, from any process (:meth:`from_id`)."""

    def __init__(self, exec_id: str, sailbox_id: str = "") -> None:
        #: The request's id.
        self.id = exec_id
        #: The sailbox it runs in ("" when made with :meth:`from_id`).
        self.sailbox_id = sailbox_id
        self._result: Optional[SailboxExecResult] = None

    @classmethod
    def from_id(cls, exec_id: str) -> "SailboxExecRequest":
        """A handle to an existing request (an unknown id raises
        :class:`SailboxExecRequestNotFoundError` when waited on)."""
        return cls(exec_id)

    def wait(self, timeout: Optional[float] = None) -> SailboxExecResult:
        """Waits until the command finishes and returns its result. ``timeout`` (seconds)
        bounds the wait only, not the command: past it :class:`SailTimeoutError` is raised
        and the command keeps running."""
        if self._result is not None:
            return self._result
        from ._pb import sailbox_pb2 as pb

        c = client()
        ms = 0 if timeout is None else max(1, int(timeout * 1000))
        r = c.call(
            c.sailboxes.WaitExec, pb.WaitExecRequest(exec_id=self.id, timeout_ms=ms),
            idempotent=True, timeout=_INF if timeout is None else timeout + _GRACE,
        )
        self._result = SailboxExecResult._from_pb(r)
        self.sailbox_id = self.sailbox_id or r.sailbox_id
        return self._result

    def stream(self, timeout: Optional[float] = None) -> Iterator[Tuple[str, bytes]]:
        """Yields ``("stdout" | "stderr", data)`` as the command writes it (from the start,
        also for a request that already finished); afterwards :meth:`wait` returns the
        result at once."""
        from ._pb import sailbox_pb2 as pb

        c = client()
        ms = 0 if timeout is None else max(1, int(timeout * 1000))
        for ev in c.stream(c.sailboxes.StreamExec, pb.WaitExecRequest(exec_id=self.id, timeout_ms=ms),
                           timeout=None if timeout is None else timeout + _GRACE):
            kind = ev.WhichOneof("event")
            if kind == "stdout":
                yield "stdout", bytes(ev.stdout)
            elif kind == "stderr":
                yield "stderr", bytes(ev.stderr)
            elif kind == "result":
                self._result = SailboxExecResult._from_pb(ev.result)

    def __repr__(self) -> str:
        return f"SailboxExecRequest({self.id!r})"


@dataclass(frozen=True)
class SailboxListener:
    """A host listener that forwards to a guest port given at create."""

    #: The guest port.
    port: int
    #: ``http://host:port`` of the host listener.
    url: str
    #: ``host:port`` of the host listener.
    host_addr: str
    #: ``"routed"`` once the guest accepts connections on the port, else ``"pending"``.
    route_status: str
    #: The sailbox.
    sailbox_id: str = ""

    @property
    def routed(self) -> bool:
        """Whether the guest accepts connections on the port."""
        return self.route_status == "routed"

    def wait(self, timeout: float = 60.0) -> "SailboxListener":
        """Waits up to ``timeout`` seconds until the guest accepts connections on the port
        and returns the updated listener; raises :class:`SailTimeoutError` if it does not."""
        got = _listeners(self.sailbox_id, self.port, wait=timeout)
        if not got or not got[0].routed:
            raise SailTimeoutError(f"port {self.port} of sailbox {self.sailbox_id} did not route within {timeout} s")
        return got[0]

    @classmethod
    def _from_pb(cls, l: Any, sailbox_id: str) -> "SailboxListener":
        return cls(port=l.port, url=l.url, host_addr=l.host_addr,
                   route_status="routed" if l.routed else "pending", sailbox_id=sailbox_id)


def _listeners(sailbox_id: str, port: int = 0, wait: Optional[float] = None) -> List[SailboxListener]:
    from ._pb import sailbox_pb2 as pb

    c = client()
    ms = int(wait * 1000) if wait else 0
    r = c.call(
        c.sailboxes.Listeners, pb.ListenersRequest(sailbox_id=sailbox_id, port=port, wait_routed_ms=ms),
        idempotent=True, timeout=None if not wait else wait + _GRACE,
    )
    return [SailboxListener._from_pb(l, sailbox_id) for l in r.listeners]


@dataclass(frozen=True)
class Checkpoint:
    """A completed checkpoint: memory and writable disk stored as chunks."""

    #: ``ck-...``: any host sharing the chunk store can restore it.
    id: str
    #: The sailbox it was taken of.
    sailbox_id: str
    #: How long the guest was stopped, ms.
    pause_ms: int
    #: Until it was durable, ms.
    total_ms: int
    #: Guest memory regions written since the previous checkpoint, bytes.
    memory_bytes_changed: int
    #: Of those, what the store did not have.
    memory_bytes_uploaded: int
    #: Writable disk changed since the previous checkpoint, bytes.
    disk_bytes_changed: int
    #: The checkpoint before it ("" if none).
    parent: str = ""

    @classmethod
    def _from_pb(cls, c: Any) -> "Checkpoint":
        return cls(id=c.checkpoint_id, sailbox_id=c.sailbox_id, pause_ms=c.pause_ms, total_ms=c.total_ms,
                   memory_bytes_changed=c.memory_bytes_changed, memory_bytes_uploaded=c.memory_bytes_uploaded,
                   disk_bytes_changed=c.disk_bytes_changed, parent=c.parent_checkpoint)


Data = Union[bytes, bytearray, memoryview, str, BinaryIO, IO[bytes]]


class Sailbox:
    """A handle to a sailbox. Get one with :meth:`create`, :meth:`connect` or
    :meth:`list`; use it as a context manager to terminate it on exit."""

    def __init__(self, info: Any) -> None:
        self._info = info
        self._runtime: Optional[str] = None  # the function runtime uploaded (function.py)

    # -- finding and creating ------------------------------------------------------------

    @classmethod
    def create(
        cls,
        app: Union[App, str, None] = None,
        image: Union[str, Any, None] = None,
        name: str = "",
        cpu: float = 1,
        memory_mib: int = 1024,
        disk_gib: int = 8,
        ingress_ports: Optional[Sequence[int]] = None,
        volumes: Optional[Mapping[str, Union["Volume", str]]] = None,
        image_build_timeout: Optional[float] = None,
        network: str = "outbound",
        timeout: Optional[float] = None,
    ) -> "Sailbox":
        """Creates a sailbox and returns once its VM runs.

        ``cpu > 0``; ``memory_mib`` in 1024..=65536; ``disk_gib`` in 1..=64;
        ``ingress_ports`` unique in 1..=65535, never 22 or 10000; ``volumes`` maps absolute
        guest paths (not ``/``) to :class:`Volume` handles (or names). Out-of-range
        arguments raise :class:`SailboxCreationError` before anything is created.
        ``image`` is ``"debian"`` (default), ``"minimal"``, an image id or a
        :class:`sail.Image` definition (built first when needed);
        ``image_build_timeout`` bounds preparing it (:class:`ImageBuildError` past it).
        ``network="none"`` gives the guest no outbound network. ``timeout`` bounds the
        create call itself (default: 10 minutes; VMs boot slowly under emulation).
        """
        from ._pb import sailbox_pb2 as pb

        from .image import Image

        # The image first, under its own bound (a first Debian build takes minutes), so the
        # create call's deadline covers only the VM; an image already built answers at once.
        if isinstance(image, Image):
            image_name = image.build(timeout=image_build_timeout)
        else:
            image_name = _image_name(image)
            ensure_image(image_name, timeout=image_build_timeout)
        mounts: Dict[str, Any] = {}
        for path, vol in (volumes or {}).items():
            if isinstance(vol, str):
                mounts[path] = pb.VolumeMount(volume=vol)
            else:
                if not getattr(vol, "name", ""):
                    raise SailboxError(f"volume for {path!r} has no name: pass sail.Volume.get(name)")
                mounts[path] = pb.VolumeMount(volume=vol.name, org=vol.org or "")
        req = pb.CreateSailboxRequest(
            app=app.name if isinstance(app, App) else (app or ""),
            image=image_name,
            name=name,
            cpu=float(cpu),
            memory_mib=int(memory_mib),
            disk_gib=int(disk_gib),
            ingress_ports=[int(p) for p in (ingress_ports or ())],
            volumes=mounts,
            network=network,
        )
        c = client()
        return cls(c.call(c.sailboxes.CreateSailbox, req, idempotent=False, timeout=timeout or 600.0))

    @classmethod
    def connect(cls, sailbox_id: str, *, timeout: Optional[float] = None) -> "Sailbox":
        """A handle to an existing sailbox; resumes it first if it is paused or sleeping.
        Unknown ids raise :class:`SailboxError` (code ``NOT_FOUND``)."""
        from ._pb import sailbox_pb2 as pb

        c = client()
        info = c.call(c.sailboxes.GetSailbox, pb.GetSailboxRequest(sailbox_id=sailbox_id, connect=True),
                      idempotent=True, timeout=timeout or 600.0)
        return cls(info)

    @classmethod
    def list(
        cls,
        app: Union[App, str, None] = None,
        max_guest_schema_version: Optional[int] = None,
        states: Optional[Iterable[SailboxState]] = None,
    ) -> List["Sailbox"]:
        """Sailboxes of ``app`` (default: every app), oldest first, every state but
        terminated unless ``states`` says; ``max_guest_schema_version`` keeps those whose
        agent is at most that version."""
        from ._pb import sailbox_pb2 as pb

        wanted = [getattr(pb, f"SAILBOX_STATE_{SailboxState(s).name}") for s in (states or ())
                  if SailboxState(s) is not SailboxState.UNKNOWN]
        req = pb.ListSailboxesRequest(
            app=app.name if isinstance(app, App) else (app or ""),
            states=wanted,
            max_guest_schema_version=max_guest_schema_version or 0,
        )
        c = client()
        return [cls(s) for s in c.call(c.sailboxes.ListSailboxes, req, idempotent=True).sailboxes]

    # -- what it is ----------------------------------------------------------------------

    @property
    def id(self) -> str:
        """The sailbox id."""
        return str(self._info.sailbox_id)

    @property
    def app(self) -> str:
        """Its app's name."""
        return str(self._info.app)

    @property
    def name(self) -> str:
        """Its name ("" if none)."""
        return str(self._info.name)

    @property
    def image(self) -> str:
        """The image id its disk was made from."""
        return str(self._info.image)

    @property
    def state(self) -> SailboxState:
        """Its state now (asks the service)."""
        return SailboxState._from_pb(self.refresh()._info.state)

    @property
    def guest_schema_version(self) -> int:
        """The version of its in-guest agent (as of the last answer about it)."""
        return int(self._info.guest_schema_version)

    @property
    def info(self) -> Any:
        """The service's last full answer about it (``sail.sailbox.v1.Sailbox``)."""
        return self._info

    def refresh(self) -> "Sailbox":
        """Re-reads its record (without resuming it) and returns ``self``."""
        from ._pb import sailbox_pb2 as pb

        c = client()
        self._info = c.call(c.sailboxes.GetSailbox, pb.GetSailboxRequest(sailbox_id=self.id), idempotent=True)
        return self

    # -- exec and functions --------------------------------------------------------------

    def exec(
        self,
        command: Union[str, Sequence[str], "SailFunction", Callable[..., Any]],
        *args: Any,
        timeout: Optional[float] = None,
        cwd: Optional[str] = None,
        background: bool = False,
        env: Optional[Mapping[str, str]] = None,
        **kwargs: Any,
    ) -> Any:
        """Starts a command and returns its :class:`SailboxExecRequest`.

        ``command`` is a shell command line (run with ``/bin/sh -c``) or a list of words
        (quoted for the shell). ``timeout`` (seconds) bounds its runtime; ``cwd`` is an
        absolute directory; ``background=True`` launches it detached and ``wait()`` only
        waits for the launcher. One exec request runs at a time per sailbox (a second
        raises :class:`SailboxExecAlreadyRunningError`).

        With a function (``@sail.function()`` or any callable), runs
        ``command(*args, **kwargs)`` inside the sailbox with the image's python3 and returns
        its value (see :mod:`sail.functions`); ``background`` is refused for functions.
        """
        if not isinstance(command, (str, list, tuple)):
            if background:
                raise SailboxError("background=True is not allowed with a function: it returns a value")
            from .functions import SailFunction

            fn = command if isinstance(command, SailFunction) else SailFunction(cast(Callable[..., Any], command))
            return fn._run_in(self, args, kwargs, timeout=timeout, cwd=cwd, env=env)
        if args or kwargs:
            raise SailboxError("extra arguments are only for functions; pass a list to quote words")
        return self._exec(command, timeout=timeout, cwd=cwd, background=background, env=env)

    def _exec(
        self,
        command: Union[str, Sequence[str]],
        *,
        timeout: Optional[float] = None,
        cwd: Optional[str] = None,
        background: bool = False,
        env: Optional[Mapping[str, str]] = None,
    ) -> SailboxExecRequest:
        from ._pb import sailbox_pb2 as pb

        line = command if isinstance(command, str) else " ".join(shlex.quote(str(w)) for w in command)
        req = pb.ExecRequest(
            sailbox_id=self.id,
            command=line,
            cwd=cwd or "",
            timeout_ms=0 if timeout is None else max(1, int(timeout * 1000)),
            background=background,
            env=dict(env or {}),
        )
        c = client()
        # Exec wakes a sleeping sailbox, which takes a while under emulation.
        h = c.call(c.sailboxes.Exec, req, idempotent=False, timeout=600.0)
        return SailboxExecRequest(h.exec_id, h.sailbox_id)

    # -- files ---------------------------------------------------------------------------

    def write(self, path: str, data: Data, mode: int = 0o644, *, timeout: Optional[float] = None) -> int:
        """Writes ``data`` (bytes, str as UTF-8, or a binary file object, streamed in 1 MiB
        messages) to the absolute ``path``, creating missing parent directories; the file
        appears whole, atomically. Returns the bytes written."""
        from ._pb import sailbox_pb2 as pb

        source, size, cleanup = _source(data)
        # gRPC turns an exception raised while producing the messages into a bare CANCELLED:
        # keep it and raise it instead.
        failed: List[BaseException] = []

        def messages() -> Iterator[Any]:
            try:
                yield pb.WriteFileRequest(sailbox_id=self.id, path=path, mode=mode, size=size)
                sent = 0
                while sent < size:
                    chunk = source.read(min(WRITE_CHUNK, size - sent))
                    if not chunk:
                        raise SailError(f"the data for {path} ended after {sent} of {size} bytes")
                    sent += len(chunk)
                    yield pb.WriteFileRequest(data=chunk)
            except BaseException as e:
                failed.append(e)
                raise

        try:
            c = client()
            try:
                r = c.call(c.sailboxes.WriteFile, messages(), idempotent=False,
                           timeout=timeout if timeout is not None else _INF)
            except SailError:
                if failed and not isinstance(failed[0], GeneratorExit):
                    e = failed[0]
                    if isinstance(e, SailError):
                        raise e from None
                    raise SailError(f"reading the data for {path} failed: {type(e).__name__}: {e}") from e
                raise
            return int(r.bytes_written)
        finally:
            cleanup()

    def read_stream(self, path: str, *, timeout: Optional[float] = None) -> Iterator[bytes]:
        """Yields a regular file's bytes as they arrive."""
        from ._pb import sailbox_pb2 as pb

        c = client()
        for m in c.stream(c.sailboxes.ReadFile, pb.ReadFileRequest(sailbox_id=self.id, path=path), timeout=timeout):
            if m.data:
                yield bytes(m.data)

    def read(self, path: str, *, timeout: Optional[float] = None) -> bytes:
        """A regular file's bytes (a missing file raises :class:`SailboxError`, code
        ``NOT_FOUND``)."""
        return b"".join(self.read_stream(path, timeout=timeout))

    # -- ingress -------------------------------------------------------------------------

    def listener(self, port: int) -> SailboxListener:
        """The listener of a port given at create (others raise :class:`SailboxExecutionError`)."""
        got = _listeners(self.id, port)
        if not got:
            raise SailboxError(f"sailbox {self.id} has no listener for port {port}")
        return got[0]

    def listeners(self) -> List[SailboxListener]:
        """Every listener, by port."""
        return _listeners(self.id)

    # -- lifecycle -----------------------------------------------------------------------

    def _lifecycle(self, method: str, timeout: Optional[float]) -> Any:
        from ._pb import sailbox_pb2 as pb

        c = client()
        return c.call(getattr(c.sailboxes, method), pb.SailboxIdRequest(sailbox_id=self.id),
                      idempotent=False, timeout=timeout or 600.0)

    def checkpoint(self, *, timeout: Optional[float] = None) -> Checkpoint:
        """Snapshots memory and writable disk while it keeps running."""
        return Checkpoint._from_pb(self._lifecycle("CheckpointSailbox", timeout))

    def pause(self, *, timeout: Optional[float] = None) -> "Sailbox":
        """Checkpoints and powers down until :meth:`resume` (exec fails meanwhile; ingress
        does not wake it)."""
        self._info = self._lifecycle("Pause", timeout)
        return self

    def sleep(self, call: str = "", *, timeout: Optional[float] = None) -> "Sailbox":
        """Checkpoints and powers down until ingress, an exec or :meth:`resume` wakes it
        (or, with ``call``, the completion of that named external call)."""
        from ._pb import sailbox_pb2 as pb

        c = client()
        self._info = c.call(c.sailboxes.Sleep, pb.SleepRequest(sailbox_id=self.id, call=call),
                            idempotent=False, timeout=timeout or 600.0)
        return self

    def complete_call(self, call: str, *, timeout: Optional[float] = None) -> "Sailbox":
        """Reports that the external call a :meth:`sleep` waits on completed: wakes it."""
        from ._pb import sailbox_pb2 as pb

        c = client()
        self._info = c.call(c.sailboxes.CompleteCall, pb.CompleteCallRequest(sailbox_id=self.id, call=call),
                            idempotent=False, timeout=timeout or 600.0)
        return self

    def resume(self, *, timeout: Optional[float] = None) -> "Sailbox":
        """Powers a paused or sleeping sailbox back on from its checkpoint."""
        self._info = self._lifecycle("Resume", timeout)
        return self

    def fork(self, *, timeout: Optional[float] = None) -> "Sailbox":
        """A new running sailbox from this one's current memory and disk (a paused or
        sleeping one is forked from its last checkpoint without waking it)."""
        return Sailbox(self._lifecycle("Fork", timeout).child)

    def upgrade(self, *, timeout: Optional[float] = None) -> bool:
        """Reboots onto the newest in-guest agent and returns True (or True at once if it is
        current); on a paused or sleeping sailbox records it for the next wake and returns
        False."""
        r = self._lifecycle("Upgrade", timeout)
        self._info = r.sailbox
        return bool(r.applied)

    def terminate(self, *, timeout: Optional[float] = None) -> None:
        """Destroys it for good (its volumes are kept)."""
        from ._pb import sailbox_pb2 as pb

        c = client()
        self._info = c.call(c.sailboxes.Terminate, pb.TerminateRequest(sailbox_id=self.id),
                            idempotent=False, timeout=timeout or 120.0)

    def __enter__(self) -> "Sailbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.terminate()
        except SailboxTerminatedError:
            pass

    def __repr__(self) -> str:
        return f"Sailbox({self.id!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sailbox) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


def _image_name(image: Any) -> str:
    if image is None:
        return ""
    if isinstance(image, str):
        return image
    ident = getattr(image, "id", None) or getattr(image, "image_id", None)
    if isinstance(ident, str) and ident:
        return ident
    raise SailboxError(f"image must be a name or an image id, not {type(image).__name__}")


def ensure_image(image: str = "", *, timeout: Optional[float] = None,
                 on_progress: Optional[Callable[[str], None]] = None) -> str:
    """Builds (once per host) or assembles an image and returns its id; ``on_progress``
    receives each progress line. Past ``timeout`` seconds, or on failure, raises
    :class:`ImageBuildError`."""
    from ._pb import sailbox_pb2 as pb

    c = client()
    image_id = ""
    try:
        for p in c.stream(c.sailboxes.EnsureImage, pb.EnsureImageRequest(image=image), timeout=timeout):
            if on_progress and p.message:
                on_progress(p.message)
            if p.image_id:
                image_id = p.image_id
    except SailTimeoutError as e:
        raise ImageBuildError(f"image {image or 'debian'!r} was not ready within {timeout} s: {e.message}",
                              code=e.code) from None
    if not image_id:
        raise ImageBuildError(f"image {image or 'debian'!r}: the service ended the build without an image id")
    return image_id


def _source(data: Data) -> Tuple[BinaryIO, int, Callable[[], None]]:
    """A readable binary stream over ``data``, its size, and what to do after."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data).cast("B")
        return io.BytesIO(mv), mv.nbytes, lambda: None  # type: ignore[arg-type]
    if not hasattr(data, "read"):
        raise SailboxError(f"write() takes bytes, str or a binary file object, not {type(data).__name__}")
    f: Any = data
    if isinstance(f, io.TextIOBase):
        raise SailboxError("write() needs a binary file object (open it with 'rb')")
    # A regular file or a seekable stream: its remaining size without reading it.
    try:
        fd = f.fileno()
        st = os.fstat(fd)
        import stat as _stat

        if _stat.S_ISREG(st.st_mode):
            return f, st.st_size - f.tell(), lambda: None
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    try:
        if f.seekable():
            here = f.tell()
            end = f.seek(0, io.SEEK_END)
            f.seek(here)
            return f, end - here, lambda: None
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    # A pipe or a generator-like stream: spool it to a temporary file first (the service
    # needs the size up front), so memory stays bounded.
    tmp = tempfile.TemporaryFile()
    while True:
        chunk = f.read(WRITE_CHUNK)
        if not chunk:
            break
        if isinstance(chunk, str):
            raise SailboxError("write() needs a binary file object (open it with 'rb')")
        tmp.write(chunk)
    size = tmp.tell()
    tmp.seek(0)
    return tmp, size, tmp.close
