"""Metering's refusals as gRPC statuses a caller can act on.

RESOURCE_EXHAUSTED carries, in `grpc-status-details-bin` (a `google.rpc.Status`), a
`google.rpc.QuotaFailure` (one violation per limit broken, subject `principal:<name>`), a
`google.rpc.RetryInfo` (when to retry; absent when the call can never pass) and a
`google.rpc.ErrorInfo` (domain `stealguard`, reason `RATE_LIMITED` or `QUOTA_EXCEEDED`,
the principal and limits in its metadata). Any gRPC client reads them, e.g. Python's
`grpc_status.rpc_status.from_call(error)`.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from stealguard.server.metering.errors import OverLimit, StoreUnavailable

DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "stealguard"


def _packed(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def over_limit_status(error: OverLimit) -> status_pb2.Status:
    """The `google.rpc.Status` of an OverLimit, details included."""
    details = [_packed(error_details_pb2.QuotaFailure(violations=[
        error_details_pb2.QuotaFailure.Violation(subject=f"principal:{error.principal}",
                                                 description=v.description)
        for v in error.violations]))]
    if error.retry_after is not None:
        seconds = max(0.0, error.retry_after)
        whole = math.floor(seconds)
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=whole, nanos=min(999_999_999, math.ceil((seconds - whole) * 1e9))))))
    reason = "QUOTA_EXCEEDED" if any(v.limit != "rate" for v in error.violations) \
        else "RATE_LIMITED"
    details.append(_packed(error_details_pb2.ErrorInfo(
        reason=reason, domain=DOMAIN,
        metadata={"principal": error.principal, "rows": str(error.rows),
                  "limits": ",".join(v.limit for v in error.violations)})))
    return status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=str(error),
                             details=details)


def grpc_status_of(error: OverLimit | StoreUnavailable
                   ) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """Code, message and trailing metadata for `context.abort(code, message, metadata)`."""
    if isinstance(error, StoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, str(error), ()
    status = over_limit_status(error)
    return (grpc.StatusCode.RESOURCE_EXHAUSTED, status.message,
            ((DETAILS_KEY, status.SerializeToString()),))
