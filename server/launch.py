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
import re
import sys
import threading
from collections.abc import Callable
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

POLLER = "-event_engine_client,-event_engine_listener"
CHECKED = ((1, 74), (1, 85))  # the grpcio releases (major, minor) that know both experiments


def _grpcio_release() -> tuple[int, int] | None:
    """grpcio's (major, minor), from the version file it ships, read without importing grpc
    (and without `importlib.metadata`, whose scan of every installed package cost about
    20 ms of each start)."""
    try:
        spec = find_spec("grpc")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(spec.submodule_search_locations[0]) / "_grpcio_metadata.py"
        found = re.search(r"""__version__\s*=\s*['"]+(\d+)\.(\d+)""", path.read_text())
    except (OSError, ValueError):
        return None
    return (int(found[1]), int(found[2])) if found else None


def prefer_poller() -> None:
    """Set `GRPC_EXPERIMENTS` to the poller, unless it is set or grpcio is not a checked
    release. Call before grpc is imported; afterwards it changes nothing."""
    release = _grpcio_release()
    if release is not None and CHECKED[0] <= release <= CHECKED[1]:
        os.environ.setdefault("GRPC_EXPERIMENTS", POLLER)


class _HiddenFromThisThread:
    """A `sys.meta_path` finder that makes `package` (and its modules) unimportable from the
    thread that created it, and changes nothing for any other thread."""

    def __init__(self, package: str):
        self.package = package
        self.thread = threading.get_ident()

    def find_spec(self, name, path=None, target=None):
        if threading.get_ident() == self.thread and (
                name == self.package or name.startswith(self.package + ".")):
            raise ModuleNotFoundError(f"{name} is not imported while numba starts",
                                      name=name)
        return None


def start_numba() -> None:
    """Import numba and start its CPU target with scipy hidden, for a process that is about
    to run kernels (the sidecar, the proxy).

    numba probes scipy twice before its first compiled call: `import numba` imports scipy
    to check its version, and starting the CPU target (on the first compile or cache load)
    imports scipy.linalg's BLAS and LAPACK bindings, for `np.dot` and `np.linalg`, which no
    kernel here uses. Where scipy is installed that is about 0.35 s of a 1.2 s cached start
    (`bench/cold_start.py`); cffi, for numba's cffi support (unused too), is hidden as well
    (about 12 ms). Afterwards both import as usual (PRADA's Shapiro-Wilk test
    loads it when it first scores); only numba's linear algebra stays off in this process.
    Not done on a plain `import stealguard.server.defenses`, so a program that embeds the
    defenses next to numba code of its own keeps numba's BLAS."""
    if "numba" in sys.modules:
        return  # started already; hiding scipy now would change nothing numba does
    hidden = [_HiddenFromThisThread(package) for package in ("scipy", "cffi")]
    sys.meta_path[:0] = hidden
    try:
        import numba  # noqa: F401 - its import is the first probe
        from numba.core.registry import cpu_target

        cpu_target.target_context.refresh()  # the second: what a first compile would do
    finally:
        for finder in hidden:
            sys.meta_path.remove(finder)


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
