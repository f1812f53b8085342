"""Oracles: the prediction API as the attacker sees it, with a query budget.

An oracle answers a batch of inputs with probability rows and counts every input it
answers. A query that would take the count past the budget is refused with
`BudgetExceeded` before anything is sent. The attack code only ever calls
`oracle.query(x)`, so the same attack runs in-process (`LocalOracle`: a torch model plus a
stealguard defense) and over the network (`RemoteOracle`: TorchServe's gRPC inference API,
as served by the model server or the sidecar's proxy).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable

import numpy as np
from stealguard.attacks.training import predict
from torch import nn


class BudgetExceeded(RuntimeError):
    """The attacker asked for more queries than the budget allows."""


class OracleError(RuntimeError):
    """The oracle could not answer (unreachable target, unknown model, bad reply)."""


class Oracle:
    """Base class: counts queries against `budget` (a positive int)."""

    def __init__(self, budget: int):
        if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"budget must be a positive integer, got {budget!r}")
        self.budget = int(budget)
        self.queries = 0

    @property
    def remaining(self) -> int:
        return self.budget - self.queries

    def query(self, x: np.ndarray) -> np.ndarray:
        """Answer the batch `x` (N, *input_shape) with probability rows (N, K), float64.
        Raises BudgetExceeded, without answering any of them, if N > remaining."""
        n = len(x)
        if n > self.remaining:
            raise BudgetExceeded(
                f"query of {n} inputs refused: {self.queries} of the budget of "
                f"{self.budget} already used, {self.remaining} left"
            )
        self.queries += n
        if n == 0:
            return np.zeros((0, 0))
        return self._answer(np.ascontiguousarray(x, dtype=np.float32))

    def _answer(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class LocalOracle(Oracle):
    """A torch model (returning logits) behind an optional defense, in this process.
    `defense` is any callable probs -> probs, e.g. stealguard.server.defenses.make_defense(...)."""

    def __init__(
        self,
        model: nn.Module,
        budget: int,
        defense: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        super().__init__(budget)
        self.model = model
        self.defense = defense

    def _answer(self, x: np.ndarray) -> np.ndarray:
        probs = predict(self.model, x)
        return probs if self.defense is None else np.asarray(self.defense(probs), np.float64)


def encode_npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


class RemoteOracle(Oracle):
    """TorchServe's gRPC `InferenceAPIsService.Predictions` at `target` ("host:port") for
    model `model_name`. Each request carries up to `batch_size` inputs as a float32 .npy
    batch in input "data"; the `prediction` is a JSON list of probability vectors.
    `metadata`: (key, value) pairs sent with every call (e.g. `x-client-id`, the principal
    a server that trusts the client header charges and watches).
    Raises OracleError naming the target if it cannot be reached within `timeout` seconds."""

    RETRIES = 2

    def __init__(
        self,
        target: str,
        model_name: str,
        budget: int,
        *,
        timeout: float = 30.0,
        batch_size: int = 100,
        metadata: tuple[tuple[str, str], ...] = (),
    ):
        import grpc
        from stealguard.compat.torchserve import inference_pb2_grpc

        super().__init__(budget)
        self.target = target
        self.model_name = model_name
        self.timeout = timeout
        self.batch_size = batch_size
        self.metadata = tuple(metadata)  # sent with every call, e.g. the client header
        self._grpc = grpc
        self._channel = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 64 << 20),
                             ("grpc.max_send_message_length", 64 << 20)]
        )
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            self._channel.close()
            raise OracleError(f"cannot reach the model server at {target} "
                              f"(no connection within {timeout:g}s)") from None
        self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RemoteOracle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _answer(self, x: np.ndarray) -> np.ndarray:
        from stealguard.compat.torchserve import inference_pb2

        rows = []
        for i in range(0, len(x), self.batch_size):
            batch = x[i : i + self.batch_size]
            request = inference_pb2.PredictionsRequest(
                model_name=self.model_name, input={"data": encode_npy(batch)}
            )
            reply = self._predict(request, len(batch))
            rows.append(self._decode(reply.prediction, len(batch)))
        return np.concatenate(rows)

    def _predict(self, request, n: int):
        """One Predictions call; a busy server (UNAVAILABLE, DEADLINE_EXCEEDED) is retried
        up to RETRIES times with a growing deadline: the same inputs, so no extra queries."""
        grpc = self._grpc
        for attempt in range(self.RETRIES + 1):
            try:
                return self._stub.Predictions(
                    request, timeout=(self.timeout + 0.01 * n) * (attempt + 1),
                    metadata=self.metadata or None)
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.NOT_FOUND:
                    raise OracleError(f"model {self.model_name!r} not found at {self.target}: "
                                      f"{e.details()}") from None
                retry = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if not retry or attempt == self.RETRIES:
                    raise OracleError(f"{self.target} answered {code.name} for model "
                                      f"{self.model_name!r}: {e.details()}") from None
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def _decode(self, prediction: bytes, n: int) -> np.ndarray:
        try:
            probs = np.asarray(json.loads(prediction), dtype=np.float64)
        except (ValueError, TypeError) as e:
            raise OracleError(f"{self.target} model {self.model_name!r}: prediction is not "
                              f"a JSON list of probability vectors ({e})") from None
        if probs.ndim == 1:
            probs = probs[None, :]
        if probs.ndim != 2 or len(probs) != n:
            raise OracleError(f"{self.target} model {self.model_name!r}: expected {n} "
                              f"probability vectors, got an array of shape {probs.shape}")
        return probs
