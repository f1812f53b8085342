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
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial

import numpy as np

from ._base import Defense
from ._cache import refresh_kernel_cache
from ._validation import read_only_flat, validate
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


def warm_up(defenses: Mapping[str, Defense] | Iterable[Defense] | None = None, *,
            progress: Callable[[str], None] | None = None, background: bool = False,
            every: float = 5.0) -> float:
    """Compile (or load from numba's cache) the kernels `defenses` use, float32 and float64.

    `defenses`: the policies to serve ({policy name: defense}) or defenses; None means one
    of every registered defense. Each distinct kernel is exercised the way requests reach
    it (probabilities, logits, binary columns), so the first real request pays no
    compilation: the single-thread kernels first, then the parallel ones for big batches.

    With `background=True` this returns as soon as the single-thread kernels are ready and
    compiles the parallel ones in a daemon thread; until a defense's parallel kernel is
    ready, its big batches run on its single-thread kernel (same results, one core).

    `progress(message)` hears what is compiling and how far it is, e.g.
    "compiling kernels for policies default, mnist-open: 3/8 (none float64 parallel), 12 s",
    when each kernel starts and at least every `every` seconds, and once when all are
    ready. Returns the seconds until the single-thread kernels were ready (all kernels
    without `background`).
    """
    start = time.perf_counter()
    if defenses is None:
        defenses = [make_defense(name) for name in DEFENSE_NAMES]
    label = "policies" if isinstance(defenses, Mapping) else "defenses"
    if isinstance(defenses, Mapping):
        names, defenses = list(defenses), list(defenses.values())
    else:
        defenses = list(defenses)
        names = list(dict.fromkeys(d.name for d in defenses))
    report = _Progress(f"compiling kernels for {label} {', '.join(names)}", progress, every)
    serial, parallel = _warm_up_steps(defenses)
    report.total = len(serial) + len(parallel)
    with report:
        for what, step in serial:
            report.step(what)
            step()
    seconds = time.perf_counter() - start
    if not background:
        _compile_parallel(parallel, report, {})
        return time.perf_counter() - start
    _SWITCH.acquire()  # one background compile at a time switches kernels
    threading.Thread(target=_compile_parallel,
                     args=(parallel, report, _switch(parallel), _SWITCH.release),
                     daemon=True, name="stealguard-parallel-kernels").start()
    return seconds


class _Progress:
    """Reports `prefix: done/total (what), seconds` at the first step, at a later step if
    a second has passed since the last report (a cached start says little), and every
    `every` seconds."""

    def __init__(self, prefix: str, callback: Callable[[str], None] | None, every: float):
        self.prefix, self.callback, self.every = prefix, callback, every
        self.total, self.done, self.what = 0, 0, ""
        self.start = self.said = time.perf_counter()
        self._stop = threading.Event()

    def step(self, what: str) -> None:
        first = not self.what and not self.done
        if self.what:
            self.done += 1
        self.what = what
        if first or time.perf_counter() - self.said >= 1.0:
            self.say()

    def say(self, message: str | None = None) -> None:
        if self.callback is not None:
            self.said = time.perf_counter()
            elapsed = self.said - self.start
            self.callback(message or f"{self.prefix}: {self.done}/{self.total} "
                                     f"({self.what}), {elapsed:.0f} s")

    def finish(self, message: str) -> None:
        self.done, self.what = self.done + (1 if self.what else 0), ""
        self.say(f"{message} in {time.perf_counter() - self.start:.1f} s")

    def __enter__(self) -> _Progress:
        self._stop.clear()
        threading.Thread(target=self._tick, daemon=True, name="stealguard-warm-up-progress"
                         ).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self.say()


def _warm_up_steps(defenses: list[Defense]) -> tuple[list, list]:
    """([(what, step)] for the single-thread kernels, [(what, owner, step)] for the
    parallel ones): one step per distinct kernel and dtype, float32 first."""
    serial, parallel, seen = [], [], set()
    for dtype in (np.float32, np.float64):
        for defense in defenses:
            for kind, kernel in (("serial", defense._serial), ("parallel", defense._parallel)):
                if kernel is None or (kind, id(kernel), dtype) in seen:
                    continue
                seen.add((kind, id(kernel), dtype))
                what = f"{defense.name} {np.dtype(dtype).name} {kind}"
                if kind == "serial":
                    serial.append((what, partial(_exercise_serial, defense, dtype)))
                else:
                    parallel.append((what, _owner(type(defense), "_parallel"),
                                     partial(_exercise_parallel, defense, dtype, kernel)))
    return serial, parallel


def _exercise_serial(defense: Defense, dtype: type) -> None:
    """Every way a request reaches the single-thread kernel with input of `dtype`."""
    small = np.full((2, 4), 0.25, dtype)
    defense(small)
    defense(small, logits=True)
    validate(small)
    if dtype is np.float64:  # columns of either dtype are perturbed in float64
        for column in (small[:, :1], small[:, :1].astype(np.float32)):
            defense(column)
            defense(column, logits=True)


def _exercise_parallel(defense: Defense, dtype: type, kernel: Callable) -> None:
    """Compile the parallel kernel for `dtype` as `Defense._rows` calls it (on any size)."""
    rows = np.full((2, 4), 0.25, dtype)
    out = np.empty(rows.size, dtype)
    kernel(read_only_flat(rows), out, 2, 4, True, *defense._args[np.dtype(dtype)])


def _owner(cls: type, attribute: str) -> type:
    """The class of cls's MRO that defines `attribute` (where to switch kernels)."""
    return next(c for c in cls.__mro__ if attribute in vars(c))


_SWITCH = threading.Lock()


def _switch(steps: list) -> dict[type, object]:
    """Serve big batches on the single-thread kernel of each class in `steps` until its
    parallel kernel is ready; returns the parallel kernels to put back."""
    saved = {}
    for _, owner, _ in steps:
        if owner not in saved:
            saved[owner] = vars(owner)["_parallel"]
            owner._parallel = staticmethod(owner._serial)
    return saved


def _compile_parallel(steps: list, report: _Progress, saved: dict[type, object],
                      done: Callable[[], None] | None = None) -> None:
    """Compile the parallel kernels, putting each one in `saved` back on its class as soon
    as it is ready; then call `done`."""
    try:
        with report:
            for index, (what, owner, step) in enumerate(steps):
                report.step(what)
                step()
                if owner in saved and all(o is not owner for _, o, _ in steps[index + 1:]):
                    owner._parallel = saved.pop(owner)
    finally:
        for owner, kernel in saved.items():  # a compile failed: compile on first use
            owner._parallel = kernel
        if done is not None:
            done()
    report.finish(f"{report.prefix.replace('compiling kernels', 'kernels')}: "
                  f"{report.total}/{report.total} ready")
