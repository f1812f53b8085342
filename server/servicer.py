"""The `stealguard.v1.Defense` servicer: decode, pick the policy, perturb, encode.

Methods only wire the codec, the policies and the defenses together; errors become
gRPC status codes in one place (`status_of`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from google.rpc import status_pb2
from stealguard.server import metrics
from stealguard.server.codec import CodecError, RowLimitError, tensor_to_flat, write_tensor
from stealguard.server.interceptors import CLIENT
from stealguard.server.policies import PolicySet, UnknownModel
from stealguard.v1 import defense_pb2, defense_pb2_grpc

log = logging.getLogger("stealguard.sidecar")


class NotServing(RuntimeError):
    """The sidecar is warming up or draining."""


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a caller gets for `error`."""
    if isinstance(error, NotServing):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, RowLimitError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, UnknownModel):
        return grpc.StatusCode.NOT_FOUND, str(error)
    if isinstance(error, (CodecError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    log.exception("internal error while perturbing", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}"


class DefenseServicer(defense_pb2_grpc.DefenseServicer):
    """Serves Perturb, PerturbStream and ListPolicies from a swappable `PolicySet`."""

    def __init__(self, policies: PolicySet, *, max_rows: int | None = None,
                 with_metrics: bool = False):
        self.policies = policies  # replaced whole on reload; read once per request
        self.max_rows = max_rows
        self.with_metrics = with_metrics
        self.in_flight = 0  # handlers running now (what a drain waits for)
        self.not_serving: str | None = "the sidecar is warming up its kernels; retry shortly"
        self._idle_streams: set[asyncio.Task] = set()  # streams waiting for a message

    def end_idle_streams(self) -> int:
        """On drain: end every stream that waits for its next message with UNAVAILABLE
        (`not_serving`), so that a client's long-lived stream does not hold the drain
        for the whole grace period. Returns how many were ended."""
        tasks = list(self._idle_streams)
        for task in tasks:
            task.cancel()
        return len(tasks)

    def perturb(self, request: defense_pb2.PerturbRequest) -> defense_pb2.PerturbResponse:
        """Protect one request's probabilities (raises the errors `status_of` maps)."""
        if self.not_serving:
            raise NotServing(self.not_serving)
        policy = self.policies.resolve(request.model)
        tensor = request.probabilities
        values, rows, classes = tensor_to_flat(tensor, max_rows=self.max_rows)
        protected = policy.apply_flat(values, rows, classes, logits=request.logits)
        if self.with_metrics:
            metrics.observe_rows(policy.name, CLIENT.get(), values.reshape(rows, classes),
                                 protected.reshape(rows, classes), logits=request.logits)
        response = defense_pb2.PerturbResponse(policy=policy.name,
                                               request_id=request.request_id)
        write_tensor(response.probabilities, protected, tensor.shape)
        return response

    def _count(self, method: str, policy: str, code: grpc.StatusCode) -> None:
        if self.with_metrics:
            metrics.REQUESTS.labels(method, policy, code.name).inc()

    async def Perturb(self, request, context):
        self.in_flight += 1
        try:
            response = self.perturb(request)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            code, message = status_of(error)
            self._count("Perturb", "-", code)
            await context.abort(code, message)
        finally:
            self.in_flight -= 1
        if self.with_metrics:
            self._count("Perturb", response.policy, grpc.StatusCode.OK)
        return response

    async def PerturbStream(
        self, request_iterator, context
    ) -> AsyncIterator[defense_pb2.PerturbResponse]:
        """Answers each message in order. A message that fails ends the stream with its
        status, or with `keep_stream_on_error` gets a reply carrying that status and the
        stream goes on. A drain ends the stream, at once if it waits for its next message."""
        task = asyncio.current_task()
        requests = request_iterator.__aiter__()
        index = 0
        self.in_flight += 1
        try:
            while True:
                if self.not_serving:  # draining began while this stream was busy
                    await context.abort(grpc.StatusCode.UNAVAILABLE, self.not_serving)
                self._idle_streams.add(task)
                try:
                    request = await requests.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if self.not_serving is None:
                        raise
                    await context.abort(grpc.StatusCode.UNAVAILABLE, self.not_serving)
                finally:
                    self._idle_streams.discard(task)
                try:
                    response = self.perturb(request)
                except Exception as error:  # noqa: BLE001
                    code, message = status_of(error)
                    self._count("PerturbStream", "-", code)
                    message = f"stream message {index}: {message}"
                    if code is grpc.StatusCode.UNAVAILABLE or not getattr(
                            request, "keep_stream_on_error", False):
                        await context.abort(code, message)
                    response = defense_pb2.PerturbResponse(
                        request_id=request.request_id,
                        error=status_pb2.Status(code=code.value[0], message=message))
                else:
                    self._count("PerturbStream", response.policy, grpc.StatusCode.OK)
                yield response
                index += 1
        finally:
            self.in_flight -= 1

    async def ListPolicies(self, request, context):
        return defense_pb2.ListPoliciesResponse(
            policies=[
                defense_pb2.Policy(name=p.name, defense=p.defense_name, params=p.params)
                for p in self.policies
            ]
        )
