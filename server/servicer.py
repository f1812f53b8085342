"""The `stealguard.v1.Defense` servicer: a thin converter around the protect core.

Each RPC decodes the `Tensor` (`stealguard.server.codec`), names the caller
(`Identity`), calls `ProtectCore.protect`, and encodes the answer; errors become gRPC
status codes in `stealguard.server.platform.status`. The servicer keeps only what is
gRPC's: calls in flight, the streams waiting for their next message (ended at once by a
drain), and calls by method and status code when metrics are on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from stealguard.server import metrics
from stealguard.server.codec import tensor_to_flat, write_tensor
from stealguard.server.core import ANONYMOUS, ProtectCore
from stealguard.server.errors import Unavailable
from stealguard.server.metering.inflight import Slots, StreamGuard, StreamIdle
from stealguard.server.metering.meter import ADMISSION
from stealguard.server.platform.identity import Identity
from stealguard.server.platform.status import grpc_status, status_message
from stealguard.v1 import defense_pb2, defense_pb2_grpc

log = logging.getLogger("stealguard.sidecar")

WARMING_UP = "the sidecar is warming up its kernels; retry shortly"
DRAINING = "the sidecar is draining; retry on another instance"


class DefenseServicer(defense_pb2_grpc.DefenseServicer):
    """Serves Perturb, PerturbStream and ListPolicies over a `ProtectCore`."""

    def __init__(self, core: ProtectCore, identity: Identity | None = None, *,
                 with_metrics: bool = False, slots: Slots | None = None,
                 streams: StreamGuard | None = None):
        self.core = core
        self.identity = identity or Identity()
        self.with_metrics = with_metrics
        # per-principal caps on calls and streams in flight (stealguard.server.metering)
        self.slots = slots if slots is not None and (slots.max_calls or slots.max_streams) \
            else None
        # a request stream's slot, opening charge and idle timeout (per principal)
        self.streams = streams or StreamGuard()
        self.in_flight = 0  # handlers running now (what a drain waits for)
        self._idle_streams: set[asyncio.Task] = set()  # streams waiting for a message

    def end_idle_streams(self) -> int:
        """On drain: end every stream that waits for its next message with UNAVAILABLE,
        so that a client's long-lived stream does not hold the drain for the whole grace
        period. Returns how many were ended."""
        tasks = list(self._idle_streams)
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def perturb(self, request: defense_pb2.PerturbRequest, principal: str,
                      charged: bool = False) -> defense_pb2.PerturbResponse:
        """Protect one request's probabilities (raises domain errors); `charged`: the
        caller, believed, has charged them already."""
        if self.core.unavailable is not None:  # before decoding: nothing to do while so
            raise Unavailable(self.core.unavailable)
        tensor = request.probabilities
        values, rows, classes = tensor_to_flat(tensor)
        answer = await self.core.protect(values.reshape(rows, classes), request.model,
                                         principal, logits=request.logits, charged=charged)
        response = defense_pb2.PerturbResponse(policy=answer.policy,
                                               request_id=request.request_id)
        write_tensor(response.probabilities, answer.rows.reshape(-1), tensor.shape)
        return response

    def _calls_capped(self) -> bool:
        """Whether a `Perturb` takes a per-principal call slot. Only a limiter can suspend
        one (its store round trip): without one a call runs from start to end without
        yielding, so its principal never has another in flight and the cap cannot bite;
        the slot and the caller's identification are then skipped (measured: bench/parity.py)."""
        return self.slots is not None and bool(self.slots.max_calls) and \
            self.core.limiter is not None

    def _caller(self, context, stream: bool = False):
        """What is known of the caller, when a limiter, an observer or a slot cap will look
        at its principal; else None (the principal is then ANONYMOUS)."""
        capped = self.slots is not None and bool(self.slots.max_streams) if stream else \
            self._calls_capped()
        if self.core.needs_principal or capped:
            return self.identity.caller(context)
        return None

    def _principal_of(self, caller, request) -> str:
        """The principal one request is charged to: the end client it names in
        `principal`, when its caller may speak for others (see principal.py)."""
        if caller is None:
            return ANONYMOUS
        return self.identity.end_principal(caller, request.principal)

    def _charged(self, caller, request) -> bool:
        """The request says its rows are charged already, and its caller is believed."""
        return request.charged and self.identity.speaks_for_others(caller)

    def _count(self, method: str, policy: str, code: grpc.StatusCode) -> None:
        if self.with_metrics:
            metrics.REQUESTS.labels(method, policy, code.name).inc()

    async def Perturb(self, request, context):
        self.in_flight += 1
        principal = None
        try:
            caller = self._caller(context)
            principal = self._principal_of(caller, request)
            capped = self._calls_capped()
            if capped:
                self.slots.enter(principal, False)
            try:
                response = await self.perturb(request, principal,
                                              self._charged(caller, request))
            finally:
                if capped:
                    self.slots.leave(principal, False)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            status = grpc_status(error)
        else:
            status = None
        finally:
            # before the abort: gRPC counts the call finished once its status is sent,
            # so a drain may be over while an abort still waits to return
            self.in_flight -= 1
        if status is not None:
            self._count("Perturb", "-", status.code)
            await context.abort(status.code, status.message,
                                trailing_metadata=tuple(status.trailing))
        admission = ADMISSION.get()
        if admission is not None and admission.principal == principal:
            context.set_trailing_metadata(admission.metadata())  # who paid, what is left
        if self.with_metrics:
            self._count("Perturb", response.policy, grpc.StatusCode.OK)
        return response

    async def _open_stream(self, context):
        """The caller of a new request stream and its principal, its slot taken and its
        opening charged (`StreamGuard`), or the call ended with the refusal."""
        caller = self._caller(context, stream=True)
        if caller is None:
            return None, ANONYMOUS
        principal = self.identity.end_principal(caller, "")
        try:
            await self.streams.open(principal)
        except Exception as error:  # noqa: BLE001
            status = grpc_status(error)
            self._count("PerturbStream", "-", status.code)
            await context.abort(status.code, status.message,
                                trailing_metadata=tuple(status.trailing))
        return caller, principal

    async def PerturbStream(
        self, request_iterator, context
    ) -> AsyncIterator[defense_pb2.PerturbResponse]:
        """Answers each message in order. A message that fails ends the stream with its
        status, or with `keep_stream_on_error` gets a reply carrying that status and the
        stream goes on. A drain ends the stream, at once if it waits for its next message."""
        task = asyncio.current_task()
        requests = self.streams.messages(request_iterator)
        caller, opener = await self._open_stream(context)
        index = 0
        self.in_flight += 1
        counted = True

        async def end(code, message, trailing=()) -> None:
            nonlocal counted
            counted = False  # not running any more once its status is sent (see Perturb)
            self.in_flight -= 1
            await context.abort(code, message, trailing_metadata=tuple(trailing))

        try:
            while True:
                if self.core.unavailable is not None:  # draining began while it was busy
                    await end(grpc.StatusCode.UNAVAILABLE, self.core.unavailable)
                self._idle_streams.add(task)
                try:
                    request = await requests.__anext__()
                except StopAsyncIteration:
                    return
                except StreamIdle as idle:
                    await end(*grpc_status(idle))
                except asyncio.CancelledError:
                    if self.core.unavailable is None:
                        raise
                    await end(grpc.StatusCode.UNAVAILABLE, self.core.unavailable)
                finally:
                    self._idle_streams.discard(task)
                try:
                    principal = opener if not request.principal else \
                        self._principal_of(caller, request)
                    response = await self.perturb(request, principal,
                                                  self._charged(caller, request))
                except Exception as error:  # noqa: BLE001
                    status = grpc_status(error, prefix=f"stream message {index}: ")
                    self._count("PerturbStream", "-", status.code)
                    if status.code is grpc.StatusCode.UNAVAILABLE or not getattr(
                            request, "keep_stream_on_error", False):
                        await end(*status)
                    response = defense_pb2.PerturbResponse(
                        request_id=request.request_id, error=status_message(status))
                else:
                    self._count("PerturbStream", response.policy, grpc.StatusCode.OK)
                yield response
                index += 1
        finally:
            if counted:
                self.in_flight -= 1
            if caller is not None:
                self.streams.close(opener)

    async def ListPolicies(self, request, context):
        return defense_pb2.ListPoliciesResponse(
            policies=[
                defense_pb2.Policy(name=p.name, defense=p.defense_name, params=p.params)
                for p in self.core.policies
            ]
        )
