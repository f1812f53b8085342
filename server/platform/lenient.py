"""Register generated gRPC services so that request bytes that do not parse are answered
INVALID_ARGUMENT with the reason, instead of gRPC's bare UNKNOWN and a logged traceback.

    add_lenient(defense_pb2_grpc.add_DefenseServicer_to_server, servicer, server)

The generated `add_*_to_server` is called against a recorder to learn the service's
handlers; each handler's request deserializer is then made lenient (a DecodeError becomes
an `UnreadableRequest`) and its behaviour aborts on one before the servicer sees it —
unless the servicer method is marked `@reads_unreadable`: a streaming method that answers
each message on its own (TorchServe's StreamPredictions2) then gets the `UnreadableRequest`
in its request stream and answers it like any other bad request.
"""

from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError


async def settled(result):
    """A handler's result, awaited if the handler was a coroutine function."""
    return await result if inspect.isawaitable(result) else result


async def relay(replies):
    """Yield a streaming handler's replies: from its async iterator, or none when it
    wrote them itself with context.write() and returned a coroutine."""
    if hasattr(replies, "__aiter__"):
        async for reply in replies:
            yield reply
    else:
        await replies


def reads_unreadable(method):
    """Mark a request-streaming servicer method that takes `UnreadableRequest`s itself."""
    method.reads_unreadable = True
    return method


def kind_of(handler) -> str:
    """The RpcMethodHandler field that holds `handler`'s behaviour."""
    return {(False, False): "unary_unary", (False, True): "unary_stream",
            (True, False): "stream_unary", (True, True): "stream_stream"}[
        (handler.request_streaming, handler.response_streaming)]


class UnreadableRequest:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, error: Exception):
        self.message = f"the request bytes are not a valid message of this RPC: {error}"


def _lenient(parse):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as error:
            return UnreadableRequest(error)

    return deserialize


async def _refuse(context, request: UnreadableRequest) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


async def _checked(requests, context):
    async for request in requests:
        if isinstance(request, UnreadableRequest):
            await _refuse(context, request)
        yield request


def _guarded(handler):
    kind = kind_of(handler)
    inner = getattr(handler, kind)
    if not handler.request_streaming:
        if not handler.response_streaming and inspect.iscoroutinefunction(inner):
            async def behaviour(request, context):  # the hot path: awaited directly
                if request.__class__ is UnreadableRequest:
                    await _refuse(context, request)
                return await inner(request, context)
        elif not handler.response_streaming:
            async def behaviour(request, context):
                if isinstance(request, UnreadableRequest):
                    await _refuse(context, request)
                return await settled(inner(request, context))
        else:
            async def behaviour(request, context):
                if isinstance(request, UnreadableRequest):
                    await _refuse(context, request)
                async for reply in relay(inner(request, context)):
                    yield reply
    elif getattr(inner, "reads_unreadable", False):
        behaviour = inner
    elif not handler.response_streaming:
        async def behaviour(requests, context):
            return await settled(inner(_checked(requests, context), context))
    else:
        async def behaviour(requests, context):
            async for reply in relay(inner(_checked(requests, context), context)):
                yield reply
    return handler._replace(**{kind: behaviour},
                            request_deserializer=_lenient(handler.request_deserializer))


class _Recorder:
    """Takes the place of a server while a generated `add_*_to_server` runs."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def add_lenient(add_to_server, servicer, server) -> None:
    """Register `servicer` on `server` like `add_to_server` does, with lenient parsing."""
    recorder = _Recorder()
    add_to_server(servicer, recorder)
    handlers = {name: _guarded(h) for name, h in recorder.handlers.items()}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(recorder.service, handlers),))
    server.add_registered_method_handlers(recorder.service, handlers)
