"""Extraction detectors: per-principal watchers of the queries a caller sends.

    from stealguard.server.detection import Prada
    detector = Prada(features=784, delta=0.9)
    reading = detector.observe("shop", images, predicted_classes)
    reading.alarm, reading.scores        # W below delta?, W after each row (nan: too few)

`prada` holds PRADA (Juuti et al., EuroS&P 2019), on the inputs; `classmix` the G-test of
the classes a principal is answered against the deployment's mix, on the outputs only
(`ClassMix`, which every front end can run); `escalation` the
per-principal ladder its alarms climb (`Ladder`: watch, a policy, labels, refuse), which
the protect core consults. Nothing here imports grpc or numba; scipy gives the
Shapiro-Wilk test and loads on PRADA's first score, so the class mix never loads it.
"""

from stealguard.server.detection.classmix import ClassMix
from stealguard.server.detection.escalation import Ladder
from stealguard.server.detection.prada import FeatureSizeError, Prada, Reading

__all__ = ["ClassMix", "FeatureSizeError", "Ladder", "Prada", "Reading"]
