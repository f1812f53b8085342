"""Interceptors in front of every RPC but health and reflection, each installed only when
something needs it, so a plain server pays nothing for them:

- `AuthInterceptor` (a token file is configured): a call without a valid bearer token is
  refused with UNAUTHENTICATED before any servicer sees it; that includes reflection
  (the schema) and ListPolicies, not health (probes have no token). Who the caller is, is then
  asked of `Identity` by the front end, which hands the principal to the protect core.
- `CallMetricsInterceptor` (metrics are on): calls in flight and time per call by method.
- `RequestBytesInterceptor` (`max_request_bytes` > 0): bounds the memory the requests
  being served take, counted as COST times each message's size. A call first reserves
  that for the largest message (a stream's later messages: for the largest it has sent,
  at least STREAM_FLOOR); when it does not fit within RequestBytes.wait, the call is
  refused with RESOURCE_EXHAUSTED before its message is read (gRPC then holds no more of
  it than the HTTP/2 window: the server turns off gRPC's window growth, BDP probing, when
  bounded). Once read, the reservation becomes the message's own cost until the call ends
  (for a stream: until the next message is read).

Limits are not here: the concurrency limit is gRPC's own (`maximum_concurrent_rpcs`, which
refuses at once with RESOURCE_EXHAUSTED), and rate limits and quotas are the protect core's
limiter (`stealguard.server.core`), charged per request: each message of a stream.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import grpc
from stealguard.server.errors import Unauthenticated
from stealguard.server.platform import metrics
from stealguard.server.platform.identity import Identity
from stealguard.server.platform.lenient import kind_of, relay, settled

_EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_NO_TOKEN = ("/grpc.health.v1.Health/",)


def _wrap(handler, enter, leave=None):
    """`handler` with `await enter(context)` before it runs and `leave(state)` after."""
    kind = kind_of(handler)
    inner = getattr(handler, kind)
    if not handler.response_streaming:
        async def behaviour(request_or_iterator, context):
            state = await enter(context)
            try:
                return await settled(inner(request_or_iterator, context))
            finally:
                if leave is not None:
                    leave(state)
    else:
        async def behaviour(request_or_iterator, context):
            state = await enter(context)
            try:
                async for reply in relay(inner(request_or_iterator, context)):
                    yield reply
            finally:
                if leave is not None:
                    leave(state)
    return handler._replace(**{kind: behaviour})


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer token (`Identity.authenticate`)."""

    def __init__(self, identity: Identity):
        self.identity = identity

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_NO_TOKEN):
            return handler
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ())}
        identity = self.identity

        async def enter(context):
            try:
                identity.authenticate(metadata)
            except Unauthenticated as error:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))

        return _wrap(handler, enter)


class CallMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts calls in flight and observes each call's duration by method."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_EXEMPT):
            return handler
        name = handler_call_details.method.rsplit("/", 1)[-1]

        async def enter(context):
            metrics.IN_FLIGHT.inc()
            return time.perf_counter()

        def leave(start):
            metrics.IN_FLIGHT.dec()
            metrics.LATENCY.labels(name).observe(time.perf_counter() - start)

        return _wrap(handler, enter, leave)


class RequestBytes:
    """The memory held for requests: `held` by messages read, `reserved` by reads under
    way, against `bound`. A read that does not fit waits its turn (first come, first
    served) for up to `wait` seconds: a burst of small calls is served as each read ends
    instead of refused, and the queue is never longer than the calls in flight."""

    def __init__(self, bound: int, wait: float = 0.25):
        self.bound = bound
        self.wait = wait
        self.held = 0
        self.reserved = 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    def _fits(self, n: int) -> bool:
        return self.held + self.reserved + n <= self.bound

    async def reserve(self, n: int) -> bool:
        """Room to read a message costing up to `n`, or False (refuse: none came in time)."""
        if not self._waiting and self._fits(n):
            self.reserved += n
            return True
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((n, turn))
        try:
            async with asyncio.timeout(self.wait):
                return await turn
        except TimeoutError:
            granted = turn.done() and not turn.cancelled()  # granted as the wait ended
            self._serve()  # a cancelled turn at the head no longer holds up the others
            return granted
        except asyncio.CancelledError:  # the call ended while it waited
            if turn.done() and not turn.cancelled():
                self.settle(n, 0)
            else:
                turn.cancel()
                self._serve()
            raise

    def _serve(self) -> None:
        while self._waiting and (self._waiting[0][1].done() or self._fits(self._waiting[0][0])):
            n, turn = self._waiting.popleft()
            if not turn.done():
                self.reserved += n
                turn.set_result(True)

    def settle(self, reserved: int, cost: int) -> None:
        """A read ended: its reservation becomes the message's `cost` (0: nothing read)."""
        self.reserved -= reserved
        self.held += cost
        self._serve()

    def give(self, cost: int) -> None:
        self.held -= cost
        if cost:
            self._serve()


#: What a stream's next message reserves at least, in cost (8 x 64 KiB): what a small
#: request costs, and what gRPC buffers of a message not yet read with BDP probing off.
STREAM_FLOOR = 8 * 64 * 1024


class RequestBytesInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose request could not be held within `max_request_bytes`.

    Each handler becomes request-streaming with raw bytes (the wire does not differ), so
    that the message is read only once its room is reserved, and parsed here."""

    #: Memory a request takes while it is served, per byte of its message: the bytes,
    #: the parsed message, the arrays read from it and the answer written (measured on
    #: the sidecar, tests/test_memory_bound.py).
    COST = 8

    def __init__(self, bound: int, max_message_bytes: int):
        self.budget = RequestBytes(bound)
        self.reserve = min(max_message_bytes * self.COST, bound)

    def _refusal(self) -> str:
        return (f"the requests being served hold {self.budget.held} bytes and reads under "
                f"way reserve {self.budget.reserved} of the bound of {self.budget.bound} "
                f"(--max-request-bytes; a read reserves up to {self.reserve}, "
                f"--max-message-bytes x {self.COST}); retry shortly")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_EXEMPT):
            return handler
        kind = kind_of(handler)
        inner = getattr(handler, kind)
        parse = handler.request_deserializer or (lambda raw: raw)
        budget, reserve, refusal = self.budget, self.reserve, self._refusal

        async def read(context, held: list[int]):
            """The next request (None at the end), its cost held in `held[0]`; `held[1]` is
            the largest cost this call has read (None before its first message)."""
            budget.give(held[0])
            held[0] = 0
            # The first message reserves room for the largest; a stream's later messages
            # room for the largest it has sent (at least STREAM_FLOOR), so that streams
            # waiting for their next message do not hold the bound away from every call.
            room = reserve if held[1] is None else min(reserve, max(held[1], STREAM_FLOOR))
            if not await budget.reserve(room):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal())
            cost = 0
            try:
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    return None
                cost = min(len(raw) * RequestBytesInterceptor.COST, reserve)
            finally:
                budget.settle(room, cost)
                held[0] = cost
                held[1] = max(held[1] or 0, cost)
            return parse(raw)

        async def requests(context, held):
            while (request := await read(context, held)) is not None:
                yield request

        async def one(context, held):
            request = await read(context, held)
            if request is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
            return request

        async def stream(context, held):
            return requests(context, held)

        source = stream if handler.request_streaming else one
        if not handler.response_streaming:
            async def behaviour(_, context):
                held = [0, None]
                try:
                    return await settled(inner(await source(context, held), context))
                finally:
                    budget.give(held[0])
        else:
            async def behaviour(_, context):
                held = [0, None]
                try:
                    async for reply in relay(inner(await source(context, held), context)):
                        yield reply
                finally:
                    budget.give(held[0])
        streaming = "stream_stream" if handler.response_streaming else "stream_unary"
        behaviours = dict.fromkeys(("unary_unary", "unary_stream", "stream_unary",
                                    "stream_stream"))
        behaviours[streaming] = behaviour
        return handler._replace(request_streaming=True, request_deserializer=None,
                                **behaviours)
