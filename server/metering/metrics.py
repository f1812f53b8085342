"""Prometheus series of metering, in the servers' one registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram
from stealguard.server.metrics import REGISTRY

STORE_UP = Gauge("stealguard_metering_store_up",
                 "1 while the metering store answers, 0 while it does not.", ["store"],
                 registry=REGISTRY)
STORE_FAILURES = Counter(
    "stealguard_metering_store_failures",
    "Calls that met an unavailable metering store, by what happened to them "
    "(mode=closed: refused UNAVAILABLE; mode=open: admitted and counted in this process).",
    ["store", "mode"], registry=REGISTRY)
STORE_SECONDS = Histogram(
    "stealguard_metering_store_seconds", "Round trips to the metering store (lease refills).",
    ["store"], registry=REGISTRY,
    buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0))
REFUSED = Counter("stealguard_metering_refused",
                  "Calls refused over a limit, by the limit (rate, or a quota's window).",
                  ["limit"], registry=REGISTRY)
REFUSED_SLOTS = Counter("stealguard_metering_slots_refused",
                        "Calls or streams refused by a principal's in-flight cap.", ["kind"],
                        registry=REGISTRY)
