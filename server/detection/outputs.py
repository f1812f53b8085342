"""Detection on what every protect core sees: the model's raw answers, per principal.

    watch = class_mix_watch(config, named)      # None unless --detect classmix
    core = ProtectCore(policies, observers=[watch], escalation=watch)

`ClassMixWatch` is a protect-core observer and escalation at once. After each answered
call it shows the principal's predicted classes (the argmax of the rows as given, before
any defense) to the `ClassMix` detector of that policy and class count, and tells the
escalation ladder about alarms; the core then asks it, through the ladder, which policy the
principal gets. So the sidecar, the proxy, Envoy ext_proc and the model server detect and
escalate the same way, from one place (`stealguard.server.sidecar.protect_core`, the model
server's `run_modelserver`). A single column holds positive-class probabilities: its class
is p >= 0.5. A policy that is not protected (the model server's `none` baseline) is
neither watched nor escalated.

**Shared state.** With a Redis or Valkey `--store` (the metering store), each (policy,
principal) window lives there instead (`RedisStore.record_classes`, one atomic script), so
every replica and worker naming the store scores one window: a thief who spreads its calls
over replicas is counted once. The store call runs as a task after the answer (an observer
must not wait), so an alarm takes effect from the principal's next call after it lands;
each window expires a day after its last answer. A store that fails is logged and the
calls keep their policy; the in-process detectors (and `--detect-principals`) serve the
memory store. Each escalation step change is kept in the store too (`StoreRecorder`), as
the principal's detection record that `stealguard-sidecar usage --detections` prints.

A detector that fails is logged by the core and the call keeps its answer: a failure never
weakens one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import numpy as np
from stealguard.server.core import Exchange, Policy
from stealguard.server.detection.classmix import ClassMix
from stealguard.server.detection.escalation import WATCH, Ladder

log = logging.getLogger("stealguard.detection")

SIGNAL = "classmix"
#: How long a principal's shared window, and its detection record, outlive its last answer
#: or step change.
SHARED_TTL_S = 86_400


class ClassMixWatch:
    """`ClassMix` per (policy, class count) over every answered call, feeding `ladder`.

    `prior`: the reference class mix for the policies whose class count it matches
    (others get a uniform one); `threshold`, `max_principals`: each detector's."""

    def __init__(self, ladder: Ladder, threshold: float, prior: Sequence[float] = (),
                 max_principals: int = 10_000, store=None):
        self.ladder = ladder
        self.threshold = threshold
        self.prior = list(prior)
        self.max_principals = max_principals
        self.detectors: dict[tuple[str, int], ClassMix] = {}
        self.store = store  # a RedisStore: the windows are shared (module docstring)
        self._pending: set[asyncio.Task] = set()

    def detector(self, policy: str, classes: int) -> ClassMix:
        """The detector of `policy`'s answers with `classes` classes (made on first use)."""
        key = (policy, classes)
        found = self.detectors.get(key)
        if found is None:
            prior = self.prior if len(self.prior) == classes else None
            if self.prior and prior is None:
                log.warning("classmix: --detect-prior has %d classes, policy %r answers %d: "
                            "a uniform reference mix for it", len(self.prior), policy, classes)
            found = self.detectors[key] = ClassMix(classes, self.threshold, prior=prior,
                                                   max_principals=self.max_principals)
            log.info("classmix on policy %r (%d classes): G above %g alarms, at most %.1f MiB "
                     "for %d principals", policy, classes, self.threshold,
                     found.worst_case_bytes / 2**20, self.max_principals)
        return found

    def observe(self, exchange: Exchange) -> None:
        """The core's observer hook: count the classes of an answered call."""
        if exchange.returned is None or exchange.principal in self.ladder.allow:
            return
        rows = exchange.given
        if rows.shape[1] == 1:  # positive-class probabilities (or logits: p >= 0.5 at 0)
            classes = 2
            labels = (rows[:, 0] >= (0.0 if exchange.logits else 0.5)).astype(np.int64)
        else:
            classes = rows.shape[1]
            labels = rows.argmax(axis=1)
        detector = self.detector(exchange.policy, classes)
        if self.store is not None:  # the observer must not wait: the store call is a task
            task = asyncio.get_running_loop().create_task(
                self._shared(detector, exchange.policy, exchange.principal, labels))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            return
        reading = detector.observe(exchange.principal, labels)
        alarmed = reading.scores > self.threshold  # nan (too few answers) is no alarm
        count = int(np.count_nonzero(alarmed))
        if count:
            self.ladder.alarm(exchange.principal, SIGNAL, count, {
                "G": round(float(reading.scores[alarmed].max()), 2),
                "threshold": self.threshold, "queries": reading.queries})

    async def _shared(self, detector: ClassMix, policy: str, principal: str,
                      labels: np.ndarray) -> None:
        """Record `labels` in the store's window of (policy, principal), which every replica
        and worker naming the store shares, and score the window after them: G of the whole
        batch, one alarm per row when it is above the threshold."""
        try:
            n, counts = await self.store.record_classes(
                f"{policy}:{principal}", labels.tolist(), detector.window, SHARED_TTL_S)
        except Exception as error:  # noqa: BLE001 - detection must not fail the call
            log.warning("classmix: the store did not record principal %r's answers (%s); "
                        "its calls keep their policy", principal, error)
            return
        if n < detector.min_queries:
            return
        vector = np.zeros(detector.classes, np.int64)
        for label, count in counts.items():
            if 0 <= label < detector.classes:
                vector[label] = count
        g = detector.g_of(vector, n)
        if g > self.threshold:
            self.ladder.alarm(principal, SIGNAL, len(labels), {
                "G": round(g, 2), "threshold": self.threshold, "window": n, "shared": True})

    def policy_for(self, principal: str, policy: Policy) -> Policy:
        """The core's escalation hook: the ladder's policy for `principal`; an unprotected
        policy is left alone."""
        if not getattr(policy, "protected", True):
            return policy
        return self.ladder.policy_for(principal, policy)


class StoreRecorder:
    """A ladder listener: each step change becomes the principal's detection record in the
    shared store (`RedisStore.record_detection`), which `stealguard-sidecar usage
    --detections` prints. The write is a task on the server's event loop (a step change
    made on an inference thread is handed to it), one at a time in the order of the
    changes, so the record is the latest step; a store that fails is logged."""

    def __init__(self, store):
        self.store = store
        try:
            self.loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # built before the loop runs: bound on the first event
            self.loop = None
        self._pending: set[asyncio.Task] = set()
        self._order: asyncio.Lock | None = None  # FIFO: writes land in the order made

    def __call__(self, event: dict) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            if self.loop is None or self.loop.is_closed():
                log.warning("escalation: principal %r's step change is not recorded in the "
                            "store (no event loop to write it from)", event["principal"])
                return
            self.loop.call_soon_threadsafe(self, event)
            return
        self.loop = loop
        task = loop.create_task(self._write(event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, event: dict) -> None:
        if self._order is None:
            self._order = asyncio.Lock()
        try:
            async with self._order:
                await self.store.record_detection(event, SHARED_TTL_S)
        except Exception as error:  # noqa: BLE001 - the record never fails a call
            log.warning("escalation: the store did not record principal %r's step %s (%s)",
                        event["principal"], event["step"], error)


def shared_store(config):
    """The `RedisStore` of a server's `--store`, or None for the memory store."""
    if config.store in ("", "memory"):
        return None
    from stealguard.server.metering.redis_store import open_store

    return open_store(config.store)


def ladder_of(config, named: Callable[[Policy, str], Policy], store=None) -> Ladder:
    """The escalation ladder of a server's detection settings; with a shared `--store`
    (`store`, else opened here) each step change is also recorded there."""
    ladder = Ladder(config.escalate or [WATCH], after=config.escalate_after,
                    cooldown=config.detect_cooldown, allow=config.detect_allow,
                    dry_run=config.detect_dry_run, named=named)
    store = store if store is not None else shared_store(config)
    if store is not None:
        ladder.listeners.append(StoreRecorder(store))
    log.info("extraction detection: %s on protected policies; ladder %s, a step per %d "
             "alarmed queries, %s%s", config.detect, " -> ".join(ladder.steps), ladder.after,
             f"one step down per {ladder.cooldown:g}s without an alarm" if ladder.cooldown
             else "no cool-down", "; dry run: nothing changes" if ladder.dry_run else "")
    return ladder


def class_mix_watch(config, named: Callable[[Policy, str], Policy]) -> ClassMixWatch | None:
    """The `ClassMixWatch` of a server's settings (None unless `detect: classmix`)."""
    if config.detect != SIGNAL:
        return None
    store = shared_store(config)  # the metering store: replicas share the windows
    return ClassMixWatch(ladder_of(config, named, store), config.detect_threshold,
                         config.detect_prior, config.detect_principals, store)
