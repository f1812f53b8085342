"""The one tensor codec: `stealguard.v1.Tensor` message <-> `numpy.ndarray`.

Decoding never copies when it can avoid it (`np.frombuffer` over the message's bytes);
the result is read-only, which the defenses respect. Every way a tensor can be malformed
is a `CodecError` whose message says which field is wrong and how to fix it.
"""

from __future__ import annotations

import math

import numpy as np
from stealguard.v1 import defense_pb2

_DTYPES = {
    defense_pb2.FLOAT32: np.dtype("<f4"),
    defense_pb2.FLOAT64: np.dtype("<f8"),
}


class CodecError(ValueError):
    """A `Tensor` message that cannot be read as a probability array."""


class RowLimitError(CodecError):
    """More rows than the server accepts in one request (RESOURCE_EXHAUSTED, not invalid)."""


def tensor_to_array(tensor: defense_pb2.Tensor, *, max_rows: int | None = None) -> np.ndarray:
    """Decode `tensor` into a 1-D or 2-D float32/float64 array without copying.

    Raises `CodecError` for an unspecified or unknown dtype, a shape that is not
    [classes] or [rows, classes], a negative or zero class count, more rows than
    `max_rows`, or data whose length does not match shape x dtype.
    """
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        name = "DTYPE_UNSPECIFIED" if tensor.dtype == 0 else f"the unknown value {tensor.dtype}"
        raise CodecError(f"probabilities.dtype is {name}: set FLOAT32 or FLOAT64")
    shape = tuple(tensor.shape)
    if not 1 <= len(shape) <= 2:
        raise CodecError(
            f"probabilities.shape is {list(shape)}: expected [classes] or [rows, classes]"
        )
    if any(d < 0 for d in shape):
        raise CodecError(f"probabilities.shape {list(shape)} has a negative dimension")
    rows = shape[0] if len(shape) == 2 else 1
    if shape[-1] == 0 and rows > 0:
        raise CodecError(f"probabilities.shape {list(shape)} has no classes: need at least 1")
    if max_rows is not None and rows > max_rows:
        raise RowLimitError(f"probabilities has {rows} rows: at most {max_rows} per request; "
                            "split the batch")
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise CodecError(
            f"probabilities.data has {len(tensor.data)} bytes but shape {list(shape)} of "
            f"{dtype.name} needs {expected}"
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if not array.flags.aligned:  # numba compiles aligned access only
        array = array.copy()
    return array


def array_to_tensor(array: np.ndarray) -> defense_pb2.Tensor:
    """Encode a float32/float64 array of 1 or 2 dimensions as a `Tensor` message."""
    if array.dtype.kind != "f" or array.dtype.itemsize not in (4, 8):
        raise CodecError(f"cannot encode dtype {array.dtype}: only float32 and float64")
    enum = defense_pb2.FLOAT32 if array.dtype.itemsize == 4 else defense_pb2.FLOAT64
    if not 1 <= array.ndim <= 2:
        raise CodecError(f"cannot encode a {array.ndim}-D array: expected 1-D or 2-D")
    little = array.astype(_DTYPES[enum], copy=False)
    return defense_pb2.Tensor(shape=little.shape, dtype=enum, data=little.tobytes())
