"""Helpers for the fault tests: a model server whose sidecar can be killed, stalled and
restarted on the same port, and callers that record and classify every answer.

An answer of `mnist` to a real MNIST image is one of:

    protected   the sidecar's perturbation of `mnist-open`'s raw output for that image
    label       one-hot at the raw output's top-1 (the model server failed closed)
    raw         `mnist-open`'s raw output itself: a leak
    other       anything else (also a failure)
    error       the call failed (allowed: no probabilities were returned)

A batch answer is of one kind in every row, checked against `mnist-open`'s answer to the
same batch; anything mixed is `other`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from _modelserver_helpers import (
    STARTUP_TIMEOUT,
    TorchServeClient,
    mnist_test_images,
    npy_bytes,
    start_modelserver,
)
from _procs import Process, script, start_sidecar
from stealguard.client import DefenseClient

BATCH = 4  # images per call of the batch caller


@dataclass(frozen=True)
class Answer:
    start: float  # time.monotonic() when the call was sent
    end: float  # ... and when its answer (or error) came back
    caller: int  # 0 sends batches, the others single images
    call: int  # index in the caller's list of calls
    kind: str  # protected | label | raw | other | error
    detail: str = ""


def classify(answer: np.ndarray, raw: np.ndarray, protected: np.ndarray) -> str:
    """protected, label, raw or other (see the module docstring)."""
    if answer.shape != raw.shape:
        return "other"
    if np.allclose(answer, protected, rtol=0, atol=1e-12):
        return "protected"
    if np.array_equal(answer, np.eye(len(raw))[raw.argmax()]):
        return "label"
    if np.allclose(answer, raw, rtol=0, atol=1e-9):
        return "raw"
    return "other"


@dataclass(frozen=True)
class Call:
    """One Predictions request of `mnist` and the references its answer is checked against:
    `mnist-open`'s answer to the same bytes, and the sidecar's perturbation of it."""

    data: bytes  # .npy of one image (1, 28, 28) or of a batch (n, 1, 28, 28)
    raw: np.ndarray  # (classes,) or (n, classes)
    protected: np.ndarray

    def classify(self, answer: np.ndarray) -> str:
        """The kind of `answer`; a batch answer must be of one kind in every row."""
        if answer.shape != self.raw.shape:
            return "other"
        kinds = {classify(a, r, p) for a, r, p in zip(np.atleast_2d(answer),
                                                     np.atleast_2d(self.raw),
                                                     np.atleast_2d(self.protected),
                                                     strict=True)}
        return kinds.pop() if len(kinds) == 1 else "other"


@dataclass
class Stack:
    """A model server (sidecar timeout 0.5 s) and a sidecar on a fixed port."""

    store: Path
    sidecar: Process = None
    sidecar_address: str = ""
    modelserver: Process = None
    address: str = ""
    images: np.ndarray = None  # real MNIST test images whose answers tell the kinds apart
    singles: list[Call] = field(default_factory=list)  # one call per image
    batches: list[Call] = field(default_factory=list)  # calls of BATCH images each
    sidecars: list[Process] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.sidecar_address.rsplit(":", 1)[1])

    def start(self, candidates: int = 64, keep: int = 24) -> None:
        self.sidecar, self.sidecar_address = start_sidecar(wait=False)
        self.sidecars.append(self.sidecar)
        self.modelserver, self.address = start_modelserver(
            self.sidecar_address, self.store, "--sidecar-timeout", "0.5")
        self.modelserver.wait_healthy(self.address, timeout=STARTUP_TIMEOUT)
        self.sidecar.wait_healthy(self.sidecar_address, timeout=STARTUP_TIMEOUT)
        images = mnist_test_images(candidates)
        client = TorchServeClient(self.address)
        with DefenseClient(self.sidecar_address, timeout=30) as defense:
            def call(data: bytes) -> Call:
                raw = client.predict("mnist-open", data)
                return Call(data, raw, defense.perturb(raw, model="mnist"))

            singles = [call(npy_bytes(image)) for image in images]
            # keep images whose three possible answers `classify` tells apart
            chosen = [n for n, c in enumerate(singles)
                      if c.raw.max() < 1 - 1e-6
                      and not np.allclose(c.protected, c.raw, rtol=0, atol=1e-6)
                      and not np.allclose(c.protected, np.eye(10)[c.raw.argmax()], rtol=0,
                                          atol=1e-6)][:keep]
            assert len(chosen) >= 8, "too few MNIST test images give distinguishable answers"
            self.images = images[chosen]
            self.singles = [singles[n] for n in chosen]
            # a batch gets its own references: a forward pass over a batch may differ from
            # single-image passes in the last bits
            self.batches = [call(npy_bytes(self.images[i:i + BATCH]))
                            for i in range(0, len(chosen) - BATCH + 1, BATCH)]
        client.close()

    def restart_sidecar(self) -> float:
        """A new sidecar on the same port, waited for; returns when it became SERVING."""
        assert self.sidecar.popen.poll() is not None, "the old sidecar is still running"
        self.sidecar, _ = start_sidecar(port=self.port, wait=False)
        self.sidecars.append(self.sidecar)
        self.sidecar.wait_healthy(self.sidecar_address, timeout=STARTUP_TIMEOUT)
        return time.monotonic()

    def stop(self) -> None:
        if self.modelserver is not None:
            self.modelserver.stop()
        for process in self.sidecars:
            if process.popen.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # a stalled sidecar cannot take SIGTERM
            process.stop()


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Wait until the kernel reports `pid` stopped (state T) after a SIGSTOP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} did not stop")


class Recorder:
    """`callers` threads asking the model server's `mnist` for real MNIST images (one
    caller in batches of BATCH), each answer classified against the stack's references;
    plus stealguard-load for the load."""

    def __init__(self, stack: Stack, callers: int = 3, load_seconds: float = 0,
                 payload: Path | None = None):
        self.stack = stack
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._caller, args=(n,), daemon=True)
                         for n in range(callers)]
        self.load: subprocess.Popen | None = None
        if load_seconds:
            np.save(payload, stack.images)
            self.load = subprocess.Popen(
                [script("stealguard-load"), "--target", stack.address, "--method",
                 "predictions", "--model", "mnist", "--payload", str(payload),
                 "--concurrency", "2", "--duration", f"{load_seconds}s", "--timeout", "30s",
                 "--format", "json", "--no-progress"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> Recorder:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        if self.load is not None and self.load.poll() is None:
            self.load.kill()
            self.load.wait()

    def _caller(self, number: int) -> None:
        """Caller 0 sends batches of BATCH images, the others one image per call."""
        calls = self.stack.batches if number == 0 else self.stack.singles
        client = TorchServeClient(self.stack.address)
        count = number
        while not self._stop.is_set():
            index = count % len(calls)
            count += 1
            start = time.monotonic()
            try:
                answer = client.predict("mnist", calls[index].data, timeout=30)
                kind, detail = calls[index].classify(answer), ""
                if kind in ("raw", "other"):
                    detail = np.array2string(answer, precision=4)
            except grpc.RpcError as error:
                kind, detail = "error", f"{error.code().name}: {error.details()}"
            except Exception as error:  # noqa: BLE001 - an answer that is not JSON numbers
                kind, detail = "other", repr(error)
            with self._lock:
                self.answers.append(Answer(start, time.monotonic(), number, index,
                                           kind, detail))
        client.close()

    def count(self, kind: str, since: float = 0.0) -> int:
        with self._lock:
            return sum(a.kind == kind and a.start >= since for a in self.answers)

    def wait_for(self, kind: str, count: int, since: float = 0.0,
                 timeout: float = 60.0) -> None:
        """Wait until `count` answers of `kind`, sent at `since` or later, came back."""
        deadline = time.monotonic() + timeout
        while self.count(kind, since) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.count(kind, since)} {kind} answers in "
                                   f"{timeout}s; kinds so far: {self.kinds()}")
            time.sleep(0.05)

    def kinds(self, start: float = 0.0, end: float = float("inf")) -> dict[str, int]:
        """Counts by kind of the answers sent at `start` or later that came back by `end`."""
        counts: dict[str, int] = {}
        with self._lock:
            for a in self.answers:
                if a.start >= start and a.end <= end:
                    counts[a.kind] = counts.get(a.kind, 0) + 1
        return counts

    def leaks(self) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.kind in ("raw", "other")]

    def load_report(self) -> dict:
        """stealguard-load's JSON report (waits for its run to end)."""
        out, err = self.load.communicate(timeout=120)
        assert self.load.returncode == 0, err
        return json.loads(out)
