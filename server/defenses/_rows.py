"""Row operations the defense kernels share: argmax, normalisation, the top-1 guard.

All work on a flat array and the offset `base` of a row of `k` values, so a kernel can walk
a C-contiguous (rows, classes) batch without 2-D indexing.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._fastmath import next_below


@njit(inline="always")
def row_argmax(a, base, k):
    """numpy.argmax of a[base:base+k]: the first index of the largest value."""
    best = 0
    top = a[base]
    for j in range(1, k):
        v = a[base + j]
        if v > top:
            top = v
            best = j
    return best


@njit(inline="always")
def normalise_row(y, out, base, k, total):
    """Divide out[base:base+k] (non-negative, summing to `total`) by its sum.

    A row the perturbation wiped out entirely (total == 0) carries no information; it
    becomes the one-hot row of the input's top-1 class, the label-only answer that the
    paper treats as the floor of what an accuracy-preserving defense returns. So no row is
    ever NaN.
    """
    if total > 0.0:
        for j in range(base, base + k):
            out[j] = out[j] / total
    else:
        top = row_argmax(y, base, k)
        for j in range(k):
            out[base + j] = 1.0 if j == top else 0.0


@njit
def restore_top1(out, base, k, top):
    """Make class `top` the numpy.argmax of the normalised row out[base:base+k] again.

    The adjustment is the smallest one in the Euclidean sense: the projection of the row
    onto the set of rows where `top` is a largest value. It replaces `top` and every class
    above it by their mean t (the classes above t after averaging; found by shrinking
    the set until it is stable), which keeps the row's sum and leaves every other class
    untouched. numpy.argmax takes the first of equal maxima, so classes before `top` that
    now equal t are then lowered by one unit in the last place, making `top` the strict
    maximum over them. Nothing else changes.
    """
    qtop = np.float64(out[base + top])
    t = qtop
    count = -1
    while True:  # the set {j : out[j] > t} only shrinks, so this ends within k rounds
        total = qtop
        c = 0
        for j in range(k):
            v = np.float64(out[base + j])
            if j != top and v > t:
                total += v
                c += 1
        if c == count:
            break
        count = c
        t = total / (c + 1)
    # t is the mean of top and the set S that is above it; assign it in the row's dtype
    out[base + top] = t  # the store rounds t to the row's dtype
    tv = out[base + top]
    for j in range(k):
        v = out[base + j]
        if j == top or v > tv:
            out[base + j] = tv
    below = next_below(tv)
    for j in range(top):
        if out[base + j] >= tv:
            out[base + j] = below
