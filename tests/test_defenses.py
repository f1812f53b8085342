"""Reverse Sigmoid against DESIGN.md, the top-1 guard, the registry and input handling."""

from __future__ import annotations

import numpy as np
import pytest
from _defenses_helpers import digits_softmax_rows, reverse_sigmoid_reference, softmax
from stealguard.server.defenses import DEFENSE_NAMES, make_defense, validate, warm_up

SETTINGS = [(1.0, 0.1), (1.5, 0.3), (1.0, 0.5), (2.0, 0.2), (0.7, 0.4), (3.0, 1.0)]


@pytest.fixture(scope="module")
def digits_rows() -> np.ndarray:
    return digits_softmax_rows()


def _unguarded(beta, gamma):
    return make_defense("reverse_sigmoid", beta=beta, gamma=gamma, preserve_top1=False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("beta,gamma", SETTINGS)
def test_reverse_sigmoid_matches_float64_formula_on_real_model_rows(digits_rows, dtype, beta,
                                                                    gamma):
    probs = digits_rows.astype(dtype)
    out = _unguarded(beta, gamma)(probs)
    assert out.dtype == dtype and out.shape == probs.shape
    np.testing.assert_allclose(out, reverse_sigmoid_reference(probs, beta, gamma), rtol=0,
                               atol=1e-6)


def _edge_rows():
    rng = np.random.default_rng(7)
    wide = softmax(rng.normal(0, 3, (50, 1000)))
    return {
        "one_hot": np.eye(10),
        "uniform": np.full((3, 10), 0.1),
        "zeros_and_ones": np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]),
        "two_classes": np.array([[0.5, 0.5], [1e-12, 1 - 1e-12], [0.3, 0.7]]),
        "binary_column": np.array([[0.0], [1.0], [0.5], [0.5301345], [1e-7]]),
        "thousand_classes": wide,
        "empty": np.zeros((0, 10)),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", sorted(_edge_rows()))
def test_reverse_sigmoid_matches_float64_formula_on_edge_rows(case, dtype):
    probs = _edge_rows()[case].astype(dtype)
    for beta, gamma in SETTINGS:
        out = _unguarded(beta, gamma)(probs)
        assert out.shape == probs.shape and out.dtype == dtype
        np.testing.assert_allclose(out, reverse_sigmoid_reference(probs, beta, gamma), rtol=0,
                                   atol=1e-6, err_msg=f"beta={beta} gamma={gamma}")


GOLDEN_IN = [0.12109935, 0.0498215, 0.0993958, 0.06410096, 0.11366928, 0.04645343, 0.06419807,
             0.30685693, 0.07616714, 0.05823757]
GOLDEN_OUT = [0.10733664, 0.07743666, 0.09712707, 0.08230411, 0.10377649, 0.0764482,
              0.08234023, 0.20600921, 0.08703023, 0.08019119]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reverse_sigmoid_reproduces_published_golden_values(dtype):
    defense = make_defense("reverse_sigmoid", beta=1.0, gamma=0.1)
    out = defense(np.array(GOLDEN_IN, dtype))
    assert np.abs(out - np.array(GOLDEN_OUT)).max() < 5e-5
    column = defense(np.array([[0.5301345]], dtype))
    assert column.shape == (1, 1)
    assert abs(column[0, 0] - 0.52711743) < 5e-5


def test_guard_restores_top1_only_on_rows_the_formula_would_flip(digits_rows):
    probs = digits_rows.astype(np.float32)
    plain = _unguarded(1.5, 0.3)(probs)
    guarded = make_defense("reverse_sigmoid", beta=1.5, gamma=0.3)(probs)
    flipped = plain.argmax(axis=1) != probs.argmax(axis=1)
    assert flipped.mean() > 0.5  # confident rows: tiny classes overtake the top one
    assert (guarded.argmax(axis=1) == probs.argmax(axis=1)).all()
    np.testing.assert_array_equal(guarded[~flipped], plain[~flipped])
    np.testing.assert_allclose(guarded.sum(axis=1), 1.0, atol=1e-6)


def _margin_projection(row, top, margin):
    """The guard's projection, found by trying every active set (an independent check)."""
    others = [j for j in np.argsort(-row, kind="stable") if j != top]
    for c in range(1, len(others) + 1):
        active = others[:c]
        a = (row[top] + row[active].sum() + margin * c) / (c + 1)
        rest = others[c:]
        if row[active[-1]] > a - margin and all(row[j] <= a - margin for j in rest):
            out = row.copy()
            out[active] = a - margin
            out[top] = a
            return out
    raise AssertionError("no active set satisfies the optimality conditions")


def test_guard_is_the_least_squares_projection_with_a_real_margin(digits_rows):
    from stealguard.server.defenses._rows import GUARD_MARGIN

    probs = digits_rows[:200].astype(np.float64)
    plain = _unguarded(1.5, 0.3)(probs)
    guarded = make_defense("reverse_sigmoid", beta=1.5, gamma=0.3)(probs)
    flipped = np.nonzero(plain.argmax(axis=1) != probs.argmax(axis=1))[0]
    assert len(flipped) > 100
    for i in flipped:
        expected = _margin_projection(plain[i], probs[i].argmax(), GUARD_MARGIN)
        np.testing.assert_allclose(guarded[i], expected, rtol=0, atol=1e-12)


def test_guarded_rows_keep_their_label_through_rounding_and_float32(digits_rows):
    flipped = _unguarded(1.5, 0.3)(digits_rows).argmax(axis=1) != digits_rows.argmax(axis=1)
    guarded = make_defense("reverse_sigmoid", beta=1.5, gamma=0.3)(digits_rows)[flipped]
    labels = digits_rows.argmax(axis=1)[flipped]
    ordered = np.sort(guarded, axis=1)
    assert (ordered[:, -1] - ordered[:, -2]).min() >= 0.02 - 1e-6
    assert (np.round(guarded, 2).argmax(axis=1) == labels).all()
    assert (guarded.astype(np.float32).argmax(axis=1) == labels).all()


def test_guard_lifts_a_top_class_after_an_equal_one_by_the_margin():
    # class 1 is the top-1; the plain formula maps both small classes to the same value
    row = np.array([[1e-6, 0.999998, 1e-6]], np.float32)
    plain = _unguarded(1.5, 0.3)(row)[0]
    guarded = make_defense("reverse_sigmoid", beta=1.5, gamma=0.3)(row)[0]
    assert plain[0] == plain[2] > plain[1]
    assert guarded.argmax() == 1
    assert guarded[1] - max(guarded[0], guarded[2]) >= np.float32(0.02) - 1e-6
    assert guarded[0] == guarded[2]


def test_reverse_sigmoid_defaults_are_the_design_default_policy():
    defense = make_defense("reverse_sigmoid")
    assert defense.name == "reverse_sigmoid"
    assert defense.params == {"beta": 1.5, "gamma": 0.3, "preserve_top1": 1.0}


def test_every_registered_defense_has_name_and_numeric_params():
    assert DEFENSE_NAMES[:3] == ("coarse_confidence", "reverse_sigmoid", "none")
    assert len(DEFENSE_NAMES) == 13
    for name in DEFENSE_NAMES:
        defense = make_defense(name, secret=b"k")
        assert defense.name == name
        assert all(isinstance(v, float) for v in defense.params.values())


def test_input_is_never_written_and_read_only_input_works():
    rows = softmax(np.random.default_rng(1).normal(0, 2, (4, 10))).astype(np.float32)
    frozen = np.frombuffer(rows.tobytes(), np.float32).reshape(4, 10)
    unaligned = np.frombuffer(b"\0" + rows.tobytes(), np.float32, offset=1).reshape(4, 10)
    assert not frozen.flags.writeable and not unaligned.flags.aligned
    for name in DEFENSE_NAMES:
        defense = make_defense(name, secret=b"k")
        expected = defense(rows.copy())
        np.testing.assert_array_equal(defense(frozen), expected)
        np.testing.assert_array_equal(defense(unaligned), expected)
    np.testing.assert_array_equal(frozen, rows)


def test_perturb_flat_equals_call_bit_for_bit_and_raises_the_same_errors():
    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        rows = softmax(rng.normal(0, 2, (7, 10))).astype(dtype)
        view = np.frombuffer(rows.tobytes(), dtype)  # what the codec hands the sidecar
        for name in DEFENSE_NAMES:
            defense = make_defense(name, secret=b"k")
            flat = defense.perturb_flat(view, 7, 10)
            assert flat.shape == (70,) and flat.dtype == dtype
            assert flat.tobytes() == defense(rows).tobytes(), name
    defense = make_defense("reverse_sigmoid")
    logits = rng.normal(0, 3, (3, 4))
    assert (defense.perturb_flat(logits.reshape(-1), 3, 4, logits=True).tobytes()
            == defense(logits, logits=True).tobytes())
    column = np.array([0.2, 0.9])
    assert defense.perturb_flat(column, 2, 1).tobytes() == defense(column[:, None]).tobytes()
    bad = np.frombuffer(np.array([[0.5, 0.5], [0.9, 0.3]]).tobytes(), np.float64)
    with pytest.raises(ValueError, match="row 1: sums to 1.2000"):
        defense.perturb_flat(bad, 2, 2)
    assert defense.perturb_flat(np.empty(0, np.float32), 0, 10).shape == (0,)


def test_one_row_in_gives_one_row_out_and_strided_input_is_accepted():
    defense = make_defense("reverse_sigmoid")
    rows = softmax(np.random.default_rng(2).normal(0, 2, (6, 10)))
    assert defense(rows[0]).shape == (10,)
    np.testing.assert_array_equal(defense(rows[::2]), defense(rows[::2].copy()))
    assert defense(rows.T.copy().T).shape == (6, 10)


def test_logits_are_softmaxed_first():
    logits = np.random.default_rng(3).normal(0, 3, (5, 10))
    defense = make_defense("reverse_sigmoid")
    np.testing.assert_allclose(defense(logits, logits=True), defense(softmax(logits)),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(validate(logits, logits=True), softmax(logits), rtol=0,
                               atol=1e-15)
    column = np.array([[-2.0], [0.0], [800.0]])
    np.testing.assert_allclose(validate(column, logits=True)[:, 0],
                               [1 / (1 + np.exp(2.0)), 0.5, 1.0])


def test_large_batches_use_the_parallel_kernel_with_the_same_result():
    rows = softmax(np.random.default_rng(4).normal(0, 3, (20_000, 10))).astype(np.float32)
    defense = make_defense("reverse_sigmoid")
    parallel = defense(rows)
    serial = np.concatenate([defense(rows[i:i + 1000]) for i in range(0, 20_000, 1000)])
    np.testing.assert_array_equal(parallel, serial)


def test_warm_up_returns_seconds():
    assert warm_up() >= 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_big_outputs_sit_half_a_page_from_their_input_and_answer_the_same(dtype):
    from stealguard.server.defenses._base import PAGE, empty_apart

    rows = np.tile(softmax(np.random.default_rng(1).normal(0, 3, (40, 1000))), (4, 1))
    probs = rows.astype(dtype)
    buffer = np.empty(probs.size + PAGE, dtype)  # inputs at every offset an 8-byte step gives
    for offset in range(0, PAGE // probs.itemsize, 8 // probs.itemsize * 37):
        view = buffer[offset : offset + probs.size]
        view[:] = probs.ravel()
        view.flags.writeable = False
        out = empty_apart(view, view.size)
        assert out.shape == (view.size,) and out.dtype == dtype
        assert (out.ctypes.data - view.ctypes.data) % PAGE == PAGE // 2
        defense = make_defense("reverse_sigmoid", beta=1.5, gamma=0.3)
        np.testing.assert_array_equal(defense.perturb_flat(view, *probs.shape),
                                      defense(probs).ravel())
    small = np.zeros(10, dtype)
    assert empty_apart(small, 10).shape == (10,)
