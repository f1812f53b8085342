"""The Prometheus registry every stealguard server shares, the per-call and per-client
series, and the one `/metrics` endpoint (`serve_metrics`).

Front ends add their own series to `REGISTRY` (the sidecar's in `stealguard.server.metrics`,
the model server's in `stealguard.modelserver.metrics`). With `--workers N`, worker i
serves its own metrics on metrics_port + i.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

LATENCY = Histogram("stealguard_request_seconds", "Time to answer a call, by method.",
                    ["method"], registry=REGISTRY,
                    buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0))
IN_FLIGHT = Gauge("stealguard_in_flight", "Calls being served now.", registry=REGISTRY)
CLIENT_QUERIES = Counter("stealguard_client_queries", "Calls by client.", ["client"],
                         registry=REGISTRY)
CLIENT_ROWS = Counter("stealguard_client_rows", "Rows by client.", ["client"],
                      registry=REGISTRY)
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


def serve_metrics(port: int, log: logging.Logger, *, default: int | None = None) -> int:
    """Serve /metrics on all interfaces at `port` (a daemon thread); the port served, 0
    for none.

    `port` 0 is off. None means `default`: tried, and skipped with a warning when taken
    (so that several model servers on one host all start); a port that was asked for
    must be free (OSError naming `--metrics-port` otherwise).
    """
    asked = port is not None
    port = default if port is None else port
    if not port:
        return 0
    try:
        start_http_server(port, registry=REGISTRY)
    except OSError as error:
        if asked:
            raise OSError(f"--metrics-port {port}: cannot serve metrics: {error.strerror}") \
                from None
        log.warning("metrics off: default port %d is taken (%s); pass --metrics-port",
                    port, error.strerror)
        return 0
    log.info("metrics on :%d/metrics", port)
    return port
