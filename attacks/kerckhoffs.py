"""What an attacker who knows the defense's algorithm can undo (Kerckhoffs's principle).

The attacker knows every defense's formula and the parameters the API publishes
(`ListPolicies`); only the server secret is unknown. From served answers it can compute:

    contract_view(served)       what the utility contract discloses: each row's label and
                                served top probability, the other classes uniform
    label_view(served, c)       the label alone, as a row with confidence c, rest uniform
    invert(served, name, params)
                                the closed-form inverse of a known defense: Reverse Sigmoid
                                solved class by class on the branch of
                                q(y) = y - beta (sigmoid(gamma logit y) - 1/2) that starts
                                at y = 0, with the normaliser solved from sum(y) = 1; for
                                coarse_confidence the keyed rest is a pseudo-random function
                                of the input bytes, so the best inverse is the contract view
    estimate(served, name)      the parameters of a defense estimated from answers alone
                                (Reverse Sigmoid: the (beta, gamma) whose inverse is most
                                self-consistent)
"""

from __future__ import annotations

import numpy as np

LOGIT_LIMIT = 20.723265836946411  # ln((1 - 1e-9) / 1e-9), as the defense


def contract_view(served: np.ndarray) -> np.ndarray:
    """Label and served top probability of each row kept, the other classes uniform."""
    served = np.asarray(served, np.float64)
    n, k = served.shape
    top = served.argmax(1)
    t = np.clip(served[np.arange(n), top], 1.0 / k, 1.0)
    out = np.repeat(((1.0 - t) / (k - 1))[:, None], k, axis=1)
    out[np.arange(n), top] = t
    return out


def label_view(served: np.ndarray, confidence: float) -> np.ndarray:
    """Only the label of each row: `confidence` on it, the rest uniform."""
    served = np.asarray(served, np.float64)
    n, k = served.shape
    out = np.full((n, k), (1.0 - confidence) / (k - 1))
    out[np.arange(n), served.argmax(1)] = confidence
    return out


def _branch(beta: float, gamma: float, points: int = 8001) -> tuple[np.ndarray, np.ndarray]:
    """(q, y) along the branch of q(y) that starts at y = 0, q decreasing, for np.interp."""
    z = np.linspace(-LOGIT_LIMIT, LOGIT_LIMIT, points)
    y = 1.0 / (1.0 + np.exp(-z))
    q = np.maximum(y - beta * (1.0 / (1.0 + np.exp(-gamma * z)) - 0.5), 0.0)
    rising = np.nonzero(np.diff(q) > 0)[0]
    end = rising[0] + 1 if len(rising) else points
    y = np.concatenate([[0.0], y[:end]])
    q = np.concatenate([[beta * 0.5], q[:end]])
    return q[::-1], y[::-1]  # increasing q for np.interp


def _rs_inverse_rows(served, beta, gamma, scales):
    """For each row and candidate normaliser S: the inverted row and its inconsistency."""
    n, k = served.shape
    q_branch, y_branch = _branch(beta, gamma)
    top = served.argmax(1)
    mask = np.ones_like(served, bool)
    mask[np.arange(n), top] = False
    targets = served[:, None, :] * scales[None, :, None]  # (n, S, k) = q values
    y = np.interp(targets, q_branch, y_branch)  # lower branch, clamped at its ends
    y = np.where(mask[:, None, :], y, 0.0)
    y_top = 1.0 - y.sum(2)  # (n, S)
    z_top = np.log(np.clip(y_top, 1e-9, 1 - 1e-9) / (1 - np.clip(y_top, 1e-9, 1 - 1e-9)))
    q_top = np.maximum(y_top - beta * (1 / (1 + np.exp(-gamma * z_top)) - 0.5), 0.0)
    served_top = served[np.arange(n), top][:, None]
    bad = (y_top < y.max(2)) | (y_top > 1.0)
    error = np.abs(q_top - served_top * scales[None, :]) + bad * 10.0
    return y, y_top, error


def invert_reverse_sigmoid(served: np.ndarray, beta: float, gamma: float,
                           return_error: bool = False):
    """Closed-form inverse of Reverse Sigmoid answers: one row of probabilities each."""
    served = np.asarray(served, np.float64)
    n, k = served.shape
    scales = np.geomspace(1e-3, 20.0, 300)
    out = np.empty_like(served)
    errors = np.empty(n)
    for start in range(0, n, 256):  # bounded memory: (256, 300, k) at a time
        chunk = served[start:start + 256]
        y, y_top, error = _rs_inverse_rows(chunk, beta, gamma, scales)
        best = error.argmin(1)
        rows = np.arange(len(chunk))
        inv = y[rows, best]
        inv[rows, chunk.argmax(1)] = np.clip(y_top[rows, best], 0.0, 1.0)
        inv = np.maximum(inv, 1e-12)
        out[start:start + 256] = inv / inv.sum(1, keepdims=True)
        errors[start:start + 256] = error[rows, best]
    return (out, float(np.median(errors))) if return_error else out


def estimate(served: np.ndarray, name: str) -> dict:
    """The parameters of defense `name` that best explain the answers, from answers alone."""
    if name != "reverse_sigmoid":
        return {}
    sample = np.asarray(served, np.float64)[:200]
    best = None
    for beta in (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0):
        for gamma in (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0):
            _, error = invert_reverse_sigmoid(sample, beta, gamma, return_error=True)
            if best is None or error < best[0]:
                best = (error, beta, gamma)
    return {"beta": best[1], "gamma": best[2]}


def constructor_params(name: str, published: dict) -> dict:
    """The keyword arguments of defense `name` from its published (ListPolicies) numbers:
    coarse_confidence publishes edge_1.., value_1..; booleans come back from 0.0/1.0."""
    if name == "coarse_confidence":
        def listed(prefix):
            keys = sorted((k for k in published if k.startswith(prefix)),
                          key=lambda k: int(k.split("_")[1]))
            return [published[k] for k in keys]
        return {"edges": listed("edge_"), "values": listed("value_"),
                "margin": published.get("margin", 0.02)}
    if name == "reverse_sigmoid":
        return {"beta": published["beta"], "gamma": published["gamma"],
                "preserve_top1": bool(published.get("preserve_top1", 1.0))}
    return dict(published)


def invert(served: np.ndarray, name: str, params: dict) -> np.ndarray:
    """The best closed-form reconstruction of the clean answers, knowing the algorithm."""
    if name == "reverse_sigmoid":
        return invert_reverse_sigmoid(served, params["beta"], params["gamma"])
    if name == "coarse_confidence":
        return contract_view(served)
    return np.asarray(served, np.float64)
