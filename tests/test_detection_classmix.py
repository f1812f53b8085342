"""The class-mix signal (stealguard.server.detection.ClassMix) on real MNIST labels."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
from _procs import script
from stealguard.modelserver.datasets import load_dataset
from stealguard.server.detection import ClassMix
from stealguard.server.detection.prada import InvalidQueries
from stealguard.server.errors import InvalidInput

THRESHOLD = 23.0  # what attacks/results/detection chose from its calibration clients


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", seed=0)


def _prior(ds) -> np.ndarray:
    return np.bincount(ds.base_y, minlength=10) / len(ds.base_y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_labels_in_random_order_do_not_alarm(mnist, seed):
    order = np.random.default_rng(seed).permutation(len(mnist.test_y))
    detector = ClassMix(10, THRESHOLD, prior=_prior(mnist))
    reading = detector.observe("honest", mnist.test_y[order].astype(np.int64))
    assert not reading.alarm and reading.alarmed_at is None
    assert np.isnan(reading.scores[:49]).all() and not np.isnan(reading.scores[49:]).any()


def test_answers_piling_into_two_classes_alarm_once_scored(mnist):
    # what random inputs do to a classifier: most land in one or two classes
    labels = np.where(np.random.default_rng(0).random(200) < 0.7, 8, 3)
    reading = ClassMix(10, THRESHOLD, prior=_prior(mnist)).observe("thief", labels)
    assert reading.alarm and reading.alarmed_at == 50


def test_the_score_is_the_g_test_of_the_last_window(mnist):
    rng = np.random.default_rng(1)
    labels = np.concatenate([np.full(300, 4), rng.permutation(mnist.test_y)[:400]])
    detector = ClassMix(10, 1e9, prior=_prior(mnist), window=250)
    scores = np.concatenate([detector.observe("p", part).scores
                             for part in np.array_split(labels, 7)])  # batches change nothing
    counts = np.bincount(labels[-250:], minlength=10)
    seen = counts > 0
    want = 2 * (counts[seen] * np.log(counts[seen] / (250 * _prior(mnist)[seen]))).sum()
    assert scores[-1] == pytest.approx(want)
    assert scores[299] > 1000 > scores[-1]  # the skewed start has left the window


def test_memory_stays_bounded_with_10000_principals():
    rng = np.random.default_rng(0)
    detector = ClassMix(10, THRESHOLD, window=100, max_principals=500)
    for i in range(10_000):
        detector.observe(f"client-{i}", rng.integers(0, 10, 20))
    assert len(detector) == 500
    assert np.isnan(detector.score("client-0"))  # dropped, least recently seen first
    assert detector.nbytes() <= detector.worst_case_bytes
    assert detector.worst_case_bytes == 500 * (2 * 100 + 8 * 10 + 200)


@pytest.mark.parametrize("classes, message", [
    (np.array([0, 10]), r"classes must be one integer in \[0, 10\) per row, got shape \[2\] "
                        r"of int64 from 0 to 10"),
    (np.array([[1, 2]]), r"got shape \[1, 2\]"),
    (np.array([0.5]), "of float64"),
    (np.array([-1]), "from -1 to -1"),
])
def test_bad_classes_name_the_principal_and_why(classes, message):
    with pytest.raises(InvalidQueries, match=message) as caught:
        ClassMix(10, THRESHOLD).observe("shop", classes)
    assert isinstance(caught.value, InvalidInput) and "'shop'" in str(caught.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": 1}, "classes must be an integer >= 2"),
    ({"threshold": 0}, "threshold must be a finite number > 0"),
    ({"threshold": float("nan")}, "threshold must be a finite number > 0"),
    ({"prior": [0.5, 0.5]}, "prior must be 10 non-negative numbers"),
    ({"prior": [0.0] * 10}, "prior must be 10 non-negative numbers"),
    ({"min_queries": 200, "window": 100}, r"min_queries \(200\) must not exceed window"),
    ({"max_principals": True}, "max_principals must be an integer >= 1"),
])
def test_bad_parameters_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassMix(**{"classes": 10, "threshold": THRESHOLD, **kwargs})


# -- in every front end: the protect core's observer and escalation ---------------------

def _digits_rows():
    from _defenses_helpers import digits_softmax_rows

    return digits_softmax_rows().astype(np.float32)


def _ask(stub, who, batch):
    from stealguard.server.codec import array_to_tensor, tensor_to_array
    from stealguard.v1 import defense_pb2

    reply = stub.Perturb(defense_pb2.PerturbRequest(probabilities=array_to_tensor(batch)),
                         metadata=[("x-client-id", who)], timeout=10)
    return tensor_to_array(reply.probabilities)


def _is_label(answer) -> bool:
    return bool(np.sort(answer)[0, -2] == 0)


def test_two_sidecars_on_one_valkey_score_one_window_per_principal(tmp_path):
    """A thief alternating between two replicas: with the windows in the store, its 50th
    answer overall is scored, though each replica has answered it only 25 times."""
    import grpc
    from _procs import start_sidecar
    from _valkey import Valkey
    from stealguard.v1 import defense_pb2_grpc

    threes = _digits_rows()
    threes = threes[threes.argmax(1) == 3][:20]
    valkey = Valkey(tmp_path / "valkey").start()
    flags = ("--detect", "classmix", "--escalate", "labels", "--trust-client-header",
             "--store", valkey.url)
    replicas = [start_sidecar(*flags), start_sidecar(*flags)]
    try:
        channels = [grpc.insecure_channel(address) for _, address in replicas]
        stubs = [defense_pb2_grpc.DefenseStub(channel) for channel in channels]
        labels = [_is_label(_ask(stubs[i % 2], "mallory", threes[i % 20:i % 20 + 1]))
                  for i in range(50)]
        later = []  # the 50th answer's alarm lands after its answer, on both replicas
        for i in range(50, 98):  # under 50 calls per replica: alone, neither would alarm
            time.sleep(0.05)  # time for the store's answer, on a busy machine too
            later.append(_is_label(_ask(stubs[i % 2], "mallory", threes[i % 20:i % 20 + 1])))
            if len(later) >= 2 and later[-2:] == [True, True]:
                break
        for channel in channels:
            channel.close()
        usage = subprocess.run([script("stealguard-sidecar"), "usage", "--store", valkey.url,
                                "--detections", "--format", "json"],
                               capture_output=True, text=True, timeout=60)
    finally:
        codes = [process.stop() for process, _ in replicas]
        valkey.stop()
    assert codes == [0, 0]
    assert not any(labels)  # below min_queries on every replica until the 50th
    assert later[-2:] == [True, True], later  # both replicas escalated on the shared window
    # the operator's view: the principal, the step, the signal and its evidence
    assert usage.returncode == 0, usage.stderr
    (record,) = json.loads(usage.stdout)
    assert record["principal"] == "mallory" and record["step"] == "labels"
    assert record["previous"] == "clear" and record["signal"] == "classmix"
    assert record["evidence"]["G"] > THRESHOLD and record["evidence"]["shared"] is True
    assert record["dry_run"] is False and record["changes"] >= 1


def test_a_step_change_on_an_inference_thread_is_recorded_in_the_store(tmp_path):
    """PRADA's ladder moves on the model server's inference thread: the record is written
    from the event loop, and `usage --detections` prints it as a table."""
    import asyncio
    import threading

    from _valkey import Valkey
    from stealguard.server.detection.escalation import Ladder
    from stealguard.server.detection.outputs import StoreRecorder
    from stealguard.server.metering.redis_store import open_store

    valkey = Valkey(tmp_path / "valkey").start()

    async def climb():
        store = open_store(valkey.url)
        ladder = Ladder(["watch", "labels"], after=2)
        ladder.listeners.append(StoreRecorder(store))  # built on the loop, as servers do
        thread = threading.Thread(target=lambda: ladder.alarm(
            "eve", "prada", 3, {"W": 0.71, "delta": 0.94, "queries": 180}))
        thread.start()
        thread.join()
        for _ in range(100):  # the write is a task the thread handed to this loop
            records = await store.detections("eve")
            if records and records[0].changes == 2:
                break
            await asyncio.sleep(0.05)
        await store.close()
        return records

    try:
        (record,) = asyncio.run(climb())
        table = subprocess.run([script("stealguard-sidecar"), "usage", "--store", valkey.url,
                                "--detections"], capture_output=True, text=True, timeout=60)
    finally:
        valkey.stop()
    assert (record.step, record.previous, record.signal) == ("labels", "watch", "prada")
    assert record.evidence == {"W": 0.71, "delta": 0.94, "queries": 180}
    head, row = table.stdout.splitlines()
    assert head.split() == ["principal", "step", "from", "signal", "since", "evidence"]
    assert row.split()[:4] == ["eve", "labels", "watch", "prada"]
    assert row.endswith("W 0.71, delta 0.94, queries 180")


def test_a_real_sidecar_answers_a_one_class_principal_with_labels_and_others_as_before():
    """`stealguard-sidecar --detect classmix --escalate labels`: mallory's answers pile into
    class 3 and from its alarm on it gets one-hot labels; alice's real mix is untouched."""
    import grpc
    from _procs import start_sidecar
    from stealguard.v1 import defense_pb2_grpc

    rows = _digits_rows()
    threes = rows[rows.argmax(1) == 3][:20]
    mixed = rows[np.random.default_rng(0).permutation(len(rows))[:60]]
    process, address = start_sidecar("--detect", "classmix", "--escalate", "labels",
                                     "--trust-client-header")
    try:
        with grpc.insecure_channel(address) as channel:
            stub = defense_pb2_grpc.DefenseStub(channel)
            one_hot = [_is_label(_ask(stub, "mallory", threes[i % 20:i % 20 + 1]))
                       for i in range(60)]
            honest = [_ask(stub, "alice", mixed[i:i + 1]) for i in range(60)]
    finally:
        assert process.stop() == 0
    assert one_hot[:49] == [False] * 49  # scored from the 50th answer on
    assert all(one_hot[50:])  # the 50th alarmed: every later answer is labels only
    assert not any(_is_label(h) for h in honest)
    assert "classmix" in process.output() and "mallory" in process.output()


def test_the_store_window_keeps_the_last_answers_and_their_counts(tmp_path):
    import asyncio

    from _valkey import Valkey
    from stealguard.server.metering.redis_store import RedisStore

    valkey = Valkey(tmp_path / "valkey").start()

    async def record():
        store = RedisStore(valkey.url, timeout=5.0)
        try:
            first = await store.record_classes("p:mallory", [1, 1, 2], 4, 60)
            second = await store.record_classes("p:mallory", [3, 3], 4, 60)  # 1 leaves
            other = await store.record_classes("p:alice", [1], 4, 60)
            return first, second, other
        finally:
            await store.close()

    try:
        first, second, other = asyncio.run(record())
    finally:
        valkey.stop()
    assert first == (3, {1: 2, 2: 1})
    assert second == (4, {1: 1, 2: 1, 3: 2})
    assert other == (1, {1: 1})


def test_the_class_mix_does_not_load_scipy():
    """scipy (half a second at start) is PRADA's Shapiro-Wilk test, loaded on its first
    score: a server detecting with the class mix never imports it."""
    import sys

    code = ("import sys, numpy as np; from stealguard.server.detection import ClassMix; "
            "import stealguard.server.detection.outputs; "
            "ClassMix(10, 23.0).observe('p', np.zeros(60, np.int64)); "
            "print('scipy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "False", done.stderr


# -- stealguard-attack calibrate-detector: the class mix's prior and threshold ----------------

def test_calibration_threshold_is_above_every_calibration_client_and_prior_is_the_mix():
    from stealguard.attacks.detection import benign_clients, calibrate_class_mix, g_trajectories

    labels = load_dataset("digits", seed=0).base_y.astype(np.int64)
    result = calibrate_class_mix(labels, 10, clients=5, per_client=400, seed=3)
    counts = np.bincount(labels, minlength=10)
    assert result["prior"] == pytest.approx((counts + 0.5) / (len(labels) + 5), abs=1e-6)
    assert (result["answers"], result["clients"], result["per_client"]) == (len(labels), 5, 400)
    g = g_trajectories(benign_clients(labels, 5, 400, 3), 10, np.array(result["prior"]))
    assert max(np.nanmax(t) for t in g) == pytest.approx(result["max_g"])
    assert result["max_g"] < result["threshold"] <= result["max_g"] + 0.5
    assert result["threshold"] * 2 == int(result["threshold"] * 2)  # the 0.5 grid


@pytest.mark.parametrize("labels, message", [
    (np.zeros((3, 2), np.int64), r"class indices, got shape \[3, 2\]"),
    (np.array([0.5, 1.0]), "of float64"),
    (np.array([0, 12]), r"in \[0, 10\), got 0 to 12"),
    (np.zeros(10, np.int64), "has 10 answers: the class mix scores from 50"),
])
def test_a_bad_calibration_stream_names_what_is_wrong(labels, message):
    from stealguard.attacks.detection import calibrate_class_mix

    with pytest.raises(ValueError, match=message):
        calibrate_class_mix(labels, 10)


def test_calibrate_detector_prints_model_server_yaml_from_probability_rows(tmp_path):
    import yaml

    rows = _digits_rows()
    path = tmp_path / "answers.npy"
    np.save(path, rows)
    done = subprocess.run([script("stealguard-attack"), "calibrate-detector", "--answers",
                           str(path), "--clients", "4", "--per-client", "300"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    settings = yaml.safe_load(done.stdout)
    assert settings["detect"] == "classmix" and len(settings["detect_prior"]) == 10
    assert settings["detect_threshold"] > 0
    assert sum(settings["detect_prior"]) == pytest.approx(1, abs=1e-4)
    bad = subprocess.run([script("stealguard-attack"), "calibrate-detector", "--answers",
                          str(tmp_path / "missing.npy")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--answers" in bad.stderr
