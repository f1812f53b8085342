"""Per-principal caps on calls and streams in flight, and an idle timeout for streams.

gRPC's `max_in_flight` is one pool for everyone: a principal holding idle request
streams could take every slot. `Slots` gives each principal at most `max_calls` unary
calls and `max_streams` request streams at once (0: no cap), so one principal cannot
exhaust the slots of all others; `idle_limited` ends a request stream that sends nothing
for `timeout` seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class SlotsExhausted(Exception):
    """A principal already has its cap of calls or streams in flight."""

    def __init__(self, principal: str, kind: str, cap: int):
        self.principal, self.kind, self.cap = principal, kind, cap
        flag = "--max-streams-per-principal" if kind == "streams" else \
            "--max-calls-per-principal"
        super().__init__(f"principal {principal!r} already has {cap} {kind} in flight "
                         f"({flag}); finish one and retry")


class StreamIdle(Exception):
    """A request stream sent nothing for the idle timeout."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        super().__init__(f"the request stream sent no message for {timeout:g} s "
                         "(--stream-idle-timeout) and was ended; open a new one")


class Slots:
    """Counts of calls and streams in flight per principal, refused beyond their caps."""

    def __init__(self, max_calls: int = 0, max_streams: int = 0):
        self.max_calls = max_calls
        self.max_streams = max_streams
        self._held: dict[tuple[str, bool], int] = {}

    def enter(self, principal: str, stream: bool) -> None:
        """Take a slot (raises SlotsExhausted at the cap); pair with `leave`."""
        cap = self.max_streams if stream else self.max_calls
        key = (principal, stream)
        held = self._held.get(key, 0)
        if cap and held >= cap:
            from stealguard.server.metering import metrics

            kind = "streams" if stream else "calls"
            metrics.REFUSED_SLOTS.labels(kind).inc()
            raise SlotsExhausted(principal, kind, cap)
        self._held[key] = held + 1

    def leave(self, principal: str, stream: bool) -> None:
        """Give the slot back (entries at zero are dropped: no growth with principals)."""
        key = (principal, stream)
        held = self._held.get(key, 0) - 1
        if held > 0:
            self._held[key] = held
        else:
            self._held.pop(key, None)

    def held(self, principal: str, stream: bool) -> int:
        return self._held.get((principal, stream), 0)


async def idle_limited(requests: AsyncIterator, timeout: float) -> AsyncIterator:
    """The messages of `requests`; StreamIdle when the next one takes over `timeout`
    seconds (0: no timeout)."""
    iterator = requests.__aiter__()
    while True:
        try:
            if timeout > 0:
                message = await asyncio.wait_for(iterator.__anext__(), timeout)
            else:
                message = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise StreamIdle(timeout) from None
        yield message
