"""One lifecycle for every stealguard server (sidecar, proxy, model server):

    bind (NOT_SERVING) -> warm-up hook -> SERVING -> SIGTERM/SIGINT: drain -> stopped
                                          SIGHUP: reload (a bad config keeps the old one;
                                          a server with nothing to reload logs it)

A server is a `Service` (override what it needs) run on a `GrpcApp` by `run`. The warm-up
runs in a daemon thread, so a stop signal during a long compile still ends the process.
`serve_workers` runs N copies of a server in forked processes that share one port
(SO_REUSEPORT); the parent forks before any gRPC object exists.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from stealguard.server.platform.app import GrpcApp
from stealguard.server.settings import ConfigError

log = logging.getLogger("stealguard.platform")

_STOPPED = object()  # what `_unless_stopped` returns when a stop signal came first


class Service:
    """The hooks a server gives the lifecycle; every one has a harmless default.

    A service with a protect `core` has it refuse calls (UNAVAILABLE) until it is warm and
    again from the drain on, with `draining` as the reason.
    """

    #: True if `reload` is implemented (SIGHUP then calls it).
    reloadable = False
    #: The protect core (`stealguard.server.core.ProtectCore`) the service answers with.
    core = None
    draining = "the server is draining; retry on another instance"

    def warm_up(self) -> str:
        """Blocking work before SERVING (compile kernels, a first forward pass); returns
        what the log says when it is done, e.g. "kernels warm in 1.40s"."""
        return "ready"

    async def serving(self, app: GrpcApp) -> None:
        """Warm: start answering. The default opens the core and reports SERVING; the
        proxy instead lets its upstream watcher decide health."""
        if self.core is not None:
            self.core.open()
        await app.set_serving(True)

    def drain(self) -> None:
        """SIGTERM: refuse new work (calls already running go on for the grace period)."""
        if self.core is not None:
            self.core.refuse(self.draining)

    def reload(self) -> str:
        """SIGHUP: install a new config; returns what to log. Raise `ConfigError` or
        `OSError` to keep the old one."""
        raise NotImplementedError

    async def stop(self) -> None:
        """After the drain, alongside the gRPC server's stop: stop any other listener the
        service runs (the model server's REST API), with the same grace period."""

    @property
    def in_flight(self) -> int:
        """Calls running now (reported after the drain)."""
        return 0

    async def close(self) -> None:
        """After the server stopped: close channels and clients."""


async def run(app: GrpcApp, service: Service, *, name: str = "", details: str = "") -> None:
    """Run `service` on `app` until SIGTERM/SIGINT, then drain and stop.

    Once the port is bound it logs "`name` listening on HOST:PORT (pid N) [with TLS]
    `details`".
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        port = await app.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        def reload() -> None:
            if not service.reloadable:  # logged, rather than SIGHUP's default: to exit
                app.log.warning("SIGHUP: this server has nothing to reload")
                return
            try:
                names = service.reload()
            except (ConfigError, OSError) as error:
                app.log.error("SIGHUP: new config rejected, old policies stay (and the old "
                              "tokens and certificates): %s", error)
                return
            app.log.info("SIGHUP: policies reloaded: %s", names)

        loop.add_signal_handler(signal.SIGHUP, reload)
        host = app.listen.rsplit(":", 1)[0]
        app.log.info("%slistening on %s:%d (pid %d)%s%s", f"{name} " if name else "", host,
                     port, os.getpid(), " with TLS" if app.credentials else "", details)
        note = await _unless_stopped(service.warm_up, stop)
        if note is not _STOPPED:
            # What exists now (numba's kernels, torch, the models, grpc) lives as long as
            # the process: keep it out of every later garbage collection pass.
            gc.collect()
            gc.freeze()
            await service.serving(app)
            app.log.info("%s", note)
        await stop.wait()
        app.log.info("draining: refusing new calls, %.1fs grace for calls in flight",
                     app.grace)
        service.drain()
        await asyncio.gather(app.stop(), service.stop())
        app.log.info("stopped")
        if service.in_flight:
            app.log.warning("%d calls were still running when the grace period ended",
                            service.in_flight)
        else:
            app.log.info("drained: every call in flight finished")
    finally:
        await service.close()


async def _unless_stopped(work: Callable[[], Any], stop: asyncio.Event) -> Any:
    """Run blocking `work` in a daemon thread; `_STOPPED` if `stop` is set first."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def target() -> None:
        try:
            result = work()
        except BaseException as error:  # noqa: BLE001 - handed to the loop
            loop.call_soon_threadsafe(_settle, done, None, error)
        else:
            loop.call_soon_threadsafe(_settle, done, result, None)

    threading.Thread(target=target, name="stealguard-warm-up", daemon=True).start()
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({done, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if done.done():
        stopped.cancel()
        return done.result()
    return _STOPPED


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when its parent dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve_workers(settings, run_one: Callable[[Any, bool], Coroutine[Any, Any, None]]) -> int:
    """Run `run_one(settings, reuse_port)` in `settings.workers` processes on one port.

    With one worker it runs in this process. Otherwise the parent forks the workers
    before any gRPC object exists, forwards SIGTERM/SIGINT/SIGHUP to them, and exits with
    the first non-zero worker exit code (0 when all stop cleanly). Worker i serves its
    metrics on metrics_port + i.
    """
    if settings.workers == 1:
        asyncio.run(run_one(settings, False))
        return 0
    if settings.listen.endswith(":0"):
        raise OSError("--workers > 1 needs a fixed port: port 0 would give each worker its own")
    children = []
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # worker
            _die_with_parent()
            if settings.metrics_port:
                settings.metrics_port += index  # one metrics endpoint per worker
            code = 0
            try:
                asyncio.run(run_one(settings, True))
            except BaseException:  # noqa: BLE001 - report and exit the worker
                logging.getLogger("stealguard").exception("worker failed")
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)

    def forward(signum, _frame):
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    log.info("started %d workers: %s", len(children), " ".join(map(str, children)))
    worst = 0
    remaining = set(children)
    while remaining:
        pid, status = os.wait()
        if pid in remaining:
            remaining.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if code != 0 and worst == 0:
                worst = code if code > 0 else 1
                # one worker died: stop the rest rather than serve at reduced capacity silently
                forward(signal.SIGTERM, None)
    return worst
