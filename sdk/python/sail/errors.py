"""The contract's error types (DESIGN 2.4): one class per name, the same names as in gRPC
status details (``sail.error.v1.ErrorDetail``), the CLI's JSON errors and the FUSE helper's
control socket replies.

Hierarchy::

    SailError
    ├── SailboxError
    │   ├── SailboxCreationError
    │   ├── SailboxExecutionError
    │   ├── SailboxExecAlreadyRunningError
    │   ├── SailboxExecRequestNotFoundError
    │   ├── SailboxFunctionError
    │   ├── SailboxFunctionSerializationError
    │   ├── SailboxTerminatedError
    │   └── SailboxWorkerLostError
    ├── ImageBuildError
    ├── VolumeError
    │   ├── VolumeNotFoundError, VolumeFuseUnavailableError, VolumeCommitConflictError,
    │   └── VolumeIntegrityError, VolumeCommitNotFoundError, VolumePathNotFoundError, ...
    ├── SailConnectionError      (the service cannot be reached)
    ├── SailAuthenticationError  (missing or rejected API key)
    └── SailTimeoutError         (a deadline passed; also a TimeoutError)

This module uses the standard library only: it also runs inside guests.
"""

from __future__ import annotations

from typing import Dict, Optional, Type


class SailError(Exception):
    """Base of every error this package raises.

    ``name`` is the contract name; ``message`` the server's (or the client's) text; ``code``
    the gRPC status code name (``"NOT_FOUND"``, ...) when the error came from a call.
    """

    name = "SailError"

    def __init__(self, message: str = "", *, code: Optional[str] = None) -> None:
        super().__init__(message)
        #: The human-readable message.
        self.message = message
        #: The gRPC status code name, when the error came from a gRPC call.
        self.code = code


class SailboxError(SailError):
    """Base of the sailbox errors; raised itself for a bad argument or an unknown sailbox
    or app."""

    name = "SailboxError"


class SailboxCreationError(SailboxError):
    """Create, checkpoint, stop, start or another lifecycle step failed (out-of-range create
    arguments included: nothing was created)."""

    name = "SailboxCreationError"


class SailboxExecutionError(SailboxError):
    """An exec, a file transfer or a listener failed, or the sailbox cannot run it now (for
    example it is paused)."""

    name = "SailboxExecutionError"


class SailboxExecAlreadyRunningError(SailboxError):
    """Another exec request is still running on the sailbox (one at a time)."""

    name = "SailboxExecAlreadyRunningError"


class SailboxExecRequestNotFoundError(SailboxError):
    """No exec request with this id."""

    name = "SailboxExecRequestNotFoundError"


class SailboxFunctionError(SailboxError):
    """A function run in a sailbox raised. ``remote_traceback`` holds the guest's traceback,
    ``remote_type`` the exception's qualified class name, and ``remote_exception`` the
    exception itself when it could be rebuilt safely (built-in exception types), else
    ``None``."""

    name = "SailboxFunctionError"

    def __init__(
        self,
        message: str = "",
        *,
        code: Optional[str] = None,
        remote_traceback: str = "",
        remote_type: str = "",
        remote_exception: Optional[BaseException] = None,
    ) -> None:
        super().__init__(message, code=code)
        #: The traceback printed in the guest.
        self.remote_traceback = remote_traceback
        #: ``module.QualName`` of the remote exception.
        self.remote_type = remote_type
        #: The remote exception, when its type is a built-in one; else ``None``.
        self.remote_exception = remote_exception

    def __str__(self) -> str:
        if self.remote_traceback:
            return f"{self.message}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return self.message


class SailboxFunctionSerializationError(SailboxError):
    """A function, its arguments, its result or its runtime could not be serialized or
    loaded (the reason is in the message)."""

    name = "SailboxFunctionSerializationError"


class SailboxTerminatedError(SailboxError):
    """The sailbox was terminated."""

    name = "SailboxTerminatedError"


class SailboxWorkerLostError(SailboxError):
    """The machine running the sailbox went away and it could not be restored."""

    name = "SailboxWorkerLostError"


class ImageBuildError(SailError):
    """Building or preparing an image failed or ran out of time."""

    name = "ImageBuildError"


class VolumeError(SailError):
    """Base of the volume errors."""

    name = "VolumeError"


class VolumeNotFoundError(VolumeError):
    """The volume does not exist (and was not minted)."""

    name = "VolumeNotFoundError"


class VolumeFuseUnavailableError(VolumeError):
    """No FUSE helper serves the path: not a sail mount, or the helper died."""

    name = "VolumeFuseUnavailableError"


class VolumeCommitConflictError(VolumeError):
    """The commit cannot merge (an upsert below a path that is a file in the head)."""

    name = "VolumeCommitConflictError"


class VolumeIntegrityError(VolumeError):
    """Stored bytes or metadata failed verification against their hash."""

    name = "VolumeIntegrityError"


class VolumeCommitNotFoundError(VolumeError):
    """A commit id that the volume does not have."""

    name = "VolumeCommitNotFoundError"


class VolumePathNotFoundError(VolumeError):
    """A path that the commit does not have."""

    name = "VolumePathNotFoundError"


class VolumeInvalidArgumentError(VolumeError):
    """The request was malformed or out of limits."""

    name = "VolumeInvalidArgumentError"


class VolumeMissingChunksError(VolumeError):
    """A commit referenced chunks the store does not have."""

    name = "VolumeMissingChunksError"


class SailConnectionError(SailError):
    """The service could not be reached (not running, wrong address, connection lost)."""

    name = "SailConnectionError"


class SailAuthenticationError(SailError):
    """The service refused the call's API key (``SAIL_API_KEY``) or it was missing."""

    name = "SailAuthenticationError"


class SailPermissionDeniedError(SailAuthenticationError):
    """The call's API key is valid but may not do this (another org named, or managing keys
    without an admin key)."""

    name = "SailPermissionDeniedError"


class SailTimeoutError(SailError, TimeoutError):
    """A call's deadline (or a wait's timeout) passed before it finished."""

    name = "SailTimeoutError"


_BY_NAME: Dict[str, Type[SailError]] = {
    cls.name: cls
    for cls in (
        SailError,
        SailboxError,
        SailboxCreationError,
        SailboxExecutionError,
        SailboxExecAlreadyRunningError,
        SailboxExecRequestNotFoundError,
        SailboxFunctionError,
        SailboxFunctionSerializationError,
        SailboxTerminatedError,
        SailboxWorkerLostError,
        ImageBuildError,
        VolumeError,
        VolumeNotFoundError,
        VolumeFuseUnavailableError,
        VolumeCommitConflictError,
        VolumeIntegrityError,
        VolumeCommitNotFoundError,
        VolumePathNotFoundError,
        VolumeInvalidArgumentError,
        VolumeMissingChunksError,
        SailConnectionError,
        SailAuthenticationError,
        SailPermissionDeniedError,
        SailTimeoutError,
    )
}


def error_for(name: str, message: str, code: Optional[str] = None) -> SailError:
    """The exception for a contract error name (unknown names become :class:`SailError`)."""
    return _BY_NAME.get(name, SailError)(message, code=code)
