"""Functions: run a Python function inside a sailbox and get its value back.

    @sail.function()
    def add(a, b):
        return a + b

    assert sb.exec(add, 2, 3) == 5

How it works:

- The function and its arguments are serialized with cloudpickle; the function's own
  module is pickled *by value* (so a function defined in a script or a test file works
  without that file in the guest); other modules it uses are pickled by reference and must
  be importable in the image.
- A runtime (a small zip: the runner plus the caller's own copy of cloudpickle, pure Python)
  is uploaded once per sailbox handle to ``/tmp/.sail-fn/``; the image needs only python3.
- The call is one file upload and one exec: ``python3 <runtime.zip> <payload>``. The
  function's own prints go to the exec's stderr; the runner reports on stdout.
- **Python versions.** Pickled functions carry bytecode, which differs between Python
  minor versions, so the caller's and the guest's ``major.minor`` must match: a mismatch
  raises :class:`SailboxFunctionSerializationError` naming both (Debian bookworm images run
  3.11).
- **Results from a guest are untrusted.** Unpickling can run code, and the guest runs
  whatever code it was given. So by default results (and remote exceptions) are loaded with
  a restricted unpickler that accepts only plain data: None, bools, numbers, strings, bytes,
  lists, tuples, dicts, sets, and a few standard value types (datetime, Decimal, Fraction,
  UUID, OrderedDict, deque) and built-in exceptions. Anything else raises
  :class:`SailboxFunctionSerializationError`, unless the function is declared with
  ``@sail.function(trusted=True)``, which loads results with full pickle.
"""

from __future__ import annotations

import base64
import builtins
import functools
import hashlib
import io
import json
import pickle
import sys
import uuid
import zipfile
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple, TypeVar

from .errors import (
    SailboxFunctionError,
    SailboxFunctionSerializationError,
)

if TYPE_CHECKING:
    from .sailbox import Sailbox

F = TypeVar("F", bound=Callable[..., Any])

#: Where runtimes and call payloads live in the guest.
GUEST_DIR = "/tmp/.sail-fn"
#: The marker of the runner's report line on stdout.
MARKER = "SAILFN1 "
#: Results up to this size come back inline on stdout; larger ones through a file.
INLINE_MAX = 8 << 20
#: The call's exit code when the runtime zip is missing in the guest.
_NO_RUNTIME = 97

# The runner, run in the guest as the zip's __main__ (standard library + cloudpickle).
_RUNNER = r'''
import base64, glob, json, os, sys, time, traceback

INLINE_MAX = %(inline)d
MARKER = %(marker)r


def main():
    payload, results = sys.argv[1], sys.argv[2]
    report = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the function's own prints go to stderr

    def reply(obj):
        report.write("\n" + MARKER + json.dumps(obj) + "\n")
        report.flush()

    def bad(reason):
        reply({"status": "serialization", "reason": reason})

    try:
        with open(payload, "rb") as f:
            header = json.loads(f.readline())
            body = f.read()
    except Exception as e:
        return bad("cannot read the call's payload %%s: %%s" %% (payload, e))
    finally:
        try:
            os.unlink(payload)
        except OSError:
            pass
    # Old result files of earlier calls (read by their callers long ago).
    for old in glob.glob(os.path.join(results, "*.result")):
        try:
            if os.stat(old).st_mtime < time.time() - 3600:
                os.unlink(old)
        except OSError:
            pass
    mine = tuple(sys.version_info[:2])
    theirs = tuple(header.get("python", ()))
    if mine != theirs:
        return bad(
            "the caller runs Python %%s and the guest's python3 is %%s: functions carry bytecode, "
            "which differs between Python versions; use an image with Python %%s (or call from %%s)"
            %% (".".join(map(str, theirs)), ".".join(map(str, mine)),
               ".".join(map(str, theirs)), ".".join(map(str, mine))))
    import cloudpickle

    try:
        fn, args, kwargs = cloudpickle.loads(body)
    except BaseException as e:
        return bad("cannot load the function or its arguments in the guest: %%s: %%s" %% (type(e).__name__, e))
    try:
        value = fn(*args, **kwargs)
    except BaseException as e:
        tb = traceback.format_exc()
        try:
            exc = base64.b64encode(cloudpickle.dumps(e)).decode()
        except BaseException:
            exc = None
        t = type(e)
        return reply({"status": "error", "type": "%%s.%%s" %% (t.__module__, t.__qualname__),
                      "message": str(e), "traceback": tb, "exception": exc})
    try:
        data = cloudpickle.dumps(value)
    except BaseException as e:
        return bad("cannot serialize the result (%%s) in the guest: %%s: %%s"
                   %% (type(value).__name__, type(e).__name__, e))
    if len(data) <= INLINE_MAX:
        return reply({"status": "ok", "value": base64.b64encode(data).decode()})
    path = os.path.join(results, os.path.basename(payload) + ".result")
    with open(path, "wb") as f:
        f.write(data)
    reply({"status": "ok", "file": path, "size": len(data)})


main()
''' % {"inline": INLINE_MAX, "marker": MARKER}


@functools.lru_cache(maxsize=1)
def _runtime() -> Tuple[str, bytes]:
    """The runtime zip (runner + cloudpickle's source files) and its name, derived from its
    content (fixed timestamps, so the same inputs give the same bytes)."""
    import os

    import cloudpickle

    pkg_dir = os.path.dirname(cloudpickle.__file__)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        def add(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)

        add("__main__.py", _RUNNER.encode())
        for entry in sorted(os.listdir(pkg_dir)):
            if entry.endswith(".py"):
                with open(os.path.join(pkg_dir, entry), "rb") as f:
                    source = f.read()
                add(f"cloudpickle/{entry}", source)
                # Bytecode beside it: a zip import never caches what it compiles, and
                # compiling cloudpickle took ~0.5 s of every call under emulation. Unchecked
                # hash-based, so the bytes are reproducible; a guest Python with another
                # magic number ignores it and compiles the source.
                add(f"cloudpickle/{entry}c", _bytecode(source, f"cloudpickle/{entry}"))
    data = buf.getvalue()
    return f"{GUEST_DIR}/rt-{hashlib.blake2b(data, digest_size=12).hexdigest()}.zip", data


def _bytecode(source: bytes, name: str) -> bytes:
    """A ``.pyc`` (unchecked-hash mode, PEP 552) of ``source`` for this interpreter."""
    import importlib.util
    import marshal

    code = compile(source, name, "exec", dont_inherit=True)
    flags = (0b01).to_bytes(4, "little")  # hash-based, not checked against the source
    return importlib.util.MAGIC_NUMBER + flags + importlib.util.source_hash(source) + marshal.dumps(code)


class SailFunction:
    """A Python function that can run inside a sailbox (make one with
    :func:`function`). Calling it directly runs it locally, unchanged."""

    def __init__(self, fn: Callable[..., Any], *, trusted: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"sail.function needs a callable, not {type(fn).__name__}")
        #: The wrapped function.
        self.fn = fn
        #: Whether results are loaded with full pickle (see the module docs).
        self.trusted = trusted
        #: The function's name (in error messages).
        self.name: str = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def serialize(self, args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
        """The payload for one call: a JSON header line, then the cloudpickled
        ``(fn, args, kwargs)``. Raises :class:`SailboxFunctionSerializationError`."""
        import cloudpickle

        module = sys.modules.get(getattr(self.fn, "__module__", "") or "")
        by_value = module is not None and module.__name__ not in ("__main__", "builtins")
        if by_value:
            try:
                cloudpickle.register_pickle_by_value(module)
            except (ValueError, TypeError):
                by_value = False
        try:
            body = cloudpickle.dumps((self.fn, tuple(args), dict(kwargs)))
        except Exception as e:
            raise SailboxFunctionSerializationError(
                f"cannot serialize {self.name} or its arguments: {type(e).__name__}: {e}"
            ) from None
        finally:
            if by_value and module is not None:
                try:
                    cloudpickle.unregister_pickle_by_value(module)
                except ValueError:
                    pass
        header = {"python": list(_python_version()), "cloudpickle": cloudpickle.__version__}
        return json.dumps(header).encode() + b"\n" + body

    def _run_in(
        self,
        sb: "Sailbox",
        args: Tuple[Any, ...],
        kwargs: Mapping[str, Any],
        *,
        timeout: Optional[float],
        cwd: Optional[str],
        env: Optional[Mapping[str, str]],
    ) -> Any:
        payload = self.serialize(args, kwargs)
        rt_path, rt = _runtime()
        call = f"{GUEST_DIR}/calls/{uuid.uuid4().hex}"
        for attempt in range(2):
            if sb._runtime != rt_path:
                sb.write(rt_path, rt, 0o644)
                sb._runtime = rt_path
            sb.write(call, payload, 0o600)
            # The runtime can be gone although this handle uploaded it (a reboot by upgrade
            # empties /tmp, another client cleaned it): the shell says so and it is sent again.
            cmd = f"test -f {rt_path} || exit {_NO_RUNTIME}; exec python3 {rt_path} {call} {GUEST_DIR}/calls"
            res = sb._exec(cmd, timeout=timeout, cwd=cwd, env=env).wait()
            if res.returncode != _NO_RUNTIME or attempt == 1:
                break
            sb._runtime = None
        report = _report(res.stdout)
        if report is None:
            if res.timed_out:
                raise SailboxFunctionError(
                    f"{self.name} did not finish within {timeout} s (killed)", remote_type="TimeoutError"
                )
            if res.returncode == 127:
                raise SailboxFunctionSerializationError(
                    "the sailbox's image has no python3: functions need an image with python3"
                )
            raise SailboxFunctionError(
                f"{self.name} ended without a result (exit code {res.returncode}); "
                f"stderr: {res.stderr[-2000:].strip()}"
            )
        status = report.get("status")
        if status == "serialization":
            raise SailboxFunctionSerializationError(str(report.get("reason", "")))
        if status == "error":
            exc = None
            if report.get("exception"):
                try:
                    exc = _safe_loads(base64.b64decode(report["exception"]))
                except Exception:
                    exc = None
            raise SailboxFunctionError(
                f"{self.name} raised {report.get('type', '?')}: {report.get('message', '')}",
                remote_traceback=str(report.get("traceback", "")),
                remote_type=str(report.get("type", "")),
                remote_exception=exc if isinstance(exc, BaseException) else None,
            )
        if "file" in report:
            data = sb.read(str(report["file"]))
        else:
            data = base64.b64decode(report.get("value", ""))
        try:
            return pickle.loads(data) if self.trusted else _safe_loads(data)
        except _Refused as e:
            raise SailboxFunctionSerializationError(
                f"the result of {self.name} contains {e}, which is not loaded from a guest by "
                "default (unpickling it could run code); declare the function with "
                "@sail.function(trusted=True) to load it"
            ) from None
        except Exception as e:
            raise SailboxFunctionSerializationError(
                f"cannot load the result of {self.name}: {type(e).__name__}: {e}"
            ) from None

    def __repr__(self) -> str:
        return f"SailFunction({getattr(self.fn, '__qualname__', self.fn)!r})"


def function(*, trusted: bool = False) -> Callable[[F], SailFunction]:
    """Declares a function that can run in a sailbox with ``sb.exec(fn, *args)``.

    ``trusted=True`` loads its results with full pickle (any type; only for sailboxes whose
    code you trust); by default only plain data comes back (see the module docs)."""

    def wrap(fn: F) -> SailFunction:
        return SailFunction(fn, trusted=trusted)

    return wrap


def _python_version() -> Tuple[int, int]:
    """The caller's ``(major, minor)``, which the guest's python3 must match."""
    return sys.version_info[0], sys.version_info[1]


def _report(stdout: str) -> Optional[Dict[str, Any]]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER):
            try:
                obj = json.loads(line[len(MARKER):])
            except ValueError:
                return None
            return obj if isinstance(obj, dict) else None
    return None


class _Refused(Exception):
    pass


_SAFE_BUILTINS = frozenset(
    {"bool", "int", "float", "complex", "str", "bytes", "bytearray", "list", "tuple", "dict", "set",
     "frozenset", "slice", "range"}
    | {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
)
_SAFE = {
    "collections": frozenset({"OrderedDict", "deque"}),
    "datetime": frozenset({"datetime", "date", "time", "timedelta", "timezone"}),
    "decimal": frozenset({"Decimal"}),
    "fractions": frozenset({"Fraction"}),
    "uuid": frozenset({"UUID"}),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module == "builtins" and name in _SAFE_BUILTINS) or name in _SAFE.get(module, ()):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def _safe_loads(data: bytes) -> Any:
    return _SafeUnpickler(io.BytesIO(data)).load()
