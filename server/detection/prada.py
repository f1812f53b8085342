"""PRADA (Juuti et al., "PRADA: Protecting against DNN Model Stealing Attacks", EuroS&P
2019): a thief's synthetic queries are spaced unlike natural data, and a normality test on
the spacing says so.

For each principal and each class the model predicted, a *growing set* of the principal's
past queries (feature vectors: raw pixels flattened, unless the deployment passes others).
Each new query x predicted as class c:

1. the first query of class c joins G_c, and no distance is recorded;
2. otherwise d = min over y in G_c of ||x - y||_2 is appended to the principal's
   distances D; if d > T_c, x joins G_c, d joins D_Gc (the distances at which members
   joined) and T_c = max(T_c, mean(D_Gc) - std(D_Gc)) (Algorithm 1 of the paper, as we
   read it: the threshold only rises);
3. once D holds at least `min_distances` (100) values, those more than 3 standard
   deviations from their mean are set aside and the Shapiro-Wilk W of the rest is the
   score (`scipy.stats.shapiro`); W < `delta` is an alarm. Natural queries give nearly
   normal distances (W near 1); near-duplicates of earlier queries (Jacobian augmentation)
   or queries from a narrow synthetic distribution do not.

**Bounded memory.** A principal keeps at most `max_vectors` vectors over all its classes
(after that its sets stop growing: new queries are still measured against them) and its
last `max_distances` distances; at most `max_principals` principals are kept, the one seen
least recently evicted first. `worst_case_bytes` is the bound those caps give.

The detector is not thread-safe: one front end's event loop calls it (an observer runs
inline in the protect core).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
from stealguard.server.errors import InvalidInput

#: Distances a principal needs before it is scored (the paper's 100).
MIN_DISTANCES = 100
#: Distances further than this many standard deviations from their mean are set aside.
OUTLIER_SIGMAS = 3.0
_FIRST_CAPACITY = 8  # rows a class's set starts with; it doubles as it fills
_DISTANCE_BYTES = 8


class InvalidQueries(InvalidInput, ValueError):
    """Queries the detector cannot take (the message names the principal and why)."""


class FeatureSizeError(InvalidQueries):
    """Query rows whose feature count is not the detector's."""


@dataclass(frozen=True, slots=True)
class Reading:
    """What the detector made of one batch of a principal's queries.

    `scores`: W after each row (nan while the principal has fewer than `min_distances`
    distances); `alarm`: some row of this batch scored below delta; `alarmed_at`: the
    principal's query count (1-based) at its first alarm, or None; `queries`: its count
    after this batch."""

    scores: np.ndarray
    alarm: bool
    alarmed_at: int | None
    queries: int


class _GrowingSet:
    """One class's growing set G_c: its vectors, the distances they joined at, T_c."""

    __slots__ = ("vectors", "size", "joined", "threshold")

    def __init__(self, features: int, capacity: int):
        self.vectors = np.empty((capacity, features), np.float32)
        self.size = 0
        self.joined: list[float] = []
        self.threshold = 0.0

    def nearest(self, x: np.ndarray) -> float:
        diff = self.vectors[: self.size] - x
        return float(math.sqrt(np.einsum("ij,ij->i", diff, diff).min()))

    def add(self, x: np.ndarray, distance: float | None) -> None:
        self.vectors[self.size] = x
        self.size += 1
        if distance is not None:
            self.joined.append(distance)
            joined = np.asarray(self.joined)
            self.threshold = max(self.threshold, float(joined.mean() - joined.std()))


class _Principal:
    """One principal's sets, distances and verdict."""

    __slots__ = ("sets", "distances", "capacity", "queries", "alarmed_at", "score")

    def __init__(self, max_distances: int):
        self.sets: dict[int, _GrowingSet] = {}
        self.distances: deque[float] = deque(maxlen=max_distances)
        self.capacity = 0  # rows allocated over all its sets
        self.queries = 0
        self.alarmed_at: int | None = None
        self.score = math.nan

    @property
    def stored(self) -> int:
        return sum(s.size for s in self.sets.values())

    def nbytes(self) -> int:
        vectors = sum(s.vectors.nbytes for s in self.sets.values())
        return vectors + _DISTANCE_BYTES * len(self.distances)


class Prada:
    """PRADA's per-principal detector (see the module docstring).

    `features`: the length of a query's feature vector (784 for 28x28 images);
    `delta`: W below it is an alarm, in (0, 1]; `min_distances`: distances before a
    principal is scored (at least 3, Shapiro-Wilk's minimum); `max_vectors`,
    `max_distances`, `max_principals`: the memory caps. Raises ValueError naming a bad
    parameter.
    """

    def __init__(self, features: int, delta: float, *, min_distances: int = MIN_DISTANCES,
                 max_vectors: int = 1000, max_distances: int = 5000,
                 max_principals: int = 256):
        for name, value, least in (("features", features, 1), ("min_distances", min_distances, 3),
                                   ("max_vectors", max_vectors, 1),
                                   ("max_principals", max_principals, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) \
                    or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if not isinstance(max_distances, (int, np.integer)) or max_distances < min_distances:
            raise ValueError(f"max_distances must be an integer >= min_distances "
                             f"({min_distances}), got {max_distances!r}")
        if not 0 < delta <= 1:  # also refuses nan
            raise ValueError(f"delta must be in (0, 1], got {delta!r}")
        self.features = int(features)
        self.delta = float(delta)
        self.min_distances = int(min_distances)
        self.max_vectors = int(max_vectors)
        self.max_distances = int(max_distances)
        self.max_principals = int(max_principals)
        self._principals: OrderedDict[str, _Principal] = OrderedDict()

    @property
    def worst_case_bytes(self) -> int:
        """The most the stored vectors and distances of all principals can take."""
        per_principal = 4 * self.features * self.max_vectors \
            + _DISTANCE_BYTES * self.max_distances
        return self.max_principals * per_principal

    def __len__(self) -> int:
        """How many principals are kept."""
        return len(self._principals)

    def nbytes(self) -> int:
        """What the stored vectors and distances take now."""
        return sum(p.nbytes() for p in self._principals.values())

    def stored(self, principal: str) -> int:
        """How many vectors `principal`'s growing sets hold (0 for one not kept)."""
        state = self._principals.get(principal)
        return 0 if state is None else state.stored

    def score(self, principal: str) -> float:
        """`principal`'s latest W (nan: not kept, or too few distances yet)."""
        state = self._principals.get(principal)
        return math.nan if state is None else state.score

    def observe(self, principal: str, queries: np.ndarray, classes: np.ndarray) -> Reading:
        """Take `queries` (rows, ...) that `principal` sent, in order, with the class the
        model predicted for each (`classes`, one non-negative integer per row); each row is
        flattened to the feature vector. Raises `FeatureSizeError` (a ValueError and an
        `InvalidInput`) naming the principal and the expected size when a row has another
        number of features, `InvalidQueries` for other bad input."""
        x, labels = self._check(principal, queries, classes)
        state = self._principals.get(principal)
        if state is None:
            state = self._principals[principal] = _Principal(self.max_distances)
            while len(self._principals) > self.max_principals:
                self._principals.popitem(last=False)
        self._principals.move_to_end(principal)
        scores = np.full(len(x), math.nan)
        alarm = False
        for i, (row, label) in enumerate(zip(x, labels, strict=True)):
            state.queries += 1
            if self._take(state, row, int(label)):
                state.score = scores[i] = self._shapiro(state.distances)
                if state.score < self.delta:
                    alarm = True
                    if state.alarmed_at is None:
                        state.alarmed_at = state.queries
        return Reading(scores, alarm, state.alarmed_at, state.queries)

    def _take(self, state: _Principal, x: np.ndarray, label: int) -> bool:
        """Steps 1 and 2 for one query; whether the principal has enough distances."""
        growing = state.sets.get(label)
        if growing is None:
            if state.capacity < self.max_vectors:
                growing = state.sets[label] = _GrowingSet(self.features, self._grant(state, 0))
                growing.add(x, None)
        else:
            distance = growing.nearest(x)
            state.distances.append(distance)
            if distance > growing.threshold and self._room(state, growing):
                growing.add(x, distance)
        return len(state.distances) >= self.min_distances

    def _grant(self, state: _Principal, size: int) -> int:
        """Rows a set of `size` rows may grow to: double, within the principal's cap."""
        extra = min(max(size, _FIRST_CAPACITY), self.max_vectors - state.capacity)
        state.capacity += extra
        return size + extra

    def _room(self, state: _Principal, growing: _GrowingSet) -> bool:
        """Make room for one more row in `growing`; False when the principal is at its cap."""
        if growing.size < len(growing.vectors):
            return True
        capacity = self._grant(state, growing.size)
        if capacity == growing.size:
            return False
        vectors = np.empty((capacity, self.features), np.float32)
        vectors[: growing.size] = growing.vectors
        growing.vectors = vectors
        return True

    @staticmethod
    def _shapiro(distances: deque[float]) -> float:
        d = np.fromiter(distances, np.float64, len(distances))
        spread = d.std()
        if spread > 0:
            d = d[np.abs(d - d.mean()) <= OUTLIER_SIGMAS * spread]
        if len(d) < 3 or np.ptp(d) == 0:
            return 1.0  # one repeated distance: no evidence either way
        from scipy import stats  # here: half a second to load, and the class mix never needs it

        return float(stats.shapiro(d).statistic)

    def _check(self, principal: str, queries, classes) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(principal, str):
            raise InvalidQueries(f"principal must be a string, got {type(principal).__name__}")
        x = np.asarray(queries)
        if x.ndim < 2:
            raise InvalidQueries(f"principal {principal!r}: queries must be (rows, ...), "
                                 f"got shape {list(x.shape)}")
        rows = len(x)
        width = math.prod(x.shape[1:])
        if width != self.features:
            raise FeatureSizeError(
                f"principal {principal!r}: query rows have {width} features (shape "
                f"{list(x.shape)}); this detector expects {self.features}")
        if x.dtype.kind not in "biuf":
            raise InvalidQueries(f"principal {principal!r}: queries must be numbers, "
                                 f"got dtype {x.dtype}")
        x = np.ascontiguousarray(x.reshape(rows, width), dtype=np.float32)
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise InvalidQueries(f"principal {principal!r}: row {int(bad.argmax())} has a "
                                 "value that is not finite")
        labels = np.asarray(classes)
        if labels.shape != (rows,) or labels.dtype.kind not in "iu" \
                or (rows and labels.min() < 0):
            raise InvalidQueries(
                f"principal {principal!r}: classes must be {rows} non-negative integers, "
                f"one per row, got shape {list(labels.shape)} of {labels.dtype}")
        return x, labels
