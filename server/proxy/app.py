"""Assemble and run the proxy: one `GrpcApp`, one upstream channel, one health watcher.

Health (grpc.health.v1, service "" and the proxied service's name) is SERVING only while
the kernels are warm and the upstream reports itself ready (TorchServe `Ping`, v2
`ServerReady`), polled every `health_interval` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from stealguard.server.config import Config
from stealguard.server.defenses import warm_up
from stealguard.server.proxy.errors import UpstreamError
from stealguard.server.proxy.options import ProxyPolicies
from stealguard.server.proxy.torchserve import TorchServeProxy
from stealguard.server.proxy.upstream import Upstream, upstream_credentials
from stealguard.server.proxy.v2 import V2Proxy
from stealguard.server.server import GrpcApp

log = logging.getLogger("stealguard.proxy")

PROTOCOLS = {"torchserve": TorchServeProxy, "v2": V2Proxy}


async def run_proxy(config: Config, *, reuse_port: bool = False, health_interval: float = 1.0,
                    reload: Callable[[], Config] | None = None) -> None:
    """Serve `config.protocol` on `config.listen` in front of `config.upstream` until a signal.

    TLS, tokens, limits and metrics are the sidecar's (`GrpcApp.from_config`). SIGHUP calls
    `reload` and swaps in the new policies between calls; a bad config keeps the old ones.
    """
    policies = ProxyPolicies.from_config(config.policies, config.secret_bytes())
    credentials = upstream_credentials(config.upstream_tls_ca, config.upstream_tls_cert,
                                       config.upstream_tls_key)
    upstream = Upstream(config.upstream, max_message_bytes=config.max_message_bytes,
                        credentials=credentials)
    proxy = PROTOCOLS[config.protocol](upstream, policies)
    app = GrpcApp.from_config(config, [proxy.service], reuse_port=reuse_port)
    proxy.add_to(app.server)
    watcher: asyncio.Task | None = None

    def refuse() -> None:
        proxy.not_serving = "the proxy is draining; retry on another instance"
        if watcher is not None:
            watcher.cancel()

    def swap_policies() -> str:
        proxy.policies = ProxyPolicies.from_config(reload().policies, config.secret_bytes())
        return _names(proxy.policies)

    app.on_drain.append(refuse)
    port = await app.start()
    if reload is not None:
        app.reload_on_sighup(swap_policies)
    app.serve_metrics(config.metrics_port)
    host = config.listen.rsplit(":", 1)[0]
    log.info("proxy (%s) listening on %s:%d (pid %d)%s for upstream %s%s, policies: %s",
             config.protocol, host, port, os.getpid(), " with TLS" if app.credentials else "",
             config.upstream, " over TLS" if credentials else "", _names(policies))
    seconds = await app.unless_stopped(lambda: warm_up(
        {p.name: p.policy.defense for p in policies}, progress=lambda m: log.info("%s", m),
        background=True))
    if seconds is not None:  # None: a stop signal came during the warm-up
        log.info("kernels warm in %.2fs", seconds)
        proxy.not_serving = None
        watcher = asyncio.create_task(watch_upstream(app, proxy, health_interval))
    try:
        await app.wait_and_drain()
    finally:
        if watcher is not None:
            watcher.cancel()
        await upstream.close()


def _names(policies: ProxyPolicies) -> str:
    return ", ".join(f"{p.name}={p.policy.defense_name}" for p in policies)


async def watch_upstream(app: GrpcApp, proxy, interval: float) -> None:
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
