"""Properties every defense keeps on any valid input (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from stealguard.server.defenses import DEFENSE_NAMES, make_defense

CLASS_COUNTS = [1, 2, 3, 4, 10, 17, 100, 1000]


@st.composite
def probability_batches(draw) -> np.ndarray:
    """Valid (rows, classes) batches: peaked, flat, tied, near-0.5 pairs, sparse, one-hot."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    k = draw(st.sampled_from(CLASS_COUNTS))
    n = draw(st.integers(0, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if k == 1:
        column = rng.choice([0.0, 0.5, 1.0, 1e-9, 0.3, 0.7], (n, 1))
        return np.where(rng.random((n, 1)) < 0.5, rng.random((n, 1)), column).astype(dtype)
    kind = draw(st.sampled_from(["peaked", "tied", "near_half", "sparse", "one_hot"]))
    if kind == "peaked":
        logits = rng.normal(0.0, draw(st.sampled_from([0.1, 1.0, 3.0, 8.0, 30.0])), (n, k))
        rows = np.exp(logits - logits.max(axis=1, keepdims=True))
    elif kind == "tied":  # few distinct values, so the top value is often shared
        rows = rng.integers(1, 4, (n, k)).astype(np.float64)
    elif kind == "near_half":
        eps = draw(st.sampled_from([0.0, 1e-8, 1e-7, 1e-4, 1e-2]))
        rows = np.zeros((n, k))
        rows[:, 0], rows[:, 1] = 0.5 - eps, 0.5 + eps
        rows = rng.permuted(rows, axis=1)
    elif kind == "sparse":
        rows = rng.random((n, k)) * (rng.random((n, k)) < 0.2)
        rows[:, 0] += 1e-3
    else:
        rows = np.eye(k)[rng.integers(0, k, n)]
    rows = rows / rows.sum(axis=1, keepdims=True)
    return rows.astype(dtype)


def top1(probs: np.ndarray) -> np.ndarray:
    """numpy.argmax per row; a single column p stands for the two classes (1 - p, p)."""
    if probs.shape[1] == 1:
        p = probs[:, 0].astype(np.float64)
        return (p > 1.0 - p).astype(np.int64)
    return probs.argmax(axis=1)


def _check_common(defense, probs, out):
    assert out.shape == probs.shape and out.dtype == probs.dtype
    assert np.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
    if probs.shape[1] > 1 and probs.shape[0] > 0:
        np.testing.assert_allclose(out.sum(axis=1, dtype=np.float64), 1.0, rtol=0, atol=1e-6)
    if defense.preserves_top1:
        clear = np.abs(out.astype(np.float64) - 0.5).min(axis=1) > 1e-6 if out.shape[1] == 1 \
            else np.ones(len(out), bool)  # a column within an ulp of 0.5 is a tie either way
        np.testing.assert_array_equal(top1(out)[clear], top1(probs)[clear])


@settings(max_examples=40, deadline=None)
@given(probs=probability_batches(), name=st.sampled_from(DEFENSE_NAMES))
def test_every_defense_returns_valid_rows_of_the_same_shape_and_dtype(probs, name):
    defense = make_defense(name, secret=b"property-test")
    before = probs.copy()
    _check_common(defense, probs, defense(probs))
    np.testing.assert_array_equal(probs, before)


@settings(max_examples=150, deadline=None)
@given(probs=probability_batches(),
       beta=st.sampled_from([0.1, 0.7, 1.0, 1.5, 2.0, 5.0]),
       gamma=st.sampled_from([0.05, 0.1, 0.3, 0.5, 1.0, 4.0]))
def test_guarded_reverse_sigmoid_keeps_top1_and_leaves_unflipped_rows_untouched(probs, beta,
                                                                               gamma):
    guarded = make_defense("reverse_sigmoid", beta=beta, gamma=gamma)
    plain = make_defense("reverse_sigmoid", beta=beta, gamma=gamma, preserve_top1=False)
    out, unguarded = guarded(probs), plain(probs)
    _check_common(guarded, probs, out)
    _check_common(plain, probs, unguarded)
    # a row the cast to the input's dtype left tied (within an ulp) may have flipped in the
    # kernel's float64 arithmetic, where the guard acts: only clear rows must be untouched
    wide = unguarded.astype(np.float64)
    if wide.shape[1] == 1:
        gap = np.abs(2 * wide[:, 0] - 1)
    else:
        ordered = np.sort(wide, axis=1)
        gap = ordered[:, -1] - ordered[:, -2]
    kept = (top1(unguarded) == top1(probs)) & (gap > 1e-6)
    np.testing.assert_array_equal(out[kept], unguarded[kept])


@settings(max_examples=60, deadline=None)
@given(probs=probability_batches(), beta=st.sampled_from([0.05, 0.5, 1.0, 3.0]))
def test_ranking_preserving_noise_keeps_the_whole_ranking(probs, beta):
    defense = make_defense("ranking_preserving_uniform_random", beta=beta, secret=b"s")
    out = defense(probs)
    _check_common(defense, probs, out)
    if probs.shape[1] > 1:
        for row, answer in zip(probs, out, strict=True):
            order = np.argsort(-row, kind="stable")
            assert (np.diff(answer[order]) <= 0).all()
