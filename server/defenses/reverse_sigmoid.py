"""Reverse Sigmoid (Lee et al., eq. 4), exactly as DESIGN.md states it.

For a row y of K >= 2 probabilities:

    z_j = clamp(logit(y_j), -L, +L),  L = ln((1 - 1e-9) / 1e-9) ~ 20.7233
    r_j = beta * (sigmoid(gamma * z_j) - 1/2)
    q_j = max(y_j - r_j, 0)
    out = q / sum(q)

The kernel computes sigmoid(gamma * z) as 1 / (1 + w) with w = exp(-gamma * z) =
((1 - y) / y) ** gamma, so each value costs one division, one log and one exp. float32
input uses the branch-free polynomials of `_fastmath` (LLVM vectorises the loop); float64
input uses libm. Either way the result agrees with a float64 evaluation within 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.core.extending import overload

from ._base import Defense, flag, positive
from ._fastmath import FASTMATH, exp_f32, log_f32
from ._rows import guard_top1, normalise_row, row_stats
from ._validation import SUM_TOLERANCE, check_row

#: The logit clamp: the reference implementation's clip of y to [1e-9, 1 - 1e-9].
LOGIT_LIMIT = math.log((1.0 - 1e-9) / 1e-9)
BLOCK_VALUES = 1 << 14  # values per parallel work item (rows are never split)
CHUNK_VALUES = 1 << 11  # values per pass of the flat loop: 8 KiB of float32 output


def perturbed(v, beta, gamma, limit):
    """q = max(v - beta * (sigmoid(gamma * clamp(logit v)) - 1/2), 0) in v's precision."""


@overload(perturbed, inline="always")
def _perturbed_impl(v, beta, gamma, limit):
    if v == types.float32:
        one, half, zero = np.float32(1.0), np.float32(0.5), np.float32(0.0)
        log, exp = log_f32, exp_f32
    elif v == types.float64:
        one, half, zero = 1.0, 0.5, 0.0
        log, exp = math.log, math.exp
    else:
        return None

    def impl(v, beta, gamma, limit):
        ratio = (one - v) / v  # inf at v = 0 and 0 at v = 1: the clamp handles both
        minus_z = min(max(log(ratio), -limit), limit)
        s = one / (one + exp(gamma * minus_z))
        return max(v - beta * (s - half), zero)

    return impl


@njit(inline="always")
def _rows(y, out, k, first, last, check, beta, gamma, limit, guard):
    """Rows first..last-1, a few thousand values at a time so out stays in L1 cache.

    Per chunk, one flat loop computes q for every value (no reduction in it, so LLVM
    vectorises it), then one loop per row checks the input, sums, normalises and guards.
    """
    rows_per_chunk = max(1, CHUNK_VALUES // k)
    for chunk in range(first, last, rows_per_chunk):
        stop = min(last, chunk + rows_per_chunk)
        in_range = True
        for e in range(chunk * k, stop * k):
            v = y[e]
            in_range &= (v >= 0.0) & (v <= 1.0)  # NaN and inf fail too
            out[e] = perturbed(v, beta, gamma, limit)
        for i in range(chunk, stop):
            base = i * k
            y_sum, q_sum, top = row_stats(y, out, base, k)
            if check and not (in_range and abs(y_sum - 1.0) <= SUM_TOLERANCE):
                if not check_row(y, base, k)[0]:
                    return i
            normalise_row(out, base, k, q_sum, top)
            if guard:
                guard_top1(out, base, k, top)
    return -1


@njit(cache=True, error_model="numpy", fastmath=FASTMATH)
def reverse_sigmoid_serial(y, out, n, k, check, beta, gamma, limit, guard):
    """Reverse Sigmoid of the flat (n, k) batch y into out on this thread."""
    return _rows(y, out, k, 0, n, check, beta, gamma, limit, guard)


@njit(cache=True, error_model="numpy", fastmath=FASTMATH, parallel=True)
def reverse_sigmoid_parallel(y, out, n, k, check, beta, gamma, limit, guard):
    """Reverse Sigmoid of the flat (n, k) batch y into out, blocks of rows in parallel."""
    rows_per_block = max(1, BLOCK_VALUES // k)
    blocks = (n + rows_per_block - 1) // rows_per_block
    bad = np.empty(blocks, np.int64)
    for b in prange(blocks):
        first = b * rows_per_block
        bad[b] = _rows(y, out, k, first, min(n, first + rows_per_block), check,
                       beta, gamma, limit, guard)
    for b in range(blocks):
        if bad[b] >= 0:
            return bad[b]
    return -1


class ReverseSigmoid(Defense):
    """Reverse Sigmoid perturbation with the optional top-1 guard.

    beta > 0 scales the perturbation, gamma > 0 stretches the pseudo-logit. With
    `preserve_top1` (the default) a row whose numpy.argmax the formula would change gets
    its input's top-1 class back by the smallest adjustment (`_rows.guard_top1`); every
    other row is bit-identical to the unguarded output.
    """

    name = "reverse_sigmoid"
    _serial = staticmethod(reverse_sigmoid_serial)
    _parallel = staticmethod(reverse_sigmoid_parallel)

    def __init__(self, beta: float = 1.5, gamma: float = 0.3, preserve_top1: bool = True):
        self.beta = positive("beta", beta)
        self.gamma = positive("gamma", gamma)
        self.preserve_top1 = flag("preserve_top1", preserve_top1)
        super().__init__()

    @property
    def preserves_top1(self) -> bool:  # type: ignore[override]
        return self.preserve_top1

    @property
    def params(self) -> dict[str, float]:
        return {"beta": self.beta, "gamma": self.gamma,
                "preserve_top1": float(self.preserve_top1)}

    def _kernel_args(self, dtype) -> tuple:
        return (dtype(self.beta), dtype(self.gamma), dtype(LOGIT_LIMIT), self.preserve_top1)
