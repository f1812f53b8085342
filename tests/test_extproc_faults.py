"""The external processor killed, stalled (SIGSTOP) and restarted while a load runs through
real Envoy to real MLServer: every answer is the protected one, label-only, or an error —
never the upstream's raw probabilities (fail closed, `failure_mode_allow: false`)."""

from __future__ import annotations

import json
import signal
import threading
import time

import numpy as np
from _extproc_helpers import MLSERVER_MODEL, Envoy, MLServer, post_json
from _procs import free_port, start_sidecar
from stealguard.client import DefenseClient
from stealguard.server.extproc.servicer import LABEL_ONLY_HEADER

IRIS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5],
        [6.3, 2.8, 5.1, 1.5], [4.9, 3.1, 1.5, 0.1], [6.0, 2.2, 5.0, 1.5]]
PATH = f"/v2/models/{MLSERVER_MODEL}/infer"
MAX_REQUESTS = 3000  # per load thread: bounded whatever the timing


def _request(index: int) -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64",
                        "data": IRIS[index]}], "outputs": [{"name": "predict_proba"}]}


def _probabilities(body: bytes) -> np.ndarray:
    return np.array(json.loads(body)["outputs"][0]["data"], dtype=np.float64)


def _load(url: str, stop: threading.Event, seen: list, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(MAX_REQUESTS):
        if stop.is_set():
            return
        index = int(rng.integers(len(IRIS)))
        status, headers, body = post_json(url + PATH, _request(index), timeout=10)
        seen.append((index, status, headers, body))


def test_killed_stalled_and_restarted_processor_never_lets_a_raw_vector_through(tmp_path):
    port = free_port()
    sidecar, address = start_sidecar(port=port)
    mlserver = envoy = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    seen: list = []
    try:
        mlserver = MLServer(tmp_path)
        mlserver_address = mlserver.rest.removeprefix("http://")
        envoy = Envoy(tmp_path, {"stealguard": address, "torchserve_rest": mlserver_address,
                                 "kserve_v1": mlserver_address,
                                 "torchserve_grpc": mlserver.grpc,
                                 "v2_rest": mlserver_address, "v2_grpc": mlserver.grpc})
        raw = []
        for index in range(len(IRIS)):
            status, _, body = post_json(envoy.raw_url + PATH, _request(index))
            assert status == 200
            raw.append(_probabilities(body))
        with DefenseClient(address, timeout=10) as defense:
            protected = [defense.perturb(r, model=MLSERVER_MODEL) for r in raw]

        threads = [threading.Thread(target=_load, args=(envoy.url, stop, seen, seed))
                   for seed in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        sidecar.stop(signal.SIGKILL)
        time.sleep(1.0)
        sidecar, _ = start_sidecar(port=port)  # warm-up happens under the load
        time.sleep(1.0)
        sidecar.popen.send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        sidecar.popen.send_signal(signal.SIGCONT)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        for process in (envoy, mlserver):
            if process is not None:
                process.stop()
        sidecar.popen.send_signal(signal.SIGCONT)
        sidecar.stop()

    outcomes = {"protected": 0, "label-only": 0, "error": 0}
    for index, status, headers, body in seen:
        if status != 200:
            outcomes["error"] += 1
            assert b"predict_proba" not in body  # an error, not an answer
            continue
        answer = _probabilities(body) if "outputs" in json.loads(body) else None
        assert answer is not None
        assert not np.allclose(answer, raw[index], rtol=0, atol=1e-9), "a raw vector passed"
        if LABEL_ONLY_HEADER in headers:
            outcomes["label-only"] += 1
            np.testing.assert_array_equal(answer, np.eye(3)[raw[index].argmax()])
        else:
            outcomes["protected"] += 1
            np.testing.assert_array_equal(answer, protected[index])
    print("outcomes under the faults:", outcomes)
    assert outcomes["protected"] > 0
    assert outcomes["error"] + outcomes["label-only"] > 0  # the faults were seen
