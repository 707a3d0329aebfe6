"""The contract's error types: one class per name, the same names as in gRPC status details,
the CLI's JSON errors and the control socket's replies."""

from __future__ import annotations


class SailError(Exception):
    """Base of every error this package raises."""

    name = "SailError"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


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


_BY_NAME = {
    cls.name: cls
    for cls in (
        SailError,
        VolumeError,
        VolumeNotFoundError,
        VolumeFuseUnavailableError,
        VolumeCommitConflictError,
        VolumeIntegrityError,
        VolumeCommitNotFoundError,
        VolumePathNotFoundError,
        VolumeInvalidArgumentError,
        VolumeMissingChunksError,
    )
}


def error_for(name: str, message: str) -> SailError:
    """The exception for a contract error name (unknown names become SailError)."""
    return _BY_NAME.get(name, SailError)(message)
