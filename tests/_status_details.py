"""Reading the google.rpc details of a refused gRPC call, as any client would."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2


def details_of(error: grpc.RpcError):
    """The QuotaFailure and RetryInfo (None when absent) of a refused call."""
    status = status_pb2.Status.FromString(
        dict(error.trailing_metadata())["grpc-status-details-bin"])
    quota = retry = None
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
    return quota, retry
