"""sail: the Python SDK for sailboxes (persistent Linux microVMs), volumes and functions.

    import sail

    app = sail.App.find(name="demo", mint_if_missing=True)
    vol = sail.Volume.get("ws", mint_if_missing=True)
    with sail.Sailbox.create(app=app, image="debian", volumes={"/mnt/ws": vol}) as sb:
        print(sb.exec("echo hi").wait().stdout)

    @sail.function()
    def add(a, b):
        return a + b

    # sb.exec(add, 2, 3) == 5, run in the sailbox

Inside a sailbox (or wherever a volume is mounted), with the standard library only:

    vol = sail.Volume.from_mount("/mnt/ws")
    commit_id = vol.commit()
    latest = vol.reload()

Configuration: ``SAIL_API_URL`` (or ``SAIL_ENDPOINT``), ``SAIL_API_KEY``, ``SAIL_ORG``,
``SAIL_TIMEOUT`` (see :mod:`sail._client`). Errors are the contract's classes in
:mod:`sail.errors`.
"""

from .errors import (
    ImageBuildError,
    SailAuthenticationError,
    SailboxCreationError,
    SailboxError,
    SailboxExecAlreadyRunningError,
    SailboxExecRequestNotFoundError,
    SailboxExecutionError,
    SailboxFunctionError,
    SailboxFunctionSerializationError,
    SailboxTerminatedError,
    SailboxWorkerLostError,
    SailConnectionError,
    SailError,
    SailTimeoutError,
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
from .functions import SailFunction, function
from .image import Image, ImageBuildEvent
from .sailbox import (
    App,
    Checkpoint,
    Sailbox,
    SailboxExecRequest,
    SailboxExecResult,
    SailboxListener,
    SailboxState,
    ensure_image,
)
from .volume import Volume, VolumeCommit, VolumeEntry

__version__ = "0.2.0"

__all__ = [
    "App",
    "Checkpoint",
    "Image",
    "ImageBuildEvent",
    "Sailbox",
    "SailboxExecRequest",
    "SailboxExecResult",
    "SailboxListener",
    "SailboxState",
    "SailFunction",
    "Volume",
    "VolumeCommit",
    "VolumeEntry",
    "ensure_image",
    "function",
    "SailError",
    "SailboxError",
    "SailboxCreationError",
    "SailboxExecutionError",
    "SailboxExecAlreadyRunningError",
    "SailboxExecRequestNotFoundError",
    "SailboxFunctionError",
    "SailboxFunctionSerializationError",
    "SailboxTerminatedError",
    "SailboxWorkerLostError",
    "ImageBuildError",
    "VolumeError",
    "VolumeNotFoundError",
    "VolumeFuseUnavailableError",
    "VolumeCommitConflictError",
    "VolumeIntegrityError",
    "VolumeCommitNotFoundError",
    "VolumePathNotFoundError",
    "VolumeInvalidArgumentError",
    "VolumeMissingChunksError",
    "SailConnectionError",
    "SailAuthenticationError",
    "SailTimeoutError",
]
