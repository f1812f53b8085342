"""Class mix: an output-only extraction signal, from the classes a model answers a principal.

A thief's queries are chosen to teach a copy, not drawn from the task's traffic: random
inputs pile into one or two classes, a surrogate set from another source lands on the
model's classes in its own proportions, and Jacobian augmentation crowds the decision
boundaries it walks. Honest traffic answers in the mix of classes the deployment sees. So,
per principal, over its last `window` answers with class counts c_j (n in all):

    G = 2 * sum_j c_j * ln(c_j / (n * p_j))        (the G-test of fit; 0 when c = n p)

where p is the reference class mix (the owner's traffic or validation data; uniform when
not given). Once n >= `min_queries`, G > `threshold` is an alarm. Under honest traffic G
is about chi-square with K - 1 degrees of freedom, so the threshold is set from the
owner's own clients (the evaluation takes the largest G they reach,
`stealguard-attack detect`).

It needs only the argmax of the model's raw answer, which every front end's protect core
sees, so it runs in the sidecar, the proxy, ext_proc and the model server alike (PRADA
needs the inputs, which only the model server has). A principal costs its window of
class indices (2 bytes each) and K counts; at most `max_principals` are kept, the least
recently seen dropped first (`worst_case_bytes`).

What it cannot see: a thief whose queries are natural samples of the task in the task's
proportions (the Sample and ArgmaxSample attacks) answers like honest traffic, and an
honest caller whose traffic is skewed to a few classes (a shop that only sends 3s) looks
like a thief. Its alarms feed the same escalation ladder as PRADA's.

Not thread-safe: one front end's event loop calls it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from stealguard.server.detection.prada import InvalidQueries, Reading

#: Answers a principal needs before it is scored.
MIN_QUERIES = 50
#: Answers the score looks back over.
WINDOW = 1000
_PRINCIPAL_OVERHEAD = 200  # bytes: the dict entry, the state object, two array headers


class _Mix:
    """One principal's last `window` classes (a ring) and their counts."""

    __slots__ = ("ring", "counts", "queries", "alarmed_at", "score")

    def __init__(self, window: int, classes: int):
        self.ring = np.empty(window, np.uint16)
        self.counts = np.zeros(classes, np.int64)
        self.queries = 0
        self.alarmed_at: int | None = None
        self.score = math.nan

    def nbytes(self) -> int:
        return self.ring.nbytes + self.counts.nbytes


class ClassMix:
    """The class-mix G-test per principal (see the module docstring).

    `classes`: K, the model's class count; `threshold`: G above it is an alarm (> 0);
    `prior`: the reference mix, K non-negative numbers (normalised here; default uniform);
    `min_queries`, `window`, `max_principals`: as the module docstring says. Raises
    ValueError naming a bad parameter.
    """

    def __init__(self, classes: int, threshold: float, *, prior: Sequence[float] | None = None,
                 min_queries: int = MIN_QUERIES, window: int = WINDOW,
                 max_principals: int = 10_000):
        for name, value, least in (("classes", classes, 2), ("min_queries", min_queries, 1),
                                   ("window", window, 1), ("max_principals", max_principals, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) \
                    or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if classes > np.iinfo(np.uint16).max + 1:
            raise ValueError(f"classes must be at most 65536, got {classes}")
        if min_queries > window:
            raise ValueError(f"min_queries ({min_queries}) must not exceed window ({window})")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0 < threshold < math.inf:
            raise ValueError(f"threshold must be a finite number > 0, got {threshold!r}")
        if prior is None:
            p = np.full(classes, 1.0 / classes)
        else:
            p = np.asarray(prior, np.float64)
            if p.shape != (classes,) or not np.isfinite(p).all() or (p < 0).any() \
                    or p.sum() <= 0:
                raise ValueError(f"prior must be {classes} non-negative numbers, not all 0, "
                                 f"got {list(np.ravel(prior))[:12]}")
            p = p / p.sum()
        self.classes = int(classes)
        self.threshold = float(threshold)
        self.min_queries = int(min_queries)
        self.window = int(window)
        self.max_principals = int(max_principals)
        # a class the reference never answers gets a floor: one answer in it is evidence,
        # not an infinite G
        self._log_prior = np.log(np.maximum(p, 0.5 / self.window))
        self._principals: OrderedDict[str, _Mix] = OrderedDict()

    @property
    def worst_case_bytes(self) -> int:
        """The most the kept principals can take."""
        per = 2 * self.window + 8 * self.classes + _PRINCIPAL_OVERHEAD
        return self.max_principals * per

    def __len__(self) -> int:
        """How many principals are kept."""
        return len(self._principals)

    def nbytes(self) -> int:
        """What the kept principals' windows and counts take now (arrays only)."""
        return sum(m.nbytes() for m in self._principals.values())

    def score(self, principal: str) -> float:
        """`principal`'s latest G (nan: not kept, or fewer than `min_queries` answers)."""
        state = self._principals.get(principal)
        return math.nan if state is None else state.score

    def observe(self, principal: str, classes: np.ndarray) -> Reading:
        """Take the classes the model answered `principal`, in order (one non-negative
        integer < K per row); G after each one (nan before `min_queries`). Raises
        `InvalidQueries` (a ValueError and an `InvalidInput`) naming the principal and why."""
        labels = self._check(principal, classes)
        state = self._principals.get(principal)
        if state is None:
            state = self._principals[principal] = _Mix(self.window, self.classes)
            while len(self._principals) > self.max_principals:
                self._principals.popitem(last=False)
        self._principals.move_to_end(principal)
        scores = np.full(len(labels), math.nan)
        alarm = False
        ring, counts, window = state.ring, state.counts, self.window
        for i, label in enumerate(labels.tolist()):
            slot = state.queries % window
            if state.queries >= window:
                counts[ring[slot]] -= 1
            ring[slot] = label
            counts[label] += 1
            state.queries += 1
            n = min(state.queries, window)
            if n >= self.min_queries:
                state.score = scores[i] = self.g_of(counts, n)
                if state.score > self.threshold:
                    alarm = True
                    if state.alarmed_at is None:
                        state.alarmed_at = state.queries
        return Reading(scores, alarm, state.alarmed_at, state.queries)

    def g_of(self, counts: np.ndarray, n: int) -> float:
        """G of `n` answers with `counts` per class against the reference mix."""
        seen = counts > 0
        c = counts[seen]
        return float(2.0 * (c * (np.log(c / n) - self._log_prior[seen])).sum())

    def _check(self, principal: str, classes) -> np.ndarray:
        if not isinstance(principal, str):
            raise InvalidQueries(f"principal must be a string, got {type(principal).__name__}")
        labels = np.asarray(classes)
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or (
                len(labels) and (labels.min() < 0 or labels.max() >= self.classes)):
            raise InvalidQueries(
                f"principal {principal!r}: classes must be one integer in [0, "
                f"{self.classes}) per row, got shape {list(labels.shape)} of {labels.dtype}"
                + (f" from {labels.min()} to {labels.max()}"
                   if labels.size and labels.dtype.kind in "iuf" else ""))
        return labels
