"""Extraction detection in the model server, which sees the inputs the protect core does not.

    watch = watch_of(config, specs)             # None unless --detect prada
    core = ProtectCore(models, escalation=watch)
    watch.observe(spec, "shop", batch, probs)   # each handler, after the forward pass
    await core.protect(probs, bound, "shop")    # the core asks watch.policy_for(...)

PRADA (`stealguard.server.detection.Prada`) watches each protected model's inputs: the
decoded pixels, flattened, with the classes the model predicted (the argmax of its raw
output), one detector per model (models differ in input size). Its alarms feed one
escalation ladder (`stealguard.server.detection.escalation.Ladder`) for every model, so a
principal detected on one protected model is escalated on all of them. A model with policy
`none` is the unprotected baseline: neither watched nor escalated.

A detector that fails is logged and the call keeps its configured policy: a failure never
weakens an answer.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
from stealguard.modelserver.store import ModelSpec
from stealguard.server.core import Policy

if TYPE_CHECKING:  # imported when detection is on: scipy takes half a second to load
    from stealguard.server.detection.escalation import Ladder

log = logging.getLogger("stealguard.detection")

SIGNAL = "prada"
#: The most principals PRADA keeps per model: each may hold PRADA_VECTORS images (3 MB
#: for MNIST), so this bounds a model's detector to about 200 MB.
PRADA_PRINCIPALS = 64
PRADA_VECTORS = 1000


class Watch:
    """PRADA on the inputs of each protected model of `specs`, feeding `ladder`; the
    core's escalation. `delta`: W below it is an alarm; `max_principals`: principals each
    detector keeps."""

    def __init__(self, ladder: Ladder, delta: float, specs: Iterable[ModelSpec],
                 max_principals: int = PRADA_PRINCIPALS):
        from stealguard.server.detection import Prada

        self.ladder = ladder
        self.delta = delta
        self.detectors = {spec.name: Prada(math.prod(spec.input_shape), delta,
                                           max_vectors=PRADA_VECTORS,
                                           max_principals=max_principals)
                          for spec in specs if spec.protected}
        for name, detector in self.detectors.items():
            log.info("extraction detection on model %r: prada on %d input features, delta "
                     "%g, at most %.0f MiB for %d principals", name, detector.features, delta,
                     detector.worst_case_bytes / 2**20, max_principals)
        # the inference thread calls observe; tests may run handlers on a thread pool
        self._lock = threading.Lock()

    def observe(self, spec: ModelSpec, principal: str, batch: np.ndarray,
                probs: np.ndarray) -> None:
        """Show the detector of `spec` the `batch` `principal` sent and the raw `probs`
        the model answered, and tell the ladder about alarms. Never raises: a failure is
        logged, and the call keeps its configured policy."""
        detector = self.detectors.get(spec.name)
        if detector is None or principal in self.ladder.allow:
            return
        try:
            with self._lock:
                reading = detector.observe(principal, batch, probs.argmax(axis=1))
            alarmed = reading.scores < self.delta  # nan (too few distances) is no alarm
            count = int(np.count_nonzero(alarmed))
            if count:
                self.ladder.alarm(principal, SIGNAL, count, {
                    "W": float(reading.scores[alarmed].min()), "delta": self.delta,
                    "queries": reading.queries})
        except Exception:  # noqa: BLE001 - detection must not fail the call
            log.exception("extraction detection failed on model %r for principal %r: "
                          "answering with the configured policy", spec.name, principal)

    def policy_for(self, principal: str, policy: Policy) -> Policy:
        """The protect core's escalation hook: the ladder's policy for `principal`; the
        unprotected baseline is left alone."""
        if not getattr(policy, "protected", True):
            return policy
        return self.ladder.policy_for(principal, policy)


def _named(policy, name: str):
    """A model's handler calling the sidecar with policy `name` instead of its own."""
    return policy.using(name)


def watch_of(config, specs: Iterable[ModelSpec]) -> Watch | None:
    """The model server's PRADA `Watch` of the models `specs` for its settings (None unless
    `detect: prada`; `classmix` runs in the protect core, `class_mix_of`)."""
    if config.detect != SIGNAL:
        return None
    from stealguard.server.detection.outputs import ladder_of

    kept = min(config.detect_principals, PRADA_PRINCIPALS)
    if kept < config.detect_principals:
        log.info("prada keeps at most %d principals per model (--detect-principals %d is "
                 "classmix's): each can hold %d stored images", kept,
                 config.detect_principals, PRADA_VECTORS)
    return Watch(ladder_of(config, _named), config.detect_delta, specs, kept)


def class_mix_of(config):
    """The protect core's `ClassMixWatch` for the model server (None unless `detect:
    classmix`): its escalation steps name sidecar policies the way PRADA's do."""
    from stealguard.server.detection.outputs import class_mix_watch

    return class_mix_watch(config, _named)
