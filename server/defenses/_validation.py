"""The input checks every defense shares, and the softmax for `logits=True`.

Valid probabilities are a 1-D (one row) or 2-D (rows, classes) float32/float64 array whose
values are finite and within [0, 1] and whose rows sum to 1 within 1e-3. A single column
(K = 1) holds positive-class probabilities and has no sum rule. The per-row check is cheap
enough to run inside each defense kernel (`check_row`); when a kernel reports a bad row,
`row_error` works out the reason in Python, where speed no longer matters.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._rows import scan_row

SUM_TOLERANCE = 1e-3
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)


def as_rows(probs: np.ndarray) -> np.ndarray:
    """`probs` as a 2-D C-contiguous native-endian float array (a view when possible).

    Raises ValueError for anything that is not a 1-D or 2-D float32/float64 array.
    Never writes into `probs`.
    """
    if not isinstance(probs, np.ndarray):
        probs = np.asarray(probs)
    dtype = probs.dtype
    if dtype is not F32 and dtype is not F64:
        if dtype.kind != "f" or dtype.itemsize not in (4, 8):
            raise ValueError(
                f"probabilities must be float32 or float64, got {dtype.name}"
            )
        probs = probs.astype(dtype.newbyteorder("="))  # byte-swapped input
    ndim = probs.ndim
    if ndim == 2:
        rows = probs
    elif ndim == 1:
        rows = probs.reshape(1, -1)
    else:
        raise ValueError(
            "probabilities must be 1-D (one row) or 2-D (rows, classes), "
            f"got {ndim}-D with shape {probs.shape}"
        )
    if not (rows.flags.c_contiguous and rows.flags.aligned):
        rows = np.array(rows, order="C")  # strided or unaligned (np.frombuffer at an offset)
    if rows.shape[1] == 0 and rows.shape[0] > 0:
        raise ValueError(f"probabilities have no classes (shape {probs.shape})")
    return rows


def read_only_flat(rows: np.ndarray) -> np.ndarray:
    """A read-only flat view of C-contiguous rows.

    Kernels only ever see read-only input, so numba compiles one specialisation per dtype
    instead of two (writable and read-only arrays are different numba types).
    """
    flat = rows.reshape(-1)  # always a new view object, so the flag is ours to set
    flat.flags.writeable = False
    return flat


@njit(inline="always")
def check_row(y, base, k):
    """(valid, numpy.argmax) of the row y[base:base+k]: in [0, 1] and summing to 1."""
    in_range, total, top = scan_row(y, base, k)
    return in_range & (abs(total - 1.0) <= SUM_TOLERANCE), top


@njit(cache=True)
def first_invalid_row(y, n, k):
    """Index of the first invalid row of the flat (n, k) array y, or -1.

    A single column (k == 1) holds positive-class probabilities: no sum rule.
    """
    for i in range(n):
        if k == 1:
            valid = scan_row(y, i, 1)[0]
        else:
            valid = check_row(y, i * k, k)[0]
        if not valid:
            return i
    return -1


@njit(cache=True, error_model="numpy")
def softmax_rows(x, out, n, k):
    """Numerically stable softmax of each row of x into out (sigmoid when k == 1).

    Computed in float64 whatever the dtype. Returns the first row with a non-finite value,
    or -1.
    """
    for i in range(n):
        base = i * k
        top = -math.inf
        for j in range(base, base + k):
            v = np.float64(x[j])
            if not math.isfinite(v):
                return i
            top = max(top, v)
        if k == 1:
            v = np.float64(x[base])
            out[base] = 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))
            continue
        total = 0.0
        for j in range(base, base + k):
            total += math.exp(np.float64(x[j]) - top)
        for j in range(base, base + k):
            out[j] = math.exp(np.float64(x[j]) - top) / total
    return -1


def row_error(rows: np.ndarray, i: int, logits: bool = False) -> ValueError:
    """The ValueError for invalid row i of the 2-D array rows, naming the reason.

    Values print as the shortest text of their own dtype (float32 1.2 is "1.2").
    """
    row = rows[i]
    for j, v in enumerate(row):
        if not np.isfinite(v):
            return ValueError(f"row {i}: value {v!s} at column {j} is not finite")
        if not logits and not 0.0 <= v <= 1.0:
            return ValueError(f"row {i}: value {v!s} at column {j} is outside [0, 1]")
    total = float(np.sum(row, dtype=np.float64))
    return ValueError(f"row {i}: sums to {total:.4f}, expected 1 within {SUM_TOLERANCE:g}")


def softmax(rows: np.ndarray) -> np.ndarray:
    """Row-wise softmax (sigmoid for one column) of finite logits, same dtype.

    Raises ValueError naming the first row with a non-finite value.
    """
    out = np.empty(rows.shape, rows.dtype)
    n, k = rows.shape
    bad = softmax_rows(read_only_flat(rows), out.reshape(-1), n, k)
    if bad >= 0:
        raise row_error(rows, bad, logits=True)
    return out


def validate(probs: np.ndarray, logits: bool = False) -> np.ndarray:
    """Check `probs` as every defense does and return it as a 2-D float array.

    With `logits=True` the values may be any finite numbers and the row-wise softmax
    (sigmoid for a single column) is returned. Raises ValueError naming the first bad row
    and the reason, e.g. "row 3: value nan at column 2 is not finite".
    """
    rows = as_rows(probs)
    if logits:
        return softmax(rows)
    n, k = rows.shape
    bad = first_invalid_row(read_only_flat(rows), n, k)
    if bad >= 0:
        raise row_error(rows, bad)
    return rows
