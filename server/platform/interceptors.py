"""Interceptors in front of every RPC but health and reflection, each installed only when
something needs it, so a plain server pays nothing for them:

- `AuthInterceptor` (a token file is configured): a call without a valid bearer token is
  refused with UNAUTHENTICATED before any servicer sees it. Who the caller is, is then
  asked of `Identity` by the front end, which hands the principal to the protect core.
- `CallMetricsInterceptor` (metrics are on): calls in flight and time per call by method.

Limits are not here: the concurrency limit is gRPC's own (`maximum_concurrent_rpcs`, which
refuses at once with RESOURCE_EXHAUSTED), and rate limits and quotas are the protect core's
limiter (`stealguard.server.core`), charged per request: each message of a stream.
"""

from __future__ import annotations

import time

import grpc
from stealguard.server.errors import Unauthenticated
from stealguard.server.platform import metrics
from stealguard.server.platform.identity import Identity
from stealguard.server.platform.lenient import kind_of, relay, settled

_EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")


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
        if handler is None or handler_call_details.method.startswith(_EXEMPT):
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
