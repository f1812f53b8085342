"""Helpers for the model server and TorchServe tests: start the model server, encode real
MNIST test images as PNG and .npy, and call TorchServe's gRPC API."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import grpc
import numpy as np
from _procs import Process, free_port, script, start_sidecar
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc


def mnist_test_images(count: int) -> np.ndarray:
    """The first `count` images of the held-out MNIST test part, float32 (N, 1, 28, 28)."""
    from stealguard.modelserver.datasets import load_dataset

    return load_dataset("mnist").test_x[:count]


def png_bytes(image: np.ndarray) -> bytes:
    """A grayscale PNG of one image (1, H, W) or (H, W) with values in [0, 1]."""
    from PIL import Image

    pixels = np.round(np.asarray(image).reshape(image.shape[-2:]) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


STARTUP_TIMEOUT = 600.0  # the sidecar compiles its kernels at start; slow on a busy machine


def start_modelserver(sidecar: str, store: Path, *extra: str) -> tuple[Process, str]:
    """`stealguard-modelserver` on a free loopback port (not waited for)."""
    address = f"127.0.0.1:{free_port()}"
    process = Process([script("stealguard-modelserver"), "--listen", address,
                       "--sidecar", sidecar, "--model-store", str(store), *extra])
    return process, address


def start_stack(store: Path, *extra: str) -> tuple[Process, str, Process, str]:
    """A sidecar and a model server that calls it, started together and waited for:
    (sidecar, its address, model server, its address)."""
    sidecar, sidecar_address = start_sidecar(wait=False)
    modelserver, address = start_modelserver(sidecar_address, store, *extra)
    try:
        modelserver.wait_healthy(address, timeout=STARTUP_TIMEOUT)
        sidecar.wait_healthy(sidecar_address, timeout=STARTUP_TIMEOUT)
    except Exception:
        modelserver.stop(signal.SIGKILL)
        sidecar.stop(signal.SIGKILL)
        raise
    return sidecar, sidecar_address, modelserver, address


class TorchServeClient:
    """TorchServe's InferenceAPIsService over one channel."""

    def __init__(self, address: str):
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(self.channel)

    def request(self, model: str, data: bytes | None, **fields) -> inference_pb2.PredictionsRequest:
        inputs = {} if data is None else {"data": data}
        return inference_pb2.PredictionsRequest(model_name=model, input=inputs, **fields)

    def predict(self, model: str, data: bytes | None, timeout: float = 30.0, **fields):
        """The decoded JSON `prediction` as a float64 array; raises grpc.RpcError."""
        reply = self.stub.Predictions(self.request(model, data, **fields), timeout=timeout)
        return np.array(json.loads(reply.prediction), dtype=np.float64)

    def close(self) -> None:
        self.channel.close()
