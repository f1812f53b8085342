"""Prometheus metrics of the protect core in the sidecar and the proxy: one observer.

`MetricsObserver` counts what the core was asked and answered, the same for a sidecar
answer and a proxied one: per-client queries and rows, rows, L1 distortion and top-1
changes by policy, and calls refused by a client's rate limit. Calls by method, policy and
status code (`REQUESTS`) are counted by the front end, which knows the method. The
shared series and the endpoint are `stealguard.server.platform.metrics`.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter
from stealguard.server.core import Exchange
from stealguard.server.platform.metrics import (
    CLIENT_QUERIES,
    CLIENT_ROWS,
    RATE_LIMITED,
    REGISTRY,
    client_label,
)

REQUESTS = Counter("stealguard_requests", "Calls by method, policy and status code.",
                   ["method", "policy", "code"], registry=REGISTRY)
ROWS = Counter("stealguard_rows", "Probability rows protected, by policy.", ["policy"],
               registry=REGISTRY)
L1_DISTORTION = Counter(
    "stealguard_l1_distortion",
    "Sum over rows of the L1 distance between returned and input probabilities; divide by "
    "stealguard_rows_total for the mean distortion.", ["policy"], registry=REGISTRY)
TOP1_CHANGES = Counter("stealguard_top1_changes", "Returned rows whose top-1 class differs "
                       "from the input's.", ["policy"], registry=REGISTRY)


class MetricsObserver:
    """The protect core's Prometheus observer (sidecar and proxy)."""

    def observe(self, exchange: Exchange) -> None:
        client = client_label(exchange.principal)
        if exchange.limited:
            RATE_LIMITED.labels(client).inc()
            return
        CLIENT_QUERIES.labels(client).inc()
        if exchange.returned is not None:
            observe_rows(exchange.policy, client, exchange.given, exchange.returned,
                         logits=exchange.logits)


def observe_rows(policy: str, client: str, given: np.ndarray, returned: np.ndarray,
                 logits: bool = False) -> None:
    """Count rows, per-client rows, L1 distortion and top-1 changes of one answer.

    `client` is a label value (`client_label`). For logits input the L1 distortion is not
    defined (the input is not probabilities): only rows and top-1 changes are counted.
    """
    rows = np.atleast_2d(given)
    out = np.atleast_2d(returned)
    n = rows.shape[0]
    ROWS.labels(policy).inc(n)
    CLIENT_ROWS.labels(client).inc(n)
    if n == 0 or rows.shape != out.shape:
        return
    if not logits:
        L1_DISTORTION.labels(policy).inc(float(np.abs(out - rows).sum()))
    changed = int((out.argmax(axis=1) != rows.argmax(axis=1)).sum())
    if changed:
        TOP1_CHANGES.labels(policy).inc(changed)
