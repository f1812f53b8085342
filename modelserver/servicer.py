"""TorchServe's `InferenceAPIsService` over the model handlers.

Each RPC converts the request, calls `Models`, and converts the answer; errors become gRPC
status codes in one place (`status_of`). `StreamPredictions2` answers every request of the
stream in order and reports a failed request in its response's `status`, as TorchServe
does, so one bad request — even one whose bytes do not parse — does not end the stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import grpc
from google.rpc import status_pb2
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc
from stealguard.modelserver.handler import Models
from stealguard.modelserver.inputs import InputError
from stealguard.modelserver.metrics import Recorder
from stealguard.modelserver.store import UnknownModel
from stealguard.server.interceptors import CLIENT
from stealguard.server.lenient import UnreadableRequest, reads_unreadable

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


class PredictionFailed(Exception):
    """A prediction's error as the gRPC status the caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class InferenceServicer(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """Ping, Predictions, StreamPredictions and StreamPredictions2 over `Models`."""

    def __init__(self, models: Models, recorder: Recorder | None = None):
        self.models = models
        self.recorder = recorder or Recorder(enabled=False)

    async def predict(
        self, request: inference_pb2.PredictionsRequest, context
    ) -> inference_pb2.PredictionResponse:
        """One prediction within the caller's deadline; raises `PredictionFailed`."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        with self.recorder.prediction(request.model_name) as outcome:
            try:
                handler = self.models.get(request.model_name, request.model_version)
                prediction = await handler.handle(request.input, deadline, CLIENT.get())
            except asyncio.CancelledError:
                outcome.code = "CANCELLED"
                raise
            except Exception as error:  # noqa: BLE001 - every error becomes a status
                code, message = status_of(error)
                outcome.code = code.name
                raise PredictionFailed(code, message) from error
        return _response(request, prediction=prediction)

    async def Ping(self, request, context):
        return inference_pb2.TorchServeHealthResponse(health=HEALTHY)

    async def Predictions(self, request, context):
        try:
            return await self.predict(request, context)
        except PredictionFailed as failed:
            await context.abort(failed.code, failed.message)

    async def StreamPredictions(self, request, context) -> AsyncIterator:
        # our handlers answer in one piece: the stream holds one response
        try:
            response = await self.predict(request, context)
        except PredictionFailed as failed:
            await context.abort(failed.code, failed.message)
        yield response

    @reads_unreadable
    async def StreamPredictions2(self, request_iterator, context) -> AsyncIterator:
        async for request in request_iterator:
            if isinstance(request, UnreadableRequest):  # no sequence_id to echo
                code = grpc.StatusCode.INVALID_ARGUMENT
                yield inference_pb2.PredictionResponse(
                    status=status_pb2.Status(code=code.value[0], message=request.message))
                continue
            try:
                yield await self.predict(request, context)
            except PredictionFailed as failed:  # reported in this response's status
                status = status_pb2.Status(code=failed.code.value[0], message=failed.message)
                yield _response(request, status=status)


def _response(
    request: inference_pb2.PredictionsRequest, **fields
) -> inference_pb2.PredictionResponse:
    if request.HasField("sequence_id"):
        fields["sequence_id"] = request.sequence_id
    return inference_pb2.PredictionResponse(**fields)
