"""Per-principal metering: a query is a row, limits hold across workers, replicas and
restarts when the counts live in Redis or Valkey.

    limits = Limits.of(rate=100, burst=200, quotas=["20000/1d"])
    meter = Meter(limits, open_store("redis://127.0.0.1:6379/0"), failure="closed")
    admission = await meter.admit("alice", rows=32)   # or OverLimit / StoreUnavailable

See limits.py (GCRA rate, rolling-window quotas), store.py and redis_store.py (the one
atomic algorithm, in Python and Lua), meter.py (leases, failing closed or open),
errors.py (the protect core's Exhausted and Unavailable), inflight.py (per-principal
slots, idle streams) and usage.py (`stealguard-sidecar usage`).
"""

from stealguard.server.metering.errors import OverLimit, StoreUnavailable, Violation
from stealguard.server.metering.inflight import Slots, SlotsExhausted, StreamIdle
from stealguard.server.metering.limits import Limits, Quota, parse_quota
from stealguard.server.metering.meter import FAILURE_MODES, Admission, Meter
from stealguard.server.metering.redis_store import RedisStore, open_store
from stealguard.server.metering.store import MemoryStore, StoreError

__all__ = [
    "FAILURE_MODES", "Admission", "Limits", "MemoryStore", "Meter", "OverLimit", "Quota",
    "RedisStore", "Slots", "SlotsExhausted", "StoreError", "StoreUnavailable", "StreamIdle",
    "Violation", "open_store", "parse_quota",
]
