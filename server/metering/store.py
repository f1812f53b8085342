"""The metering store: where each principal's counts live, and the one algorithm on them.

A store answers `acquire`: charge between `want_min` and `want_max` rows to a principal,
as many as every limit allows, atomically, or none. The counts of one principal are one
hash: field `tat` (the GCRA theoretical arrival time, µs) and one field `w<PERIOD>:<SLOT>`
per quota slot that holds rows. `MemoryStore` keeps them in this process; `RedisStore`
(redis_store.py) runs the same steps as one Lua script in Redis or Valkey, so workers and
replicas share them. `algorithm` below is that step in Python: the memory store runs it
and the tests compare the script with it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from stealguard.server.metering.limits import SLOTS, Limits, Quota

RATE = "rate"


@dataclass(frozen=True)
class Grant:
    """A store's answer. `rows` > 0: that many rows are charged; 0: refused, with the
    limits it broke (`violated`: "rate" or a quota's period in seconds) and `retry_us`
    until `want_min` rows could pass (-1: never). `remaining` maps "rate" and each quota
    period to the rows still allowed after this grant; `now_us` is the store's clock."""

    rows: int
    now_us: int
    retry_us: int = 0
    violated: tuple[str, ...] = ()
    remaining: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    """Rows a principal spent in one window (`window` is `1d`, `1h`..., or `rate`)."""

    principal: str
    window: str
    rows: int


@dataclass(frozen=True)
class Detection:
    """A principal's latest escalation step change (`detection.escalation`), as the shared
    store keeps it: the step it is on, the signal and evidence that moved it, when (UTC,
    ISO 8601), in a dry run or not, and how many step changes it has had."""

    principal: str
    step: str
    previous: str
    signal: str
    evidence: dict
    since: str
    dry_run: bool
    changes: int


class Store(Protocol):
    """Where counts live. `name` says which store, for messages (no password in it)."""

    name: str

    async def acquire(self, principal: str, want_min: int, want_max: int, limits: Limits,
                      refund: int = 0, refund_at_us: int = 0) -> Grant:
        """Give back `refund` rows charged at `refund_at_us` (an unused lease), then charge
        as many rows in [want_min, want_max] as the limits allow, or none."""

    async def usage(self, principal: str | None = None) -> list[Usage]:
        """Rows per principal per quota window now (one principal, or all)."""

    async def close(self) -> None:
        """Release connections."""


class StoreError(Exception):
    """The store could not be reached or did not answer."""


def period_name(seconds: int) -> str:
    """`86400` → `1d`: a quota period as written in `N/PERIOD`."""
    return Quota(1, seconds).name.split("/", 1)[1]


def algorithm(h: dict[str, int], now: int, want_min: int, want_max: int, limits: Limits,
              refund: int = 0, refund_at_us: int = 0) -> tuple[Grant, int]:
    """One acquire on a principal's fields `h` (changed in place) at store time `now` µs.

    Returns the grant and how many µs the fields must be kept (their expiry). The Lua
    script in redis_store.py is this function, step for step.
    """
    em = limits.emission_us
    grant = want_max
    retry = 0
    violated: list[str] = []
    remaining: dict[str, int] = {}
    expire = 0

    def wait(us: int) -> None:
        nonlocal retry
        if us < 0 or retry < 0:
            retry = -1
        else:
            retry = max(retry, us)

    tat = now
    if em:
        tat = max(h.get("tat", now), now)
        if refund:
            tat = max(now, tat - refund * em)
            h["tat"] = tat
        room = (now + limits.burst * em - tat) // em
        grant = min(grant, room)
        if room < want_min:
            violated.append(RATE)
            wait(-1 if want_min > limits.burst else tat + (want_min - limits.burst) * em - now)
    used_of = {}
    for quota in limits.quotas:
        prefix = f"w{quota.period}:"
        k = now // quota.slot_us
        live: list[tuple[int, int]] = []
        for name in [f for f in h if f.startswith(prefix)]:
            slot = int(name[len(prefix):])
            if slot < k - SLOTS:
                del h[name]
            else:
                live.append((slot, h[name]))
        if refund:
            charged = f"{prefix}{refund_at_us // quota.slot_us}"
            if charged in h:
                back = min(h[charged], refund)
                h[charged] -= back
                live = [(s, v - back if f"{prefix}{s}" == charged else v) for s, v in live]
        used = sum(v for _, v in live)
        used_of[quota] = (used, k)
        room = quota.rows - used
        grant = min(grant, room)
        if room < want_min:
            violated.append(str(quota.period))
            if want_min > quota.rows:
                wait(-1)
            else:
                freed = room
                for slot, rows in sorted(live):
                    freed += rows
                    if freed >= want_min:
                        wait((slot + SLOTS + 1) * quota.slot_us - now)
                        break
    if grant < want_min or grant <= 0:
        grant = 0
    else:
        violated, retry = [], 0
        if em:
            tat += grant * em
            h["tat"], h["em"] = tat, em
        for quota in limits.quotas:
            name = f"w{quota.period}:{used_of[quota][1]}"
            h[name] = h.get(name, 0) + grant
    if em:
        remaining[RATE] = int((now + limits.burst * em - tat) // em)
        expire = max(expire, tat - now)
    for quota in limits.quotas:
        used, k = used_of[quota]
        remaining[str(quota.period)] = quota.rows - used - grant
        expire = max(expire, (k + SLOTS + 1) * quota.slot_us - now)
    return Grant(int(grant), now, int(retry), tuple(violated), remaining), expire


def usage_of(principal: str, h: dict[str, int], now: int) -> list[Usage]:
    """The rows of each quota window in fields `h` at `now` µs (what `usage` prints)."""
    sums: dict[int, int] = {}
    for name, value in h.items():
        if not name.startswith("w"):
            continue
        period_text, _, slot_text = name[1:].partition(":")
        period = int(period_text)
        slot_us = Quota(1, period).slot_us
        if int(slot_text) >= now // slot_us - SLOTS:
            sums[period] = sums.get(period, 0) + int(value)
    out = [Usage(principal, period_name(p), rows) for p, rows in sorted(sums.items())]
    if h.get("em"):
        # rows of the burst in use: how far the GCRA clock runs ahead of now, in rows
        out.append(Usage(principal, RATE, max(0, -(-(int(h["tat"]) - now) // int(h["em"])))))
    return out


class MemoryStore:
    """Counts in this process only (`--store memory`): right for one process.

    At most `max_principals` principals are kept; the longest idle is forgotten first.
    """

    name = "memory"

    def __init__(self, max_principals: int = 100_000, clock=time.time):
        self.max_principals = max_principals
        self._clock = clock
        self._fields: OrderedDict[str, tuple[dict[str, int], int]] = OrderedDict()

    def _now(self) -> int:
        return int(self._clock() * 1_000_000)

    def _fields_of(self, principal: str, now: int) -> dict[str, int]:
        fields, expires = self._fields.pop(principal, ({}, 0))
        return fields if expires > now else {}

    async def acquire(self, principal: str, want_min: int, want_max: int, limits: Limits,
                      refund: int = 0, refund_at_us: int = 0) -> Grant:
        return self.acquire_now(principal, want_min, want_max, limits, refund, refund_at_us)

    def acquire_now(self, principal: str, want_min: int, want_max: int, limits: Limits,
                    refund: int = 0, refund_at_us: int = 0) -> Grant:
        """`acquire` without awaiting (the memory store never waits)."""
        now = self._now()
        fields = self._fields_of(principal, now)
        grant, expire = algorithm(fields, now, want_min, want_max, limits, refund, refund_at_us)
        if fields and expire > 0:
            self._fields[principal] = (fields, now + expire)
            while len(self._fields) > self.max_principals:
                self._fields.popitem(last=False)
        return grant

    async def usage(self, principal: str | None = None) -> list[Usage]:
        now = self._now()
        names = [principal] if principal is not None else list(self._fields)
        out = []
        for name in names:
            fields, expires = self._fields.get(name, ({}, 0))
            if expires > now:
                out += usage_of(name, fields, now)
        return out

    async def close(self) -> None:
        pass


def ceil_ms(us: int) -> int:
    """Microseconds to whole milliseconds, rounded up (for PEXPIRE)."""
    return max(1, math.ceil(us / 1000))
