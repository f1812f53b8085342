"""The guard in front of every RPC but health and reflection: who is calling, may they,
and what did it cost.

Installed only when something needs it (tokens, mTLS, a rate limit or metrics), so a
plain sidecar pays nothing for it. A call is authenticated once; every request is charged
to the client's rate limit and query count — for a request stream (PerturbStream,
StreamPredictions2) that is every message, so a stream cannot carry unmetered queries.
The concurrency limit is gRPC's own (`maximum_concurrent_rpcs`), which refuses at once
with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import contextvars
import time
from collections import OrderedDict

import grpc
from stealguard.server import metrics
from stealguard.server.lenient import kind_of, relay, settled
from stealguard.server.security import Tokens

ANONYMOUS = "anonymous"
# The calling client's name, for the servicer's per-client row counts.
CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("stealguard_client",
                                                             default=ANONYMOUS)
_EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class RateLimiter:
    """A token bucket per client: `rate` calls per second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: int, max_clients: int = 100_000):
        self.rate = rate
        self.burst = float(burst or max(1.0, rate))
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, client: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.max_clients:  # forget the longest-idle client
            self._buckets.popitem(last=False)
        return allowed


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates, identifies and rate-limits callers; counts calls per client."""

    def __init__(self, *, tokens: Tokens | None, client_header: str,
                 limiter: RateLimiter | None, with_metrics: bool):
        self.tokens = tokens
        self.client_header = client_header.lower()
        self.limiter = limiter
        self.with_metrics = with_metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_EXEMPT):
            return handler
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ())}
        return self._wrap(handler, handler_call_details.method, metadata)

    async def _admit(self, context, metadata: dict) -> str:
        """The client's name; aborts the call when it is not authenticated."""
        client = None
        if self.tokens is not None:
            client = self.tokens.client_of(metadata.get("authorization"))
            if client is None:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or wrong bearer token: send metadata "
                    "'authorization: Bearer <token>' with a token from the server's token file",
                )
        if client is None:
            subject = context.auth_context().get("x509_common_name")
            if subject:
                client = subject[0].decode(errors="replace")
        if client is None:
            client = str(metadata.get(self.client_header) or ANONYMOUS)[:128]
        return client

    async def _charge(self, context, client: str) -> None:
        """One request of `client`: refused (the call aborted) over its rate limit,
        counted for metrics."""
        if self.limiter is not None and not self.limiter.allow(client):
            if self.with_metrics:
                metrics.RATE_LIMITED.labels(metrics.client_label(client)).inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"client {client!r} is over its rate limit of {self.limiter.rate:g} "
                "requests/s; slow down and retry",
            )
        if self.with_metrics:
            metrics.CLIENT_QUERIES.labels(metrics.client_label(client)).inc()

    async def _charged(self, requests, context, client: str):
        """A request stream whose every message is charged before the servicer sees it."""
        async for request in requests:
            await self._charge(context, client)
            yield request

    def _wrap(self, handler, method: str, metadata: dict):
        guard = self
        name = method.rsplit("/", 1)[-1]

        per_message = handler.request_streaming and (
            guard.limiter is not None or guard.with_metrics)

        async def enter(context):
            client = await guard._admit(context, metadata)
            if not per_message:
                await guard._charge(context, client)
            if guard.with_metrics:
                metrics.IN_FLIGHT.inc()
            return CLIENT.set(client), time.perf_counter(), client

        def requests_of(request_or_iterator, context, state):
            if per_message:
                return guard._charged(request_or_iterator, context, state[2])
            return request_or_iterator

        def leave(state):
            token, start, _ = state
            CLIENT.reset(token)
            if guard.with_metrics:
                metrics.IN_FLIGHT.dec()
                metrics.LATENCY.labels(name).observe(time.perf_counter() - start)

        kind = kind_of(handler)
        inner = getattr(handler, kind)
        if not handler.response_streaming:
            async def behaviour(request_or_iterator, context):
                state = await enter(context)
                try:
                    return await settled(inner(requests_of(request_or_iterator, context, state),
                                               context))
                finally:
                    leave(state)
        else:
            async def behaviour(request_or_iterator, context):
                state = await enter(context)
                try:
                    requests = requests_of(request_or_iterator, context, state)
                    async for reply in relay(inner(requests, context)):
                        yield reply
                finally:
                    leave(state)

        return handler._replace(**{kind: behaviour})
