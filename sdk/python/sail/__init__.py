"""sail: the in-VM module for volumes mounted by the sail FUSE helper.

    import sail
    vol = sail.Volume.from_mount("/mnt/ws")
    commit_id = vol.commit()
    latest = vol.reload()
"""

from .errors import (
    SailError,
    VolumeCommitConflictError,
    VolumeCommitNotFoundError,
    VolumeError,
    VolumeFuseUnavailableError,
    VolumeIntegrityError,
    VolumeInvalidArgumentError,
    VolumeMissingChunksError,
    VolumeNotFoundError,
    VolumePathNotFoundError,
)
from .volume import Volume

__all__ = [
    "Volume",
    "SailError",
    "VolumeError",
    "VolumeNotFoundError",
    "VolumeFuseUnavailableError",
    "VolumeCommitConflictError",
    "VolumeIntegrityError",
    "VolumeCommitNotFoundError",
    "VolumePathNotFoundError",
    "VolumeInvalidArgumentError",
    "VolumeMissingChunksError",
]
