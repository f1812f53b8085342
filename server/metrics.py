"""Prometheus metrics of the sidecar (and proxy), served on `--metrics-port`.

With `--workers N`, worker i serves its own metrics on metrics_port + i.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

REQUESTS = Counter("stealguard_requests", "Calls by method, policy and status code.",
                   ["method", "policy", "code"], registry=REGISTRY)
LATENCY = Histogram("stealguard_request_seconds", "Time to answer a call, by method.",
                    ["method"], registry=REGISTRY,
                    buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0))
ROWS = Counter("stealguard_rows", "Probability rows protected, by policy.", ["policy"],
               registry=REGISTRY)
IN_FLIGHT = Gauge("stealguard_in_flight", "Calls being served now.", registry=REGISTRY)
CLIENT_QUERIES = Counter("stealguard_client_queries", "Calls by client.", ["client"],
                         registry=REGISTRY)
CLIENT_ROWS = Counter("stealguard_client_rows", "Rows by client.", ["client"],
                      registry=REGISTRY)
L1_DISTORTION = Counter(
    "stealguard_l1_distortion",
    "Sum over rows of the L1 distance between returned and input probabilities; divide by "
    "stealguard_rows_total for the mean distortion.", ["policy"], registry=REGISTRY)
TOP1_CHANGES = Counter("stealguard_top1_changes", "Returned rows whose top-1 class differs "
                       "from the input's.", ["policy"], registry=REGISTRY)
RATE_LIMITED = Counter("stealguard_rate_limited", "Calls refused by a client's rate limit.",
                       ["client"], registry=REGISTRY)

#: Distinct client names that get series of their own; later ones share OTHER_CLIENTS.
#: Without tokens a client's name is whatever its `x-client-id` header says, so unbounded
#: per-client series would let a caller grow /metrics and the process's memory at will.
MAX_CLIENT_SERIES = 1000
OTHER_CLIENTS = "_other"
_client_series: set[str] = set()


def client_label(client: str) -> str:
    """The per-client label value for `client`: its name, or OTHER_CLIENTS once
    MAX_CLIENT_SERIES other names have series."""
    if client in _client_series:
        return client
    if len(_client_series) < MAX_CLIENT_SERIES:
        _client_series.add(client)
        return client
    return OTHER_CLIENTS


def serve(port: int) -> None:
    """Serve /metrics on all interfaces at `port` (a daemon thread)."""
    start_http_server(port, registry=REGISTRY)


def observe_rows(policy: str, client: str, given: np.ndarray, returned: np.ndarray,
                 logits: bool = False) -> None:
    """Count rows, per-client rows, L1 distortion and top-1 changes of one answer.

    For logits input the L1 distortion is not defined (the input is not probabilities):
    only rows and top-1 changes are counted.
    """
    rows = np.atleast_2d(given)
    out = np.atleast_2d(returned)
    n = rows.shape[0]
    ROWS.labels(policy).inc(n)
    CLIENT_ROWS.labels(client_label(client)).inc(n)
    if n == 0 or rows.shape != out.shape:
        return
    if not logits:
        L1_DISTORTION.labels(policy).inc(float(np.abs(out - rows).sum()))
    changed = int((out.argmax(axis=1) != rows.argmax(axis=1)).sum())
    if changed:
        TOP1_CHANGES.labels(policy).inc(changed)
