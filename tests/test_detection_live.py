"""The detection evaluation through a real model server (`stealguard-attack detect
--target`, stealguard.attacks.detection_live): the class mix escalates a thief the server
watches to labels, an allow-listed one never, and honest clients keep their answers."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from _modelserver_helpers import STARTUP_TIMEOUT, start_modelserver
from _procs import script
from stealguard.attacks.detection_live import first_labelled, labelled

ALLOWED = "the-evaluation"


def test_labels_only_rows_are_one_hot_rows_and_nothing_else():
    rows = np.array([[0.0, 1.0, 0.0],         # labels only
                     [0.000001, 0.999997, 0.000002],  # the default's most confident answer
                     [0.5, 0.5, 0.0],
                     [1.0, 0.0, 0.0]])
    assert labelled(rows).tolist() == [True, False, False, True]
    assert first_labelled(rows[1:]) == 3 and first_labelled(rows[1:3]) is None


@pytest.fixture(scope="module")
def watched_modelserver(sidecar, tmp_path_factory):
    """The model server on its default models (cached on this machine), class mix on,
    escalating to labels, with the evaluation's allow-listed principal."""
    from stealguard.modelserver.datasets import load_dataset
    from stealguard.modelserver.training import trained_model

    trained_model()
    prior = np.bincount(load_dataset("mnist").base_y, minlength=10)
    modelserver, address = start_modelserver(
        sidecar, tmp_path_factory.mktemp("store"), "--metrics-port", "0", "--detect",
        "classmix", "--escalate", "labels", "--trust-client-header", "--detect-allow",
        ALLOWED, "--detect-prior", ",".join(str(v) for v in prior))
    try:
        modelserver.wait_healthy(address, timeout=STARTUP_TIMEOUT)
        yield modelserver, address
    finally:
        assert modelserver.stop() == 0, modelserver.output()


def test_live_evaluation_escalates_the_thief_not_the_allowed_one_nor_honest_clients(
        watched_modelserver, tmp_path):
    modelserver, address = watched_modelserver
    out = tmp_path / "out"
    done = subprocess.run(
        [script("stealguard-attack"), "--torch-threads", "1", "detect", "--target", address,
         "--allowed", ALLOWED, "--out", str(out), "--quick", "--budget", "120",
         "--clients", "2", "--attacks", "random,jacobian"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    random = next(r for r in result["attacks"] if r["attack"] == "random")
    # noise images pile into a few classes: the 50th answer is scored and alarms, and the
    # server answers labels only from the next call (10 queries per call)
    assert random["labels_from"] == 51 and random["labelled"] == 70
    assert "principal 'attack-" in modelserver.output()  # the server's escalation event
    # the allow-listed principal sent the same Jacobian thief and kept its probabilities
    (undetected,) = result["without_detection"]
    assert undetected["principal"] == ALLOWED and undetected["labels_from"] is None
    assert undetected["queries"] == 120
    # each honest client sent the 1,000 test images and was never answered labels only
    assert result["benign"]["queries"] == 2000 and result["benign"]["alarmed_clients"] == 0
    report = (out / "report.md").read_text()
    assert "| random (random, attacker samples) | 120 | 51 | 70 |" in report


def test_live_evaluation_against_nothing_is_one_line_naming_the_target(tmp_path):
    from _procs import free_port

    target = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        [script("stealguard-attack"), "detect", "--target", target, "--out",
         str(tmp_path / "out"), "--wait", "0", "--timeout", "1"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and target in lines[0] and "Traceback" not in done.stderr
