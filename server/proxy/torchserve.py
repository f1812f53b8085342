"""TorchServe's `InferenceAPIsService`, forwarded upstream with the predictions protected.

Each method: pick the model's policy, forward the call, protect the answer. The policy is
resolved before the call goes upstream, so a model without a policy costs the upstream
nothing. `StreamPredictions2` pairs the n-th answer with the n-th request's model, as
TorchServe answers a sequence one reply per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from google.protobuf import empty_pb2
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc
from stealguard.server.metering.inflight import StreamIdle
from stealguard.server.platform import status
from stealguard.server.platform.lenient import add_lenient
from stealguard.server.proxy.base import ProxyServicer
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
                       model: str, context) -> inference_pb2.PredictionResponse:
        if response.prediction:  # an empty one (e.g. a reply with only a status) holds nothing
            response.prediction = await protect_prediction(
                response.prediction, policy, model, self.perturber(policy, context))
        return response

    @status.unary
    async def Ping(self, request, context):
        return await self.upstream.unary(self.stub.Ping, request, context)

    @status.unary
    async def Predictions(self, request, context):
        policy = self.policy(request.model_name)
        response = await self.upstream.unary(self.stub.Predictions, request, context)
        return await self._protect(response, policy, request.model_name, context)

    @status.streaming
    async def StreamPredictions(self, request, context):
        policy = self.policy(request.model_name)
        async for response in self.upstream.stream(self.stub.StreamPredictions, request,
                                                    context):
            yield await self._protect(response, policy, request.model_name, context)

    @status.streaming
    async def StreamPredictions2(self, request_iterator, context):
        models: deque[str] = deque()
        model = ""
        principal = self.identity.of(context)
        await self.streams.open(principal)  # its slot, one row, the idle timeout
        handler, idle = asyncio.current_task(), []

        async def requests() -> AsyncIterator[inference_pb2.PredictionsRequest]:
            try:
                async for request in self.streams.messages(request_iterator):
                    models.append(request.model_name)
                    yield request
            except StreamIdle as error:  # gRPC's request reader would swallow it
                idle.append(error)
                handler.cancel()

        try:
            async for response in self.upstream.stream(self.stub.StreamPredictions2,
                                                        requests(), context):
                if models:
                    model = models.popleft()
                yield await self._protect(response, self.policy(model), model, context)
        except asyncio.CancelledError:
            if not idle:
                raise
            raise idle[0] from None
        finally:
            self.streams.close(principal)
