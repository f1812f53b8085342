"""Prometheus metrics of the model server, served on `--metrics-port` (default 8082).

They live in the platform's registry (`stealguard.server.platform.metrics.REGISTRY`)
beside the per-call series its interceptor keeps (`stealguard_in_flight`,
`stealguard_request_seconds` by RPC method) and the per-client ones
(`stealguard_client_queries_total`, `stealguard_client_rows_total`,
`stealguard_rate_limited_total`), so one endpoint shows all. `Recorder` counts each
prediction (`prediction`) and is the protect core's observer of each answer (`observe`).
Model labels are model-store names only: a caller cannot add label values by asking for
models that do not exist (they count as `unknown`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Gauge, Histogram
from stealguard.server.core import Exchange
from stealguard.server.platform.metrics import (
    CLIENT_QUERIES,
    CLIENT_ROWS,
    RATE_LIMITED,
    REGISTRY,
    client_label,
)

UNKNOWN_MODEL = "unknown"

REQUESTS = Counter("stealguard_modelserver_requests", "Predictions by model and status code.",
                   ["model", "code"], registry=REGISTRY)
LATENCY = Histogram("stealguard_modelserver_request_seconds",
                    "Time to answer a prediction (decode, forward pass, sidecar), by model.",
                    ["model"], registry=REGISTRY,
                    buckets=(1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
                             2.5, 10.0))
ROWS = Counter("stealguard_modelserver_rows", "Probability rows answered, by model.",
               ["model"], registry=REGISTRY)
IN_FLIGHT = Gauge("stealguard_modelserver_in_flight", "Predictions being answered now.",
                  registry=REGISTRY)
L1_DISTORTION = Counter(
    "stealguard_modelserver_l1_distortion",
    "Protected models: sum over rows of the L1 distance between the returned probabilities "
    "and the model's raw output; divide by stealguard_modelserver_rows_total for the mean.",
    ["model"], registry=REGISTRY)
TOP1_CHANGES = Counter("stealguard_modelserver_top1_changes",
                       "Protected models: returned rows whose top-1 class differs from the "
                       "model's raw output.", ["model"], registry=REGISTRY)
FAIL_CLOSED = Counter("stealguard_modelserver_fail_closed",
                      "Answers that were label-only because the sidecar failed, by model and "
                      "the sidecar call's status code.", ["model", "code"], registry=REGISTRY)


@dataclass
class Outcome:
    """The status code of one prediction, set by whoever knows it (OK unless told)."""

    code: str = "OK"
    limited: bool = False  # refused by the rate limit (not counted as a query)


class Recorder:
    """Records the model server's metrics; does nothing when `enabled` is false.

    `models` are the names in the store, `protected` those with a protect step (only they
    get distortion series).
    """

    def __init__(self, enabled: bool, models: Iterable[str] = (),
                 protected: Iterable[str] | None = None):
        self.enabled = enabled
        self.models = frozenset(models)
        self.protected = self.models if protected is None else frozenset(protected)

    def _label(self, model: str) -> str:
        return model if model in self.models else UNKNOWN_MODEL

    @contextmanager
    def prediction(self, model: str, client: str | None = None) -> Iterator[Outcome]:
        """Count one prediction by model and final status code, its latency and in-flight,
        and as one query of `client` unless its rate limit refused it."""
        outcome = Outcome()
        if not self.enabled:
            yield outcome
            return
        label = self._label(model)
        IN_FLIGHT.inc()
        start = time.perf_counter()
        try:
            yield outcome
        finally:
            IN_FLIGHT.dec()
            LATENCY.labels(label).observe(time.perf_counter() - start)
            REQUESTS.labels(label, outcome.code).inc()
            if client is not None and not outcome.limited:
                CLIENT_QUERIES.labels(client_label(client)).inc()

    def observe(self, exchange: Exchange) -> None:
        """The protect core's observer: rows of one answer; for a protected model, its
        distortion against the model's raw output; a refusal by the rate limit."""
        if not self.enabled:
            return
        if exchange.limited:
            RATE_LIMITED.labels(client_label(exchange.principal)).inc()
        if exchange.returned is not None:
            self.answer(exchange.policy, exchange.principal, exchange.given,
                        exchange.returned)

    def answer(self, model: str, client: str, raw: np.ndarray, returned: np.ndarray) -> None:
        """Rows of one answer; for a protected model, its distortion against `raw`."""
        if not self.enabled:
            return
        rows = len(raw)
        ROWS.labels(self._label(model)).inc(rows)
        CLIENT_ROWS.labels(client_label(client)).inc(rows)
        if model not in self.protected or rows == 0:
            return
        L1_DISTORTION.labels(model).inc(float(np.abs(returned - raw).sum()))
        changed = int((returned.argmax(axis=1) != raw.argmax(axis=1)).sum())
        TOP1_CHANGES.labels(model).inc(changed)

    def fail_closed(self, model: str, code: str) -> None:
        """One label-only answer: the sidecar call ended with `code`."""
        if self.enabled:
            FAIL_CLOSED.labels(self._label(model), code).inc()
