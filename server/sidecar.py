"""Assemble and run the sidecar: policies -> protect core -> `Defense` servicer -> `GrpcApp`.

NOT_SERVING (and UNAVAILABLE) until the kernels are compiled and warm; SIGHUP swaps in
the policies of a fresh config between calls; SIGTERM drains (the platform's lifecycle).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from stealguard.server.config import Config
from stealguard.server.core import ProtectCore
from stealguard.server.defenses import warm_up
from stealguard.server.limits import TokenBucket
from stealguard.server.metrics import MetricsObserver
from stealguard.server.platform import lifecycle
from stealguard.server.platform.app import GrpcApp
from stealguard.server.platform.lenient import add_lenient
from stealguard.server.platform.metrics import serve_metrics
from stealguard.server.policies import PolicySet
from stealguard.server.servicer import DRAINING, WARMING_UP, DefenseServicer
from stealguard.v1 import defense_pb2, defense_pb2_grpc

log = logging.getLogger("stealguard.sidecar")

DEFENSE_SERVICE = defense_pb2.DESCRIPTOR.services_by_name["Defense"].full_name


def protect_core(config: Config, policies) -> ProtectCore:
    """The core with `config`'s limits and, when metrics are on, the metrics observer
    (the sidecar and the proxy build theirs the same way)."""
    limiter = TokenBucket(config.rate_limit, config.rate_burst) if config.rate_limit else None
    observers = [MetricsObserver()] if config.metrics_port else []
    return ProtectCore(policies, max_rows=config.max_rows, limiter=limiter,
                       observers=observers)


def describe_policies(policies) -> str:
    return ", ".join(f"{p.name}={p.defense_name}" for p in policies)


class Sidecar(lifecycle.Service):
    """The sidecar's lifecycle hooks: warm the kernels, drain, reload the policies."""

    draining = DRAINING

    def __init__(self, config: Config, servicer: DefenseServicer,
                 reload: Callable[[], Config] | None, app: GrpcApp | None = None):
        self.config = config
        self.app = app
        self.servicer = servicer
        self.core = servicer.core
        self._reload = reload
        self.reloadable = reload is not None

    def warm_up(self) -> str:
        return f"ready: kernels warm in {warm_up():.2f}s"

    def drain(self) -> None:
        super().drain()
        log.info("draining: %d calls in flight; ended %d idle streams", self.servicer.in_flight,
                 self.servicer.end_idle_streams())

    def reload(self) -> str:
        core = self.servicer.core
        config = self._reload()
        policies = PolicySet.from_config(config.policies, self.config.secret_bytes())
        install = self.app.prepare_reload(config) if self.app else None
        core.policies = policies
        security = install() if install else ""
        return describe_policies(core.policies) + (f"; {security}" if security else "")

    @property
    def in_flight(self) -> int:
        return self.servicer.in_flight


async def run_sidecar(config: Config, *, reuse_port: bool = False,
                      reload: Callable[[], Config] | None = None) -> None:
    """Run the Defense service until a stop signal; NOT_SERVING until kernels are warm.

    SIGHUP calls `reload` for a new config and swaps in its policies between calls; a bad
    new config is logged and the old policies stay. The token file and TLS certificates
    are reloaded with them (`GrpcApp.prepare_reload`).
    """
    policies = PolicySet.from_config(config.policies, config.secret_bytes())
    core = protect_core(config, policies)
    core.refuse(WARMING_UP)
    app = GrpcApp.from_settings(config, [DEFENSE_SERVICE], reuse_port=reuse_port, logger=log)
    servicer = DefenseServicer(core, app.identity, with_metrics=bool(config.metrics_port))
    add_lenient(defense_pb2_grpc.add_DefenseServicer_to_server, servicer, app.server)

    serve_metrics(config.metrics_port, log, settings=config)
    await lifecycle.run(app, Sidecar(config, servicer, reload, app),
                        details=f", policies: {describe_policies(policies)}")
