"""The deterministic defenses: identity, sine, and ART's output-filter defenses.

`none` returns the validated input unchanged, `sine` is the paper's r = beta * sin(f y),
`high_confidence`, `top_k`, `rounded` and `class_labels` are the post-processing defenses
of the Adversarial Robustness Toolbox (HighConfidence, ReverseSigmoid's siblings). All but
`none` and `class_labels` renormalise each row; a row they zero out becomes the one-hot row
of its top-1 class (`_rows.normalise_row`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._base import Defense, in_range, integer, positive
from ._rows import guard_top1, normalise_row, row_sum
from ._validation import check_row

NONE, SINE, HIGH_CONFIDENCE, TOP_K, ROUNDED, CLASS_LABELS = range(6)
BLOCK_VALUES = 1 << 14


@njit(inline="always")
def _rows(y, out, k, first, last, check, kind, a, b):
    for i in range(first, last):
        base = i * k
        valid, top = check_row(y, base, k)
        if check and not valid:
            return i
        if kind == NONE:
            for j in range(base, base + k):
                out[j] = y[j]
            continue
        if kind == CLASS_LABELS:
            for j in range(k):
                out[base + j] = 1.0 if j == top else 0.0
            continue
        if kind == TOP_K and a < k:
            order = np.argsort(-y[base:base + k], kind="mergesort")
            for j in range(base, base + k):
                out[j] = 0.0
            for rank in range(int(a)):
                out[base + order[rank]] = y[base + order[rank]]
        else:
            for j in range(base, base + k):
                v = np.float64(y[j])
                if kind == SINE:
                    q = max(v - a * math.sin(b * v), 0.0)
                elif kind == HIGH_CONFIDENCE:
                    q = v if v >= a else 0.0
                elif kind == ROUNDED:
                    q = np.rint(v * a) / a
                else:  # TOP_K with k >= classes keeps everything
                    q = v
                out[j] = q
        normalise_row(out, base, k, row_sum(out, base, k), top)
        if kind == HIGH_CONFIDENCE or kind == TOP_K:  # rescaling can round a near-tie
            guard_top1(out, base, k, top)  # into a tie
    return -1


@njit(cache=True, error_model="numpy")
def simple_serial(y, out, n, k, check, kind, a, b):
    """Deterministic defense `kind` (parameters a, b) of the flat (n, k) batch y."""
    return _rows(y, out, k, 0, n, check, kind, a, b)


@njit(cache=True, error_model="numpy", parallel=True)
def simple_parallel(y, out, n, k, check, kind, a, b):
    """Deterministic defense `kind`, blocks of rows in parallel."""
    rows_per_block = max(1, BLOCK_VALUES // k)
    blocks = (n + rows_per_block - 1) // rows_per_block
    bad = np.empty(blocks, np.int64)
    for blk in prange(blocks):
        first = blk * rows_per_block
        bad[blk] = _rows(y, out, k, first, min(n, first + rows_per_block), check, kind, a, b)
    for blk in range(blocks):
        if bad[blk] >= 0:
            return bad[blk]
    return -1


class _Simple(Defense):
    _kind = NONE
    _serial = staticmethod(simple_serial)
    _parallel = staticmethod(simple_parallel)

    def _kernel_args(self, dtype) -> tuple:
        a, b = self._ab()
        return (self._kind, float(a), float(b))

    def _ab(self) -> tuple[float, float]:
        return 0.0, 0.0


class NoDefense(_Simple):
    """Identity (the unprotected baseline): the validated input, copied."""

    name = "none"
    preserves_top1 = True

    def __init__(self):
        super().__init__()


class Sine(_Simple):
    """r = beta * sin(f * y) (paper IV-B, "Sine")."""

    name = "sine"
    _kind = SINE

    def __init__(self, beta: float = 0.3, f: float = 10.0):
        self.beta = positive("beta", beta)
        self.f = positive("f", f)
        super().__init__()

    @property
    def params(self) -> dict[str, float]:
        return {"beta": self.beta, "f": self.f}

    def _ab(self) -> tuple[float, float]:
        return self.beta, self.f


class HighConfidence(_Simple):
    """Values below `cutoff` become 0, the rest are renormalised (ART HighConfidence)."""

    name = "high_confidence"
    preserves_top1 = True
    _kind = HIGH_CONFIDENCE

    def __init__(self, cutoff: float = 0.25):
        self.cutoff = in_range("cutoff", cutoff, 0.0, 1.0)
        super().__init__()

    @property
    def params(self) -> dict[str, float]:
        return {"cutoff": self.cutoff}

    def _ab(self) -> tuple[float, float]:
        return self.cutoff, 0.0


class TopK(_Simple):
    """Keep the k largest values of each row (first index wins ties), renormalise."""

    name = "top_k"
    preserves_top1 = True
    _kind = TOP_K

    def __init__(self, k: int = 1):
        self.k = integer("k", k, 1, 1 << 31)
        super().__init__()

    @property
    def params(self) -> dict[str, float]:
        return {"k": float(self.k)}

    def _ab(self) -> tuple[float, float]:
        return float(self.k), 0.0


class Rounded(_Simple):
    """Round each value to `decimals` decimal places (half to even), renormalise."""

    name = "rounded"
    _kind = ROUNDED

    def __init__(self, decimals: int = 2):
        self.decimals = integer("decimals", decimals, 0, 15)
        super().__init__()

    @property
    def params(self) -> dict[str, float]:
        return {"decimals": float(self.decimals)}

    def _ab(self) -> tuple[float, float]:
        return 10.0**self.decimals, 0.0


class ClassLabels(_Simple):
    """The one-hot row of the top-1 class (label only; ART ClassLabels)."""

    name = "class_labels"
    preserves_top1 = True
    _kind = CLASS_LABELS

    def __init__(self):
        super().__init__()
