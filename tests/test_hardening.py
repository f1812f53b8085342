"""Production hardening of the sidecar: TLS, mTLS, tokens, limits, drain, reload, metrics."""

from __future__ import annotations

import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from _certs import make_pki
from _procs import free_port, start_sidecar
from stealguard.client import DefenseClient, SidecarError, channel_credentials
from stealguard.server.codec import array_to_tensor
from stealguard.v1 import defense_pb2, defense_pb2_grpc

ROWS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def wait_tls_healthy(process, address, credentials, timeout=180.0):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.popen.poll() is None, process.output()
        with grpc.secure_channel(address, credentials) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    raise TimeoutError(process.output())


def test_tls_call_succeeds_and_plaintext_fails(pki):
    port = free_port()
    address = f"127.0.0.1:{port}"
    process, _ = start_sidecar("--tls-cert", pki.path("server.pem"),
                               "--tls-key", pki.path("server.key"), port=port, wait=False)
    try:
        tls = channel_credentials(tls_ca=pki.path("ca.pem"))
        wait_tls_healthy(process, address, tls)
        assert DefenseClient(address, timeout=10, credentials=tls).perturb(ROWS).shape == (2, 3)
        with pytest.raises(SidecarError) as error:
            DefenseClient(address, timeout=3).perturb(ROWS)
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        process.stop()


@pytest.fixture(scope="module")
def guarded(pki, tmp_path_factory):
    """mTLS + tokens + a rate limit + metrics on one sidecar."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text("# name:token\nshop:s3cret-shop\nlimited:s3cret-limited\n"
                      "streamer:s3cret-streamer\n")
    port, metrics_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    process, _ = start_sidecar(
        "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key"),
        "--tls-ca", pki.path("ca.pem"), "--token-file", str(tokens),
        # rows: 2/s, 7 at once = opening a stream (1) and three calls of ROWS (2 rows each)
        "--rate-limit", "2", "--rate-burst", "7", "--metrics-port", str(metrics_port),
        "--metrics-per-client",
        port=port, wait=False)
    mtls = channel_credentials(pki.path("ca.pem"), pki.path("client.pem"), pki.path("client.key"))
    wait_tls_healthy(process, address, mtls)
    yield address, mtls, metrics_port
    process.stop()


def test_mtls_call_with_token_succeeds(guarded):
    address, mtls, _ = guarded
    client = DefenseClient(address, timeout=10, credentials=mtls, token="s3cret-shop")
    assert client.perturb(ROWS).shape == (2, 3)


def test_client_certificate_from_another_ca_is_refused(guarded, pki):
    address, _, _ = guarded
    rogue = channel_credentials(pki.path("ca.pem"), pki.path("rogue.pem"), pki.path("rogue.key"))
    with pytest.raises(SidecarError) as error:
        DefenseClient(address, timeout=3, credentials=rogue, token="s3cret-shop").perturb(ROWS)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_no_client_certificate_is_refused_under_mtls(guarded, pki):
    address, _, _ = guarded
    tls_only = channel_credentials(pki.path("ca.pem"))
    with pytest.raises(SidecarError) as error:
        DefenseClient(address, timeout=3, credentials=tls_only, token="s3cret-shop").perturb(ROWS)
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_unauthenticated(guarded, token):
    address, mtls, _ = guarded
    with pytest.raises(SidecarError) as error:
        DefenseClient(address, timeout=10, credentials=mtls, token=token).perturb(ROWS)
    assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in error.value.details


def test_rate_limit_per_client_is_resource_exhausted(guarded):
    address, mtls, _ = guarded
    client = DefenseClient(address, timeout=10, credentials=mtls, token="s3cret-limited")
    codes = []
    for _ in range(6):  # 2 rows each, burst 7, 2/s: the 4th to 6th in a quick row are refused
        try:
            client.perturb(ROWS)
            codes.append("OK")
        except SidecarError as error:
            codes.append(error.code.name)
            assert ("principal 'limited' is over its limit for a call of 2 rows: "
                    "rate 2 rows/s (burst 7)") in error.details
    assert codes[:3] == ["OK"] * 3 and "RESOURCE_EXHAUSTED" in codes[3:]
    # another client is not affected
    other = DefenseClient(address, timeout=10, credentials=mtls, token="s3cret-shop")
    assert other.perturb(ROWS).shape == (2, 3)


def test_every_message_of_a_stream_is_charged_to_the_rate_limit_and_counted(guarded):
    """A stream is one call but many queries: it must not carry unmetered ones."""
    address, mtls, metrics_port = guarded
    request = defense_pb2.PerturbRequest(probabilities=array_to_tensor(ROWS))
    with grpc.secure_channel(address, mtls) as channel:
        replies = defense_pb2_grpc.DefenseStub(channel).PerturbStream(
            iter([request] * 6), metadata=(("authorization", "Bearer s3cret-streamer"),),
            timeout=10)
        answered = []
        with pytest.raises(grpc.RpcError) as error:
            for reply in replies:  # 1 row to open, 2 a message: the 4th message is refused
                answered.append(reply)
    assert len(answered) == 3
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "principal 'streamer' is over its limit" in error.value.details()
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    assert 'stealguard_client_queries_total{client="streamer"} 3.0' in text.decode()


def test_metrics_count_requests_rows_clients_and_distortion(guarded):
    address, mtls, metrics_port = guarded
    DefenseClient(address, timeout=10, credentials=mtls, token="s3cret-shop").perturb(ROWS)
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    text = text.decode()
    assert 'stealguard_requests_total{code="OK",method="Perturb",policy="default"}' in text
    assert 'stealguard_client_queries_total{client="shop"}' in text
    assert 'stealguard_client_rows_total{client="shop"}' in text
    assert 'stealguard_l1_distortion_total{policy="default"}' in text
    assert "stealguard_request_seconds_bucket" in text
    assert "stealguard_in_flight" in text


@pytest.fixture(scope="module")
def limited():
    process, address = start_sidecar("--max-rows", "4", "--max-message-bytes", "4096",
                                     "--max-in-flight", "1")
    # With one call in flight allowed, the health check that found it SERVING may still
    # hold the slot on a loaded machine: wait until a plain call is answered.
    deadline = time.monotonic() + 60
    while True:
        try:
            with DefenseClient(address, timeout=10) as client:
                client.perturb(ROWS)
            break
        except SidecarError as error:
            if error.code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield address
    process.stop()


def test_too_many_rows_is_resource_exhausted(limited):
    with pytest.raises(SidecarError) as error:
        DefenseClient(limited, timeout=10).perturb(np.full((5, 2), 0.5, np.float32))
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "5 rows: at most 4 per request" in error.value.details


def test_too_large_message_is_resource_exhausted(limited):
    big = np.full((2, 1000), 0.001, np.float32)  # 8 kB > 4096 bytes
    with pytest.raises(SidecarError) as error:
        DefenseClient(limited, timeout=10).perturb(big)
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_calls_beyond_max_in_flight_are_refused_at_once(limited):
    channel = grpc.insecure_channel(limited)
    stub = defense_pb2_grpc.DefenseStub(channel)
    hold = threading.Event()

    def requests():  # an open stream is one call in flight until it ends
        yield defense_pb2.PerturbRequest(probabilities=array_to_tensor(ROWS))
        hold.wait(10)

    stream = stub.PerturbStream(requests(), timeout=20)
    next(stream)  # the stream is now open on the server
    try:
        start = time.monotonic()
        with pytest.raises(SidecarError) as error:
            DefenseClient(limited, timeout=10).perturb(ROWS)
        assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - start < 5  # refused, not queued
    finally:
        hold.set()
        list(stream)
        channel.close()
    # the slot frees once the server has finished the stream, which on a busy machine may
    # be a moment after the client saw it end
    deadline = time.monotonic() + 20
    while True:
        try:
            assert DefenseClient(limited, timeout=10).perturb(ROWS).shape == (2, 3)
            break
        except SidecarError as error:
            if error.code != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _load(address, stop, results, rows=ROWS):
    """Call Perturb until `stop`; record (start time, status) of each call."""
    client = DefenseClient(address, timeout=10)
    while not stop.is_set():
        start = time.monotonic()
        try:
            client.perturb(rows)
            results.append((start, "OK"))
        except SidecarError as error:
            results.append((start, error.code.name))


def test_drain_under_load_loses_no_call_in_flight():
    process, address = start_sidecar("--grace", "5")
    # batches big enough (a few ms each) that calls are in flight when SIGTERM lands
    rows = np.random.default_rng(0).dirichlet(np.ones(100), size=5000).astype(np.float32)
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(address, stop, results, rows))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    sigterm = time.monotonic()
    code = process.stop(signal.SIGTERM)
    stop.set()
    for thread in threads:
        thread.join()
    assert code == 0
    output = process.output()
    # every call whose handler was running at SIGTERM finished within the grace period
    assert "draining:" in output and "drained: every call in flight finished" in output
    # calls sent around SIGTERM either completed or were refused before being served
    # (UNAVAILABLE from the draining servicer, CANCELLED by gRPC for calls not yet
    # dispatched to a handler): nothing else, and never an answer cut short
    begun_before = [status for start, status in results if start < sigterm]
    assert begun_before.count("OK") > 4
    assert set(begun_before) <= {"OK", "UNAVAILABLE", "CANCELLED"}
    assert {status for start, status in results if start >= sigterm} <= {
        "OK", "UNAVAILABLE", "CANCELLED"}


def test_sighup_swaps_policies_under_load_with_zero_errors(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text("policies:\n  default: {defense: reverse_sigmoid, beta: 1.5, gamma: 0.3}\n")
    process, address = start_sidecar("--config", str(config))
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(address, stop, results)) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        config.write_text(
            "policies:\n  default: {defense: none}\n  extra: {defense: top_k, k: 2}\n"
        )
        process.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        client = DefenseClient(address, timeout=10)
        while time.monotonic() < deadline:
            if {p["name"] for p in client.policies()} == {"default", "extra"}:
                break
            time.sleep(0.1)
        np.testing.assert_array_equal(client.perturb(ROWS), ROWS)  # `none` now
        # a broken config is rejected and the current policies stay
        config.write_text("policies:\n  default: {defense: no_such_defense}\n")
        process.popen.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert {p["name"] for p in client.policies()} == {"default", "extra"}
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        process.stop()
    assert len(results) > 0 and {status for _, status in results} == {"OK"}
    assert "new config rejected, old policies stay" in process.output()


def test_callers_cannot_add_per_client_series_without_end():
    """Behind a gateway (--trust-client-header) a client is named by x-client-id: past
    MAX_CLIENT_SERIES names, new ones share one series, so /metrics and memory stay
    bounded."""
    from stealguard.server.platform.metrics import MAX_CLIENT_SERIES, OTHER_CLIENTS

    metrics_port = free_port()
    process, address = start_sidecar("--metrics-port", str(metrics_port),
                                     "--trust-client-header", "--metrics-per-client")
    extra = 25
    try:
        request = defense_pb2.PerturbRequest(probabilities=array_to_tensor(ROWS))
        with grpc.insecure_channel(address) as channel:
            perturb = defense_pb2_grpc.DefenseStub(channel).Perturb
            for i in range(MAX_CLIENT_SERIES + extra):
                perturb(request, metadata=(("x-client-id", f"rotating-{i}"),), timeout=10)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                      timeout=10).read().decode()
    finally:
        process.stop()
    per_call = {"stealguard_client_queries_total": 1, "stealguard_client_rows_total": len(ROWS)}
    for family, count in per_call.items():
        series = [line for line in text.splitlines() if line.startswith(family + "{")]
        assert len(series) == MAX_CLIENT_SERIES + 1, family
        assert f'{family}{{client="rotating-0"}} {float(count)}' in series
        assert f'{family}{{client="{OTHER_CLIENTS}"}} {float(count * extra)}' in series
