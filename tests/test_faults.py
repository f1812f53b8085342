"""Fail-closed under faults: the sidecar is killed, stalled and restarted while load runs.

A real `stealguard-modelserver` (sidecar timeout 0.5 s) answers `mnist` for real MNIST test
images, driven by stealguard-load and by callers that classify every answer against
`mnist-open`'s raw output for the same image (see tests/_fault_helpers.py). While the
sidecar is down or stalled every answer is label-only (one-hot at the raw top-1) or an
error; no answer at any time is the raw vector or anything but the sidecar's perturbation
or label-only; protected answers resume once a sidecar serves on the same port again.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from _fault_helpers import Recorder, Stack, wait_stopped
from stealguard.modelserver.training import trained_model

FAULT_SECONDS = 2.0  # how long the sidecar stays down or stalled
RECOVERY_TIMEOUT = 90.0  # the model server's channel reconnects with gRPC's backoff


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    trained_model()  # trained once per machine, cached
    stack = Stack(tmp_path_factory.mktemp("store"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def _assert_fail_closed(recorder: Recorder, fault_start: float, fault_end: float) -> None:
    leaks = recorder.leaks()
    assert not leaks, f"{len(leaks)} answers were not protected nor label-only: {leaks[:3]}"
    during = recorder.kinds(fault_start, fault_end)
    assert set(during) <= {"label", "error"}, f"answers during the fault: {during}"
    assert during.get("label", 0) >= 1, f"no label-only answer during the fault: {during}"
    print(f"all answers {recorder.kinds()}; during the fault {during}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_sidecar_stopped_and_restarted_on_the_same_port_answers_label_only_then_protected(
        stack, tmp_path, sig):
    with Recorder(stack, load_seconds=6, payload=tmp_path / "images.npy") as recorder:
        recorder.wait_for("protected", 10)
        old = stack.sidecar
        old.popen.send_signal(sig)
        code = old.popen.wait(30)  # SIGTERM drains: calls in flight finish, then exit
        fault_start = time.monotonic()
        assert recorder.load.poll() is None, "stealguard-load ended before the fault"
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), old.output()
        time.sleep(FAULT_SECONDS)
        recorder.wait_for("label", 5, since=fault_start)
        fault_end = time.monotonic()
        ready = stack.restart_sidecar()
        print(f"new sidecar SERVING after {ready - fault_end:.1f}s")
        recorder.wait_for("protected", 20, since=ready, timeout=RECOVERY_TIMEOUT)
        print(f"protected answers again {time.monotonic() - ready:.1f}s after the new "
              "sidecar was SERVING")
        report = recorder.load_report()
    _assert_fail_closed(recorder, fault_start, fault_end)
    assert report["requests"] > 0 and report["errors"] == {}, report["errors"]


def test_sidecar_stalled_by_sigstop_answers_label_only_then_protected_after_sigcont(
        stack, tmp_path):
    with Recorder(stack, load_seconds=5, payload=tmp_path / "images.npy") as recorder:
        recorder.wait_for("protected", 10)
        pid = stack.sidecar.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_stopped(pid)
            fault_start = time.monotonic()
            assert recorder.load.poll() is None, "stealguard-load ended before the fault"
            time.sleep(FAULT_SECONDS)
            recorder.wait_for("label", 5, since=fault_start)
            fault_end = time.monotonic()
        finally:
            os.kill(pid, signal.SIGCONT)
        recorder.wait_for("protected", 20, since=fault_end, timeout=RECOVERY_TIMEOUT)
        report = recorder.load_report()
    _assert_fail_closed(recorder, fault_start, fault_end)
    assert report["requests"] > 0 and report["errors"] == {}, report["errors"]
    assert stack.sidecar.popen.poll() is None  # the stalled sidecar carries on
