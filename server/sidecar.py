"""Assemble and run the sidecar: policies -> protect core -> `Defense` servicer -> `GrpcApp`.

NOT_SERVING (and UNAVAILABLE) until the kernels are compiled and warm; SIGHUP swaps in
the policies of a fresh config between calls; SIGTERM drains (the platform's lifecycle).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from stealguard.server.config import Config
from stealguard.server.core import ProtectCore
from stealguard.server.defenses import warm_up
from stealguard.server.extproc.servicer import SERVICE as EXTPROC_SERVICE
from stealguard.server.extproc.servicer import ExternalProcessorServicer, add_extproc
from stealguard.server.metering.inflight import Slots
from stealguard.server.metering.settings import meter_of, stream_guard
from stealguard.server.metrics import MetricsObserver
from stealguard.server.platform import lifecycle
from stealguard.server.platform.app import GrpcApp
from stealguard.server.platform.lenient import add_lenient
from stealguard.server.platform.metrics import serve_metrics
from stealguard.server.proxy.options import ProxyPolicies
from stealguard.server.servicer import DRAINING, WARMING_UP, DefenseServicer
from stealguard.v1 import defense_pb2, defense_pb2_grpc

log = logging.getLogger("stealguard.sidecar")

DEFENSE_SERVICE = defense_pb2.DESCRIPTOR.services_by_name["Defense"].full_name


def protect_core(config: Config, policies) -> ProtectCore:
    """The core with `config`'s limits and, when metrics are on, the metrics observer
    (the sidecar and the proxy build theirs the same way)."""
    limiter = meter_of(config)
    observers = [MetricsObserver()] if config.metrics_port else []
    core = ProtectCore(policies, max_rows=config.max_rows, limiter=limiter,
                       observers=observers)
    if config.detect == "classmix":  # the same observer and escalation in every front end
        from stealguard.server.detection.outputs import class_mix_watch  # scipy: only now

        watch = class_mix_watch(config, lambda policy, name: core.resolve(name))
        core.observers.append(watch)
        core.escalation = watch
    return core


def warm_kernels(core: ProtectCore, policies, who: str, logger: logging.Logger) -> float:
    """`warm_up` for the kernels `policies` use, single-thread ones first; returns once those
    are in. Each progress message is logged and, until then, is the reason `core` refuses
    calls with ("the sidecar is warming up its kernels (compiling ...: 1/4 ...)")."""
    lock, warming = threading.Lock(), [True]

    def progress(message: str) -> None:
        logger.info("%s", message)
        with lock:  # never after the return below: then the lifecycle opens the core
            if warming[0]:
                core.refuse(f"the {who} is warming up its kernels ({message}); retry shortly")

    seconds = warm_up({p.name: p.defense for p in policies}, progress=progress,
                      background=True)
    with lock:
        warming[0] = False
    return seconds


def describe_policies(policies) -> str:
    return ", ".join(f"{p.name}={p.defense_name}" for p in policies)


class Sidecar(lifecycle.Service):
    """The sidecar's lifecycle hooks: warm the kernels, drain, reload the policies."""

    draining = DRAINING

    def __init__(self, config: Config, servicer: DefenseServicer,
                 reload: Callable[[], Config] | None,
                 extproc: ExternalProcessorServicer | None = None, app: GrpcApp | None = None):
        self.config = config
        self.app = app
        self.servicer = servicer
        self.extproc = extproc
        self.core = servicer.core
        self._reload = reload
        self.reloadable = reload is not None

    def warm_up(self) -> str:
        seconds = warm_kernels(self.core, self.core.policies, "sidecar", log)
        return f"ready: kernels warm in {seconds:.2f}s"

    def drain(self) -> None:
        super().drain()
        log.info("draining: %d calls in flight; ended %d idle streams", self.servicer.in_flight,
                 self.servicer.end_idle_streams())

    def reload(self) -> str:
        core = self.servicer.core
        config = self._reload()
        new = ProxyPolicies.from_config(config.policies, self.config.secret_bytes())
        install = self.app.prepare_reload(config) if self.app else None
        core.policies = new.policies
        if self.extproc is not None:  # its on_unrecognized / outputs keys, swapped together
            self.extproc.options = new.resolve
        security = install() if install else ""
        return describe_policies(core.policies) + (f"; {security}" if security else "")

    @property
    def in_flight(self) -> int:
        return self.servicer.in_flight

    async def close(self) -> None:
        await close_limiter(self.servicer.core)


async def close_limiter(core: ProtectCore) -> None:
    """After the server stopped: give the meter's unspent leases back to its store."""
    close = getattr(core.limiter, "close", None)
    if close is not None:
        await close()


async def run_sidecar(config: Config, *, reuse_port: bool = False,
                      reload: Callable[[], Config] | None = None) -> None:
    """Run the Defense service until a stop signal; NOT_SERVING until kernels are warm.

    SIGHUP calls `reload` for a new config and swaps in its policies between calls; a bad
    new config is logged and the old policies stay. The token file and TLS certificates
    are reloaded with them (`GrpcApp.prepare_reload`).
    """
    proxy_policies = ProxyPolicies.from_config(config.policies, config.secret_bytes())
    policies = proxy_policies.policies
    core = protect_core(config, policies)
    core.refuse(WARMING_UP)
    app = GrpcApp.from_settings(config, [DEFENSE_SERVICE, EXTPROC_SERVICE],
                                reuse_port=reuse_port, logger=log)
    servicer = DefenseServicer(
        core, app.identity, with_metrics=bool(config.metrics_port),
        slots=Slots(config.max_calls_per_principal, config.max_streams_per_principal),
        streams=stream_guard(config, core))
    add_lenient(defense_pb2_grpc.add_DefenseServicer_to_server, servicer, app.server)
    extproc = add_extproc(app.server, core, proxy_policies, app.identity, config)  # Envoy

    serve_metrics(config.metrics_port, log, settings=config)
    await lifecycle.run(app, Sidecar(config, servicer, reload, extproc, app),
                        details=f", policies: {describe_policies(policies)}")
