"""The one tensor codec: `stealguard.v1.Tensor` message <-> `numpy.ndarray`.

Decoding never copies when it can avoid it (`np.frombuffer` over the message's bytes);
the result is read-only, which the defenses respect. Every way a tensor can be malformed
is a `CodecError` whose message says which field is wrong and how to fix it.
"""

from __future__ import annotations

import numpy as np
from stealguard.server.errors import Exhausted, InvalidInput
from stealguard.v1 import defense_pb2

_DTYPES = {
    defense_pb2.FLOAT32: np.dtype("<f4"),
    defense_pb2.FLOAT64: np.dtype("<f8"),
}


class CodecError(InvalidInput, ValueError):
    """A `Tensor` message that cannot be read as a probability array."""


class RowLimitError(Exhausted, CodecError):
    """More rows than the server accepts in one request (RESOURCE_EXHAUSTED, not invalid)."""


def tensor_to_flat(tensor: defense_pb2.Tensor, *, max_rows: int | None = None
                   ) -> tuple[np.ndarray, int, int]:
    """Decode `tensor` into (values, rows, classes) without copying.

    `values` is the flat, read-only view of the data (`np.frombuffer`); a 1-D shape
    [classes] is one row. Raises `CodecError` for an unspecified or unknown dtype, a shape
    that is not [classes] or [rows, classes], a negative or zero class count, more rows
    than `max_rows`, or data whose length does not match shape x dtype.
    """
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        name = "DTYPE_UNSPECIFIED" if tensor.dtype == 0 else f"the unknown value {tensor.dtype}"
        raise CodecError(f"probabilities.dtype is {name}: set FLOAT32 or FLOAT64")
    shape = tensor.shape
    if len(shape) == 2:
        rows, classes = shape
    elif len(shape) == 1:
        rows, classes = 1, shape[0]
    else:
        raise CodecError(
            f"probabilities.shape is {list(shape)}: expected [classes] or [rows, classes]"
        )
    if rows < 0 or classes < 0:
        raise CodecError(f"probabilities.shape {list(shape)} has a negative dimension")
    if classes == 0 and rows > 0:
        raise CodecError(f"probabilities.shape {list(shape)} has no classes: need at least 1")
    if max_rows is not None and rows > max_rows:
        raise RowLimitError(f"probabilities has {rows} rows: at most {max_rows} per request; "
                            "split the batch")
    data = tensor.data
    expected = rows * classes * dtype.itemsize
    if len(data) != expected:
        raise CodecError(
            f"probabilities.data has {len(data)} bytes but shape {list(shape)} of "
            f"{dtype.name} needs {expected}"
        )
    values = np.frombuffer(data, dtype=dtype)
    if not values.flags.aligned:  # numba compiles aligned access only
        values = values.copy()
        values.flags.writeable = False
    return values, rows, classes


def tensor_to_array(tensor: defense_pb2.Tensor, *, max_rows: int | None = None) -> np.ndarray:
    """Decode `tensor` into a 1-D or 2-D float32/float64 array without copying (read-only).

    Raises the `CodecError`s of `tensor_to_flat`.
    """
    values, _, _ = tensor_to_flat(tensor, max_rows=max_rows)
    return values.reshape(tuple(tensor.shape))


def write_tensor(message: defense_pb2.Tensor, values: np.ndarray, shape) -> None:
    """Fill the empty `Tensor` message with the float32/float64 `values` as `shape` (1-D or
    2-D), in place: the sidecar writes its answer straight into the response."""
    dtype = values.dtype
    if dtype.kind != "f" or dtype.itemsize not in (4, 8):
        raise CodecError(f"cannot encode dtype {dtype}: only float32 and float64")
    if not 1 <= len(shape) <= 2:
        raise CodecError(f"cannot encode a {len(shape)}-D array: expected 1-D or 2-D")
    enum = defense_pb2.FLOAT32 if dtype.itemsize == 4 else defense_pb2.FLOAT64
    message.shape.extend(shape)
    message.dtype = enum
    message.data = values.astype(_DTYPES[enum], copy=False).tobytes()


def array_to_tensor(array: np.ndarray) -> defense_pb2.Tensor:
    """Encode a float32/float64 array of 1 or 2 dimensions as a `Tensor` message."""
    message = defense_pb2.Tensor()
    write_tensor(message, array, array.shape)
    return message
