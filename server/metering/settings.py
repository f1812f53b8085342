"""Metering's flags and the checks and objects built from a server's settings.

The settings themselves are fields of `stealguard.server.settings.ServerSettings`
(rate_limit, rate_burst, quota, store, store_failure, trust_client_header,
max_calls_per_principal, max_streams_per_principal, stream_idle_timeout), so every server
has them with one meaning; this module gives their flags and turns them into a `Meter`.
"""

from __future__ import annotations

import argparse

from stealguard.server.metering.limits import Limits

#: Rows that opening a request stream costs: a stream is never free, so idle streams
#: spend the budget of the principal who holds them.
STREAM_OPEN_ROWS = 1


def limits_of(settings) -> Limits:
    """The limits a server's settings name (ValueError naming a bad quota)."""
    return Limits.of(settings.rate_limit, settings.rate_burst, settings.quota)


def check_metering(settings, workers: int = 1) -> None:
    """Raise ValueError, naming the flag, for metering settings that cannot hold: a bad
    quota or store URL, or a limit with `--workers` > 1 on the memory store (each worker
    would keep its own counts, multiplying the limit by the workers)."""
    limits = limits_of(settings)
    from stealguard.server.metering.redis_store import open_store

    if settings.store not in ("", "memory"):
        open_store(settings.store)  # parses the URL only; it connects on first use
    elif limits.active and workers > 1:
        raise ValueError(f"--workers {workers} with a rate limit or quota needs a shared "
                         "--store (redis://HOST:PORT/DB): with the memory store each "
                         "worker would count alone")


def meter_of(settings):
    """The `Meter` of a server's settings, or None when nothing is limited. Call it in the
    event loop that serves: the store's connections belong to that loop."""
    limits = limits_of(settings)
    if not limits.active:
        return None
    from stealguard.server.metering.meter import Meter
    from stealguard.server.metering.redis_store import open_store

    return Meter(limits, open_store(settings.store), failure=settings.store_failure)


def stream_guard(settings, core):
    """The `StreamGuard` of a server's settings over `core`'s limiter."""
    from stealguard.server.metering.inflight import Slots, StreamGuard

    return StreamGuard(Slots(settings.max_calls_per_principal,
                             settings.max_streams_per_principal),
                       core.limiter, settings.stream_idle_timeout)


def add_metering_flags(parser: argparse.ArgumentParser) -> None:
    """The metering flags, the same on the sidecar, the proxy and the model server
    (values are read by the settings loader, which knows their kinds)."""
    group = parser.add_argument_group("metering (a query is a row)")
    group.add_argument("--rate-limit", dest="rate_limit",
                       help="rows per second per principal (default 0: no limit)")
    group.add_argument("--rate-burst", dest="rate_burst",
                       help="rows a principal may send at once (default: the rate)")
    group.add_argument("--quota", action="append", dest="quota", metavar="N/PERIOD",
                       help="at most N rows per rolling PERIOD per principal, e.g. 20000/1d "
                       "(repeatable)")
    group.add_argument("--store", help="where counts live: memory (default, this process) "
                       "or redis://HOST:PORT/DB / rediss://... shared by workers and replicas "
                       "(password in the URL or STEALGUARD_STORE_PASSWORD)")
    group.add_argument("--store-failure", dest="store_failure",
                       help="while the store is down: closed (default) refuses with "
                       "UNAVAILABLE, open admits and counts in each process")
    group.add_argument("--trust-client-header", dest="trust_client_header",
                       action="store_const", const=True,
                       help="believe the client header from every caller (only behind a "
                       "gateway that authenticates callers and sets it)")
    group.add_argument("--max-calls-per-principal", dest="max_calls_per_principal",
                       help="unary calls in flight per principal (default 64; 0: no cap)")
    group.add_argument("--max-streams-per-principal", dest="max_streams_per_principal",
                       help="request streams open per principal (default 16; 0: no cap)")
    group.add_argument("--stream-idle-timeout", dest="stream_idle_timeout",
                       help="seconds a request stream may send nothing before it is ended "
                       "(default 300; 0: never)")
