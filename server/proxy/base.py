"""What both proxied APIs share: the upstream stub, the protect core and the policies.

The proxy is a front end of the protect core like the `Defense` servicer: it resolves the
policy before a call goes upstream (so an unknown model costs the upstream nothing), reads
the probabilities out of the upstream's answer, has the core protect them for the calling
principal (limits, metrics and metering included), and writes them back.
"""

from __future__ import annotations

import numpy as np
from stealguard.server.core import ANONYMOUS, ProtectCore
from stealguard.server.metering.inflight import StreamGuard
from stealguard.server.platform.identity import Identity
from stealguard.server.proxy.options import ProxyPolicies, ProxyPolicy
from stealguard.server.proxy.upstream import Upstream

WARMING_UP = "the proxy is warming up its kernels; retry shortly"
DRAINING = "the proxy is draining; retry on another instance"


class ProxyServicer:
    """Base of the protocol servicers."""

    service: str  # full name of the proxied gRPC service (health and reflection)
    stub_class: type

    def __init__(self, upstream: Upstream, policies: ProxyPolicies, core: ProtectCore,
                 identity: Identity | None = None, streams: StreamGuard | None = None):
        self.upstream = upstream
        self.core = core
        self.identity = identity or Identity()
        # a request stream's slot, opening charge and idle timeout (per principal)
        self.streams = streams or StreamGuard()
        self.policies = policies
        self.stub = self.stub_class(upstream.channel)

    @property
    def policies(self) -> ProxyPolicies:
        return self._policies

    @policies.setter
    def policies(self, policies: ProxyPolicies) -> None:
        """Swap the proxy options and the core's policies together (SIGHUP)."""
        self._policies = policies
        self.core.policies = policies.policies

    def policy(self, model: str) -> ProxyPolicy:
        """The policy of `model`: `Unavailable` while warming or draining, `NotFound`
        without one."""
        self.core.resolve(model)
        return self._policies.resolve(model)

    def perturber(self, policy: ProxyPolicy, context, principal: str | None = None):
        """`async perturb(rows) -> rows`: the core's protection of rows read out of an
        answer, under `policy`, charged to the caller of `context` (`principal`, when the
        front end has identified it already)."""
        if not self.core.needs_principal:
            principal = ANONYMOUS
        elif principal is None:
            principal = self.identity.of(context)

        async def perturb(rows: np.ndarray) -> np.ndarray:
            return (await self.core.protect(rows, policy.name, principal)).rows

        return perturb

    async def upstream_ready(self, timeout: float) -> bool:
        """Whether the upstream reports itself ready (raises `UpstreamError` if unreachable)."""
        raise NotImplementedError
