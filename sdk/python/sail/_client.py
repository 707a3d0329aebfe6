"""The gRPC client under every remote call: configuration, the channel, the API key,
deadlines, retries and the mapping of gRPC failures to the contract's errors.

``grpc`` and the generated stubs are imported on first use, so ``import sail`` (and the
in-guest :meth:`Volume.from_mount`) needs only the standard library.

Configuration (environment):

- ``SAIL_API_URL`` (or ``SAIL_ENDPOINT``, same meaning): the service, ``http://host:port``
  (plaintext) or ``https://host:port`` (TLS); default ``http://127.0.0.1:7420``, where
  ``sail up`` listens.
- ``SAIL_API_KEY``: sent with every call as ``authorization: Bearer <key>``; without it, the
  key ``sail up`` kept for the endpoint on this machine (``<config>/keys/<host>_<port>``,
  ``<config>`` being ``$SAIL_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/sail``, else
  ``~/.config/sail``; the same rule as the CLI's, see the ``tenancy`` crate).
- ``SAIL_ORG``: the org to act in (default: the API key's own; only an operator key names
  another).
- ``SAIL_TIMEOUT``: the default deadline of a unary call in seconds (default 60).
"""

from __future__ import annotations

import os
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, TypeVar

from .errors import (
    SailAuthenticationError,
    SailConnectionError,
    SailError,
    SailTimeoutError,
    error_for,
)

DEFAULT_ENDPOINT = "http://127.0.0.1:7420"
#: Messages up to this size each way (file chunks are 1 MiB; results up to 2 x 16 MiB).
MAX_MESSAGE = 64 << 20
#: Attempts of an idempotent call on a transport failure (exponential backoff between).
ATTEMPTS = 5
T = TypeVar("T")


@dataclass(frozen=True)
class Config:
    """Where and as whom the SDK calls (see the module docs for the environment)."""

    #: ``http://host:port`` or ``https://host:port``.
    endpoint: str = DEFAULT_ENDPOINT
    #: Sent as ``authorization: Bearer <key>``; empty sends nothing.
    api_key: str = ""
    #: The org to act in ("": the API key's own).
    org: str = ""
    #: Default deadline of a unary call, seconds.
    timeout: float = 60.0

    @classmethod
    def from_env(cls) -> "Config":
        """The configuration the environment gives."""
        endpoint = os.environ.get("SAIL_API_URL") or os.environ.get("SAIL_ENDPOINT") or DEFAULT_ENDPOINT
        timeout = os.environ.get("SAIL_TIMEOUT")
        return cls(
            endpoint=endpoint,
            api_key=os.environ.get("SAIL_API_KEY", "").strip() or _saved_key(endpoint),
            org=os.environ.get("SAIL_ORG") or "",
            timeout=float(timeout) if timeout else 60.0,
        )


def _config_dir() -> str:
    """``$SAIL_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/sail``, else ``~/.config/sail``."""
    if os.environ.get("SAIL_CONFIG_DIR"):
        return os.environ["SAIL_CONFIG_DIR"]
    if os.environ.get("XDG_CONFIG_HOME"):
        return os.path.join(os.environ["XDG_CONFIG_HOME"], "sail")
    return os.path.join(os.path.expanduser("~"), ".config", "sail")


def _key_file_name(endpoint: str) -> str:
    """``<host>_<port>``, every loopback host spelled ``loopback`` (as ``tenancy`` names it)."""
    import ipaddress

    scheme, _, rest = endpoint.partition("://") if "://" in endpoint else ("http", "", endpoint)
    authority = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host, port = authority, ("443" if scheme == "https" else "80")
    head, sep, tail = authority.rpartition(":")
    if sep and tail.isdigit() and (":" not in head or head.endswith("]")):
        host, port = head, tail
    host = host.strip("[]").lower()
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback or host in ("localhost", "0.0.0.0", "::"):
        host = "loopback"
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in ".-" else "_" for c in host)
    return f"{safe}_{port}"


def _saved_key(endpoint: str) -> str:
    """The key ``sail up`` kept for ``endpoint`` on this machine, or ""."""
    try:
        with open(os.path.join(_config_dir(), "keys", _key_file_name(endpoint))) as f:
            return f.read().strip()
    except OSError:
        return ""


def _target(endpoint: str) -> Tuple[str, bool]:
    """``host:port`` and whether to use TLS, from an endpoint URL (a bare ``host:port`` is
    plaintext)."""
    if "://" not in endpoint:
        return endpoint, False
    u = urllib.parse.urlsplit(endpoint)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise SailError(f"bad service address {endpoint!r}: expected http://host:port or https://host:port")
    port = u.port or (443 if u.scheme == "https" else 80)
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{host}:{port}", u.scheme == "https"


class Client:
    """One channel to the service and its stubs. Thread-safe; get the shared one with
    :func:`client`."""

    def __init__(self, config: Config) -> None:
        import grpc

        from ._pb import sailbox_pb2_grpc, volume_pb2_grpc

        self.config = config
        target, tls = _target(config.endpoint)
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 0),
        ]
        if tls:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.sailboxes = sailbox_pb2_grpc.SailboxServiceStub(self.channel)
        self.volumes = volume_pb2_grpc.VolumeServiceStub(self.channel)
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.api_key}"),) if config.api_key else ()
        )

    def metadata(self) -> Tuple[Tuple[str, str], ...]:
        """What every call carries (the API key)."""
        return self._metadata

    def call(
        self,
        method: Callable[..., T],
        request: Any,
        *,
        idempotent: bool,
        timeout: Optional[float] = None,
    ) -> T:
        """One unary call with a deadline (``timeout`` seconds, else the configured default;
        ``float('inf')`` for none). Idempotent calls are retried with exponential backoff
        on transport failures (the service unreachable or the connection lost); a status the
        server sent is never retried. Failures raise :class:`SailError` subclasses."""
        import grpc

        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return method(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as e:
                if idempotent and attempt < ATTEMPTS and _transient(e):
                    pause = min(2.0, 0.1 * 2 ** (attempt - 1)) * (0.5 + random.random())
                    if deadline is None or time.monotonic() + pause < deadline:
                        time.sleep(pause)
                        continue
                raise self.error(e) from None

    def stream(
        self, method: Callable[..., Iterator[T]], request: Any, *, timeout: Optional[float] = None
    ) -> Iterator[T]:
        """A server-streaming call; failures (at the start or midway) raise
        :class:`SailError` subclasses. ``timeout`` bounds the whole stream (default: none)."""
        import grpc

        deadline = self._deadline(timeout if timeout is not None else float("inf"))
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        call: Any = method(request, timeout=remaining, metadata=self._metadata)
        try:
            for item in call:
                yield item
        except grpc.RpcError as e:
            raise self.error(e) from None
        finally:
            call.cancel()

    def _deadline(self, timeout: Optional[float]) -> Optional[float]:
        t = self.config.timeout if timeout is None else timeout
        return None if t == float("inf") else time.monotonic() + t

    def error(self, e: Any) -> SailError:
        """The contract error for a failed call: the server's ``ErrorDetail`` when it sent
        one, else a transport or protocol error with what to do about it."""
        import grpc

        code = e.code() if hasattr(e, "code") else None
        code_name = code.name if code is not None else None
        details = e.details() if hasattr(e, "details") else str(e)
        detail = _error_detail(e)
        if detail is not None and detail[0]:
            name, message = detail
            if name == "SailError" and code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return SailTimeoutError(message or details or "timed out", code=code_name)
            return error_for(name, message or details or name, code_name)
        if code == grpc.StatusCode.UNAUTHENTICATED or code == grpc.StatusCode.PERMISSION_DENIED:
            return SailAuthenticationError(
                f"the service at {self.config.endpoint} refused the call: {details} "
                "(set SAIL_API_KEY to a key the service knows)",
                code=code_name,
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return SailTimeoutError(f"no answer from {self.config.endpoint} in time: {details}", code=code_name)
        if code == grpc.StatusCode.UNAVAILABLE:
            return SailConnectionError(
                f"cannot reach the sail service at {self.config.endpoint}: {details}. Start it with "
                "`sail up` (or set SAIL_API_URL to where it runs)",
                code=code_name,
            )
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return SailError(
                f"the service at {self.config.endpoint} does not implement this call ({details}): "
                "is it an older `sail up`?",
                code=code_name,
            )
        return SailError(f"{code_name or 'error'}: {details}", code=code_name)

    def close(self) -> None:
        """Closes the channel."""
        self.channel.close()


def _transient(e: Any) -> bool:
    """A transport failure the server did not answer (no error detail): worth a retry."""
    import grpc

    return e.code() == grpc.StatusCode.UNAVAILABLE and _error_detail(e) is None


def _error_detail(e: Any) -> Optional[Tuple[str, str]]:
    """``(name, message)`` of the ``sail.error.v1.ErrorDetail`` in a status's trailers."""
    try:
        trailers = e.trailing_metadata() or ()
    except Exception:
        return None
    for key, value in trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            from ._pb import error_pb2

            d = error_pb2.ErrorDetail()
            try:
                d.ParseFromString(value)
            except Exception:
                return None
            return d.name, d.message
    return None


_lock = threading.Lock()
_clients: Dict[Config, Client] = {}


def client(config: Optional[Config] = None) -> Client:
    """The shared client for ``config`` (default: from the environment, read at each call,
    so a changed ``SAIL_API_URL`` takes effect)."""
    cfg = config or Config.from_env()
    with _lock:
        c = _clients.get(cfg)
        if c is None:
            try:
                c = Client(cfg)
            except ImportError as e:
                raise SailError(
                    f"the sail SDK's gRPC client is not installed ({e}): pip install sail-sdk "
                    "(inside a sailbox only Volume.from_mount works without it)"
                ) from None
            _clients[cfg] = c
        return c
