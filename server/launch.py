"""The console scripts' entry points. Each picks gRPC's I/O before anything imports grpc.

gRPC reads `GRPC_EXPERIMENTS` once, when it is first imported. grpcio 1.85 runs Python's
channels and servers on the EventEngine client and listener; the older poller they replace
is still built in, and both experiments are known to 1.74, 1.80 and 1.85 (the releases
checked). On this project's 2-core test machine the poller cut a loopback round trip to the
sidecar from 0.37 to 0.24 ms for a message on an open stream and from 0.68 to 0.44 ms for a
unary call (README, Performance). So every
stealguard command starts with `GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener`
unless the environment already sets `GRPC_EXPERIMENTS`: set it, even to nothing, to have
gRPC's own defaults. Other grpcio releases keep their defaults: an experiment a release no
longer knows would only log an error on every start.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import import_module, metadata

POLLER = "-event_engine_client,-event_engine_listener"
CHECKED = ((1, 74), (1, 85))  # the grpcio releases (major, minor) that know both experiments


def _grpcio_release() -> tuple[int, int] | None:
    try:
        major, minor = metadata.version("grpcio").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def prefer_poller() -> None:
    """Set `GRPC_EXPERIMENTS` to the poller, unless it is set or grpcio is not a checked
    release. Call before grpc is imported; afterwards it changes nothing."""
    release = _grpcio_release()
    if release is not None and CHECKED[0] <= release <= CHECKED[1]:
        os.environ.setdefault("GRPC_EXPERIMENTS", POLLER)


def _command(module: str) -> Callable[[], int]:
    """The entry point that runs `module.main()` with the poller chosen first."""

    def run() -> int:
        prefer_poller()
        return import_module(module).main()

    return run


sidecar = _command("stealguard.server.cli")
modelserver = _command("stealguard.modelserver.cli")
load = _command("stealguard.client.load.cli")
attack = _command("stealguard.attacks.cli")
