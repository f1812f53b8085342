"""Oracles: the prediction API as the attacker sees it, with a query budget.

An oracle answers a batch of inputs with probability rows and counts every input it
answers. A query that would take the count past the budget is refused with
`BudgetExceeded` before anything is sent. The attack code only ever calls
`oracle.query(x)`, so the same attack runs in-process (`LocalOracle`: a torch model plus a
stealguard defense) and over the network: `RemoteOracle` speaks TorchServe's gRPC
inference API (the model server, the sidecar's proxy, Envoy in front of either),
`RestOracle` its REST API (`/predictions/{model}`: the model server, TorchServe, Envoy's
ext_proc in front of them). `remote_oracle` picks one by the target's form.
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


class _ServedOracle(Oracle):
    """What the network oracles share: a float32 .npy batch of up to `batch_size` inputs
    per request, answered with a JSON list of probability vectors."""

    target = ""
    model_name = ""
    batch_size = 100

    def _answer(self, x: np.ndarray) -> np.ndarray:
        rows = []
        for i in range(0, len(x), self.batch_size):
            batch = x[i : i + self.batch_size]
            rows.append(self._decode(self._send(encode_npy(batch), len(batch)), len(batch)))
        return np.concatenate(rows)

    def _send(self, data: bytes, n: int) -> bytes:
        raise NotImplementedError

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

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteOracle(_ServedOracle):
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

    def _send(self, data: bytes, n: int) -> bytes:
        from stealguard.compat.torchserve import inference_pb2

        request = inference_pb2.PredictionsRequest(model_name=self.model_name,
                                                   input={"data": data})
        return self._predict(request, n).prediction

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


class RestOracle(_ServedOracle):
    """TorchServe's REST inference API at `base_url` (`http://host:port`, or https): each
    batch is a POST of a float32 .npy body to `{base_url}/predictions/{model_name}`, whose
    answer is a JSON list of probability vectors. `headers`: sent with every request (e.g.
    `x-client-id`). A busy server (429, 502, 503, 504, no connection) is retried up to
    RETRIES times: the same inputs, so no extra queries. Raises OracleError naming the
    target if `/ping` cannot be reached within `timeout` seconds."""

    RETRIES = 2
    RETRY_STATUS = (429, 502, 503, 504)

    def __init__(self, base_url: str, model_name: str, budget: int, *,
                 timeout: float = 30.0, batch_size: int = 100,
                 headers: tuple[tuple[str, str], ...] = ()):
        import urllib.parse

        super().__init__(budget)
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise OracleError(f"target {base_url!r}: expected http://HOST:PORT or "
                              "https://HOST:PORT")
        self.target = base_url.rstrip("/")
        self.model_name = model_name
        self.timeout = timeout
        self.batch_size = batch_size
        self.headers = dict(headers)
        self._url = f"{self.target}/predictions/{urllib.parse.quote(model_name, safe='')}"
        self._wait_reachable()

    def _wait_reachable(self) -> None:
        """Until something answers HTTP at the target (any status: Envoy may route only
        /predictions), at most `timeout` seconds."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.target}/ping", timeout=self.timeout):
                    return
            except urllib.error.HTTPError:
                return  # it answered
            except (urllib.error.URLError, OSError) as error:
                if time.monotonic() >= deadline:
                    raise OracleError(f"cannot reach the model server at {self.target} "
                                      f"(no answer within {self.timeout:g}s: "
                                      f"{getattr(error, 'reason', error)})") from None
                time.sleep(0.2)

    def _send(self, data: bytes, n: int) -> bytes:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            self._url, data=data, method="POST",
            headers={"content-type": "application/octet-stream", **self.headers})
        for attempt in range(self.RETRIES + 1):
            try:
                with urllib.request.urlopen(
                        request, timeout=(self.timeout + 0.01 * n) * (attempt + 1)) as reply:
                    return reply.read()
            except urllib.error.HTTPError as e:
                detail = _error_message(e)
                if e.code == 404:
                    raise OracleError(f"model {self.model_name!r} not found at "
                                      f"{self.target}: {detail}") from None
                if e.code not in self.RETRY_STATUS or attempt == self.RETRIES:
                    raise OracleError(f"{self.target} answered HTTP {e.code} for model "
                                      f"{self.model_name!r}: {detail}") from None
            except (urllib.error.URLError, OSError) as e:
                if attempt == self.RETRIES:
                    raise OracleError(f"{self.target} did not answer for model "
                                      f"{self.model_name!r}: "
                                      f"{getattr(e, 'reason', e)}") from None
            time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")


def _error_message(error) -> str:
    """The `message` of a JSON error body (TorchServe's, ours, Envoy's), else its text."""
    try:
        body = error.read().decode(errors="replace")
    except OSError:
        return error.reason
    try:
        document = json.loads(body)
    except ValueError:
        return body.strip()[:200] or str(error.reason)
    if isinstance(document, dict):
        return str(document.get("message") or document.get("error") or document)[:200]
    return body[:200]


def remote_oracle(target: str, model_name: str, budget: int, **options) -> _ServedOracle:
    """The oracle for `target`: `http://` or `https://` → `RestOracle`, `HOST:PORT` →
    `RemoteOracle` (gRPC). `metadata` (key, value) pairs go as headers over REST."""
    if target.startswith(("http://", "https://")):
        headers = options.pop("metadata", ())
        return RestOracle(target, model_name, budget, headers=headers, **options)
    return RemoteOracle(target, model_name, budget, **options)
