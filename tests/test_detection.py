"""PRADA (stealguard.server.detection) on small real inputs, and `stealguard-attack detect`'s
one-line errors."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from _procs import script
from stealguard.modelserver.datasets import load_dataset
from stealguard.server.detection import FeatureSizeError, Prada
from stealguard.server.detection.prada import InvalidQueries
from stealguard.server.errors import InvalidInput, Kind

DELTA = 0.94  # what attacks/results/detection chose from its calibration clients


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", seed=0)


def jacobian_like(seeds: np.ndarray, labels: np.ndarray, rounds: int, rng) -> tuple:
    """Papernot-style augmentation without a substitute: each round every point so far
    gets a copy moved by 0.1 * sign(noise), clipped to [0, 1]; the set doubles."""
    x, y = seeds, labels
    for _ in range(rounds):
        moved = np.clip(x + 0.1 * np.sign(rng.normal(size=x.shape)), 0, 1)
        x, y = np.concatenate([x, moved.astype(np.float32)]), np.concatenate([y, y])
    return x, y


def test_near_duplicate_perturbed_queries_raise_the_alarm(mnist):
    rng = np.random.default_rng(0)
    pick = rng.choice(len(mnist.attacker_x), 40, replace=False)
    x, y = jacobian_like(mnist.attacker_x[pick], mnist.attacker_y[pick], rounds=4, rng=rng)
    reading = Prada(784, DELTA).observe("thief", x, y)
    assert reading.alarm and reading.alarmed_at is not None
    assert np.nanmin(reading.scores) < DELTA
    assert reading.queries == len(x) == 640


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_real_test_images_in_random_order_do_not_alarm(mnist, seed):
    order = np.random.default_rng(seed).permutation(len(mnist.test_x))
    reading = Prada(784, DELTA).observe("honest", mnist.test_x[order], mnist.test_y[order])
    assert not reading.alarm and reading.alarmed_at is None
    assert np.nanmin(reading.scores) > DELTA


def test_digits_test_images_in_random_order_do_not_alarm():
    digits = load_dataset("digits", seed=0)
    order = np.random.default_rng(0).permutation(len(digits.test_x))
    reading = Prada(64, 0.9).observe("honest", digits.test_x[order], digits.test_y[order])
    assert not reading.alarm and np.nanmin(reading.scores) > 0.9


def test_a_principal_is_scored_only_after_100_distances(mnist):
    x, y = mnist.test_x[:200], np.zeros(200, np.int64)  # one class: distances from row 2 on
    scores = Prada(784, DELTA).observe("p", x, y).scores
    assert np.isnan(scores[:100]).all() and not np.isnan(scores[100:]).any()


def test_memory_stays_bounded_with_10000_principals():
    rng = np.random.default_rng(0)
    detector = Prada(64, 0.9, max_vectors=16, max_distances=100, max_principals=100)
    for i in range(10_000):
        detector.observe(f"client-{i}", rng.random((20, 64)), rng.integers(0, 10, 20))
    assert len(detector) == 100
    assert detector.stored("client-0") == 0 and detector.stored("client-9999") > 0
    busy = "client-9999"
    for _ in range(30):  # 600 rows more: the sets and the distances stop at their caps
        detector.observe(busy, rng.random((20, 64)), rng.integers(0, 10, 20))
    assert detector.stored(busy) <= 16
    assert all(detector.stored(f"client-{i}") <= 16 for i in range(9_900, 10_000))
    assert detector.nbytes() <= detector.worst_case_bytes == 100 * (4 * 64 * 16 + 8 * 100)


def test_a_wrong_feature_length_names_the_principal_and_the_expected_size(mnist):
    detector = Prada(784, DELTA)
    with pytest.raises(FeatureSizeError, match=r"principal 'shop': query rows have 64 "
                       r"features \(shape \[2, 1, 8, 8\]\); this detector expects 784") as err:
        detector.observe("shop", np.zeros((2, 1, 8, 8)), np.zeros(2, np.int64))
    assert isinstance(err.value, ValueError) and isinstance(err.value, InvalidInput)
    assert err.value.kind is Kind.INVALID_INPUT
    assert len(detector) == 0  # a refused batch leaves no state


@pytest.mark.parametrize("queries, classes, message", [
    (np.zeros(784), [0], r"queries must be \(rows, \.\.\.\), got shape \[784\]"),
    (np.full((2, 784), np.nan), [0, 0], "row 0 has a value that is not finite"),
    (np.zeros((2, 784)), [0], r"classes must be 2 non-negative integers, one per row"),
    (np.zeros((2, 784)), [0.5, 1.0], "classes must be 2 non-negative integers"),
    (np.zeros((2, 784)), [0, -1], "classes must be 2 non-negative integers"),
    (np.array([["a"] * 784]), [0], "queries must be numbers"),
])
def test_bad_queries_are_refused_with_the_principal(queries, classes, message):
    with pytest.raises(InvalidQueries, match=message) as err:
        Prada(784, DELTA).observe("shop", queries, np.asarray(classes))
    assert "principal 'shop'" in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"delta": 0.0}, r"delta must be in \(0, 1\], got 0.0"),
    ({"delta": float("nan")}, "delta must be in"),
    ({"delta": 0.9, "features": 0}, "features must be an integer >= 1, got 0"),
    ({"delta": 0.9, "min_distances": 2}, "min_distances must be an integer >= 3"),
    ({"delta": 0.9, "max_distances": 50}, r"max_distances must be an integer >= min_dist"),
    ({"delta": 0.9, "max_principals": 0}, "max_principals must be an integer >= 1"),
])
def test_bad_parameters_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Prada(**{"features": 784, **kwargs})


def test_the_surrogate_set_is_digits_in_mnists_frame():
    from stealguard.attacks.detection import surrogate_digits

    x = surrogate_digits()
    assert x.shape == (1797, 1, 28, 28) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
    assert not x[:, :, :4].any() and not x[:, :, -4:].any()  # MNIST's 4-pixel margin


@pytest.mark.parametrize("args, message", [
    (["detect", "--out", "x", "--budget", "0"], "'0' is not a positive integer"),
    (["detect", "--out", "x", "--clients", "abc"], "'abc' is not a positive integer"),
    (["detect", "--out", "x", "--attacks", "jacobian,steal-all"],
     "unknown attack 'steal-all'"),
    (["detect", "--out", "x", "--victim", "no/such/folder"], "--victim: no victim.pt in"),
    (["detect"], "the following arguments are required: --out"),
    (["detect", "--out", "x", "--target", "127.0.0.1:1", "--wait", "-1"],
     "--wait: must be 0 or more seconds"),
    (["detect", "--out", "x", "--target", "127.0.0.1:1", "--timeout", "nan"],
     "--timeout: must be a positive number of seconds"),
    (["detect", "--out", "x", "--target", "127.0.0.1:1", "--batch-size", "0"],
     "'0' is not a positive integer"),
])
def test_detect_bad_flags_are_one_line_and_exit_2(args, message):
    result = subprocess.run([script("stealguard-attack"), *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_escalation_answers_labels_only_from_the_alarm_on():
    import torch
    from stealguard.attacks.detection import EscalatingOracle
    from stealguard.attacks.training import predict

    ds = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    # delta 1.0: the first scored query (after 3 distances, the 4th of its class) alarms
    detector = Prada(64, delta=1.0, min_distances=3, max_principals=1)
    oracle = EscalatingOracle(model, 40, detector, "thief")
    first = oracle.query(ds.test_x[:2])
    assert oracle.alarmed_at is None and not np.isin(first, (0.0, 1.0)).all()
    rest = np.concatenate([oracle.query(ds.test_x[i:i + 6]) for i in range(2, 38, 6)])
    assert oracle.alarmed_at is not None and 2 < oracle.alarmed_at <= 38
    answers = np.concatenate([first, rest])
    cut = oracle.alarmed_at - 1
    assert not np.isin(answers[:cut], (0.0, 1.0)).all(1).any()  # probabilities before
    assert np.isin(answers[cut:], (0.0, 1.0)).all() and (answers[cut:].sum(1) == 1).all()
    clean = predict(model, ds.test_x[:38])
    assert (answers.argmax(1) == clean.argmax(1)).all()  # the label is the model's
    queries, recorded = oracle.stream()
    assert len(queries) == 38 and np.array_equal(recorded, answers)


def test_delta_is_the_grid_value_below_every_calibration_w():
    from stealguard.attacks.detection import choose_delta, first_alarm

    calibration = [np.array([np.nan, 0.99, 0.9421]), np.array([np.nan, 0.97, 0.96])]
    delta = choose_delta(calibration)
    assert delta == 0.94  # exactly the grid's value, so the sweep does not list it twice
    assert all(first_alarm(w, delta) is None for w in calibration)
    assert first_alarm(np.array([np.nan, 0.95, 0.93, 0.90]), delta) == 3  # 1-based query
