"""Every way a proxied call can fail, as one gRPC status (code, message, trailing metadata).

Upstream errors keep their code and message (UNAVAILABLE names the upstream, so a person
can tell the proxy's upstream is down from the proxy itself). An answer the proxy cannot
protect under `on_unrecognized: reject` is FAILED_PRECONDITION: the operator has to fix
the policy or the model, retrying will not help.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import grpc
from stealguard.server.policies import UnknownModel
from stealguard.server.servicer import NotServing

log = logging.getLogger("stealguard.proxy")

Metadata = Sequence[tuple[str, str | bytes]]


class UpstreamError(Exception):
    """The upstream answered a call with an error status (or could not be reached)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Metadata = ()):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing = tuple(trailing)


class Unrecognized(ValueError):
    """An answer holds no probabilities the proxy can protect, and the policy rejects it."""

    def __init__(self, model: str, policy: str, reason: str):
        super().__init__(
            f"model {model!r}: cannot protect the upstream's answer: {reason}. The proxy "
            f"returns no probabilities it cannot protect (policy {policy!r} has "
            "on_unrecognized: reject); set on_unrecognized: pass in that policy to return "
            "such answers unchanged"
        )


def status_of(error: Exception) -> tuple[grpc.StatusCode, str, Metadata]:
    """The gRPC status code, message and trailing metadata a caller gets for `error`."""
    if isinstance(error, UpstreamError):
        return error.code, error.details, error.trailing
    if isinstance(error, NotServing):
        return grpc.StatusCode.UNAVAILABLE, str(error), ()
    if isinstance(error, UnknownModel):
        return grpc.StatusCode.NOT_FOUND, str(error), ()
    if isinstance(error, Unrecognized):
        return grpc.StatusCode.FAILED_PRECONDITION, str(error), ()
    log.exception("internal error while proxying", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"proxy internal error: {type(error).__name__}", ()


def unary(method):
    """Turn any exception of a unary RPC method into its status (`status_of`)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            code, message, trailing = status_of(error)
            await context.abort(code, message, trailing_metadata=trailing)

    return wrapper


def streaming(method):
    """As `unary`, for RPCs answering a stream; proxy errors name the stream message."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        index = 0
        try:
            async for response in method(self, request, context):
                yield response
                index += 1
        except Exception as error:  # noqa: BLE001
            code, message, trailing = status_of(error)
            if not isinstance(error, UpstreamError):
                message = f"stream message {index}: {message}"
            await context.abort(code, message, trailing_metadata=trailing)

    return wrapper
