"""Coarse confidence: the label with a real margin, the top probability on a few levels,
the other classes keyed noise. The default defense (README, "Choosing the default").

For a row y of K >= 2 probabilities with top class c = numpy.argmax(y):

    level  = number of `edges` <= y_c                 (edges e_1 < ... < e_{L-1})
    t      = max(values[level], (1 + margin (K - 1)) / K)
    rest   = 1 - t, shared among the other K - 1 classes by keyed weights w_j:
             a_j = rest * w_j / sum(w), mixed with the uniform share u = rest / (K - 1)
             just enough that no class exceeds t - margin:
             q_j = lam a_j + (1 - lam) u,  lam = min(1, (t - margin - u) / (max a - u))
    q_c    = t

What an answer discloses, by construction, is the label and the level of its confidence,
nothing else. The weights w_j are exponential draws (so w / sum(w) is Dirichlet(1)),
-log u for u uniform on 23 bits, two from each output of a splitmix64 stream seeded by the
keyed PRF `nh_siphash24` of the row's bytes (NH, then SipHash-2-4) under keys derived from
the server secret, the defense's name and its parameters (`noise.key_bytes`).
They do not depend on the values of the other classes at all, so there is no formula to
invert: knowing the algorithm and its published parameters, an attacker learns from the
other classes only a pseudo-random function of the input bytes, and repeating a query, or
averaging near-duplicates, converges to the uniform share. The top value is a public
step function of y_c. The margin makes the label survive rounding to 2 decimals and a
float32 cast: served top minus runner-up is at least `margin` on every row.

Why coarse and not exact: an exact (or monotone) confidence lets a distilling thief weigh
each query by how sure the model is, which measurably beats a label-only thief
(attacks/results/*/report.md). A few levels keep the order of confidence for callers
who threshold on it, at a price in leakage the experiments measure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numba import njit, prange

from ._base import Defense, in_range
from ._fastmath import NH_WORDS, log_f32, nh_siphash24, splitmix64
from ._validation import check_row
from .noise import key_bytes, row_key

BLOCK_VALUES = 1 << 14  # values per parallel work item (rows are never split)
_U32 = np.uint64(0xFFFFFFFF)


@njit(inline="always")
def _row(y, out, base, k, top, edges, values, margin, nh, k0, k1):
    p = np.float64(y[base + top])
    level = 0
    for e in edges:
        level += p >= e
    t = min(max(values[level], (1.0 + margin * (k - 1)) / k), 1.0)
    rest = 1.0 - t
    seed = nh_siphash24(y, base, k, nh, k0, k1)
    total = 0.0
    largest = 0.0
    for first in range(0, k, 2):  # two 32-bit uniforms from each splitmix64 output
        draws = splitmix64(seed, first >> 1)
        for j in range(first, min(k, first + 2)):
            # 23 bits, so that u is in (0, 1) exactly in float32 and every weight is > 0
            u = (np.float32((draws & _U32) >> np.uint64(9)) + np.float32(0.5)) \
                * np.float32(2.0 ** -23)
            draws >>= np.uint64(32)
            w = 0.0 if j == top else -np.float64(log_f32(u))  # exponential: Dirichlet(1)
            out[base + j] = w  # weights first; out is float64 scratch only when y is
            total += w
            largest = max(largest, w)
    share = rest / (k - 1)
    cap = t - margin
    lam = 1.0
    peak = rest * largest / total
    if peak > cap:
        lam = (cap - share) / (peak - share)
    scale = lam * rest / total
    offset = (1.0 - lam) * share
    for j in range(k):
        out[base + j] = scale * np.float64(out[base + j]) + offset
    out[base + top] = t


@njit(inline="always")
def _rows(y, out, k, first, last, check, edges, values, margin, nh, k0, k1):
    for i in range(first, last):
        base = i * k
        valid, top = check_row(y, base, k)
        if check and not valid:
            return i
        _row(y, out, base, k, top, edges, values, margin, nh, k0, k1)
    return -1


@njit(cache=True, error_model="numpy")
def coarse_confidence_serial(y, out, n, k, check, edges, values, margin, nh, k0, k1):
    """Coarse confidence of the flat (n, k) batch y into out, on this thread."""
    return _rows(y, out, k, 0, n, check, edges, values, margin, nh, k0, k1)


@njit(cache=True, error_model="numpy", parallel=True)
def coarse_confidence_parallel(y, out, n, k, check, edges, values, margin, nh, k0, k1):
    """Coarse confidence of the flat (n, k) batch y into out, blocks of rows in parallel."""
    rows_per_block = max(1, BLOCK_VALUES // k)
    blocks = (n + rows_per_block - 1) // rows_per_block
    bad = np.empty(blocks, np.int64)
    for b in prange(blocks):
        first = b * rows_per_block
        bad[b] = _rows(y, out, k, first, min(n, first + rows_per_block), check,
                       edges, values, margin, nh, k0, k1)
    for b in range(blocks):
        if bad[b] >= 0:
            return bad[b]
    return -1


def nines(p: float) -> float:
    """-log10(1 - p): how many nines a probability has (0.999 -> 3)."""
    return math.inf if p >= 1.0 else -math.log10(1.0 - p)


def default_values(edges: Sequence[float]) -> tuple[float, ...]:
    """Each level's served top: the midpoint of its edges counted in nines.

    The lowest level starts at 0 nines (p = 0), the highest ends one nine above the last
    edge; with no edges the one level spans 0 to 1 nine. So a caller's threshold placed at
    an edge keeps its meaning, and the served value never claims a nine the level lacks.
    """
    bounds = [0.0, *(nines(e) for e in edges)]
    bounds.append(bounds[-1] + 1.0)
    pairs = zip(bounds[:-1], bounds[1:], strict=True)
    return tuple(1.0 - 10.0 ** (-(lo + hi) / 2) for lo, hi in pairs)


def _numbers(name: str, value: object) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | np.ndarray):
        raise ValueError(f"{name} must be a list of numbers, got {value!r}")
    return tuple(in_range(f"{name}[{i}]", v, 0.0, 1.0) for i, v in enumerate(value))


#: The default levels: 0.5 and 0.7, then two per nine (1 - 10^-k at whole and half k, rounded)
#: from 0.9 to 0.99999; twelve levels (README, "The utility contract"; measured in
#: attacks/results/*/contract.md).
DEFAULT_EDGES = (0.5, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999, 0.9997, 0.9999, 0.99997, 0.99999)


class CoarseConfidence(Defense):
    """The label with a margin, its confidence on len(edges) + 1 levels, the rest keyed.

    `edges` (increasing, in (0, 1)) split the top probability into levels; `values`
    (one per level, non-decreasing, in (0, 1)) are what each level serves (default:
    `default_values`); `margin` in [0.005, 0.25] is the least served top-minus-runner-up.
    Keyed by the server secret: identical rows get identical answers.
    """

    name = "coarse_confidence"
    preserves_top1 = True
    keyed = True
    _serial = staticmethod(coarse_confidence_serial)
    _parallel = staticmethod(coarse_confidence_parallel)

    def __init__(self, edges: Sequence[float] = DEFAULT_EDGES,
                 values: Sequence[float] | None = None, margin: float = 0.02,
                 *, secret: bytes = b""):
        self.edges = _numbers("edges", edges)
        if any(not 0.0 < e < 1.0 for e in self.edges):
            raise ValueError(f"edges must lie strictly between 0 and 1, got {list(edges)}")
        if any(b <= a for a, b in zip(self.edges[:-1], self.edges[1:], strict=True)):
            raise ValueError(f"edges must increase, got {list(edges)}")
        self.values = (default_values(self.edges) if values is None
                       else _numbers("values", values))
        if len(self.values) != len(self.edges) + 1:
            raise ValueError(f"values must have one entry per level, len(edges) + 1 = "
                             f"{len(self.edges) + 1}, got {len(self.values)}")
        if any(not 0.0 < v < 1.0 for v in self.values):
            raise ValueError(f"values must lie strictly between 0 and 1, got {list(values)}")
        if any(b < a for a, b in zip(self.values[:-1], self.values[1:], strict=True)):
            raise ValueError(f"values must not decrease (confidence keeps its order), "
                             f"got {list(values)}")
        self.margin = in_range("margin", margin, 0.005, 0.25)
        self._key = row_key(secret, self.name, self.params)
        self._nh = np.frombuffer(key_bytes(secret, self.name, self.params, 4 * NH_WORDS,
                                           b"nh"), np.uint32).copy()
        self._edges = np.array(self.edges, np.float64)
        self._values = np.array(self.values, np.float64)
        super().__init__()

    @property
    def params(self) -> dict[str, float]:
        """edge_1.., value_1.. and margin: flat numbers, as ListPolicies carries them."""
        out = {f"edge_{i + 1}": e for i, e in enumerate(self.edges)}
        out.update({f"value_{i + 1}": v for i, v in enumerate(self.values)})
        out["margin"] = self.margin
        return out

    def _kernel_args(self, dtype) -> tuple:
        return (self._edges, self._values, self.margin, self._nh, self._key[0], self._key[1])
