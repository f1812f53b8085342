"""Row operations the defense kernels share: checks, normalisation, the top-1 guard.

All work on a flat array and the offset `base` of a row of `k` values, so a kernel can walk
a C-contiguous (rows, classes) batch without 2-D indexing.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._fastmath import like

# What the guard puts between a guarded row's top class and every other: enough for the
# label to survive rounding to 2 decimals (README, "The utility contract").
GUARD_MARGIN = 0.02


@njit(inline="always")
def scan_row(y, base, k):
    """One pass over an input row: (all values in [0, 1], float64 sum, numpy.argmax).

    NaN and inf fail one of the two comparisons, so "in [0, 1]" also means finite. The
    argmax (first index of the largest value) uses selects, not branches: where a row's
    maximum sits is random, so a branch would be mispredicted about once per row.
    """
    ok = True
    s0 = s1 = 0.0
    best = 0
    top = y[base]
    j = 0
    while j + 2 <= k:
        v = y[base + j]
        w = y[base + j + 1]
        ok &= (v >= 0.0) & (v <= 1.0) & (w >= 0.0) & (w <= 1.0)
        s0 += v
        s1 += w
        better = v > top
        best = j if better else best
        top = v if better else top
        better = w > top
        best = j + 1 if better else best
        top = w if better else top
        j += 2
    if j < k:
        v = y[base + j]
        ok &= (v >= 0.0) & (v <= 1.0)
        s0 += v
        better = v > top
        best = j if better else best
    return ok, s0 + s1, best


@njit(inline="always")
def _first_max(top0, best0, top1, best1):
    """Merge two (max, index) candidates the way numpy.argmax breaks ties."""
    if top1 > top0 or (top1 == top0 and best1 < best0):
        return top1, best1
    return top0, best0


@njit(inline="always")
def row_stats(y, out, base, k):
    """One pass over an input row and its perturbed row: (sum y, sum out, argmax y).

    Sums in float64; two interleaved chains for each, so no chain waits on the previous
    element's compare or add. The argmax is numpy's (first index of the largest value).
    """
    ys0 = ys1 = qs0 = qs1 = 0.0
    top0 = top1 = y[base]
    best0 = best1 = 0
    j = 0
    while j + 2 <= k:
        v = y[base + j]
        w = y[base + j + 1]
        ys0 += v
        ys1 += w
        qs0 += out[base + j]
        qs1 += out[base + j + 1]
        better = v > top0
        best0 = j if better else best0
        top0 = v if better else top0
        better = w > top1
        best1 = j + 1 if better else best1
        top1 = w if better else top1
        j += 2
    if j < k:
        v = y[base + j]
        ys0 += v
        qs0 += out[base + j]
        better = v > top0
        best0 = j if better else best0
        top0 = v if better else top0
    best = _first_max(top0, best0, top1, best1)[1]
    return ys0 + ys1, qs0 + qs1, best


@njit(inline="always")
def row_sum(a, base, k):
    """Sum of a[base:base+k] in float64, in four interleaved partial sums (fixed order)."""
    s0 = s1 = s2 = s3 = 0.0
    j = base
    end = base + k
    while j + 4 <= end:
        s0 += a[j]
        s1 += a[j + 1]
        s2 += a[j + 2]
        s3 += a[j + 3]
        j += 4
    while j < end:
        s0 += a[j]
        j += 1
    return (s0 + s1) + (s2 + s3)


@njit(inline="always")
def normalise_row(out, base, k, total, top):
    """Divide out[base:base+k] (non-negative, summing to `total`) by its sum.

    A row the perturbation wiped out entirely (total == 0) carries no information; it
    becomes the one-hot row of the input's top-1 class `top`, the label-only answer the
    paper treats as the floor of an accuracy-preserving defense. So no row is ever NaN.
    """
    if total >= 1e-300:
        scale = like(out[base], 1.0 / total)  # float32 rows scale in float32: vectorises
        for j in range(base, base + k):
            out[j] = out[j] * scale
    elif total > 0.0:  # 1 / total would overflow
        for j in range(base, base + k):
            out[j] = out[j] / total
    else:
        for j in range(k):
            out[base + j] = 1.0 if j == top else 0.0


@njit(inline="always")
def _sum_above(a, base, k, t):
    """(sum, count) of the values of a[base:base+k] above t, in float64.

    Four partial sums, so the adds do not wait on each other (wide rows, K = 1000).
    """
    s0 = s1 = s2 = s3 = 0.0
    c = 0
    j = base
    end = base + k
    while j + 4 <= end:
        v0 = np.float64(a[j])
        v1 = np.float64(a[j + 1])
        v2 = np.float64(a[j + 2])
        v3 = np.float64(a[j + 3])
        s0 += v0 if v0 > t else 0.0
        s1 += v1 if v1 > t else 0.0
        s2 += v2 if v2 > t else 0.0
        s3 += v3 if v3 > t else 0.0
        c += (v0 > t) + (v1 > t) + (v2 > t) + (v3 > t)
        j += 4
    while j < end:
        v0 = np.float64(a[j])
        s0 += v0 if v0 > t else 0.0
        c += v0 > t
        j += 1
    return (s0 + s1) + (s2 + s3), c


@njit(inline="always")
def guard_top1(out, base, k, top):
    """Make `top` the numpy.argmax of the normalised row out[base:base+k], by a real margin.

    A row whose argmax already is `top` is left bit-for-bit as it is. Otherwise the row
    gets the smallest adjustment in the Euclidean sense that keeps its sum and puts `top`
    GUARD_MARGIN above every other class: its projection onto
    {x : x[top] >= x[j] + GUARD_MARGIN for all j != top, sum(x) = sum(out)}. That sets
    `top` to a and every class of S = {j != top : out[j] > a - GUARD_MARGIN} to
    a - GUARD_MARGIN, where a = (out[top] + sum_S out[j] + GUARD_MARGIN |S|) / (|S| + 1).
    As in Michelot's simplex projection, S starts as every other class and shrinks to the
    classes above a - GUARD_MARGIN until stable (a only grows, so at most k rounds, nearly
    always two or three). A one-ulp tie-break would keep the label only at full
    precision; the margin keeps it through rounding to 2 decimals and a float32 cast.
    Classes the projection would take below 0 stay at 0 and the row is renormalised.
    """
    q_top = np.float64(out[base + top])
    is_argmax = True
    total = 0.0
    for j in range(k):
        v = out[base + j]
        is_argmax &= (v < out[base + top]) | ((j >= top) & (v <= out[base + top]))
        total += np.float64(v) if j != top else 0.0
    if is_argmax:
        return
    m = GUARD_MARGIN
    count = k - 1
    a = (q_top + total + m * count) / (count + 1)
    while True:  # shrink S = {j != top : out[j] > a - m} until it is stable
        s, c = _sum_above(out, base, k, a - m)
        if q_top > a - m:  # _sum_above counts every class; S never holds `top`
            s -= q_top
            c -= 1
        if c >= count:
            break
        count = c
        a = max(a, (q_top + s + m * c) / (c + 1))  # rounding must not let a shrink
    low = a - m
    clamped = 0.0
    for j in range(k):
        v = np.float64(out[base + j])
        if j == top:
            out[base + j] = a
        elif v > low:
            out[base + j] = max(low, 0.0)
            clamped += max(-low, 0.0)
    if clamped > 0.0:
        scale = 1.0 / (1.0 + clamped)
        for j in range(k):
            out[base + j] = np.float64(out[base + j]) * scale
