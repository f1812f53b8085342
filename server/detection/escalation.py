"""Escalation: what a principal a detector has alarmed on is answered, step by step.

    ladder = Ladder(["watch", "labels", "refuse"], after=100, cooldown=600.0)
    ladder.alarm("shop", "prada", 3, {"W": 0.71, "delta": 0.94, "queries": 180})
    core = ProtectCore(policies, escalation=ladder)    # the core asks ladder.policy_for

The operator's ladder is a list of steps, climbed one at a time:

    watch     nothing changes (the step is logged and counted)
    labels    one-hot labels only: the argmax of each row, nothing else (`LabelsOnly`)
    refuse    the call fails with `Exhausted` (RESOURCE_EXHAUSTED, HTTP 429: there is no
              permission-denied kind), naming the principal and the evidence; last only
    NAME      any other word: the front end's policy of that name (`named`)

A principal starts below the ladder (step `clear`: its configured policy). Its first
alarmed query takes it onto the first step; every `after` further alarmed queries take
it one step up. With `cooldown` > 0, each `cooldown` seconds without an alarm take it one
step down. Principals of `allow` never escalate. In `dry_run` the ladder is climbed,
logged and counted as usual, but `policy_for` changes nothing.

Each step change is one log event on the `stealguard.detection` logger (with an `event`
mapping for JSON logs: principal, signal, evidence, the old and new step, dry_run) and
one count: `stealguard_detections_total{signal, step}` when an alarm climbs,
`stealguard_escalation_cooldowns_total{step}` when a cool-down steps down. At most
`max_principals` principals are kept (those on a step; the least recently seen dropped
first). The ladder is thread-safe: a detector may feed it from an inference thread while
the core reads it on the event loop. Each step change is also given to every callable of
`listeners` (the event mapping, with `at`: seconds since the epoch); a listener must not
block (it runs under the ladder's lock), and one that fails is logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter
from stealguard.server.core import Policy
from stealguard.server.errors import Exhausted
from stealguard.server.platform.metrics import REGISTRY

log = logging.getLogger("stealguard.detection")

WATCH, LABELS, REFUSE = "watch", "labels", "refuse"
#: The step of a principal below the ladder: its configured policy.
CLEAR = "clear"

DETECTIONS = Counter("stealguard_detections", "Escalation steps climbed on a detector's "
                     "alarm, by signal and the step reached.", ["signal", "step"],
                     registry=REGISTRY)
COOLDOWNS = Counter("stealguard_escalation_cooldowns", "Escalation steps gone down after a "
                    "cool-down with no alarm, by the step reached.", ["step"],
                    registry=REGISTRY)


def parse_steps(steps: Iterable[str]) -> tuple[str, ...]:
    """The ladder `steps` as a tuple; ValueError naming a bad one (empty, `clear`, or
    `refuse` before the last step) or an empty ladder."""
    ladder = tuple(str(step).strip() for step in steps)
    if not ladder:
        raise ValueError(f"the escalation ladder has no steps (e.g. {WATCH},{LABELS})")
    for i, step in enumerate(ladder):
        if not step or step == CLEAR:
            raise ValueError(f"step {i + 1} of the escalation ladder is {step!r}: expected "
                             f"{WATCH}, {LABELS}, {REFUSE} or a policy name")
        if step == REFUSE and i != len(ladder) - 1:
            raise ValueError(f"{REFUSE!r} must be the last step of the escalation ladder, "
                             f"got {', '.join(ladder)}")
    return ladder


class LabelsOnly:
    """A policy answering one-hot rows of each row's argmax: the label, nothing else. It
    keeps the name of the policy it replaces (front ends count by that name)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def perturb(self, rows: np.ndarray, logits: bool = False) -> np.ndarray:
        dtype = rows.dtype if rows.dtype.kind == "f" else np.float64
        top = rows.argmax(axis=1) if rows.shape[1] else np.zeros(len(rows), np.intp)
        return (top[:, None] == np.arange(rows.shape[1])).astype(dtype)


@dataclass(slots=True)
class _State:
    """One principal on the ladder: its step (1-based; 0 is `clear`), the alarmed queries
    since it last climbed, when it was last alarmed or moved, and the latest evidence."""

    level: int = 0
    alarms: int = 0
    since: float = 0.0
    signal: str = ""
    evidence: dict = field(default_factory=dict)


class Ladder:
    """Per-principal escalation (see the module docstring).

    `steps`: the ladder; `after`: alarmed queries per further step (at least 1);
    `cooldown`: seconds without an alarm per step down (0: never); `allow`: principals
    that never escalate; `named(policy, name)`: the front end's policy `name` in place of
    `policy` (needed when a step names a policy); `clock`: seconds, monotonic. Raises
    ValueError naming a bad parameter.
    """

    def __init__(self, steps: Sequence[str], *, after: int = 1, cooldown: float = 0.0,
                 allow: Iterable[str] = (), dry_run: bool = False,
                 max_principals: int = 10_000,
                 named: Callable[[Policy, str], Policy] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.steps = parse_steps(steps)
        if isinstance(after, bool) or not isinstance(after, int) or after < 1:
            raise ValueError(f"after must be an integer >= 1, got {after!r}")
        if not cooldown >= 0:  # also refuses nan
            raise ValueError(f"cooldown must be 0 or more seconds, got {cooldown!r}")
        if isinstance(max_principals, bool) or not isinstance(max_principals, int) \
                or max_principals < 1:
            raise ValueError(f"max_principals must be an integer >= 1, got {max_principals!r}")
        if named is None and any(s not in (WATCH, LABELS, REFUSE) for s in self.steps):
            raise ValueError("the ladder names a policy: give `named` to look it up")
        self.after = after
        self.cooldown = float(cooldown)
        self.allow = frozenset(allow)
        self.dry_run = dry_run
        self.max_principals = max_principals
        self.named = named
        self.clock = clock
        self.listeners: list[Callable[[dict], None]] = []  # see the module docstring
        self._principals: OrderedDict[str, _State] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many principals are on a step."""
        return len(self._principals)

    def step_of(self, principal: str) -> str:
        """`principal`'s step now (`clear` when it is on none)."""
        with self._lock:
            state = self._current(principal)
            return CLEAR if state is None else self.steps[state.level - 1]

    def alarm(self, principal: str, signal: str, alarms: int,
              evidence: Mapping[str, object]) -> str:
        """Record `alarms` alarmed queries of `principal` by detector `signal`, with what
        it saw (`evidence`, e.g. W, delta and the queries so far); the step it is on now.
        """
        if alarms <= 0 or principal in self.allow:
            return self.step_of(principal)
        with self._lock:
            state = self._current(principal)
            if state is None:
                state = self._principals[principal] = _State()
                while len(self._principals) > self.max_principals:
                    self._principals.popitem(last=False)
            self._principals.move_to_end(principal)
            state.since, state.signal, state.evidence = self.clock(), signal, dict(evidence)
            if state.level == 0:
                alarms -= 1
                self._move(principal, state, 1, signal)
            state.alarms += alarms
            while state.level < len(self.steps) and state.alarms >= self.after:
                state.alarms -= self.after
                self._move(principal, state, state.level + 1, signal)
            return self.steps[state.level - 1]

    def policy_for(self, principal: str, policy: Policy) -> Policy:
        """The policy `principal` is answered with instead of `policy` (the core's hook);
        raises `Exhausted` on the `refuse` step."""
        if not self._principals:
            return policy
        with self._lock:
            state = self._current(principal)  # a dry run too: its cool-downs are logged
            if state is None or self.dry_run:
                return policy
            step, signal = self.steps[state.level - 1], state.signal
            evidence, since = _describe(state.evidence), state.since
        if step == WATCH:
            return policy
        if step == LABELS:
            return LabelsOnly(policy.name)
        if step == REFUSE:
            retry = since + self.cooldown - self.clock() if self.cooldown else None
            raise Exhausted(f"principal {principal!r} is refused: the extraction detector "
                            f"{signal} alarmed ({evidence})",
                            retry_after=None if retry is None else max(retry, 0.0),
                            quota={f"client:{principal}": f"refused after a {signal} "
                                   "extraction alarm"})
        return self.named(policy, step)

    def _current(self, principal: str) -> _State | None:
        """`principal`'s state after its cool-downs (None when it is on no step); holds
        the lock."""
        state = self._principals.get(principal)
        if state is None or not self.cooldown:
            return state
        down = int((self.clock() - state.since) // self.cooldown)
        if down <= 0:
            return state
        for _ in range(min(down, state.level)):
            self._move(principal, state, state.level - 1, state.signal, cooled=True)
        state.since += down * self.cooldown
        state.alarms = 0
        if state.level == 0:
            del self._principals[principal]
            return None
        return state

    def _move(self, principal: str, state: _State, level: int, signal: str, *,
              cooled: bool = False) -> None:
        before = CLEAR if state.level == 0 else self.steps[state.level - 1]
        state.level = level
        step = CLEAR if level == 0 else self.steps[level - 1]
        if cooled:
            COOLDOWNS.labels(step).inc()
        else:
            DETECTIONS.labels(signal, step).inc()
        event = {"principal": principal, "signal": signal, "evidence": dict(state.evidence),
                 "from": before, "step": step, "cooldown": cooled, "dry_run": self.dry_run}
        why = (f"no alarm for {self.cooldown:g}s (last: {signal}, {_describe(state.evidence)})"
               if cooled else f"{signal} alarmed ({_describe(state.evidence)})")
        log.warning("escalation%s: principal %r %s -> %s: %s",
                    " (dry run)" if self.dry_run else "", principal, before, step, why,
                    extra={"event": event})
        for listener in self.listeners:
            try:
                listener({**event, "at": time.time()})
            except Exception:  # noqa: BLE001 - a listener never stops the ladder
                log.exception("escalation: a listener failed on principal %r's step change",
                              principal)


def _describe(evidence: Mapping[str, object]) -> str:
    return ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in evidence.items())
