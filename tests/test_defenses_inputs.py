"""Every validation error and parameter error, with the message a person acts on."""

from __future__ import annotations

import re

import numpy as np
import pytest
from stealguard.server.defenses import DEFENSE_NAMES, make_defense, validate

GOOD = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.6, 0.2, 0.2]])


def _with(row: int, col: int, value: float) -> np.ndarray:
    bad = GOOD.copy()
    bad[row, col] = value
    return bad


BAD_INPUTS = [
    (_with(2, 1, np.nan), "row 2: value nan at column 1 is not finite"),
    (_with(0, 2, np.inf), "row 0: value inf at column 2 is not finite"),
    (_with(3, 0, -np.inf), "row 3: value -inf at column 0 is not finite"),
    (_with(1, 0, -0.1), "row 1: value -0.1 at column 0 is outside [0, 1]"),
    (_with(0, 1, 1.5), "row 0: value 1.5 at column 1 is outside [0, 1]"),
    (_with(0, 0, 0.4), "row 0: sums to 1.2000, expected 1 within 0.001"),
    (_with(3, 2, 0.1), "row 3: sums to 0.9000, expected 1 within 0.001"),
    (np.array([[0.3], [1.2]]), "row 1: value 1.2 at column 0 is outside [0, 1]"),
    (np.array([1, 0, 0]), "probabilities must be float32 or float64, got int64"),
    (np.array([0.5, 0.5], np.float16), "probabilities must be float32 or float64, got float16"),
    (np.array(["a"]), "probabilities must be float32 or float64, got str32"),
    (np.zeros((2, 2, 2)), "probabilities must be 1-D (one row) or 2-D (rows, classes), "
                          "got 3-D with shape (2, 2, 2)"),
    (np.float64(1.0), "probabilities must be 1-D (one row) or 2-D (rows, classes), "
                      "got 0-D with shape ()"),
    (np.zeros((3, 0)), "probabilities have no classes (shape (3, 0))"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("probs,message", BAD_INPUTS)
def test_invalid_probabilities_are_rejected_with_row_and_reason(probs, message, dtype):
    if probs.dtype.kind == "f" and probs.dtype.itemsize >= 4:
        probs = probs.astype(dtype)
    for name in ("reverse_sigmoid", "none", "uniform_random", "top_k"):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            make_defense(name)(probs)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        validate(probs)


def test_a_bad_row_in_a_large_batch_is_found_by_the_parallel_kernel():
    rows = np.tile(GOOD, (30_000, 1))
    rows[77_777, 1] = np.nan
    for name in DEFENSE_NAMES:
        with pytest.raises(ValueError, match="^row 77777: value nan at column 1 is not finite$"):
            make_defense(name)(rows)


def test_logits_may_be_any_finite_numbers_but_not_inf_or_nan():
    logits = np.array([[100.0, -5.0, 3.0], [2.0, np.inf, 0.0]])
    with pytest.raises(ValueError, match=r"^row 1: value inf at column 1 is not finite$"):
        make_defense("reverse_sigmoid")(logits, logits=True)
    assert make_defense("reverse_sigmoid")(logits[:1], logits=True).shape == (1, 3)


def test_sums_within_tolerance_are_accepted_and_empty_batches_pass():
    almost = np.array([[0.2, 0.3, 0.5009]])
    assert make_defense("reverse_sigmoid")(almost).shape == (1, 3)
    assert make_defense("reverse_sigmoid")(np.zeros((0, 3), np.float32)).shape == (0, 3)
    assert validate(np.zeros((0, 0))).shape == (0, 0)


BAD_PARAMS = [
    ("reverse_sigmoid", {"beta": 0}, "beta must be a finite number > 0 (range (0, inf)), got 0"),
    ("reverse_sigmoid", {"beta": -1.5}, "beta must be a finite number > 0 (range (0, inf)), "
                                        "got -1.5"),
    ("reverse_sigmoid", {"gamma": float("nan")}, "gamma must be a finite number > 0 "
                                                 "(range (0, inf)), got nan"),
    ("reverse_sigmoid", {"gamma": "0.3"}, "gamma must be a finite number > 0 (range (0, inf)), "
                                          "got '0.3'"),
    ("reverse_sigmoid", {"preserve_top1": 2}, "preserve_top1 must be true or false (or 1/0), "
                                              "got 2"),
    ("reverse_sigmoid", {"alpha": 1}, "reverse_sigmoid: unknown parameter 'alpha'; accepted: "
                                      "beta, gamma, preserve_top1"),
    ("none", {"beta": 1}, "none: unknown parameter 'beta'; accepted: none"),
    ("uniform_random_concave", {"rho": 0.0}, "rho must be a finite number > 0 "
                                             "(range (0, inf)), got 0.0"),
    ("sine", {"f": -1}, "f must be a finite number > 0 (range (0, inf)), got -1"),
    ("gaussian_noise", {"scale": 0}, "scale must be a finite number > 0 (range (0, inf)), "
                                     "got 0"),
    ("high_confidence", {"cutoff": 1.5}, "cutoff must be a number in [0, 1], got 1.5"),
    ("top_k", {"k": 0}, "k must be an integer in [1, 2147483648], got 0"),
    ("top_k", {"k": 2.5}, "k must be an integer in [1, 2147483648], got 2.5"),
    ("rounded", {"decimals": 16}, "decimals must be an integer in [0, 15], got 16"),
    ("rounded", {"decimals": True}, "decimals must be an integer in [0, 15], got True"),
]


@pytest.mark.parametrize("name,params,message", BAD_PARAMS)
def test_bad_parameters_name_the_parameter_and_the_range(name, params, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make_defense(name, **params)


def test_unknown_defense_lists_the_known_ones():
    with pytest.raises(ValueError, match="^unknown defense 'reverse-sigmoid'; known defenses: "
                                         "coarse_confidence, reverse_sigmoid, none, "):
        make_defense("reverse-sigmoid")


def test_a_secret_of_the_wrong_type_is_rejected():
    with pytest.raises(ValueError, match="^secret must be bytes or str, got int$"):
        make_defense("uniform_random", secret=42)


def test_integral_floats_and_bool_like_numbers_are_accepted():
    assert make_defense("top_k", k=3.0).params == {"k": 3.0}
    assert make_defense("reverse_sigmoid", preserve_top1=0).params["preserve_top1"] == 0.0
