"""What every defense shares: parameter checks, input handling, kernel dispatch.

A defense is a small class (the ART shape): its constructor checks and stores parameters,
`__call__(probs, logits=False)` returns a new array of the same shape and dtype. The
subclass supplies two numba kernels with the same signature,
`kernel(y, out, n, k, check, *args) -> int`, working on the flat C-order (n, k) arrays y
and out and returning the first invalid row (checked only when `check`) or -1:
`_serial` for the small batches of the sidecar's hot path and `_parallel` (prange over
blocks of rows) for batches big enough to amortise starting threads.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from ._validation import F32, F64, as_rows, first_invalid_row, read_only_flat, row_error, softmax

# Batches with fewer values than this run on one thread: waking numba's thread pool costs
# more than it saves below this size (see bench/kernels.py --threshold).
PARALLEL_MIN_VALUES = 1 << 16
PAGE = 4096  # bytes: the span over which the CPU compares load and store addresses


def positive(name: str, value: object) -> float:
    """`value` as a float > 0, or ValueError naming the parameter and the range."""
    return _number(name, value, lambda v: v > 0, "a finite number > 0 (range (0, inf))")


def in_range(name: str, value: object, low: float, high: float) -> float:
    """`value` as a float in [low, high], or ValueError naming the parameter and range."""
    return _number(name, value, lambda v: low <= v <= high, f"a number in [{low:g}, {high:g}]")


def integer(name: str, value: object, low: int, high: int) -> int:
    """`value` as an int in [low, high] (3.0 is accepted), or ValueError."""
    v = _number(name, value, lambda v: v == int(v) and low <= v <= high,
                f"an integer in [{low}, {high}]")
    return int(v)


def flag(name: str, value: object) -> bool:
    """`value` as a bool (True/False or 1/0), or ValueError naming the parameter."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be true or false (or 1/0), got {value!r}")


def _number(name, value, ok, expected) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or not ok(v):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return v


def empty_apart(y: np.ndarray, size: int) -> np.ndarray:
    """`np.empty(size, y.dtype)` whose address is half a page from y's, modulo the page.

    The kernels' flat loop loads y[e] and stores out[e]. When out sits a few bytes ahead of
    y modulo 4096, the loads of the next values agree with the stores just made in the low
    12 address bits, and the CPU holds each load until it is sure they differ (4K
    aliasing): a 256x1000 float32 batch then took 3.7 ms instead of 2.0. Half a page apart,
    loads and stores never meet. Costs one page of memory, and about 3 us for the
    addresses: small outputs, where that is more than aliasing could cost, skip it.
    """
    itemsize = y.dtype.itemsize
    if size * itemsize < 4 * PAGE:
        return np.empty(size, y.dtype)
    buffer = np.empty(size + PAGE // itemsize, y.dtype)
    shift = (y.ctypes.data + PAGE // 2 - buffer.ctypes.data) % PAGE // itemsize
    return buffer[shift : shift + size]


class Defense:
    """Base class of every defense; see the module docstring for the kernel contract."""

    name: ClassVar[str] = ""
    #: True if every output row has the input row's numpy.argmax.
    preserves_top1: ClassVar[bool] = False
    #: True if the constructor takes the server `secret` (the keyed random defenses).
    keyed: ClassVar[bool] = False
    _serial: ClassVar = None
    _parallel: ClassVar = None

    def __init__(self) -> None:
        self._args = {F32: self._kernel_args(np.float32), F64: self._kernel_args(np.float64)}

    @property
    def params(self) -> dict[str, float]:
        """The parameters as numbers (bools as 0.0/1.0), e.g. for ListPolicies."""
        return {}

    def _kernel_args(self, dtype) -> tuple:
        """Extra kernel arguments after `check`, typed for input of `dtype`."""
        return ()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def __call__(self, probs: np.ndarray, logits: bool = False) -> np.ndarray:
        """Perturb `probs` (1-D row or 2-D rows x classes, float32/float64).

        Returns a new array of the same shape and dtype; `probs` is never written. With
        `logits=True` the values are logits and a stable softmax (sigmoid for one column)
        comes first. A single column holds positive-class probabilities p and is defended
        as the rows (1 - p, p). Raises ValueError naming the first invalid row and why.
        """
        rows = as_rows(probs)
        check = not logits
        if logits:
            rows = softmax(rows)
        n, k = rows.shape
        if n == 0:
            return np.empty(np.shape(probs), rows.dtype)
        if k == 1:
            return self._binary(rows, check).reshape(np.shape(probs))
        return self._rows(read_only_flat(rows), n, k, check).reshape(np.shape(probs))

    def perturb_flat(self, values: np.ndarray, n: int, k: int, logits: bool = False
                     ) -> np.ndarray:
        """Perturb n rows of k values stored flat in `values`; returns a new flat array.

        The sidecar's path: `values` is the codec's zero-copy, read-only view of a request,
        handed straight to the kernel with none of `__call__`'s reshaping. The result and
        the errors are exactly `__call__`'s; anything other than read-only, aligned,
        contiguous probabilities of K >= 2 classes goes through `__call__`.
        """
        flags = values.flags
        if (logits or k < 2 or n == 0 or flags.writeable or not flags.aligned
                or values.dtype not in self._args):
            return self(values.reshape(n, k), logits=logits).reshape(-1)
        return self._rows(values, n, k, True)

    def _rows(self, y: np.ndarray, n: int, k: int, check: bool) -> np.ndarray:
        """Run the kernel on the read-only flat (n, k) rows y; ValueError for a bad row."""
        out = empty_apart(y, n * k)
        kernel = self._serial if n * k < PARALLEL_MIN_VALUES else self._parallel
        bad = kernel(y, out, n, k, check, *self._args[y.dtype])
        if bad >= 0:
            raise row_error(y.reshape(n, k), bad)
        return out

    def _binary(self, column: np.ndarray, check: bool) -> np.ndarray:
        n = column.shape[0]
        if check:
            bad = first_invalid_row(read_only_flat(column), n, 1)
            if bad >= 0:
                raise row_error(column, bad)
        # (1 - p, p) in float64 whatever the dtype: 1 - p is exact there, not in float32
        pairs = np.empty((n, 2), np.float64)
        pairs[:, 1] = column[:, 0]
        pairs[:, 0] = 1.0 - pairs[:, 1]
        out = np.empty_like(pairs)
        kernel = self._serial if 2 * n < PARALLEL_MIN_VALUES else self._parallel
        kernel(read_only_flat(pairs), out.reshape(-1), n, 2, False, *self._args[F64])
        return out[:, 1].astype(column.dtype)
