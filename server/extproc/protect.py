"""The one call the ext_proc front end makes to protect rows, and the errors it can raise.

`Protect` is `async (rows, model, principal) -> (protected rows, policy name)`. Until the
protocol-free protect core (issue 16) lands, `PolicyShim` backs it with what the `Defense`
servicer already has: its swappable `PolicySet` (so SIGHUP reloads apply), its warm-up and
drain state, `max_rows` and the per-policy and per-client row metrics.

`kind_of` names what went wrong in the words the core will use, and `HTTP_STATUS` and
`GRPC_STATUS` say what a caller of the proxied API sees for each kind.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import numpy as np
from stealguard.server import metrics
from stealguard.server.codec import RowLimitError
from stealguard.server.policies import UnknownModel
from stealguard.server.proxy.errors import Unrecognized
from stealguard.server.servicer import DefenseServicer, NotServing

Protect = Callable[[np.ndarray, str, str], Awaitable[tuple[np.ndarray, str]]]

INVALID = "invalid"  # the answer holds no probabilities the policy can protect
NOT_FOUND = "not-found"  # no policy for the model and no default policy
EXHAUSTED = "exhausted"  # over a limit: rows per request, a rate or a quota
UNAVAILABLE = "unavailable"  # warming up or draining
INTERNAL = "internal"  # anything else: a bug, logged with its traceback

# What a caller gets, for the kinds that are refused outright (the others, where the body
# parsed, are answered label-only: see server/extproc/servicer.py).
HTTP_STATUS = {INVALID: 503, NOT_FOUND: 404, EXHAUSTED: 429, UNAVAILABLE: 503, INTERNAL: 503}
GRPC_STATUS = {
    INVALID: grpc.StatusCode.FAILED_PRECONDITION,
    NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    INTERNAL: grpc.StatusCode.INTERNAL,
}


def kind_of(error: Exception) -> str:
    """The kind of a protect or parse error (order matters: RowLimitError is a ValueError)."""
    if isinstance(error, NotServing):
        return UNAVAILABLE
    if isinstance(error, RowLimitError):
        return EXHAUSTED
    if isinstance(error, UnknownModel):
        return NOT_FOUND
    if isinstance(error, (Unrecognized, ValueError)):
        return INVALID
    return INTERNAL


class PolicyShim:
    """`Protect` over the `Defense` servicer's policies, limits, state and metrics."""

    def __init__(self, servicer: DefenseServicer):
        self.servicer = servicer

    async def __call__(self, rows: np.ndarray, model: str,
                       principal: str) -> tuple[np.ndarray, str]:
        servicer = self.servicer
        if servicer.not_serving:
            raise NotServing(servicer.not_serving)
        policy = servicer.policies.resolve(model)
        if servicer.max_rows is not None and len(rows) > servicer.max_rows:
            raise RowLimitError(f"the answer has {len(rows)} rows: at most "
                                f"{servicer.max_rows} per request; split the batch")
        protected = policy.apply(rows)
        if servicer.with_metrics:
            metrics.observe_rows(policy.name, principal, rows, protected)
        return protected, policy.name
