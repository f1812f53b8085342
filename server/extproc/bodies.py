"""Inference routes and the answer bodies they carry, as pure functions over bytes.

`route_of` reads an HTTP request's method, path and content type and names the API:

- `torchserve`: `POST /predictions/{model}[/{version}]`, answered with a probability list,
  a list of lists, a `{label: prob}` top-k dict or a list of them;
- `kserve-v1`: `POST /v1/models/{model}:predict`, answered `{"predictions": [...]}` holding
  those shapes;
- `v2`: `POST /v2/models/{model}[/versions/{v}]/infer`, answered
  `{"outputs": [{"name", "datatype", "shape", "data"}, ...]}`;
- `torchserve-grpc`: gRPC `InferenceAPIsService/Predictions`, framed `PredictionResponse`s
  whose `prediction` is TorchServe's JSON;
- `v2-grpc`: gRPC `GRPCInferenceService/ModelInfer`, framed `ModelInferResponse`s.

`Answer` parses one body and rewrites it with `await rewrite(perturb)`: the probability rows
it holds go through `perturb` (the protect core, or `label_only`) and the body comes back
with them in place. The shapes are read by the proxy's converters (`protect_prediction`,
`protect_outputs`), so ext_proc and proxy mode recognise the same answers. Values are
float64 on the JSON routes (JSON numbers) and keep their FP32/FP64 dtype on gRPC.

A body that holds no probabilities the policy can protect raises `Unrecognized`, or under
`on_unrecognized: pass` is returned unchanged by `rewrite`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any
from urllib.parse import unquote

import numpy as np
from stealguard.compat.kserve import grpc_predict_v2_pb2 as v2
from stealguard.compat.torchserve import inference_pb2
from stealguard.server.extproc.frames import FrameError, deframe, frame
from stealguard.server.proxy.errors import Unrecognized
from stealguard.server.proxy.options import ProxyPolicy
from stealguard.server.proxy.predictions import Perturb, protect_prediction
from stealguard.server.proxy.tensors import protect_outputs

TORCHSERVE = "torchserve"
KSERVE_V1 = "kserve-v1"
V2 = "v2"
TORCHSERVE_GRPC = "torchserve-grpc"
V2_GRPC = "v2-grpc"
GRPC_APIS = (TORCHSERVE_GRPC, V2_GRPC)

_TORCHSERVE_SERVICE = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/"
_V2_SERVICE = "/inference.GRPCInferenceService/"
_GRPC_METHODS = {
    _TORCHSERVE_SERVICE + "Predictions": TORCHSERVE_GRPC,
    _V2_SERVICE + "ModelInfer": V2_GRPC,
}
# Streaming inference through ext_proc would buffer a whole stream: refused, not passed.
STREAMING_METHODS = (
    _TORCHSERVE_SERVICE + "StreamPredictions",
    _TORCHSERVE_SERVICE + "StreamPredictions2",
    _V2_SERVICE + "ModelStreamInfer",
)
_REST = (
    (re.compile(r"/predictions/(?P<model>[^/]+)(?:/(?P<version>[^/]+))?/?"), TORCHSERVE),
    (re.compile(r"/v1/models/(?P<model>[^/:]+):predict"), KSERVE_V1),
    (re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer"), V2),
)
_FLOATS = ("FP32", "FP64")


@dataclasses.dataclass(frozen=True)
class Route:
    """An inference call: which API, and the model (and version) its path names."""

    api: str
    model: str = ""
    version: str = ""

    @property
    def grpc(self) -> bool:
        return self.api in GRPC_APIS


def route_of(method: str, path: str, content_type: str) -> Route | None:
    """The inference route of a request, or None for any other call (health, metadata,
    management), which carries no probabilities. A streaming inference method is a
    `Route` whose api is its path (the caller refuses it)."""
    path = path.split("?", 1)[0]
    if content_type.startswith("application/grpc"):
        if path in STREAMING_METHODS:
            return Route(api=path)
        api = _GRPC_METHODS.get(path)
        return Route(api) if api else None
    if method != "POST":
        return None
    for pattern, api in _REST:
        match = pattern.fullmatch(path)
        if match:
            version = match.groupdict().get("version") or ""
            return Route(api, unquote(match["model"]), unquote(version))
    return None


def request_model(body: bytes, encoding: str, *, max_bytes: int) -> str:
    """The model a TorchServe gRPC `PredictionsRequest` body names ("" if unreadable)."""
    try:
        messages = deframe(body, encoding, max_bytes=max_bytes)
        if len(messages) != 1:
            return ""
        return inference_pb2.PredictionsRequest.FromString(messages[0]).model_name
    except (FrameError, ValueError):
        return ""


class Answer:
    """One answer body of `route`, parsed; `rewrite(apply)` gives it with its rows applied.

    `model` is the model that picks the policy: from the path, else the gRPC message (the
    request's for TorchServe, given as `route.model`; the answer's own for v2). Raises
    `Unrecognized` (unless `options` passes such answers) when the body cannot be read.
    """

    def __init__(self, route: Route, body: bytes, options: ProxyPolicy, *,
                 encoding: str = "identity", max_bytes: int):
        self.route = route
        self.body = body
        self.options = options
        self.model = route.model
        self.passed = False  # unreadable, and the policy passes such answers
        self._messages: list[Any] = []
        self._document: Any = None
        try:
            self._parse(encoding, max_bytes)
        except (FrameError, _Unreadable) as reason:
            self.refuse(str(reason))

    def refuse(self, reason: str) -> None:
        """Raise `Unrecognized` for `reason`, or mark the answer passed under `pass`."""
        if not self.options.passes_unrecognized:
            raise Unrecognized(self.model, self.options.name, reason)
        self.passed = True

    def _parse(self, encoding: str, max_bytes: int) -> None:
        api = self.route.api
        if api in GRPC_APIS:
            kind = (inference_pb2.PredictionResponse if api == TORCHSERVE_GRPC
                    else v2.ModelInferResponse)
            for data in deframe(self.body, encoding, max_bytes=max_bytes):
                try:
                    self._messages.append(kind.FromString(data))
                except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
                    raise _Unreadable(f"a gRPC message of {len(data)} bytes is not a "
                                      f"{kind.DESCRIPTOR.name}") from None
            if api == V2_GRPC and not self.model and self._messages:
                self.model = self._messages[0].model_name
            return
        if api == TORCHSERVE:
            return  # protect_prediction reads the JSON itself
        try:
            document = json.loads(self.body)
        except (UnicodeDecodeError, ValueError):
            raise _Unreadable(f"the answer ({len(self.body)} bytes) is not JSON") from None
        if api == KSERVE_V1:
            if not isinstance(document, dict) or "predictions" not in document:
                raise _Unreadable('the answer is not a KServe v1 {"predictions": [...]} object')
            self._document = document
            self._predictions = json.dumps(document["predictions"]).encode()
        else:
            self._document = document
            self._response = _v2_response(document)
            if not self.model:
                self.model = self._response.model_name

    async def rewrite(self, perturb: Perturb) -> bytes:
        """The body with its probability rows replaced by `await perturb(rows)`. Raises
        `Unrecognized` as `__init__`, and whatever `perturb` raises but `InvalidInput`
        (rows that are not probabilities: unrecognised)."""
        if self.passed:
            return self.body
        policy, api = self.options, self.route.api
        if api == TORCHSERVE:
            return await protect_prediction(self.body, policy, self.model, perturb)
        if api == KSERVE_V1:
            predictions = await protect_prediction(self._predictions, policy, self.model,
                                                   perturb)
            return _dump({**self._document, "predictions": json.loads(predictions)})
        if api == V2:
            await protect_outputs(self._response, policy, self.model, perturb)
            return _dump(_v2_document(self._document, self._response, self.options.outputs))
        messages = []
        for message in self._messages:
            answer = type(message)()
            answer.CopyFrom(message)  # the parsed message stays as it came
            if api == TORCHSERVE_GRPC:
                if answer.prediction:  # a reply with only a status holds nothing
                    answer.prediction = await protect_prediction(answer.prediction, policy,
                                                                 self.model, perturb)
            else:
                await protect_outputs(answer, policy, self.model, perturb)
            messages.append(answer.SerializeToString())
        return frame(messages)


class _Unreadable(ValueError):
    """Why a body cannot be read as its route's answer."""


def _dump(value: Any) -> bytes:
    return json.dumps(value).encode()


def _v2_response(document: Any) -> v2.ModelInferResponse:
    """A v2 REST answer as the gRPC message the proxy's converter reads: float outputs as
    FP64 contents (JSON numbers are float64), other outputs with no contents."""
    if not isinstance(document, dict) or not isinstance(document.get("outputs"), list):
        raise _Unreadable('the answer is not an Open Inference Protocol v2 {"outputs": [...]} '
                          "object")
    response = v2.ModelInferResponse(model_name=str(document.get("model_name", "")))
    for index, output in enumerate(document["outputs"]):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise _Unreadable(f"output {index} is not an object with a name")
        shape = output.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int for d in shape):
            raise _Unreadable(f"output {output['name']!r} has no integer shape")
        datatype = str(output.get("datatype", ""))
        tensor = response.outputs.add(name=output["name"], shape=shape,
                                      datatype="FP64" if datatype in _FLOATS else datatype)
        if datatype in _FLOATS:
            values = _flat(output.get("data"))
            if values is None:
                raise _Unreadable(f"output {output['name']!r} ({datatype}) data is not a "
                                  "list of numbers")
            tensor.contents.fp64_contents.extend(values)
    return response


def _v2_document(document: dict, response: v2.ModelInferResponse,
                 named: tuple[str, ...]) -> dict:
    """`document` with the data of its named float outputs taken from `response`, flat."""
    outputs = []
    for output, tensor in zip(document["outputs"], response.outputs, strict=True):
        if output["name"] in named and output.get("datatype") in _FLOATS:
            output = {**output, "data": list(tensor.contents.fp64_contents)}
        outputs.append(output)
    return {**document, "outputs": outputs}


def _flat(data: Any) -> list[float] | None:
    """The numbers of a (possibly nested) JSON list, row-major; None if any is not one.
    (Non-finite values are the defense's to reject, with the row that holds them.)"""
    if not isinstance(data, list):
        return None
    values: list[float] = []
    pending = [iter(data)]
    while pending:
        for value in pending[-1]:
            if isinstance(value, list):
                pending.append(iter(value))
                break
            if type(value) not in (int, float):
                return None
            values.append(float(value))
        else:
            pending.pop()
    return values


async def label_only(rows: np.ndarray) -> np.ndarray:
    """Each row as the one-hot of its top class, in the rows' own float dtype: what a
    caller gets when the rows cannot be protected (the label, never the probabilities).
    A `perturb` for `Answer.rewrite`."""
    rows = np.asarray(rows)
    labels = np.zeros(rows.shape, dtype=rows.dtype if rows.dtype.kind == "f" else np.float64)
    if rows.size:
        flat = labels.reshape(-1, rows.shape[-1])
        flat[np.arange(flat.shape[0]), rows.reshape(-1, rows.shape[-1]).argmax(axis=1)] = 1.0
    return labels
