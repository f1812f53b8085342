"""The one place that starts a stealguard gRPC server (sidecar and proxy alike).

`GrpcApp` assembles a `grpc.aio` server with health and reflection, binds the port,
and drains on SIGTERM/SIGINT: health goes NOT_SERVING, new calls are refused, calls
in flight get `grace` seconds. `serve_workers` forks N processes that share one port
through SO_REUSEPORT, before any gRPC object exists in the parent.
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
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from stealguard.server import metrics
from stealguard.server.config import Config, ConfigError
from stealguard.server.defenses import warm_up
from stealguard.server.extproc.servicer import SERVICE as EXTPROC_SERVICE
from stealguard.server.extproc.servicer import add_extproc
from stealguard.server.interceptors import GuardInterceptor, RateLimiter
from stealguard.server.lenient import add_lenient
from stealguard.server.proxy.options import ProxyPolicies
from stealguard.server.security import Tokens, server_credentials
from stealguard.server.servicer import DefenseServicer
from stealguard.v1 import defense_pb2, defense_pb2_grpc

log = logging.getLogger("stealguard.sidecar")

DEFENSE_SERVICE = defense_pb2.DESCRIPTOR.services_by_name["Defense"].full_name


class GrpcApp:
    """A grpc.aio server with health, reflection, signal handling and graceful drain."""

    def __init__(self, listen: str, services: Iterable[str], *, max_message_bytes: int,
                 logger: logging.Logger = log,
                 reuse_port: bool = False, grace: float = 5.0,
                 credentials: grpc.ServerCredentials | None = None,
                 interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
                 max_in_flight: int | None = None):
        self.listen = listen
        self.log = logger
        self.services = list(services)
        self.grace = grace
        self.credentials = credentials
        self.server = grpc.aio.server(
            interceptors=list(interceptors) or None,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 1 if reuse_port else 0),
            ],
            # beyond this many concurrent calls gRPC answers RESOURCE_EXHAUSTED at once;
            # None or 0: no limit (gRPC's limiter creates one task per call)
            maximum_concurrent_rpcs=max_in_flight or None,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.services, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self._stop = asyncio.Event()
        self.on_drain: list[Callable[[], None]] = []

    @classmethod
    def from_config(cls, config: Config, services: Iterable[str], *,
                    reuse_port: bool = False, logger: logging.Logger = log) -> GrpcApp:
        """A server with the limits, TLS, tokens, rate limit and metrics of `config`.

        `config` is a sidecar `Config` or any object with the same attributes (listen,
        max_message_bytes, max_in_flight, grace, tls_cert, tls_key, tls_ca, token_file,
        rate_limit, rate_burst, client_header, metrics_port), such as the model server's.
        """
        tokens = Tokens.from_file(config.token_file) if config.token_file else None
        limiter = RateLimiter(config.rate_limit, config.rate_burst) if config.rate_limit else None
        with_metrics = config.metrics_port > 0
        guard = []
        if tokens or limiter or with_metrics or config.tls_ca:
            guard.append(GuardInterceptor(tokens=tokens, client_header=config.client_header,
                                          limiter=limiter, with_metrics=with_metrics))
        return cls(config.listen, services, max_message_bytes=config.max_message_bytes,
                   logger=logger, reuse_port=reuse_port, grace=config.grace,
                   credentials=server_credentials(config), interceptors=guard,
                   max_in_flight=config.max_in_flight)

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the whole server and each service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Bind and start, NOT_SERVING until `set_serving(True)`. Returns the bound port."""
        await self.set_serving(False)
        try:
            if self.credentials is not None:
                port = self.server.add_secure_port(self.listen, self.credentials)
            else:
                port = self.server.add_insecure_port(self.listen)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {self.listen}: address in use or not valid")
        await self.server.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        return port

    async def unless_stopped(self, work: Callable[[], Any]) -> Any:
        """Run blocking `work` in a daemon thread; None if a stop signal comes first.

        A daemon thread, so that SIGTERM during a long compile still ends the process.
        """
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
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({done, stop}, return_when=asyncio.FIRST_COMPLETED)
        if done.done():
            stop.cancel()
            return done.result()
        return None

    async def wait_and_drain(self) -> None:
        """Block until SIGTERM/SIGINT, then drain and stop."""
        await self._stop.wait()
        self.log.info("draining: refusing new calls, %.1fs grace for calls in flight",
                      self.grace)
        for hook in self.on_drain:
            hook()
        await self.set_serving(False)
        await self.server.stop(self.grace)
        self.log.info("stopped")

    def request_stop(self) -> None:
        self._stop.set()

    def reload_on_sighup(self, swap: Callable[[], str]) -> None:
        """On SIGHUP call `swap()`, which installs new policies and names them for the log;
        when it raises ConfigError or OSError the old policies stay (call after `start`)."""

        def handle() -> None:
            try:
                names = swap()
            except (ConfigError, OSError) as error:
                self.log.error("SIGHUP: new config rejected, old policies stay: %s", error)
                return
            self.log.info("SIGHUP: policies reloaded: %s", names)

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, handle)

    def serve_metrics(self, port: int) -> None:
        """Serve Prometheus metrics on `port` when it is above 0."""
        if port > 0:
            metrics.serve(port)
            self.log.info("metrics on :%d/metrics", port)


async def run_sidecar(config: Config, *, reuse_port: bool = False,
                      reload: Callable[[], Config] | None = None) -> None:
    """Run the Defense service until a stop signal; NOT_SERVING until kernels are warm.

    SIGHUP calls `reload` for a new config and swaps in its policies between calls; a bad
    new config is logged and the old policies stay.
    """
    policies = ProxyPolicies.from_config(config.policies, config.secret_bytes())
    servicer = DefenseServicer(policies.policies, max_rows=config.max_rows,
                               with_metrics=config.metrics_port > 0)
    app = GrpcApp.from_config(config, [DEFENSE_SERVICE, EXTPROC_SERVICE], reuse_port=reuse_port)
    add_lenient(defense_pb2_grpc.add_DefenseServicer_to_server, servicer, app.server)
    extproc = add_extproc(app.server, servicer, policies, config)  # Envoy ext_proc

    def refuse() -> None:
        servicer.not_serving = "the sidecar is draining; retry on another instance"
        log.info("draining: %d calls in flight; ended %d idle streams", servicer.in_flight,
                 servicer.end_idle_streams())

    def swap_policies() -> str:
        new = ProxyPolicies.from_config(reload().policies, config.secret_bytes())
        servicer.policies, extproc.options = new.policies, new.resolve
        return ", ".join(f"{p.name}={p.defense_name}" for p in servicer.policies)

    app.on_drain.append(refuse)
    port = await app.start()
    if reload is not None:
        app.reload_on_sighup(swap_policies)
    app.serve_metrics(config.metrics_port)
    host = config.listen.rsplit(":", 1)[0]
    log.info("listening on %s:%d (pid %d)%s, policies: %s", host, port, os.getpid(),
             " with TLS" if app.credentials else "",
             ", ".join(f"{p.name}={p.defense_name}" for p in servicer.policies))
    seconds = await app.unless_stopped(warm_up)
    if seconds is not None:
        # What exists now (numba, llvmlite, the compiled kernels) lives as long as the
        # process: keep it out of every later garbage collection pass.
        gc.collect()
        gc.freeze()
        servicer.not_serving = None
        await app.set_serving(True)
        log.info("ready: kernels warm in %.2fs", seconds)
    await app.wait_and_drain()
    if servicer.in_flight:
        log.warning("%d calls were still running when the grace period ended",
                    servicer.in_flight)
    else:
        log.info("drained: every call in flight finished")


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


def serve_workers(config: Config,
                  run: Callable[[Config, bool], Coroutine[Any, Any, None]]) -> int:
    """Run `run(config, reuse_port)` in `config.workers` processes on one port.

    With one worker it runs in this process. Otherwise the parent forks the workers
    before any gRPC object exists, forwards SIGTERM/SIGINT to them, and exits with the
    first non-zero worker exit code (0 when all stop cleanly).
    """
    if config.workers == 1:
        asyncio.run(run(config, False))
        return 0
    if config.listen.endswith(":0"):
        raise OSError("--workers > 1 needs a fixed port: port 0 would give each worker its own")
    children = []
    for index in range(config.workers):
        pid = os.fork()
        if pid == 0:  # worker
            _die_with_parent()
            if config.metrics_port > 0:
                config.metrics_port += index  # one metrics endpoint per worker
            code = 0
            try:
                asyncio.run(run(config, True))
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
