"""Per-principal caps on calls and streams in flight, and an idle timeout for streams.

gRPC's `max_in_flight` is one pool for everyone: a principal holding idle request
streams could take every slot. `Slots` gives each principal at most `max_calls` unary
calls and `max_streams` request streams at once (0: no cap), so one principal cannot
exhaust the slots of all others. `StreamGuard` is what a request stream costs: its slot,
one row for opening it, and `StreamIdle` when it sends nothing for the idle timeout.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import contextmanager

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


class StreamGuard:
    """What a request stream costs its principal, for every servicer that serves one: a
    stream slot (`Slots`), one row of its limiter for opening it, and the idle timeout;
    and a unary call's slot (`call`).

        await guard.open(principal)          # raises the refusal (Exhausted, Unavailable)
        try:
            async for message in guard.messages(request_iterator): ...   # StreamIdle
        finally:
            guard.close(principal)
    """

    def __init__(self, slots: Slots | None = None, limiter=None, idle_timeout: float = 0.0):
        self.slots = slots if slots is not None and slots.max_streams else None
        self.calls = slots if slots is not None and slots.max_calls else None
        self.limiter = limiter
        self.idle_timeout = idle_timeout

    @contextmanager
    def call(self, principal: str):
        """A unary call's slot (`Slots.max_calls`) while it runs; SlotsExhausted at the cap.
        For the front ends whose unary calls wait on a model or an upstream (the proxy,
        the model server): one principal cannot hold every call in flight."""
        if self.calls is None:
            yield
            return
        self.calls.enter(principal, False)
        try:
            yield
        finally:
            self.calls.leave(principal, False)

    async def open(self, principal: str) -> None:
        """Take `principal`'s stream slot and charge the opening (STREAM_OPEN_ROWS)."""
        from stealguard.server.metering.settings import STREAM_OPEN_ROWS

        if self.slots is not None:
            self.slots.enter(principal, True)
        try:
            if self.limiter is not None:
                await self.limiter.admit(principal, STREAM_OPEN_ROWS)
        except BaseException:
            self.close(principal)
            raise

    def close(self, principal: str) -> None:
        """Give the slot back (after `open` succeeded)."""
        if self.slots is not None:
            self.slots.leave(principal, True)

    def messages(self, requests: AsyncIterator) -> AsyncIterator:
        """The messages of `requests`; StreamIdle when the next one takes longer than the
        idle timeout (`IdleTimeout`: one timer per stream, not one per message)."""
        if self.idle_timeout > 0:
            return IdleTimeout(requests, self.idle_timeout)
        return requests.__aiter__()


class IdleTimeout:
    """`requests`, raising `StreamIdle` when a wait for the next message lasts `timeout`.

    What it costs per message is noting when the wait began: one timer per stream is due
    at the earliest moment the current wait could time out, and when it fires it either
    ends the wait (cancels the waiting task, which then raises StreamIdle) or, finding
    that a message came since, is set again for the current wait's deadline (or not at
    all while the stream is being answered; the next wait sets it). The timer holds the
    stream weakly: a stream that ended is not kept for the rest of the timeout.
    """

    __slots__ = ("_iterator", "_timeout", "_loop", "_timer", "_task", "_waiting", "_since",
                 "_expired", "__weakref__")

    def __init__(self, requests: AsyncIterator, timeout: float):
        self._iterator = requests.__aiter__()
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None  # the task reading the stream
        self._waiting = False  # whether it waits for a message now
        self._since = 0.0  # when that wait began (loop time)
        self._expired = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        self._since = self._loop.time()
        if self._task is None:  # one task reads a stream: found once, not per message
            self._task = asyncio.current_task()
        self._waiting = True
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self._timeout, _idle_check,
                                             weakref.ref(self))
        try:
            return await self._iterator.__anext__()
        except BaseException as error:  # the end of the stream, its error, or a cancel
            self._stop()
            if isinstance(error, asyncio.CancelledError) and self._expired and \
                    self._task.uncancel() == 0:  # ours, and no one else's cancel
                raise StreamIdle(self._timeout) from None
            raise
        finally:
            self._waiting = False

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if not self._waiting:  # being answered: the next wait sets the timer again
            return
        deadline = self._since + self._timeout
        if self._loop.time() < deadline:  # a message came since: time the current wait
            self._timer = self._loop.call_at(deadline, _idle_check, weakref.ref(self))
            return
        self._expired = True
        self._task.cancel()


def _idle_check(stream: weakref.ref) -> None:
    alive = stream()
    if alive is not None:
        alive._check()
