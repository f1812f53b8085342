"""The meter: admit a principal's rows against its limits, with leased blocks of rows.

A round trip to a shared store on every call would cost more than the whole protection
step, so each process leases rows: when a principal's local lease cannot pay for a call,
one store round trip charges the call's rows plus up to `lease_rows` more, and the next
calls spend that lease locally (a dict look-up and a subtraction). Only one refill per
principal is in flight at a time, so a process never holds more than `lease_rows`
charged-but-unspent rows of a principal; those are what can be spent after the window
that paid for them has moved on: the worst-case over-admission is `lease_rows` rows per
principal per process. A lease expires after `lease_seconds`; its unspent rows are given
back to the store with the next refill.

When the store fails: `failure="closed"` (the default) refuses with `StoreUnavailable`;
`"open"` admits and counts in a memory store of this process (each process then enforces
the limits alone). Either way a metric and one log line on each change of state. After
a failure the store is tried again every `retry_interval` seconds; the first answer
ends the outage, no restart needed.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import OrderedDict

from stealguard.server.metering import metrics
from stealguard.server.metering.errors import OverLimit, StoreUnavailable, Violation
from stealguard.server.metering.limits import Limits
from stealguard.server.metering.store import (
    RATE,
    Grant,
    MemoryStore,
    Store,
    StoreError,
    period_name,
)

log = logging.getLogger("stealguard.metering")

FAILURE_MODES = ("closed", "open")
REMAINING_KEY = "x-stealguard-remaining"
#: The last admission in this context: a front end that called the protect core (which
#: awaits `admit` in the same task) reads it for the response metadata.
ADMISSION: contextvars.ContextVar[Admission | None] = contextvars.ContextVar(
    "stealguard_admission", default=None)
PRINCIPAL_KEY = "x-stealguard-principal"


def default_lease_rows(limits: Limits) -> int:
    """A lease small beside every limit: at most 64 rows, 1/16 of the burst, 1/256 of the
    smallest quota (0: no lease, every call asks the store)."""
    sizes = [64]
    if limits.rate:
        sizes.append(limits.burst // 16)
    sizes += [q.rows // 256 for q in limits.quotas]
    return max(0, min(sizes))


class Admission:
    """An admitted call: who paid, and what is left (this process's view: the store's
    remaining rows at the last refill plus the unspent lease)."""

    __slots__ = ("principal", "rows", "_remaining", "_leased")

    def __init__(self, principal: str, rows: int, remaining: dict[str, int], leased: int):
        self.principal = principal
        self.rows = rows
        self._remaining = remaining
        self._leased = leased

    @property
    def remaining(self) -> dict[str, int]:
        """Rows still allowed per limit: `rate` (of the burst) and each quota window."""
        return {(k if k == RATE else period_name(int(k))): max(0, v + self._leased)
                for k, v in self._remaining.items()}

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Response metadata: `x-stealguard-principal` and `x-stealguard-remaining`
        (`rate=63,1d=19850`; absent when nothing is limited)."""
        out = [(PRINCIPAL_KEY, self.principal)]
        remaining = self.remaining
        if remaining:
            out.append((REMAINING_KEY, ",".join(f"{k}={v}" for k, v in remaining.items())))
        return tuple(out)


class _Lease:
    __slots__ = ("rows", "expires", "charged_at_us", "remaining", "refilling",
                 "denied_rows", "denied_until", "denied")

    def __init__(self):
        self.rows = 0
        self.expires = 0.0
        self.charged_at_us = 0
        self.remaining: dict[str, int] = {}
        self.refilling: asyncio.Future | None = None
        self.denied_rows = 0
        self.denied_until = 0.0
        self.denied: OverLimit | None = None


class Meter:
    """`await admit(principal, rows)`: an `Admission`, or `OverLimit` / `StoreUnavailable`."""

    def __init__(self, limits: Limits, store: Store, *, failure: str = "closed",
                 lease_rows: int | None = None, lease_seconds: float = 1.0,
                 retry_interval: float = 0.5, max_principals: int = 100_000,
                 clock=time.monotonic):
        if failure not in FAILURE_MODES:
            raise ValueError(f"store_failure must be one of {FAILURE_MODES}, got {failure!r}")
        self.limits = limits
        self.store = store
        self.failure = failure
        self.lease_rows = default_lease_rows(limits) if lease_rows is None else lease_rows
        self.lease_seconds = lease_seconds
        self.retry_interval = retry_interval
        self.max_principals = max_principals
        self._clock = clock
        self._leases: OrderedDict[str, _Lease] = OrderedDict()
        self._local = MemoryStore()  # counts while the store is down and failure is open
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._down_calls = 0
        self._last_error = ""
        self._descriptions = dict(zip(
            [RATE] * bool(limits.rate) + [str(q.period) for q in limits.quotas],
            limits.describe(), strict=True))
        metrics.STORE_UP.labels(store.name).set(1)

    @property
    def store_up(self) -> bool:
        """False from a failed store call until one succeeds again."""
        return self._down_since is None

    async def admit(self, principal: str, rows: int) -> Admission:
        """Charge `rows` rows to `principal`, from its lease when it can pay (no await),
        else with one store round trip. Raises OverLimit or StoreUnavailable."""
        lease = self._leases.get(principal)
        if lease is not None and lease.rows >= rows and lease.refilling is None:
            now = self._clock()
            if now < lease.expires:
                lease.rows -= rows
                admission = Admission(principal, rows, lease.remaining, lease.rows)
                ADMISSION.set(admission)
                return admission
        if not self.limits.active or rows <= 0:
            admission = Admission(principal, max(rows, 0), {}, 0)
        else:
            admission = await self._refill(principal, rows)
        ADMISSION.set(admission)
        return admission

    async def _refill(self, principal: str, rows: int) -> Admission:
        while True:
            lease = self._leases.get(principal)
            if lease is None:
                lease = self._leases[principal] = _Lease()
                self._forget_idle()
            else:
                self._leases.move_to_end(principal)
            if lease.refilling is None:
                break
            await asyncio.shield(lease.refilling)  # one refill per principal at a time
            if lease.rows >= rows and self._clock() < lease.expires:
                lease.rows -= rows
                return Admission(principal, rows, lease.remaining, lease.rows)
        now = self._clock()
        if lease.denied is not None and now < lease.denied_until and rows >= lease.denied_rows:
            metrics.REFUSED.labels(lease.denied.violations[0].limit).inc()
            raise OverLimit(principal, rows, lease.denied.violations, lease.denied_until - now)
        refund = refund_at = 0
        if now >= lease.expires and lease.rows:
            refund, refund_at, lease.rows = lease.rows, lease.charged_at_us, 0
        take = min(lease.rows, rows)
        lease.rows -= take
        need = rows - take
        if self._down_since is not None and now < self._retry_at:
            lease.rows += take
            return self._store_down(principal, rows, None)
        lease.refilling = asyncio.get_running_loop().create_future()
        try:
            started = time.perf_counter()
            grant = await self.store.acquire(principal, need, need + self.lease_rows,
                                             self.limits, refund, refund_at)
            metrics.STORE_SECONDS.labels(self.store.name).observe(time.perf_counter() - started)
        except StoreError as error:
            lease.rows += take
            return self._store_down(principal, rows, error)
        finally:
            lease.refilling.set_result(None)
            lease.refilling = None
        self._store_ok()
        if grant.rows == 0:
            lease.rows += take
            error = self._refusal(principal, rows, grant)
            if grant.retry_us > 0:
                lease.denied, lease.denied_rows = error, rows
                lease.denied_until = self._clock() + grant.retry_us / 1e6
            raise error
        lease.denied = None
        lease.rows += grant.rows - need
        lease.expires = self._clock() + self.lease_seconds
        lease.charged_at_us = grant.now_us
        lease.remaining = grant.remaining
        return Admission(principal, rows, grant.remaining, lease.rows)

    def _refusal(self, principal: str, rows: int, grant: Grant) -> OverLimit:
        violations = [Violation(v if v == RATE else period_name(int(v)),
                                self._descriptions.get(v, v)) for v in grant.violated]
        for violation in violations:
            metrics.REFUSED.labels(violation.limit).inc()
        retry = None if grant.retry_us < 0 else grant.retry_us / 1e6
        return OverLimit(principal, rows, violations, retry)

    def _forget_idle(self) -> None:
        while len(self._leases) > self.max_principals:
            _, lease = self._leases.popitem(last=False)
            if lease.refilling is not None:  # keep a lease that is being refilled
                self._leases[_] = lease
                break

    def _store_down(self, principal: str, rows: int, error: StoreError | None) -> Admission:
        now = self._clock()
        if error is not None:
            self._last_error = str(error)
            self._retry_at = now + self.retry_interval
            if self._down_since is None:
                self._down_since = now
                self._down_calls = 0
                metrics.STORE_UP.labels(self.store.name).set(0)
                log.error("metering store %s is unavailable (%s): %s", self.store.name, error,
                          "refusing calls with UNAVAILABLE (--store-failure closed)"
                          if self.failure == "closed" else
                          "admitting calls and counting them in this process "
                          "(--store-failure open)")
        self._down_calls += 1
        metrics.STORE_FAILURES.labels(self.store.name, self.failure).inc()
        if self.failure == "closed":
            raise StoreUnavailable(self.store.name, self._last_error)
        grant = self._local.acquire_now(principal, rows, rows, self.limits)
        if grant.rows == 0:
            raise self._refusal(principal, rows, grant)
        return Admission(principal, rows, grant.remaining, 0)

    def _store_ok(self) -> None:
        if self._down_since is not None:
            log.warning("metering store %s is back after %.1f s; %d calls were %s meanwhile",
                        self.store.name, self._clock() - self._down_since, self._down_calls,
                        "refused" if self.failure == "closed" else "admitted and counted "
                        "in this process")
            self._down_since = None
            metrics.STORE_UP.labels(self.store.name).set(1)

    async def close(self) -> None:
        """Give unspent leases back to the store (best effort) and close it."""
        for principal, lease in list(self._leases.items()):
            if lease.rows and self.store_up:
                try:
                    await self.store.acquire(principal, 0, 0, self.limits, lease.rows,
                                             lease.charged_at_us)
                except StoreError:
                    break
                lease.rows = 0
        await self.store.close()
