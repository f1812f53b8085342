"""TorchServe's `InferenceAPIsService` over the model handlers.

Each RPC converts the request, calls `Models`, and converts the answer; errors become gRPC
status codes in one place (`status_of`). `StreamPredictions2` answers every request of the
stream in order and reports a failed request in its response's `status`, as TorchServe
does, so one bad request does not end the stream.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import grpc
from google.rpc import status_pb2
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc
from stealguard.modelserver.handler import Models
from stealguard.modelserver.inputs import InputError
from stealguard.modelserver.store import UnknownModel

log = logging.getLogger("stealguard.modelserver")

HEALTHY = json.dumps({"status": "Healthy"}, indent=2)


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a caller gets for `error`."""
    if isinstance(error, InputError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, UnknownModel):
        return grpc.StatusCode.NOT_FOUND, str(error)
    log.error("internal error while predicting", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


class InferenceServicer(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """Ping, Predictions, StreamPredictions and StreamPredictions2 over `Models`."""

    def __init__(self, models: Models):
        self.models = models

    async def predict(
        self, request: inference_pb2.PredictionsRequest
    ) -> inference_pb2.PredictionResponse:
        """One prediction (raises the errors `status_of` maps)."""
        handler = self.models.get(request.model_name, request.model_version)
        prediction = await handler.handle(request.input)
        return _response(request, prediction=prediction)

    async def Ping(self, request, context):
        return inference_pb2.TorchServeHealthResponse(health=HEALTHY)

    async def Predictions(self, request, context):
        try:
            return await self.predict(request)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            await context.abort(*status_of(error))

    async def StreamPredictions(self, request, context) -> AsyncIterator:
        # our handlers answer in one piece: the stream holds one response
        try:
            response = await self.predict(request)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            await context.abort(*status_of(error))
        yield response

    async def StreamPredictions2(self, request_iterator, context) -> AsyncIterator:
        async for request in request_iterator:
            try:
                yield await self.predict(request)
            except Exception as error:  # noqa: BLE001 - reported in this response's status
                code, message = status_of(error)
                status = status_pb2.Status(code=code.value[0], message=message)
                yield _response(request, status=status)


def _response(
    request: inference_pb2.PredictionsRequest, **fields
) -> inference_pb2.PredictionResponse:
    if request.HasField("sequence_id"):
        fields["sequence_id"] = request.sequence_id
    return inference_pb2.PredictionResponse(**fields)
