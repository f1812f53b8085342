"""The real `stealguard-sidecar`, started as a process on loopback ports."""

from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np
import pytest
from _defenses_helpers import default_defense
from _procs import Process, free_port, health_status, script, start_sidecar
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from stealguard.client import DefenseClient, SidecarError
from stealguard.server.codec import array_to_tensor, tensor_to_array
from stealguard.server.defenses import make_defense
from stealguard.v1 import defense_pb2, defense_pb2_grpc

ROWS = np.array(
    [[0.12109935, 0.0498215, 0.0993958, 0.06410096, 0.11366928, 0.04645343, 0.06419807,
      0.30685693, 0.07616714, 0.05823757],
     [0.91, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]],
    dtype=np.float32,
)
ROWS = ROWS / ROWS.sum(axis=1, keepdims=True)


def stub(address):
    return defense_pb2_grpc.DefenseStub(grpc.insecure_channel(address))


def call(address, request):
    return stub(address).Perturb(request, timeout=10)


def request(array, model="", **kw):
    return defense_pb2.PerturbRequest(probabilities=array_to_tensor(array), model=model, **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_perturb_equals_the_in_process_defense_bit_for_bit(sidecar, dtype):
    rows = ROWS.astype(dtype)
    reply = call(sidecar, request(rows, request_id="r-1"))
    expected = default_defense()(rows)
    got = tensor_to_array(reply.probabilities)
    assert got.dtype == dtype and got.shape == rows.shape
    assert got.tobytes() == expected.tobytes()
    assert reply.policy == "default" and reply.request_id == "r-1"
    assert (got.argmax(axis=1) == rows.argmax(axis=1)).all()
    assert not np.allclose(got, rows, atol=1e-3)


def test_logits_are_softmaxed_before_the_defense(sidecar):
    logits = np.log(ROWS.astype(np.float64)) + 3.0
    reply = call(sidecar, request(logits, logits=True))
    expected = default_defense()(ROWS.astype(np.float64))
    # softmax(logits) equals ROWS up to rounding, so the keyed rest may differ; the label
    # and the served confidence level may not
    got = tensor_to_array(reply.probabilities)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(got.max(1), expected.max(1), atol=1e-9)


def test_one_row_keeps_its_one_dimensional_shape(sidecar):
    reply = call(sidecar, request(ROWS[0]))
    assert list(reply.probabilities.shape) == [10]


def test_empty_batch_is_answered_with_an_empty_batch(sidecar):
    reply = call(sidecar, request(np.zeros((0, 10), np.float32)))
    assert list(reply.probabilities.shape) == [0, 10] and reply.probabilities.data == b""


def test_stream_answers_every_request_in_order(sidecar):
    batches = [ROWS[i % 2 : i % 2 + 1] * 1.0 for i in range(5)]
    requests = [request(b, request_id=str(i)) for i, b in enumerate(batches)]
    replies = list(stub(sidecar).PerturbStream(iter(requests), timeout=10))
    assert [r.request_id for r in replies] == ["0", "1", "2", "3", "4"]
    defense = default_defense()
    for batch, reply in zip(batches, replies, strict=True):
        assert tensor_to_array(reply.probabilities).tobytes() == defense(batch).tobytes()


def test_stream_error_names_the_message_index(sidecar):
    bad = defense_pb2.PerturbRequest(probabilities=defense_pb2.Tensor(shape=[2], data=b""))
    with pytest.raises(grpc.RpcError) as error:
        list(stub(sidecar).PerturbStream(iter([request(ROWS), bad]), timeout=10))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("stream message 1: probabilities.dtype")


def test_stream_with_keep_stream_on_error_answers_a_bad_message_and_goes_on(sidecar):
    good = [request(ROWS, request_id=str(i)) for i in range(3)]
    for r in good:
        r.keep_stream_on_error = True
    bad = defense_pb2.PerturbRequest(probabilities=array_to_tensor(ROWS * 2),
                                     request_id="bad", keep_stream_on_error=True)
    replies = list(stub(sidecar).PerturbStream(iter([good[0], bad, good[1], good[2]]),
                                               timeout=10))
    assert [r.request_id for r in replies] == ["0", "bad", "1", "2"]
    refused = replies[1]
    assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert refused.error.message.startswith("stream message 1: ") and "row 0" in \
        refused.error.message
    assert not refused.HasField("probabilities") and refused.policy == ""
    expected = default_defense()(ROWS).tobytes()
    for reply in (replies[0], *replies[2:]):
        assert not reply.HasField("error")
        assert tensor_to_array(reply.probabilities).tobytes() == expected


def test_list_policies_reports_the_default_policy(sidecar):
    policies = DefenseClient(sidecar).policies()
    assert policies == [{"name": "default", "defense": "coarse_confidence",
                         "params": default_defense().params}]
    assert not any("secret" in key or "key" in key for key in policies[0]["params"])


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (defense_pb2.Tensor(shape=[2], data=b"\0" * 8), "dtype is DTYPE_UNSPECIFIED"),
        (defense_pb2.Tensor(shape=[2, 2], dtype=1, data=b"\0" * 12),
         "has 12 bytes but shape [2, 2] of float32 needs 16"),
        (defense_pb2.Tensor(shape=[1, 1, 2], dtype=1, data=b"\0" * 8),
         "expected [classes] or [rows, classes]"),
    ],
)
def test_malformed_tensors_are_invalid_argument(sidecar, tensor, message):
    with pytest.raises(grpc.RpcError) as error:
        call(sidecar, defense_pb2.PerturbRequest(probabilities=tensor))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_nan_row_is_rejected_with_row_index(sidecar):
    rows = ROWS.copy()
    rows[1, 3] = np.nan
    with pytest.raises(grpc.RpcError) as error:
        call(sidecar, request(rows))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 1" in error.value.details() and "nan" in error.value.details().lower()


def test_row_that_does_not_sum_to_one_is_rejected_with_row_index(sidecar):
    rows = ROWS.copy()
    rows[0] *= 1.5
    with pytest.raises(SidecarError) as error:
        DefenseClient(sidecar).perturb(rows)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 0" in error.value.details


def test_reflection_lists_the_defense_service(sidecar):
    channel = grpc.insecure_channel(sidecar)
    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"stealguard.v1.Defense", "grpc.health.v1.Health"} <= names


def test_policies_from_file_env_and_flags(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "policies:\n"
        "  default: {defense: reverse_sigmoid, beta: 1.0, gamma: 0.5}\n"
        "  mnist-open: {defense: none}\n"
        "  shop: {defense: top_k, k: 3}\n"
    )
    env = {"STEALGUARD_CONFIG": str(config), "STEALGUARD_BETA": "2.0"}
    process, address = start_sidecar("--gamma", "0.25", env=env)
    try:
        client = DefenseClient(address, timeout=10)
        policies = {p["name"]: p for p in client.policies()}
        assert policies["default"]["params"]["beta"] == 2.0  # env over file
        assert policies["default"]["params"]["gamma"] == 0.25  # flag over file
        assert policies["shop"] == {"name": "shop", "defense": "top_k", "params": {"k": 3.0}}
        # the request's model picks its policy; other models get the default one
        assert client.perturb(ROWS, model="mnist-open").tobytes() == ROWS.tobytes()
        expected = make_defense("reverse_sigmoid", beta=2.0, gamma=0.25)(ROWS)
        assert client.perturb(ROWS, model="anything").tobytes() == expected.tobytes()
    finally:
        assert process.stop() == 0


def test_unknown_model_without_default_policy_is_not_found(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text("policies:\n  mnist: {defense: reverse_sigmoid}\n")
    process, address = start_sidecar("--config", str(config))
    try:
        with pytest.raises(SidecarError) as error:
            DefenseClient(address, timeout=10).perturb(ROWS, model="cifar")
        assert error.value.code == grpc.StatusCode.NOT_FOUND
        assert "no policy for model 'cifar' and no default policy" in error.value.details
    finally:
        process.stop()


def test_health_is_not_serving_until_kernels_are_warm(sidecar):
    # `sidecar` first: its start filled numba's cache, so this start only loads kernels,
    # which still takes long enough (tens of ms at least) to be seen NOT_SERVING
    port = free_port()
    address = f"127.0.0.1:{port}"
    process, _ = start_sidecar(port=port, wait=False)
    try:
        seen = set()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = health_status(address, "stealguard.v1.Defense")
            seen.add(status)
            if status == "NOT_SERVING":
                try:  # a bare stub: the client library would retry UNAVAILABLE
                    call(address, request(ROWS))
                except grpc.RpcError as error:
                    seen.add(error.code().name + ": " + error.details())
            if status == "SERVING":
                break
            time.sleep(0.01)
        assert "NOT_SERVING" in seen and status == "SERVING", process.output()
        refusals = {s for s in seen if s.startswith("UNAVAILABLE: ")}
        assert refusals and all("the sidecar is warming up its kernels" in s
                                and s.endswith("; retry shortly") for s in refusals), seen
        assert DefenseClient(address, timeout=10).perturb(ROWS).shape == ROWS.shape
    finally:
        process.stop()


def _listening_pids(port: int) -> set[int]:
    """PIDs with a listening socket on `port` (from /proc, no extra tools)."""
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC may bind a v4-mapped v6 socket
        with open(name) as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}:
                    pids.add(int(pid))
        except OSError:
            continue
    return pids


def _two_free_ports() -> int:
    """A port p such that p and p + 1 are both free now (worker i serves metrics on p + i)."""
    import socket

    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def _answered(metrics_port: int) -> float:
    """Perturb calls this worker answered, from its own /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("stealguard_requests_total{") and 'method="Perturb"' in line)


def test_two_workers_serve_one_port_from_two_pids():
    """Each worker counts the calls it answered on its own metrics port, so the test
    asserts who answered, not CPU time (which a loaded machine blurs). New connections
    are opened until both have answered: SO_REUSEPORT spreads them by a hash, so the
    number needed is random, but 400 all landing on one worker has odds of 2^-399."""
    metrics_port = _two_free_ports()
    process, address = start_sidecar("--workers", "2", "--metrics-port", str(metrics_port))
    try:
        deadline = time.monotonic() + 180  # health answered by one worker; wait for both
        while process.output().count("ready: kernels warm") < 2:
            assert time.monotonic() < deadline, process.output()
            time.sleep(0.1)
        port = int(address.rsplit(":", 1)[1])
        workers = _listening_pids(port)
        assert len(workers) == 2 and process.pid not in workers
        answered = [0.0, 0.0]
        for _ in range(400):  # new connections spread over the SO_REUSEPORT group
            # a channel of its own (not gRPC's shared subchannel): a new TCP connection
            with grpc.insecure_channel(
                    address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                defense_pb2_grpc.DefenseStub(channel).Perturb(request(ROWS), timeout=10)
            answered = [_answered(metrics_port + i) for i in range(2)]
            if all(answered):
                break
        assert all(count > 0 for count in answered), answered
    finally:
        assert process.stop() == 0


def test_sigterm_and_sigint_stop_cleanly():
    for sig in (signal.SIGTERM, signal.SIGINT):
        process, address = start_sidecar()
        assert DefenseClient(address, timeout=10).perturb(ROWS).shape == ROWS.shape
        assert process.stop(sig) == 0
        assert "stopped" in process.output()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers: must be at least 1"),
        (["--beta", "x"], "argument --beta: invalid float value"),
        (["--defense", "nope"], "policy 'default'"),
        (["--beta", "-1"], "beta"),
    ],
)
def test_bad_flags_are_one_line_errors_with_exit_code_2(args, message):
    process = Process([script("stealguard-sidecar"), "--listen", "127.0.0.1:0", *args])
    assert process.popen.wait(60) == 2
    output = process.output()
    assert message in output and "Traceback" not in output
