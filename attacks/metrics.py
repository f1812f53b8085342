"""How well an attack worked, and how much a defense distorts the outputs.

agreement  top-1 agreement of two models on the same held-out inputs: the stolen model
           S vs. the base model M (treating M as the ground truth, Sec. IV), or the
           protected model P vs. M.
accuracy   top-1 accuracy on the true labels.
cosine, mae, kl   distance between protected and base outputs (Table II): mean cosine
           similarity of the rows, mean absolute error per dimension, and mean
           KL(base || protected) with probabilities clipped to [1e-7, 1] (Keras' epsilon;
           a defense may return exact zeros).
"""

from __future__ import annotations

import numpy as np
from stealguard.attacks.training import EPS


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of rows where the two probability arrays (N, K) have the same argmax."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"agreement needs two (N, K) arrays of one shape, got {a.shape} and {b.shape}"
        )
    return float(np.mean(a.argmax(1) == b.argmax(1)))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax is the true label."""
    return float(np.mean(np.asarray(probs).argmax(1) == np.asarray(labels)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of corresponding rows."""
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-300)))


def mae(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute error per dimension."""
    return float(np.mean(np.abs(a - b)))


def kl(base: np.ndarray, other: np.ndarray) -> float:
    """Mean KL(base || other) over rows, both clipped to [EPS, 1]."""
    p = np.clip(base, EPS, 1.0)
    q = np.clip(other, EPS, 1.0)
    return float(np.mean((p * np.log(p / q)).sum(1)))


def distortion(protected: np.ndarray, base: np.ndarray) -> dict[str, float]:
    """The defense's effect on outputs: cosine, mae, kl (Table II) and the protected
    model's top-1 agreement with the base model."""
    return {
        "cosine": cosine(protected, base),
        "mae": mae(protected, base),
        "kl": kl(base, protected),
        "protected_agreement": agreement(protected, base),
    }
