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
