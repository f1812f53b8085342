"""Errors -> gRPC status, in one place for every stealguard gRPC front end.

A domain error (`stealguard.server.errors`) becomes the status code of its kind and its
own message; `Exhausted` adds `google.rpc.RetryInfo` and `google.rpc.QuotaFailure`
details (trailing `grpc-status-details-bin`) when it carries them. A `GrpcError` is a
status that already is one (the proxy's upstream answered it) and passes unchanged.
Anything else is a bug: INTERNAL with a generic message, and its traceback in the log.

Servicer methods use the decorators (`unary`, `streaming`); a method that reports a
failed stream message in band (keep_stream_on_error, TorchServe's StreamPredictions2)
builds that message's `google.rpc.Status` with `status_message`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from stealguard.server.errors import (
    INTERNAL_MESSAGE,
    Exhausted,
    Kind,
    ProtectError,
)

log = logging.getLogger("stealguard.status")

Metadata = Sequence[tuple[str, str | bytes]]

GRPC_CODE: Mapping[Kind, grpc.StatusCode] = {
    Kind.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Kind.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.INTERNAL: grpc.StatusCode.INTERNAL,
}
_DETAILS_KEY = "grpc-status-details-bin"


class GrpcError(Exception):
    """A gRPC status to pass on as it is (code, details, trailing metadata), such as an
    upstream's answer in proxy mode."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Metadata = ()):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing = tuple(trailing)


class GrpcStatus(NamedTuple):
    code: grpc.StatusCode
    message: str
    trailing: Metadata = ()


def _details(error: Exhausted) -> list[any_pb2.Any]:
    details = []
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(0.0, error.retry_after) * 1e9))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    if error.quota:
        failure = error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=subject, description=text)
            for subject, text in error.quota.items()])
        packed = any_pb2.Any()
        packed.Pack(failure)
        details.append(packed)
    return details


def grpc_status(error: BaseException, prefix: str = "") -> GrpcStatus:
    """The status a caller gets for `error`; `prefix` goes before the message (e.g.
    "stream message 3: "). Logs the traceback of an error that is not a domain error."""
    if isinstance(error, GrpcError):
        return GrpcStatus(error.code, error.details, error.trailing)
    if isinstance(error, ProtectError):
        code, message = GRPC_CODE[error.kind], prefix + str(error)
        if isinstance(error, Exhausted):
            details = _details(error)
            if details:
                proto = status_pb2.Status(code=code.value[0], message=message, details=details)
                return GrpcStatus(code, message, ((_DETAILS_KEY, proto.SerializeToString()),))
        return GrpcStatus(code, message)
    log.error("internal error", exc_info=error)
    return GrpcStatus(grpc.StatusCode.INTERNAL, prefix + INTERNAL_MESSAGE)


def status_message(status: GrpcStatus) -> status_pb2.Status:
    """`status` as a `google.rpc.Status` message, for errors reported inside a reply."""
    return status_pb2.Status(code=status.code.value[0], message=status.message)


async def abort(context: grpc.aio.ServicerContext, error: BaseException,
                prefix: str = "") -> None:
    """End the call with `error`'s status (raises, as `context.abort` does)."""
    code, message, trailing = grpc_status(error, prefix)
    await context.abort(code, message, trailing_metadata=tuple(trailing))


def unary(method):
    """Turn any exception of a unary-response RPC method into its status."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # the method ended the call itself
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            await abort(context, error)

    return wrapper


def streaming(method):
    """As `unary`, for RPCs answering a stream: errors of the n-th reply say
    "stream message n: " first (an upstream's status passes unchanged)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        index = 0
        try:
            async for response in method(self, request, context):
                yield response
                index += 1
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001
            await abort(context, error, prefix=f"stream message {index}: ")

    return wrapper
