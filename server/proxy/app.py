"""Assemble and run the proxy: one protect core, one `GrpcApp`, one upstream channel, one
health watcher, on the platform's lifecycle.

Health (grpc.health.v1, service "" and the proxied service's name) is SERVING only while
the kernels are warm and the upstream reports itself ready (TorchServe `Ping`, v2
`ServerReady`), polled every `health_interval` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from stealguard.server.config import Config
from stealguard.server.metering.settings import stream_guard
from stealguard.server.platform import lifecycle
from stealguard.server.platform.app import GrpcApp
from stealguard.server.platform.metrics import serve_metrics
from stealguard.server.proxy.base import DRAINING, WARMING_UP, ProxyServicer
from stealguard.server.proxy.errors import UpstreamError
from stealguard.server.proxy.options import ProxyPolicies
from stealguard.server.proxy.torchserve import TorchServeProxy
from stealguard.server.proxy.upstream import Upstream, upstream_credentials
from stealguard.server.proxy.v2 import V2Proxy
from stealguard.server.sidecar import close_limiter, protect_core, warm_kernels

log = logging.getLogger("stealguard.proxy")

PROTOCOLS = {"torchserve": TorchServeProxy, "v2": V2Proxy}


class Proxy(lifecycle.Service):
    """The proxy's lifecycle hooks: warm the kernels, then let the upstream decide health."""

    def __init__(self, config: Config, proxy: ProxyServicer, upstream: Upstream,
                 health_interval: float, reload: Callable[[], Config] | None,
                 app: GrpcApp | None = None):
        self.config = config
        self.app = app
        self.proxy = proxy
        self.upstream = upstream
        self.health_interval = health_interval
        self._reload = reload
        self.reloadable = reload is not None
        self.watcher: asyncio.Task | None = None
        self.core = proxy.core
        self.draining = DRAINING

    def warm_up(self) -> str:
        seconds = warm_kernels(self.core, self.core.policies, "proxy", log)
        return f"kernels warm in {seconds:.2f}s"

    async def serving(self, app: GrpcApp) -> None:
        self.proxy.core.open()
        self.watcher = asyncio.create_task(
            watch_upstream(app, self.proxy, self.health_interval))

    def drain(self) -> None:
        super().drain()
        if self.watcher is not None:
            self.watcher.cancel()

    def reload(self) -> str:
        config = self._reload()
        policies = ProxyPolicies.from_config(config.policies, self.config.secret_bytes())
        install = self.app.prepare_reload(config) if self.app else None
        self.proxy.policies = policies
        security = install() if install else ""
        return _names(self.proxy.policies) + (f"; {security}" if security else "")

    async def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        await self.upstream.close()
        await close_limiter(self.proxy.core)


async def run_proxy(config: Config, *, reuse_port: bool = False, health_interval: float = 1.0,
                    reload: Callable[[], Config] | None = None) -> None:
    """Serve `config.protocol` on `config.listen` in front of `config.upstream` until a signal.

    TLS, tokens, limits and metrics are the sidecar's (`GrpcApp.from_settings`,
    `protect_core`). SIGHUP calls `reload` and swaps in the new policies between calls; a
    bad config keeps the old ones.
    """
    policies = ProxyPolicies.from_config(config.policies, config.secret_bytes())
    credentials = upstream_credentials(config.upstream_tls_ca, config.upstream_tls_cert,
                                       config.upstream_tls_key)
    upstream = Upstream(config.upstream, max_message_bytes=config.max_message_bytes,
                        credentials=credentials)
    core = protect_core(config, policies.policies)
    core.refuse(WARMING_UP)
    app = GrpcApp.from_settings(config, [PROTOCOLS[config.protocol].service],
                                reuse_port=reuse_port, logger=log)
    proxy = PROTOCOLS[config.protocol](upstream, policies, core, app.identity,
                                       stream_guard(config, core))
    proxy.add_to(app.server)

    serve_metrics(config.metrics_port, log, settings=config)
    await lifecycle.run(app, Proxy(config, proxy, upstream, health_interval, reload, app),
                        name=f"proxy ({config.protocol})",
                        details=f" for upstream {config.upstream}"
                        f"{' over TLS' if credentials else ''}, policies: {_names(policies)}")


def _names(policies: ProxyPolicies) -> str:
    return ", ".join(f"{p.name}={p.policy.defense_name}" for p in policies)


async def watch_upstream(app: GrpcApp, proxy: ProxyServicer, interval: float) -> None:
    """Poll the upstream's readiness forever; report each change through health."""
    serving = None
    while True:
        try:
            ready = await proxy.upstream_ready(timeout=interval)
            why = f"upstream {proxy.upstream.address} reports it is not ready"
        except UpstreamError as error:
            ready, why = False, f"{error.code.name}: {error.details}"
        if ready != serving:
            if ready:
                log.info("SERVING: upstream %s is ready", proxy.upstream.address)
            else:
                log.warning("NOT_SERVING: %s", why)
            await app.set_serving(ready)
            serving = ready
        await asyncio.sleep(interval)
