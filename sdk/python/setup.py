"""Generates the gRPC stubs (``sail/_pb``) from the repository's ``.proto`` files at build
time, and pins the runtime to the versions that generated them.

The stubs are never edited by hand or committed: every ``pip install ./sdk/python`` (or
``pip install -e``) regenerates them from ``proto/proto`` (override with ``SAIL_PROTO_DIR``),
and ``tests/test_stubs.py`` checks that the installed stubs describe exactly the current
``.proto`` files. An sdist carries the generated files, so it builds without the protos.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

from setuptools import setup

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "sail" / "_pb"
#: The services the SDK calls (agent.proto is the host-guest link: not for clients).
PROTOS = ("error.proto", "sailbox.proto", "volume.proto")


def proto_dir() -> pathlib.Path | None:
    env = os.environ.get("SAIL_PROTO_DIR")
    if env:
        return pathlib.Path(env)
    candidate = HERE.parent.parent / "proto" / "proto"
    return candidate if candidate.is_dir() else None


def generate() -> None:
    src = proto_dir()
    if src is None:
        if (OUT / "sailbox_pb2.py").exists():
            return  # an sdist: generated when it was made
        sys.exit("sail-sdk: no .proto files found (set SAIL_PROTO_DIR to the repository's proto/proto)")
    from grpc_tools import protoc
    import grpc_tools

    OUT.mkdir(parents=True, exist_ok=True)
    include = str(pathlib.Path(grpc_tools.__file__).parent / "_proto")
    # The virtual include path makes the generated imports `from sail._pb import x_pb2`.
    args = [
        "grpc_tools.protoc",
        f"-Isail/_pb={src}",
        f"-I{include}",
        f"--python_out={HERE}",
        f"--pyi_out={HERE}",
        f"--grpc_python_out={HERE}",
    ] + [f"sail/_pb/{p}" for p in PROTOS]
    if protoc.main(args) != 0:
        sys.exit(f"sail-sdk: protoc failed on {src}")
    (OUT / "__init__.py").write_text('"""Generated from proto/proto by setup.py; do not edit."""\n')


def runtime_requirements() -> list[str]:
    """grpcio and protobuf at least as new as the generator (the generated modules check)."""
    try:
        import grpc_tools
        from google.protobuf import __version__ as pb_version
        from importlib.metadata import version

        tools = version("grpcio-tools")
    except Exception:  # an sdist built elsewhere: the lowest versions we support
        tools, pb_version, grpc_tools = "1.62.0", "4.25.0", None
    pb_major = int(pb_version.split(".")[0])
    reqs = [
        f"grpcio>={tools}",
        f"protobuf>={pb_version},<{pb_major + 1}",
        "cloudpickle>=3.0,<4",
    ]
    if sys.version_info < (3, 10):
        reqs[0] += ",<1.81"  # the last grpcio with wheels for 3.9
    return reqs


# setuptools builds in sdk/python/build and never removes files that left the package: a
# stale module there would end up in the wheel.
shutil.rmtree(HERE / "build", ignore_errors=True)
# Before setup(): the package list names sail._pb, which egg_info (the first build step)
# already needs on disk.
generate()
setup(install_requires=runtime_requirements())
