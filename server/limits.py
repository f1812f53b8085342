"""In-process limiters for the protect core's `admit(principal, rows)` hook.

`TokenBucket` is `--rate-limit R --rate-burst B`: each principal has a bucket of B tokens
refilled at R per second, and each request (a unary call, or one message of a stream)
takes one token, whatever its row count. A limiter shared by workers and replicas (Redis,
Valkey) implements the same one-method interface (`stealguard.server.core.Limiter`).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from stealguard.server.errors import Exhausted


class TokenBucket:
    """A token bucket per principal: `rate` requests per second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int = 0, max_principals: int = 100_000):
        self.rate = rate
        self.burst = float(burst or max(1.0, rate))
        self.max_principals = max_principals
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, principal: str, now: float | None = None) -> float:
        """Take one token of `principal`'s bucket: 0.0 if there was one, else the seconds
        until there is (and nothing is taken)."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(principal, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
        self._buckets[principal] = (tokens - 1.0 if wait == 0.0 else tokens, now)
        if len(self._buckets) > self.max_principals:  # forget the longest-idle principal
            self._buckets.popitem(last=False)
        return wait

    async def admit(self, principal: str, rows: int) -> None:
        """Admit one request of `principal`, or raise `Exhausted` with the wait."""
        wait = self.take(principal)
        if wait:
            raise Exhausted(
                f"client {principal!r} is over its rate limit of {self.rate:g} requests/s; "
                "slow down and retry",
                retry_after=wait,
                quota={f"client:{principal}": f"{self.rate:g} requests/s, burst {self.burst:g}"},
            )
