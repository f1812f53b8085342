"""TorchServe's `InferenceAPIsService`, forwarded upstream with the predictions protected.

Each method: pick the model's policy, forward the call, protect the answer. The policy is
resolved before the call goes upstream, so a model without a policy costs the upstream
nothing.

`StreamPredictions2` pairs each upstream reply with its request by `sequence_id`, never by
order: a request without one is given a fresh id (stripped again from its reply), and a
reply is protected under the policy of the request it answers. A reply whose id is not in
flight (unknown, or answered already) ends the stream with an error, as does a request
whose caller-set id was used for another model earlier in the stream (TorchServe's
sequence: one model's): the proxy never guesses which model an answer belongs to, so no
answer of a protected model can come back raw, not even an upstream's late second answer
to a request whose id the caller then sent for an unprotected model.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

import grpc
from google.protobuf import empty_pb2
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc
from stealguard.server.metering.inflight import StreamIdle
from stealguard.server.platform import status
from stealguard.server.platform.lenient import add_lenient
from stealguard.server.proxy.base import ProxyServicer
from stealguard.server.proxy.errors import UpstreamError
from stealguard.server.proxy.options import ProxyPolicy
from stealguard.server.proxy.predictions import protect_prediction

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"].full_name


class TorchServeProxy(ProxyServicer, inference_pb2_grpc.InferenceAPIsServiceServicer):
    """Serves TorchServe's gRPC inference API in front of a TorchServe-compatible upstream."""

    service = SERVICE
    stub_class = inference_pb2_grpc.InferenceAPIsServiceStub

    def add_to(self, server) -> None:
        add_lenient(inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server, self, server)

    async def upstream_ready(self, timeout: float) -> bool:
        """True if the upstream's Ping answers and does not report itself unhealthy."""
        reply = await self.upstream.probe(self.stub.Ping, empty_pb2.Empty(), timeout)
        return "unhealthy" not in reply.health.lower()

    async def _protect(self, response: inference_pb2.PredictionResponse, policy: ProxyPolicy,
                       model: str, context, principal: str | None = None
                       ) -> inference_pb2.PredictionResponse:
        if response.prediction:  # an empty one (e.g. a reply with only a status) holds nothing
            response.prediction = await protect_prediction(
                response.prediction, policy, model, self.perturber(policy, context, principal))
        return response

    @status.unary
    async def Ping(self, request, context):
        return await self.upstream.unary(self.stub.Ping, request, context)

    @status.unary
    async def Predictions(self, request, context):
        policy = self.policy(request.model_name)
        principal = self.identity.of(context)
        with self.streams.call(principal):
            response = await self.upstream.unary(self.stub.Predictions, request, context)
            return await self._protect(response, policy, request.model_name, context,
                                       principal)

    @status.streaming
    async def StreamPredictions(self, request, context):
        policy = self.policy(request.model_name)
        async for response in self.upstream.stream(self.stub.StreamPredictions, request,
                                                    context):
            yield await self._protect(response, policy, request.model_name, context)

    @status.streaming
    async def StreamPredictions2(self, request_iterator, context):
        pending = _Pending()
        principal = self.identity.of(context)
        await self.streams.open(principal)  # its slot, one row, the idle timeout
        handler, idle = asyncio.current_task(), []

        async def requests() -> AsyncIterator[inference_pb2.PredictionsRequest]:
            try:
                async for request in self.streams.messages(request_iterator):
                    self.policy(request.model_name)  # refused before the upstream sees it
                    pending.add(request)
                    yield request
            except StreamIdle as error:  # gRPC's request reader would swallow it
                idle.append(error)
                handler.cancel()
            except Exception as error:  # noqa: BLE001 - it would only cancel the upstream
                pending.error = error   # call: raised by the reply loop below

        try:
            async for response in self.upstream.stream(self.stub.StreamPredictions2,
                                                        requests(), context):
                pending.check()
                model = pending.take(response)
                yield await self._protect(response, self.policy(model), model, context,
                                          principal)
            pending.check()
            if pending.waiting:
                raise UpstreamError(
                    grpc.StatusCode.INTERNAL,
                    f"the upstream ended StreamPredictions2 with {pending.waiting} "
                    "request(s) unanswered")
        except asyncio.CancelledError:
            if not idle:
                raise
            raise idle[0] from None
        finally:
            self.streams.close(principal)


class _Pending:
    """The requests of one StreamPredictions2 call that the upstream has not answered yet,
    by `sequence_id` (several requests may share a caller-set id, for one model only)."""

    #: caller-set ids remembered with their model after their last answer (per stream)
    BOUND = 4096

    def __init__(self):
        self._prefix = f"stealguard-{secrets.token_hex(6)}-"
        self._numbers = itertools.count()
        self._models: dict[str, deque[str]] = {}
        self._ours: set[str] = set()  # ids the proxy set: stripped from the replies
        # answered caller-set ids -> their model: a later request may reuse an id only for
        # the same model, so a late duplicate answer is never paired with another model's
        self._answered: OrderedDict[str, str] = OrderedDict()
        self.error: Exception | None = None  # what ended the requests early

    @property
    def waiting(self) -> int:
        return sum(len(models) for models in self._models.values())

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def add(self, request: inference_pb2.PredictionsRequest) -> None:
        if not request.HasField("sequence_id"):
            request.sequence_id = f"{self._prefix}{next(self._numbers)}"
            self._ours.add(request.sequence_id)
        models = self._models.setdefault(request.sequence_id, deque())
        owner = models[0] if models else self._answered.get(request.sequence_id)
        if owner is not None and owner != request.model_name:
            if not models:
                del self._models[request.sequence_id]
            raise UpstreamError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sequence_id {request.sequence_id!r} was sent for model {owner!r} in this "
                f"stream; a request for {request.model_name!r} cannot share it (the proxy "
                "pairs answers with requests by sequence_id)")
        models.append(request.model_name)

    def take(self, response: inference_pb2.PredictionResponse) -> str:
        """The model of the request `response` answers; `response`'s id as the caller
        sent it. An answer to no request in flight ends the stream: INTERNAL."""
        sequence_id = response.sequence_id if response.HasField("sequence_id") else None
        models = self._models.get(sequence_id) if sequence_id is not None else None
        if not models:
            raise UpstreamError(
                grpc.StatusCode.INTERNAL,
                "the upstream sent a StreamPredictions2 reply that answers no request in "
                f"flight (sequence_id {sequence_id!r}: unknown or answered already); the "
                "stream ends rather than return an answer the proxy cannot pair with its "
                "model")
        model = models.popleft()
        ours = sequence_id in self._ours
        if not models:
            del self._models[sequence_id]
            self._ours.discard(sequence_id)
            if not ours:
                self._answered[sequence_id] = model
                self._answered.move_to_end(sequence_id)
                if len(self._answered) > self.BOUND:
                    self._answered.popitem(last=False)
        if ours:
            response.ClearField("sequence_id")
        return model
