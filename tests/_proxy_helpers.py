"""Real upstream model servers for the proxy tests, run as processes on loopback ports.

    python tests/_proxy_helpers.py torchserve --listen 127.0.0.1:PORT
    python tests/_proxy_helpers.py v2 --listen 127.0.0.1:PORT

Both serve a scikit-learn LogisticRegression trained on sklearn's digits (8x8, 10 classes)
at start-up, plus grpc.health.v1 (SERVING once the model is trained).

TorchServe API (`InferenceAPIsService`), input `data` = a .npy array of shape (64,) or
(N, 64), by model name:
  digits         the probability vector, or a list of vectors for a batch (base handler)
  digits-topk    the image classifier's top-3 {label: prob} dict (a list of them for a batch)
  digits-label*  {"label": <digit>}, no probabilities
  echo-metadata  {"metadata": {key: value}, "time_remaining": seconds or null}, with
                 initial metadata x-upstream-initial and trailing x-upstream-trailing
  fail           RESOURCE_EXHAUSTED "model fail: queue is full" + trailing x-upstream-reason
  secret, public  as digits (for the pairing tests)
  StreamPredictions answers one message per row; StreamPredictions2 one per request.
  With --stream2 reversed, StreamPredictions2 reads every request first and answers them
  last to first; double answers each request twice; late-double answers each request again
  after the next request arrives; unpaired answers without sequence_id.

v2 API (`GRPCInferenceService`), input `input-0` FP32 [N, 64] in contents or raw:
  digits / digits64  outputs `predict_proba` FP32 / FP64 [N, 10] and `label` INT64 [N];
                     raw_output_contents when the request used raw_input_contents;
                     only the requested outputs when the request names some.
  fail               RESOURCE_EXHAUSTED as above.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import signal
import sys

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from stealguard.compat.kserve import grpc_predict_v2_pb2 as v2
from stealguard.compat.kserve import grpc_predict_v2_pb2_grpc as v2_grpc
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def train_model():
    """LogisticRegression on sklearn digits (scaled to [0, 1]); deterministic."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return LogisticRegression(max_iter=500).fit(x, digits.target)


def digits_samples(n: int) -> np.ndarray:
    """The first `n` digits images as float32 (n, 64) in [0, 1]: the tests' inputs."""
    from sklearn.datasets import load_digits

    return (load_digits().data[:n] / 16.0).astype(np.float32)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _abort_fail(context):
    return context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "model fail: queue is full",
                         trailing_metadata=(("x-upstream-reason", "full"),))


async def _echo_headers(context) -> None:
    await context.send_initial_metadata((("x-upstream-initial", "yes"),))
    context.set_trailing_metadata((("x-upstream-trailing", "yes"),))


async def _replay(items):
    for item in items:
        yield item


class TorchServeUpstream(inference_pb2_grpc.InferenceAPIsServiceServicer):
    def __init__(self, model, stream2: str = "ordered"):
        self.model = model
        self.stream2 = stream2

    def predict(self, request, context) -> list[bytes]:
        """One prediction per row for a batch input; one for a single sample."""
        name = request.model_name
        if name == "echo-metadata":
            metadata = {m.key: m.value for m in context.invocation_metadata()
                        if isinstance(m.value, str)}
            return [json.dumps({"metadata": metadata,
                                "time_remaining": context.time_remaining()}).encode()]
        x = np.load(io.BytesIO(request.input["data"]), allow_pickle=False)
        probs = self.model.predict_proba(np.atleast_2d(x).astype(np.float32))
        if name in ("digits", "secret", "public"):
            value = probs.tolist() if x.ndim == 2 else probs[0].tolist()
        elif name == "digits-topk":
            tops = [{LABELS[j]: float(row[j]) for j in np.argsort(-row)[:3]} for row in probs]
            value = tops if x.ndim == 2 else tops[0]
        elif name.startswith("digits-label"):
            value = {"label": int(probs[0].argmax())}
        else:
            return []
        return [json.dumps(value).encode()]

    async def Ping(self, request, context):
        return inference_pb2.TorchServeHealthResponse(health='{"status": "Healthy"}')

    async def Predictions(self, request, context):
        if request.model_name == "fail":
            await _abort_fail(context)
        if request.model_name == "echo-metadata":
            await _echo_headers(context)
        predictions = self.predict(request, context)
        if not predictions:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"Model not found: {request.model_name}")
        return inference_pb2.PredictionResponse(prediction=predictions[0])

    async def StreamPredictions(self, request, context):
        if request.model_name == "fail":
            await _abort_fail(context)
        x = np.load(io.BytesIO(request.input["data"]), allow_pickle=False)
        for row in np.atleast_2d(x):
            single = inference_pb2.PredictionsRequest(model_name=request.model_name,
                                                      input={"data": npy(row)})
            yield inference_pb2.PredictionResponse(prediction=self.predict(single, context)[0])

    async def StreamPredictions2(self, request_iterator, context):
        await _echo_headers(context)
        requests = request_iterator
        if self.stream2 == "reversed":
            requests = _replay([request async for request in request_iterator][::-1])
        late = None  # late-double: a request's second answer, sent after the next request
        async for request in requests:
            reply = inference_pb2.PredictionResponse(
                prediction=self.predict(request, context)[0])
            if self.stream2 != "unpaired" and request.HasField("sequence_id"):
                reply.sequence_id = request.sequence_id
            if late is not None:
                yield late
                late = None
            for _ in range(2 if self.stream2 == "double" else 1):
                yield reply
            if self.stream2 == "late-double":
                late = reply


class V2Upstream(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model):
        self.model = model

    async def ServerLive(self, request, context):
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return v2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return v2.ModelReadyResponse(ready=request.name in ("digits", "digits64"))

    async def ServerMetadata(self, request, context):
        return v2.ServerMetadataResponse(name="test-v2", version="1", extensions=["x"])

    async def ModelMetadata(self, request, context):
        return v2.ModelMetadataResponse(name=request.name, platform="sklearn")

    async def ModelInfer(self, request, context):
        if request.model_name == "fail":
            await _abort_fail(context)
        if request.model_name not in ("digits", "digits64"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name}")
        tensor = request.inputs[0]
        raw = bool(request.raw_input_contents)
        if raw:
            x = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
        else:
            x = np.array(tensor.contents.fp32_contents, dtype=np.float32)
        x = x.reshape(tuple(tensor.shape))
        probs = self.model.predict_proba(x)
        fp = "FP64" if request.model_name == "digits64" else "FP32"
        dtype = np.dtype("<f8") if fp == "FP64" else np.dtype("<f4")
        probs = probs.astype(dtype)
        labels = probs.argmax(axis=1).astype("<i8")
        wanted = [o.name for o in request.outputs] or ["predict_proba", "label"]
        response = v2.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name in wanted:
            array, datatype = (probs, fp) if name == "predict_proba" else (labels, "INT64")
            output = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            if raw:
                response.raw_output_contents.append(array.tobytes())
            elif datatype == "INT64":
                output.contents.int64_contents.extend(array.tolist())
            elif datatype == "FP64":
                output.contents.fp64_contents.extend(array.ravel().tolist())
            else:
                output.contents.fp32_contents.extend(array.ravel().tolist())
        return response


async def serve(protocol: str, listen: str, stream2: str = "ordered") -> None:
    server = grpc.aio.server()
    model = train_model()
    if protocol == "torchserve":
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(
            TorchServeUpstream(model, stream2), server)
    else:
        v2_grpc.add_GRPCInferenceServiceServicer_to_server(V2Upstream(model), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"cannot listen on {listen}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description="test upstream model servers")
    parser.add_argument("protocol", choices=["torchserve", "v2"])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--stream2", default="ordered",
                        choices=["ordered", "reversed", "double", "late-double",
                                 "unpaired"])
    args = parser.parse_args()
    asyncio.run(serve(args.protocol, args.listen, args.stream2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def start_upstream(protocol: str, port: int | None = None, *extra: str):
    """Start this module as a `protocol` upstream on a loopback port (`extra` flags, e.g.
    "--stream2", "reversed"); (process, address)."""
    from _procs import Process, free_port

    address = f"127.0.0.1:{port or free_port()}"
    process = Process([sys.executable, __file__, protocol, "--listen", address, *extra])
    try:
        process.wait_healthy(address, timeout=120)
    except Exception:
        process.stop(signal.SIGKILL)
        raise
    return process, address


def start_proxy(protocol: str, upstream: str, config: str, wait: bool = True):
    """Start `stealguard-sidecar proxy` in front of `upstream`; (process, address)."""
    from _procs import Process, free_port, script

    address = f"127.0.0.1:{free_port()}"
    process = Process([script("stealguard-sidecar"), "proxy", "--listen", address,
                       "--upstream", upstream, "--protocol", protocol, "--config", config,
                       "--health-interval", "0.2"],
                      env={"STEALGUARD_SECRET": "stealguard-tests"})  # as the test sidecars
    if wait:
        try:
            process.wait_healthy(address, timeout=300)
        except Exception:
            process.stop(signal.SIGKILL)
            raise
    return process, address


def wait_for_health(address: str, status: str, timeout: float = 20.0) -> str:
    """Poll the health of `address` until it reports `status`; returns the last status."""
    import time

    from _procs import health_status

    deadline = time.monotonic() + timeout
    seen = health_status(address)
    while seen != status and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = health_status(address)
    return seen
