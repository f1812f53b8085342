"""The requests a load run sends, serialised once up front so the hot loop only copies bytes."""

from __future__ import annotations

import io

import numpy as np
from stealguard.compat.torchserve import inference_pb2
from stealguard.server.codec import array_to_tensor
from stealguard.v1 import defense_pb2

from .config import LoadConfig

SYNTHETIC_POOL = 64  # distinct synthetic requests, cycled
MAX_POOL = 4096  # at most this many distinct requests from a --payload file


class PayloadError(ValueError):
    """A --payload file that cannot be sent; the message names the file and the reason."""


def synthetic_rows(cfg: LoadConfig, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` x ``cfg.classes`` rows that look like a classifier's output.

    ``dirichlet``: Dirichlet(alpha) probability rows (small alpha = confident model);
    ``softmax``: softmax of N(0, 3) logits. With ``cfg.logits`` the logits themselves.
    """
    k = cfg.classes
    if cfg.distribution == "dirichlet" and not cfg.logits:
        out = rng.dirichlet(np.full(k, cfg.alpha), size=rows)
    else:
        z = rng.normal(0.0, 3.0, size=(rows, k))
        if cfg.logits:
            out = z
        else:
            z -= z.max(axis=1, keepdims=True)
            out = np.exp(z)
            out /= out.sum(axis=1, keepdims=True)
    return np.ascontiguousarray(out, dtype=cfg.dtype)


def load_payload(path: str) -> np.ndarray:
    """The array in a .npy file; PayloadError when it is unreadable, empty or not finite."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PayloadError(f"--payload {path}: cannot read a .npy array ({exc})") from None
    if arr.size == 0:
        raise PayloadError(f"--payload {path}: the array is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise PayloadError(f"--payload {path}: values must be finite numbers")
    return arr


def _batches(arr: np.ndarray, batch: int) -> list[np.ndarray]:
    """Consecutive slices of ``batch`` leading-axis entries, wrapping around the end."""
    n = arr.shape[0]
    count = min(MAX_POOL, max(1, -(-n // batch)))
    return [np.take(arr, np.arange(i * batch, (i + 1) * batch) % n, axis=0) for i in range(count)]


def perturb_requests(cfg: LoadConfig) -> list[bytes]:
    """Serialised ``PerturbRequest`` messages of ``cfg.batch`` rows each."""
    if cfg.payload:
        arr = load_payload(cfg.payload)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise PayloadError(
                f"--payload {cfg.payload}: perturb needs (rows, classes), got shape {arr.shape}"
            )
        dtype = arr.dtype.name if arr.dtype.name in ("float32", "float64") else cfg.dtype
        arrays = [b.astype(dtype, copy=False) for b in _batches(arr, cfg.batch)]
    else:
        rng = np.random.default_rng(cfg.seed)
        arrays = [synthetic_rows(cfg, cfg.batch, rng) for _ in range(SYNTHETIC_POOL)]
    out = []
    for a in arrays:
        # on a stream, a rejected message gets its error as its reply and the stream goes on
        msg = defense_pb2.PerturbRequest(probabilities=array_to_tensor(a), model=cfg.model,
                                         logits=cfg.logits,
                                         keep_stream_on_error=cfg.method == "perturb-stream")
        out.append(msg.SerializeToString())
    return out


def prediction_requests(cfg: LoadConfig) -> list[bytes]:
    """Serialised TorchServe ``PredictionsRequest`` messages; ``data`` is a .npy batch."""
    if cfg.payload:
        arrays = _batches(load_payload(cfg.payload), cfg.batch)
    else:
        rng = np.random.default_rng(cfg.seed)
        shape = (cfg.batch, *cfg.input_shape)
        arrays = [rng.random(shape, dtype=np.float32) for _ in range(SYNTHETIC_POOL)]
    out = []
    for a in arrays:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        msg = inference_pb2.PredictionsRequest(model_name=cfg.model, input={"data": buf.getvalue()})
        out.append(msg.SerializeToString())
    return out


def requests_for(cfg: LoadConfig) -> list[bytes]:
    """The request pool for ``cfg.method``."""
    if cfg.method == "predictions":
        return prediction_requests(cfg)
    return perturb_requests(cfg)
