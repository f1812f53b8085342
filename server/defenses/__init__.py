"""Output perturbation defenses against model stealing (DESIGN.md, "Defenses").

    from stealguard.server.defenses import make_defense, DEFENSE_NAMES, validate, warm_up
    d = make_defense("reverse_sigmoid", beta=1.5, gamma=0.3, preserve_top1=True)
    out = d(probs)              # new array, same shape and dtype; probs is never written
    d.name, d.params            # "reverse_sigmoid", {"beta": 1.5, "gamma": 0.3, ...}

Modules: `confidence` (the default: label, coarse confidence, keyed rest), `reverse_sigmoid` (the
paper's defense), `noise` (keyed random perturbations),
`simple` (deterministic baselines), `_validation` (shared input checks and softmax),
`_rows` (normalisation and the top-1 guard), `_fastmath` (vectorisable float32 log/exp,
SipHash), `_base` (the Defense class and parameter checks).
"""

from __future__ import annotations

import inspect
import time

import numpy as np

from ._base import Defense
from ._cache import refresh_kernel_cache
from ._validation import validate
from .confidence import CoarseConfidence
from .noise import (
    GaussianNoise,
    RankingPreservingUniformRandom,
    UniformRandom,
    UniformRandomConcave,
    UniformRandomConvex,
)
from .reverse_sigmoid import ReverseSigmoid
from .simple import ClassLabels, HighConfidence, NoDefense, Rounded, Sine, TopK

__all__ = [
    "DEFENSE_NAMES", "Defense", "make_defense", "validate", "warm_up",
    "CoarseConfidence", "ReverseSigmoid", "NoDefense", "UniformRandom", "UniformRandomConcave",
    "UniformRandomConvex", "RankingPreservingUniformRandom", "Sine", "GaussianNoise",
    "HighConfidence", "TopK", "Rounded", "ClassLabels",
]

_REGISTRY: dict[str, type[Defense]] = {
    cls.name: cls
    for cls in (
        CoarseConfidence, ReverseSigmoid, NoDefense, UniformRandom, UniformRandomConcave,
        UniformRandomConvex, RankingPreservingUniformRandom, Sine, GaussianNoise,
        HighConfidence, TopK, Rounded, ClassLabels,
    )
}

#: Registry names, in the order of DESIGN.md's table.
DEFENSE_NAMES: tuple[str, ...] = tuple(_REGISTRY)

refresh_kernel_cache()


def parameter_names(name: str) -> tuple[str, ...]:
    """The parameters defense `name` accepts (besides `secret`)."""
    signature = inspect.signature(_defense_class(name).__init__)
    return tuple(p for p in signature.parameters if p not in ("self", "secret"))


def _defense_class(name: str) -> type[Defense]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown defense {name!r}; known defenses: {', '.join(DEFENSE_NAMES)}"
        ) from None


def make_defense(name: str, *, secret: bytes = b"", **params: object) -> Defense:
    """Build the defense `name` with `params` (missing ones take their defaults).

    `secret` keys the random defenses (ignored by the others). Raises ValueError for an
    unknown name (listing the known ones), an unknown parameter (listing the accepted
    ones) or a parameter out of range (naming it and the allowed range).
    """
    cls = _defense_class(name)
    accepted = parameter_names(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"{name}: unknown parameter {unknown[0]!r}; accepted: "
            f"{', '.join(accepted) if accepted else 'none'}"
        )
    if cls.keyed:
        return cls(secret=secret, **params)
    return cls(**params)


def warm_up() -> float:
    """Compile (or load from numba's cache) every kernel for float32 and float64.

    Exercises the single-thread and the parallel kernel of every defense, probabilities,
    logits and binary columns, so the first real request pays no compilation. Returns the
    seconds it took.
    """
    start = time.perf_counter()
    big_rows = 1 + (1 << 16) // 4
    for dtype in (np.float32, np.float64):
        small = np.full((2, 4), 0.25, dtype)
        big = np.full((big_rows, 4), 0.25, dtype)
        for array in (small, big):
            for name in DEFENSE_NAMES:
                make_defense(name)(array)
        make_defense("reverse_sigmoid")(small, logits=True)
        make_defense("reverse_sigmoid")(small[:, :1])
        validate(small)
        validate(small[:, :1])
    return time.perf_counter() - start
