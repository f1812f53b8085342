"""Independent float64 NumPy evaluations of DESIGN.md's defense formulas, for the tests."""

from __future__ import annotations

import math

import numpy as np

LOGIT_LIMIT = math.log((1.0 - 1e-9) / 1e-9)


def reverse_sigmoid_reference(probs: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """DESIGN.md's Reverse Sigmoid in float64, written from the formulas (no guard)."""
    y = np.asarray(probs, np.float64)
    if y.ndim == 2 and y.shape[1] == 1:  # a binary column is the rows (1 - p, p)
        pairs = np.concatenate([1.0 - y, y], axis=1)
        return reverse_sigmoid_reference(pairs, beta, gamma)[:, 1:]
    with np.errstate(divide="ignore"):
        logit = np.log(y) - np.log1p(-y)
    z = np.clip(logit, -LOGIT_LIMIT, LOGIT_LIMIT)
    r = beta * (1.0 / (1.0 + np.exp(-gamma * z)) - 0.5)
    q = np.maximum(y - r, 0.0)
    return q / q.sum(axis=-1, keepdims=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def digits_softmax_rows() -> np.ndarray:
    """float64 softmax rows of a logistic regression trained on scikit-learn's digits."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    model = LogisticRegression(max_iter=300).fit(x[:1200], y[:1200])
    return model.predict_proba(x[1200:])


# The secret the `sidecar` fixture runs with (STEALGUARD_SECRET), so that tests can compute
# the default policy's keyed answers in process.
TEST_SECRET = "stealguard-tests"


def default_defense():
    """The sidecar's default policy, keyed as the `sidecar` fixture is."""
    from stealguard.server.config import DEFAULT_POLICY
    from stealguard.server.defenses import make_defense

    params = {k: v for k, v in DEFAULT_POLICY.items() if k != "defense"}
    return make_defense(DEFAULT_POLICY["defense"], secret=TEST_SECRET.encode(), **params)


def assert_protected_like(got: np.ndarray, expected: np.ndarray, raw: np.ndarray) -> None:
    """`got` carries what the default policy discloses of `raw` as `expected` does.

    The default's keyed rest depends on the exact bytes the defense saw: a raw row computed
    elsewhere (another process, another batch) may differ in its last bit and get another
    rest. The label, the served top probability and the row sum must agree; and `got` must
    really be protected, not the raw vector.
    """
    got, expected, raw = (np.atleast_2d(np.asarray(a, np.float64)) for a in (got, expected, raw))
    np.testing.assert_array_equal(got.argmax(-1), raw.argmax(-1))
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
    np.testing.assert_allclose(got.max(-1), expected.max(-1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)
    assert not np.allclose(got, raw, rtol=1e-3, atol=1e-12)  # really perturbed
