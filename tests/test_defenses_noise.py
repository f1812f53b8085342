"""Keyed random defenses: the same query always gets the same answer."""

from __future__ import annotations

import numpy as np
import pytest
from _defenses_helpers import digits_softmax_rows
from stealguard.server.defenses import make_defense

KEYED = ["uniform_random", "uniform_random_concave", "uniform_random_convex",
         "ranking_preserving_uniform_random", "gaussian_noise"]


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return digits_softmax_rows()[:50].astype(np.float32)


@pytest.mark.parametrize("name", KEYED)
def test_same_row_gets_the_same_answer_wherever_it_appears(name, rows):
    defense = make_defense(name, secret=b"server-secret")
    first = defense(rows)
    np.testing.assert_array_equal(defense(rows), first)
    np.testing.assert_array_equal(defense(rows[7]), first[7])
    np.testing.assert_array_equal(defense(rows[::-1])[::-1], first)
    rebuilt = make_defense(name, secret=b"server-secret")
    np.testing.assert_array_equal(rebuilt(rows), first)


@pytest.mark.parametrize("name", KEYED)
def test_a_different_secret_gives_a_different_answer(name, rows):
    a = make_defense(name, secret=b"server-secret")(rows)
    b = make_defense(name, secret=b"another-secret")(rows)
    assert (a != b).any(axis=1).all()
    assert np.abs(a - b).max() > 1e-2


@pytest.mark.parametrize("name", KEYED)
def test_different_rows_get_different_noise(name):
    # two uniform rows of different length share no structure once perturbed
    defense = make_defense(name, secret=b"s")
    out = defense(np.full((1, 10), 0.1))[0]
    assert len(np.unique(out)) > 5
    shifted = defense(np.full((1, 10), 0.1) + np.array([1e-6] + [-1e-6 / 9] * 9))[0]
    assert np.abs(out - shifted).max() > 1e-3


@pytest.mark.parametrize("name", KEYED)
def test_averaging_repeated_answers_gets_no_closer_to_the_truth(name, rows):
    defense = make_defense(name, secret=b"server-secret")
    truth = rows[3].astype(np.float64)
    answers = np.stack([defense(rows[3]) for _ in range(1000)]).astype(np.float64)
    single = np.abs(answers[0] - truth).sum()
    mean = np.abs(answers.mean(axis=0) - truth).sum()
    assert single > 0.0
    assert mean >= single - 1e-12


def test_noise_depends_on_the_parameters_and_the_dtype(rows):
    a = make_defense("uniform_random", beta=0.5, secret=b"s")(rows)
    b = make_defense("uniform_random", beta=0.5000001, secret=b"s")(rows)
    assert np.abs(a - b).max() > 1e-3
    c = make_defense("uniform_random", beta=0.5, secret=b"s")(rows.astype(np.float64))
    assert np.abs(a - c).max() > 1e-3


def test_a_string_secret_is_its_utf8_bytes(rows):
    a = make_defense("gaussian_noise", secret="clé")(rows)
    np.testing.assert_array_equal(a, make_defense("gaussian_noise", secret="clé".encode())(rows))
