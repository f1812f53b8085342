"""TorchServe's `InferenceAPIsService` over the model handlers: a thin converter.

Each RPC converts the request, names the caller (`Identity`), calls the model's handler
(`Models`; its protect step is the protect core), and converts the answer; errors become
gRPC status codes in `stealguard.server.platform.status`. `StreamPredictions2` answers
every request of the stream in order and reports a failed request in its response's
`status`, as TorchServe does, so one bad request — even one whose bytes do not parse —
does not end the stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc
from stealguard.modelserver.handler import Models
from stealguard.modelserver.metrics import Recorder
from stealguard.server.errors import Exhausted, InvalidInput
from stealguard.server.metering.inflight import StreamGuard, StreamIdle
from stealguard.server.platform.identity import Identity
from stealguard.server.platform.lenient import UnreadableRequest, reads_unreadable
from stealguard.server.platform.status import GrpcStatus, grpc_status, status_message

log = logging.getLogger("stealguard.modelserver")

HEALTHY = json.dumps({"status": "Healthy"}, indent=2)


class PredictionFailed(Exception):
    """A prediction's error as the gRPC status the caller gets."""

    def __init__(self, status: GrpcStatus):
        super().__init__(status.message)
        self.status = status

    async def abort(self, context) -> None:
        code, message, trailing = self.status
        await context.abort(code, message, trailing_metadata=tuple(trailing))


class InferenceServicer(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """Ping, Predictions, StreamPredictions and StreamPredictions2 over `Models`."""

    def __init__(self, models: Models, recorder: Recorder | None = None,
                 identity: Identity | None = None, streams: StreamGuard | None = None):
        self.models = models
        self.recorder = recorder or Recorder(enabled=False)
        self.identity = identity or Identity()
        # a request stream's slot, opening charge and idle timeout (per principal)
        self.streams = streams or StreamGuard()

    async def predict(
        self, request: inference_pb2.PredictionsRequest, context
    ) -> inference_pb2.PredictionResponse:
        """One prediction within the caller's deadline; raises `PredictionFailed`."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        principal = self.identity.of(context)
        with self.recorder.prediction(request.model_name, principal) as outcome:
            try:
                handler = self.models.get(request.model_name, request.model_version)
                with self.streams.call(principal):  # --max-calls-per-principal
                    prediction = await handler.handle(request.input, deadline, principal)
            except asyncio.CancelledError:
                outcome.code = "CANCELLED"
                raise
            except Exception as error:  # noqa: BLE001 - every error becomes a status
                status = grpc_status(error)
                outcome.code = status.code.name
                outcome.limited = isinstance(error, Exhausted)
                raise PredictionFailed(status) from error
        return _response(request, prediction=prediction)

    async def Ping(self, request, context):
        return inference_pb2.TorchServeHealthResponse(health=HEALTHY)

    async def Predictions(self, request, context):
        try:
            return await self.predict(request, context)
        except PredictionFailed as failed:
            await failed.abort(context)

    async def StreamPredictions(self, request, context) -> AsyncIterator:
        # our handlers answer in one piece: the stream holds one response
        try:
            response = await self.predict(request, context)
        except PredictionFailed as failed:
            await failed.abort(context)
        yield response

    @reads_unreadable
    async def StreamPredictions2(self, request_iterator, context) -> AsyncIterator:
        principal = self.identity.of(context)
        try:
            await self.streams.open(principal)
        except Exception as error:  # noqa: BLE001 - the refusal ends the stream
            await PredictionFailed(grpc_status(error)).abort(context)
        try:
            async for request in self.streams.messages(request_iterator):
                if isinstance(request, UnreadableRequest):  # no sequence_id to echo
                    status = grpc_status(InvalidInput(request.message))
                    yield inference_pb2.PredictionResponse(status=status_message(status))
                    continue
                try:
                    yield await self.predict(request, context)
                except PredictionFailed as failed:  # reported in this response's status
                    yield _response(request, status=status_message(failed.status))
        except StreamIdle as idle:
            await PredictionFailed(grpc_status(idle)).abort(context)
        finally:
            self.streams.close(principal)


def _response(
    request: inference_pb2.PredictionsRequest, **fields
) -> inference_pb2.PredictionResponse:
    if request.HasField("sequence_id"):
        fields["sequence_id"] = request.sequence_id
    return inference_pb2.PredictionResponse(**fields)
