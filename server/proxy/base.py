"""What both proxied APIs share: the upstream stub, the policies, and the serving state."""

from __future__ import annotations

from stealguard.server.proxy.options import ProxyPolicies, ProxyPolicy
from stealguard.server.proxy.upstream import Upstream
from stealguard.server.servicer import NotServing


class ProxyServicer:
    """Base of the protocol servicers; `not_serving` holds why calls are refused, if so."""

    service: str  # full name of the proxied gRPC service (health and reflection)
    stub_class: type

    def __init__(self, upstream: Upstream, policies: ProxyPolicies):
        self.upstream = upstream
        self.policies = policies
        self.stub = self.stub_class(upstream.channel)
        self.not_serving: str | None = "the proxy is warming up its kernels; retry shortly"

    def policy(self, model: str) -> ProxyPolicy:
        """The policy of `model`; `NotServing` while warming or draining, or `UnknownModel`."""
        if self.not_serving:
            raise NotServing(self.not_serving)
        return self.policies.resolve(model)

    async def upstream_ready(self, timeout: float) -> bool:
        """Whether the upstream reports itself ready (raises `UpstreamError` if unreachable)."""
        raise NotImplementedError
