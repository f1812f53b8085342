"""Metering's settings, declared once so every server composes the same ones: keys (YAML
and `STEALGUARD_*`), flags, and the checks that run before any worker is forked."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from stealguard.server.metering.limits import Limits
from stealguard.server.metering.meter import FAILURE_MODES, Meter

#: Rows that opening a request stream costs: a stream is never free, so idle streams
#: spend the budget of the principal who holds them.
STREAM_OPEN_ROWS = 1


@dataclass
class MeteringSettings:
    """Field names are the YAML keys (environment: STEALGUARD_ + the key in capitals)."""

    rate_limit: float = 0.0  # rows per second per principal (0: none)
    rate_burst: int = 0  # rows at once (0: the rate)
    quota: list[str] = field(default_factory=list)  # "N/PERIOD", e.g. "20000/1d"
    store: str = "memory"  # or redis://HOST:PORT/DB, rediss://...
    store_failure: str = "closed"  # or "open"
    trust_client_header: bool = False  # believe x-client-id from anyone (behind a gateway)
    max_calls_per_principal: int = 64  # unary calls in flight per principal (0: no cap)
    max_streams_per_principal: int = 16  # request streams open per principal (0: no cap)
    stream_idle_timeout: float = 300.0  # seconds a request stream may stay silent (0: none)

    def limits(self) -> Limits:
        """The limits these settings name (ValueError naming a bad quota)."""
        return Limits.of(self.rate_limit, self.rate_burst, self.quota)

    def check(self, workers: int = 1) -> None:
        """Raise ValueError, naming the flag, for settings that cannot hold: a bad quota
        or store, or a limit with `--workers` > 1 and the memory store (each worker would
        keep its own counts and the limit would be multiplied by the workers)."""
        limits = self.limits()
        if self.store_failure not in FAILURE_MODES:
            raise ValueError(f"--store-failure must be one of {FAILURE_MODES}, "
                             f"got {self.store_failure!r}")
        from stealguard.server.metering.redis_store import open_store

        if self.store not in ("", "memory"):
            open_store(self.store)  # only parses the URL; connects on first use
        elif limits.active and workers > 1:
            raise ValueError(f"--workers {workers} with a rate limit or quota needs a shared "
                             "--store (redis://HOST:PORT/DB): with the memory store each "
                             "worker would count alone")
        for key in ("max_calls_per_principal", "max_streams_per_principal",
                    "stream_idle_timeout"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be 0 or more, got {getattr(self, key)}")

    def meter(self) -> Meter | None:
        """The meter of these settings, or None when nothing is limited (call inside the
        event loop that serves: the store's connections belong to it)."""
        limits = self.limits()
        if not limits.active:
            return None
        from stealguard.server.metering.redis_store import open_store

        return Meter(limits, open_store(self.store), failure=self.store_failure)


def add_metering_flags(parser: argparse.ArgumentParser) -> None:
    """The metering flags, the same on the sidecar, the proxy and the model server."""
    group = parser.add_argument_group("metering (a query is a row)")
    group.add_argument("--rate-limit", type=float, dest="rate_limit",
                       help="rows per second per principal (default 0: no limit)")
    group.add_argument("--rate-burst", type=int, dest="rate_burst",
                       help="rows a principal may send at once (default: the rate)")
    group.add_argument("--quota", action="append", dest="quota", metavar="N/PERIOD",
                       help="at most N rows per rolling PERIOD per principal, e.g. 20000/1d "
                       "(repeatable)")
    group.add_argument("--store", help="where counts live: memory (default, this process) "
                       "or redis://HOST:PORT/DB / rediss://... shared by workers and replicas "
                       "(password in the URL or STEALGUARD_STORE_PASSWORD)")
    group.add_argument("--store-failure", dest="store_failure", choices=FAILURE_MODES,
                       help="when the store is down: closed (default) refuses with "
                       "UNAVAILABLE, open admits and counts in this process")
    group.add_argument("--trust-client-header", dest="trust_client_header",
                       action="store_const", const=True,
                       help="believe the client header from every caller (only behind a "
                       "gateway that authenticates and sets it)")
    group.add_argument("--max-calls-per-principal", type=int,
                       dest="max_calls_per_principal",
                       help="unary calls in flight per principal (default 64; 0: no cap)")
    group.add_argument("--max-streams-per-principal", type=int,
                       dest="max_streams_per_principal",
                       help="request streams open per principal (default 16; 0: no cap)")
    group.add_argument("--stream-idle-timeout", type=float, dest="stream_idle_timeout",
                       help="seconds a request stream may send nothing before it is ended "
                       "(default 300; 0: never)")
