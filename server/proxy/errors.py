"""The proxy's own failures, as domain errors (mapped to gRPC status in
`stealguard.server.platform.status`, like every front end's).

Upstream errors keep their code and message (`UpstreamError`, a status passed on as it
is; UNAVAILABLE names the upstream, so a person can tell the proxy's upstream is down from
the proxy itself). An answer the proxy cannot protect under `on_unrecognized: reject` is
FAILED_PRECONDITION: the operator has to fix the policy or the model, retrying will not help.
"""

from __future__ import annotations

from stealguard.server.errors import FailedPrecondition
from stealguard.server.platform.status import GrpcError, Metadata

__all__ = ["Metadata", "Unrecognized", "UpstreamError"]


class UpstreamError(GrpcError):
    """The upstream answered a call with an error status (or could not be reached)."""


class Unrecognized(FailedPrecondition, ValueError):
    """An answer holds no probabilities the proxy can protect, and the policy rejects it."""

    def __init__(self, model: str, policy: str, reason: str):
        super().__init__(
            f"model {model!r}: cannot protect the upstream's answer: {reason}. The proxy "
            f"returns no probabilities it cannot protect (policy {policy!r} has "
            "on_unrecognized: reject); set on_unrecognized: pass in that policy to return "
            "such answers unchanged"
        )
