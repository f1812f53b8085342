"""Per-principal caps on calls and streams in flight, and an idle timeout for streams.

gRPC's `max_in_flight` is one pool for everyone: a principal holding idle request
streams could take every slot. `Slots` gives each principal at most `max_calls` unary
calls and `max_streams` request streams at once (0: no cap), so one principal cannot
exhaust the slots of all others. A request stream that sends nothing for the idle timeout
is ended with `StreamIdle` (server/servicer.py).
"""

from __future__ import annotations

from stealguard.server.errors import Exhausted


class SlotsExhausted(Exhausted):
    """A principal already has its cap of calls or streams in flight."""

    def __init__(self, principal: str, kind: str, cap: int):
        self.principal, self.what, self.cap = principal, kind, cap  # not `kind`: the error's
        flag = "--max-streams-per-principal" if kind == "streams" else \
            "--max-calls-per-principal"
        super().__init__(f"principal {principal!r} already has {cap} {kind} in flight "
                         f"({flag}); finish one and retry")


class StreamIdle(Exhausted):
    """A request stream sent nothing for the idle timeout (RESOURCE_EXHAUSTED, not
    UNAVAILABLE: the server is fine, and clients pause before reconnecting on that)."""

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
