"""Metering in real sidecar processes sharing a real Valkey: one principal's budget holds
across processes, workers and restarts; the attacks of issue 17, re-run, are refused."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from _modelserver_helpers import (
    STARTUP_TIMEOUT,
    TorchServeClient,
    mnist_test_images,
    npy_bytes,
    start_modelserver,
)
from _procs import free_port, script, start_sidecar
from _proxy_helpers import digits_samples, npy, start_proxy, start_upstream
from _status_details import details_of
from _valkey import Valkey
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc
from stealguard.modelserver.training import trained_model
from stealguard.server.codec import array_to_tensor
from stealguard.v1 import defense_pb2, defense_pb2_grpc

ONE_ROW = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)


def request(rows=ONE_ROW, **fields) -> defense_pb2.PerturbRequest:
    return defense_pb2.PerturbRequest(probabilities=array_to_tensor(rows), **fields)


def call(address: str, rows=ONE_ROW, metadata=(), **fields):
    """One Perturb: the status code and the error (None when OK)."""
    with grpc.insecure_channel(address) as channel:
        try:
            defense_pb2_grpc.DefenseStub(channel).Perturb(request(rows, **fields),
                                                          metadata=metadata, timeout=10)
            return grpc.StatusCode.OK, None
        except grpc.RpcError as error:
            return error.code(), error


@pytest.fixture()
def valkey(tmp_path):
    server = Valkey(tmp_path / "valkey").start()
    yield server
    server.stop()


def wait_serving(channel, timeout: float = 300.0) -> None:
    """Wait until the process behind this channel's connection is SERVING (with
    --workers, the worker it reached may still be warming up when another one serves)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub, deadline = health_pb2_grpc.HealthStub(channel), time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise TimeoutError("not SERVING")


def refused_streams(streams, expected: int) -> int:
    """How many of `streams` ended RESOURCE_EXHAUSTED, once `expected` of them ended (the
    refusals come back at once, as each stream opens; 30 s at most)."""
    for _ in range(300):
        ended = [s for s in streams if s.done()]
        if len(ended) >= expected:
            break
        threading.Event().wait(0.1)
    return sum(1 for s in ended if s.code() is grpc.StatusCode.RESOURCE_EXHAUSTED)


def metered(valkey, *flags):
    return ("--store", valkey.url, *flags)


def test_one_principal_across_two_sidecars_and_two_workers_gets_its_quota_once(valkey):
    # 200/1h is below the size that gets a lease (1/256 of the quota), so the stated
    # slack is 0 rows: exactly 200 admitted, however the calls are spread
    flags = metered(valkey, "--quota", "200/1h")
    first, a = start_sidecar(*flags)
    second, b = start_sidecar(*flags)
    port = free_port()
    workers, c = start_sidecar(*flags, "--workers", "2", port=port)
    try:
        channels = [grpc.insecure_channel(x) for x in (a, b, c, c, c)]
        for channel in channels:  # each connection reaches one worker: wait for that one
            wait_serving(channel)
        admitted = refused = 0
        for i in range(400):
            stub = defense_pb2_grpc.DefenseStub(channels[i % len(channels)])
            try:
                stub.Perturb(request(), metadata=[("x-client-id", f"rotating-{i}")],
                             timeout=10)
                admitted += 1
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                refused += 1
        for channel in channels:
            channel.close()
    finally:
        for process in (first, second, workers):
            process.stop()
    assert (admitted, refused) == (200, 200)


def test_a_gateway_token_gets_one_budget_per_end_client(valkey, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("modelserver:gw-secret:gateway\nplain:plain-secret\n")
    process, address = start_sidecar(*metered(valkey, "--quota", "3/1h", "--token-file",
                                              str(tokens)))
    try:
        gateway = [("authorization", "Bearer gw-secret")]
        codes = {name: [call(address, metadata=gateway, principal=name)[0]
                        for _ in range(4)] for name in ("alice", "bob")}
        plain = [("authorization", "Bearer plain-secret")]
        rotating = [call(address, metadata=plain, principal=f"user-{i}")[0]
                    for i in range(4)]
    finally:
        process.stop()
    ok, over = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
    assert codes == {"alice": [ok, ok, ok, over], "bob": [ok, ok, ok, over]}
    assert rotating == [ok, ok, ok, over]  # a plain token cannot assert end clients


def test_a_65536_row_call_costs_65536_rows(valkey):
    process, address = start_sidecar(*metered(valkey, "--quota", "100000/1d"))
    rows = np.full((65536, 2), 0.5, dtype=np.float32)
    try:
        first = call(address, rows)[0]
        second, refused = call(address, rows)
    finally:
        process.stop()
    usage = subprocess.run([script("stealguard-sidecar"), "usage", "--store", valkey.url,
                            "--format", "json"], capture_output=True, text=True, timeout=60)
    assert (first, second) == (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert [u["rows"] for u in json.loads(usage.stdout)] == [65536]
    quota, retry = details_of(refused)
    assert quota.violations[0].subject == "principal:peer:127.0.0.1"
    assert "100000 rows per rolling 1d" in quota.violations[0].description
    assert retry.retry_delay.seconds > 86000


def test_a_restarted_sidecar_remembers_the_quota(valkey):
    flags = metered(valkey, "--quota", "5/1h")
    process, address = start_sidecar(*flags)
    spent = [call(address)[0] for _ in range(5)]
    process.stop()
    port = int(address.rsplit(":", 1)[1])
    process, address = start_sidecar(*flags, port=port)
    try:
        after = call(address)[0]
    finally:
        process.stop()
    assert spent == [grpc.StatusCode.OK] * 5
    assert after is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_store_killed_fails_closed_naming_it_then_recovers(valkey):
    # a burst of 10 gets no lease (1/16 of it is 0): every call asks the store
    process, address = start_sidecar(*metered(valkey, "--rate-limit", "10"))
    try:
        before = call(address)[0]
        valkey.stop()
        down, error = call(address)
        valkey.start()
        after = grpc.StatusCode.UNAVAILABLE
        for _ in range(50):  # retried every 0.5 s: the first success ends the outage
            after = call(address)[0]
            if after is grpc.StatusCode.OK:
                break
            threading.Event().wait(0.1)
    finally:
        process.stop()
    assert (before, down, after) == (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.OK)
    assert valkey.url in error.details()
    assert "metering store" in process.output() and "is back after" in process.output()


def test_an_idle_stream_hog_cannot_starve_honest_callers(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("hog:hog-secret\nhonest:honest-secret\n")
    process, address = start_sidecar("--token-file", str(tokens), "--max-in-flight", "64",
                                     "--max-streams-per-principal", "4",
                                     "--rate-limit", "1000")
    hog = grpc.insecure_channel(address)
    idle = threading.Event()
    streams = []
    try:
        def silent():
            idle.wait()
            return
            yield

        stub = defense_pb2_grpc.DefenseStub(hog)
        for _ in range(100):  # more than max_in_flight
            streams.append(stub.PerturbStream(
                silent(), metadata=[("authorization", "Bearer hog-secret")]))
        honest = [call(address, metadata=[("authorization", "Bearer honest-secret")])[0]
                  for _ in range(20)]
        refused = refused_streams(streams, expected=96)
    finally:
        idle.set()
        for stream in streams:
            stream.cancel()
        hog.close()
        process.stop(signal.SIGTERM)
    assert honest == [grpc.StatusCode.OK] * 20
    assert refused == 96  # all but the hog's 4


def rows_charged(valkey) -> dict[str, int]:
    """Rows per principal in the store, as `stealguard-sidecar usage` reads them."""
    usage = subprocess.run([script("stealguard-sidecar"), "usage", "--store", valkey.url,
                            "--format", "json"], capture_output=True, text=True, timeout=60)
    return {u["principal"]: u["rows"] for u in json.loads(usage.stdout)}


def gateway_stack(valkey, tmp_path, clients: str, *modelserver_flags: str,
                  sidecar_tokens: str = ""):
    """A metered sidecar (quota in `valkey`) whose token file marks the model server's
    token as a gateway's, and a model server whose end clients have the `clients` tokens."""
    trained_model()
    tokens = tmp_path / "sidecar-tokens"
    tokens.write_text("modelserver:ms-secret:gateway\n" + sidecar_tokens)
    token = tmp_path / "token"
    token.write_text("ms-secret\n")
    client_tokens = tmp_path / "client-tokens"
    client_tokens.write_text(clients)
    sidecar, sidecar_address = start_sidecar(
        *metered(valkey, "--quota", "1000/1d", "--token-file", str(tokens)))
    modelserver, address = start_modelserver(
        sidecar_address, tmp_path / "store", "--token-file", str(client_tokens),
        "--sidecar-token-file", str(token), *modelserver_flags)
    return sidecar, sidecar_address, modelserver, address


def test_the_model_server_forwards_each_end_client_to_be_charged_once(valkey, tmp_path):
    sidecar, _, modelserver, address = gateway_stack(
        valkey, tmp_path, "alice:alice-secret\nbob:bob-secret\n", "--metrics-port", "0")
    try:
        modelserver.wait_healthy(address, timeout=STARTUP_TIMEOUT)
        client = TorchServeClient(address)
        batch = npy_bytes(mnist_test_images(3))
        for name, count in (("alice", 2), ("bob", 1)):
            for _ in range(count):
                client.stub.Predictions(client.request("mnist", batch), timeout=30,
                                        metadata=[("authorization", f"Bearer {name}-secret"),
                                                  ("x-client-id", "mallory")])
        client.close()
    finally:
        modelserver.stop()
        sidecar.stop()
    usage = rows_charged(valkey)
    # 3 images a call: alice 2 calls, bob 1 (a plain token's x-client-id is ignored); the
    # model server pays the one row of opening its shared stream
    assert usage == {"alice": 6, "bob": 3, "modelserver": 1}


def test_a_silent_request_stream_is_ended_after_the_idle_timeout():
    process, address = start_sidecar("--stream-idle-timeout", "0.5")
    release = threading.Event()

    def one_then_silence():
        yield request()
        release.wait(30)

    try:
        with grpc.insecure_channel(address) as channel:
            replies = defense_pb2_grpc.DefenseStub(channel).PerturbStream(
                one_then_silence(), timeout=30)
            answered = []
            with pytest.raises(grpc.RpcError) as ended:
                for reply in replies:
                    answered.append(reply)
            release.set()
    finally:
        process.stop()
    assert len(answered) == 1
    assert ended.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no message for 0.5 s (--stream-idle-timeout)" in ended.value.details()


def test_the_model_server_charges_images_to_one_principal_whatever_its_client_header(
        tmp_path):
    trained_model()
    # mnist-open never calls the sidecar: the model server's own meter is what counts
    modelserver, address = start_modelserver(f"127.0.0.1:{free_port()}", tmp_path / "store",
                                             "--quota", "1030/1h", "--metrics-port", "0")
    images = mnist_test_images(1000)  # the held-out test set has 1,000: 24 twice
    one, batch = npy_bytes(images[:1]), npy_bytes(np.concatenate([images, images[:24]]))
    try:
        modelserver.wait_healthy(address, timeout=STARTUP_TIMEOUT)
        client = TorchServeClient(address)

        def predict(data, i):
            try:
                client.stub.Predictions(client.request("mnist-open", data), timeout=60,
                                        metadata=[("x-client-id", f"rotating-{i}")])
                return grpc.StatusCode.OK
            except grpc.RpcError as error:
                return error.code()

        singles = [predict(one, i) for i in range(6)]
        big = predict(batch, 6)
        after = predict(one, 7)
        client.close()
    finally:
        modelserver.stop()
    assert singles == [grpc.StatusCode.OK] * 6
    assert big is grpc.StatusCode.OK  # 1,024 images: 6 + 1,024 = the quota
    assert after is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_proxy_meters_one_principal_and_caps_an_idle_stream_hog(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:alice-secret\nhog:hog-secret\nhonest:honest-secret\n")
    config = tmp_path / "proxy.yaml"
    # 5 rows at once, then one per 100 s: no refill during the test
    config.write_text(f"token_file: {tokens}\nrate_limit: 0.01\nrate_burst: 5\n"
                      "max_streams_per_principal: 2\nmax_in_flight: 32\npolicies:\n"
                      "  default: {defense: reverse_sigmoid}\n")
    upstream, proxy, address, sample = proxied(config)
    channel = grpc.insecure_channel(address)
    stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
    release = threading.Event()
    streams = []

    def predict(token, i=0):
        try:
            stub.Predictions(sample, timeout=30, metadata=[
                ("authorization", f"Bearer {token}"), ("x-client-id", f"rotating-{i}")])
            return "OK"
        except grpc.RpcError as error:
            return error.code().name

    def silent():
        release.wait(30)
        return
        yield

    try:
        rotating = [predict("alice-secret", i) for i in range(10)]
        for _ in range(40):  # more than max_in_flight
            streams.append(stub.StreamPredictions2(
                silent(), metadata=[("authorization", "Bearer hog-secret")]))
        honest = [predict("honest-secret") for _ in range(3)]
        refused = refused_streams(streams, expected=38)
    finally:
        release.set()
        for stream in streams:
            stream.cancel()
        channel.close()
        proxy.stop()
        upstream.stop()
    assert rotating == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"] * 5
    assert honest == ["OK"] * 3
    assert refused == 38  # all but the hog's 2


def test_the_proxy_ends_a_silent_request_stream_after_the_idle_timeout(tmp_path):
    config = tmp_path / "proxy.yaml"
    config.write_text("stream_idle_timeout: 0.5\npolicies:\n"
                      "  default: {defense: reverse_sigmoid}\n")
    upstream, proxy, address, sample = proxied(config)
    release = threading.Event()

    def one_then_silence():
        yield sample
        release.wait(30)

    answered = []
    try:
        with grpc.insecure_channel(address) as channel:
            replies = inference_pb2_grpc.InferenceAPIsServiceStub(channel).StreamPredictions2(
                one_then_silence(), timeout=30)
            with pytest.raises(grpc.RpcError) as ended:
                for reply in replies:
                    answered.append(reply)
            release.set()
    finally:
        proxy.stop()
        upstream.stop()
    assert len(answered) == 1
    assert ended.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "(--stream-idle-timeout)" in ended.value.details()


def proxied(config):
    """A TorchServe-protocol upstream, the proxy in front of it with `config`, and a digits
    sample to ask it about."""
    upstream, upstream_address = start_upstream("torchserve")
    proxy, address = start_proxy("torchserve", upstream_address, str(config))
    sample = inference_pb2.PredictionsRequest(model_name="digits",
                                              input={"data": npy(digits_samples(1)[0])})
    return upstream, proxy, address, sample


def calls_capped(stub, request, stopped, tokens, expected_refused: int):
    """Send one call per token in `tokens` while `stopped` (the process they wait on) is
    SIGSTOPped: the calls beyond each principal's cap are refused at once, the others wait
    holding their slots. Returns each call's final code, in order, once it is resumed."""
    stopped.popen.send_signal(signal.SIGSTOP)
    try:
        futures = [stub.Predictions.future(request, timeout=60, metadata=[
            ("authorization", f"Bearer {token}")]) for token in tokens]
        for _ in range(300):  # the refusals come back at once; 30 s at most
            if sum(f.done() for f in futures) >= expected_refused:
                break
            time.sleep(0.1)
        refused_first = sum(f.done() for f in futures)
    finally:
        stopped.popen.send_signal(signal.SIGCONT)
    codes = [grpc.StatusCode.OK if f.exception() is None else f.exception().code()
             for f in futures]
    assert refused_first == expected_refused, codes
    return codes


def test_the_proxy_caps_each_principals_unary_calls_in_flight(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("hog:hog-secret\nhonest:honest-secret\n")
    config = tmp_path / "proxy.yaml"
    config.write_text(f"token_file: {tokens}\nmax_calls_per_principal: 2\npolicies:\n"
                      "  default: {defense: reverse_sigmoid}\n")
    upstream, proxy, address, sample = proxied(config)
    channel = grpc.insecure_channel(address)
    try:
        codes = calls_capped(inference_pb2_grpc.InferenceAPIsServiceStub(channel), sample,
                             upstream, ["hog-secret"] * 6 + ["honest-secret"],
                             expected_refused=4)
    finally:
        channel.close()
        proxy.stop()
        upstream.stop()
    # two of the hog's calls wait upstream, four are refused; the honest caller is not
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4
    assert codes[-1] == grpc.StatusCode.OK and codes.count(grpc.StatusCode.OK) == 3


def test_the_model_server_caps_each_principals_unary_calls_in_flight(tmp_path):
    trained_model()
    tokens = tmp_path / "tokens"
    tokens.write_text("hog:hog-secret\nhonest:honest-secret\n")
    sidecar, sidecar_address = start_sidecar()
    modelserver, address = start_modelserver(
        sidecar_address, tmp_path / "store", "--token-file", str(tokens),
        "--max-calls-per-principal", "2", "--sidecar-timeout", "50s")
    try:
        modelserver.wait_healthy(address, timeout=STARTUP_TIMEOUT)
        client = TorchServeClient(address)
        request = client.request("mnist", npy_bytes(mnist_test_images(1)))
        # the calls wait on the stopped sidecar (after the forward pass), holding slots
        codes = calls_capped(client.stub, request, sidecar, ["hog-secret"] * 5 +
                             ["honest-secret"], expected_refused=3)
        client.close()
    finally:
        modelserver.stop()
        sidecar.stop()
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 3
    assert codes[-1] == grpc.StatusCode.OK and codes.count(grpc.StatusCode.OK) == 3


def test_limits_on_both_the_model_server_and_its_sidecar_charge_a_query_once(valkey, tmp_path):
    sidecar, sidecar_address, modelserver, address = gateway_stack(
        valkey, tmp_path, "alice:alice-secret\n", *metered(valkey, "--quota", "1000/1d"),
        sidecar_tokens="plain:plain-secret\n")
    try:
        modelserver.wait_healthy(address, timeout=STARTUP_TIMEOUT)
        client = TorchServeClient(address)
        batch = npy_bytes(mnist_test_images(3))
        for _ in range(2):
            client.stub.Predictions(client.request("mnist", batch), timeout=30,
                                    metadata=[("authorization", "Bearer alice-secret")])
        client.close()
        # a caller that is not a gateway cannot skip the charge by saying so
        rows = np.full((4, 10), 0.1, np.float32)
        with grpc.insecure_channel(sidecar_address) as channel:
            defense_pb2_grpc.DefenseStub(channel).Perturb(
                defense_pb2.PerturbRequest(probabilities=array_to_tensor(rows), charged=True,
                                           principal="alice"),
                timeout=30, metadata=[("authorization", "Bearer plain-secret")])
    finally:
        modelserver.stop()
        sidecar.stop()
    usage = rows_charged(valkey)
    # alice's 6 images charged once, by the model server; the sidecar charged the model
    # server's one row for opening its stream and the plain caller its own 4 rows
    assert usage == {"alice": 6, "modelserver": 1, "plain": 4}
