"""The model server's TorchServe REST API (`/predictions/{model}[/{version}]`, `/ping`):
a real model server calling the session's sidecar, on loopback ports, stopped by PID; the
same answers as its gRPC API, JSON errors, bearer tokens, and the REST oracle."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from email.message import Message

import numpy as np
import pytest
from _defenses_helpers import assert_protected_like
from _modelserver_helpers import (
    STARTUP_TIMEOUT,
    TorchServeClient,
    mnist_test_images,
    npy_bytes,
    png_bytes,
    start_modelserver,
)
from _procs import free_port
from stealguard.attacks.oracles import OracleError, RestOracle, remote_oracle
from stealguard.client import DefenseClient
from stealguard.modelserver.training import trained_model

MAX_MESSAGE_BYTES = 1 << 20


@pytest.fixture(scope="module")
def server(sidecar, tmp_path_factory):
    """(REST base URL, gRPC address): a model server with both APIs on."""
    trained_model()  # the default model, cached once per machine
    port = free_port()
    process, address = start_modelserver(sidecar, tmp_path_factory.mktemp("store"),
                                         "--http-port", str(port),
                                         "--max-message-bytes", str(MAX_MESSAGE_BYTES))
    try:
        process.wait_healthy(address, timeout=STARTUP_TIMEOUT)
        yield f"http://127.0.0.1:{port}", address
    finally:
        assert process.stop() == 0, process.output()


@pytest.fixture(scope="module")
def images():
    return mnist_test_images(4)


def call(url: str, data: bytes | None = None, *, method: str = "POST",
         headers: dict | None = None) -> tuple[int, Message, bytes]:
    """(status, headers (case-insensitive), body) of one HTTP request, errors included."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def predict(base: str, model: str, data: bytes, **options) -> np.ndarray:
    status, _, body = call(f"{base}/predictions/{model}", data, **options)
    assert status == 200, body
    return np.asarray(json.loads(body), np.float64)


def test_rest_answers_are_the_sidecars_perturbation_and_equal_the_grpc_answers(
        server, sidecar, images):
    base, address = server
    data = npy_bytes(images)
    raw = predict(base, "mnist-open", data)
    protected = predict(base, "mnist", data)
    assert raw.shape == protected.shape == (4, 10)
    with DefenseClient(sidecar, timeout=10) as defense:
        assert_protected_like(protected, defense.perturb(raw, model="mnist"), raw)
    grpc_client = TorchServeClient(address)
    try:
        np.testing.assert_array_equal(grpc_client.predict("mnist", data), protected)
        np.testing.assert_array_equal(grpc_client.predict("mnist-open", data), raw)
    finally:
        grpc_client.close()


def test_put_of_a_png_to_the_models_version_answers_one_vector(server, images):
    base, _ = server
    status, headers, body = call(f"{base}/predictions/mnist/1.0", png_bytes(images[0]),
                                 method="PUT")
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    row = np.asarray(json.loads(body))
    assert row.shape == (10,) and abs(row.sum() - 1) < 1e-6


def test_multipart_form_field_data_is_the_input(server, images):
    base, _ = server
    boundary = "stealguard-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; "
            f"filename=\"x.npy\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode() \
        + npy_bytes(images[:2]) + f"\r\n--{boundary}--\r\n".encode()
    answer = predict(base, "mnist-open", body,
                     headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    np.testing.assert_array_equal(answer, predict(base, "mnist-open", npy_bytes(images[:2])))


def test_ping_is_healthy_as_torchserve_says_it(server):
    base, _ = server
    status, _, body = call(f"{base}/ping", method="GET")
    assert (status, json.loads(body)) == (200, {"status": "Healthy"})


@pytest.mark.parametrize(("path", "method", "data", "status", "kind", "says"), [
    ("/predictions/nope", "POST", b"x", 404, "not_found", "'nope' is not in the model store"),
    ("/predictions/mnist/9.9", "POST", b"x", 404, "not_found", "no version '9.9'"),
    ("/predictions/mnist", "POST", b"not an image", 400, "invalid_input", "PNG"),
    ("/predictions/mnist", "POST", b"", 400, "invalid_input", "data"),
    ("/predictions/mnist", "GET", None, 405, "method_not_allowed", "use POST or PUT"),
    ("/nothing/here", "GET", None, 404, "not_found", "/predictions/{model}"),
])
def test_bad_requests_get_a_json_error_naming_the_reason(server, path, method, data, status,
                                                        kind, says):
    base, _ = server
    got, headers, body = call(base + path, data, method=method)
    error = json.loads(body)
    assert (got, error["code"], error["type"]) == (status, status, kind), error
    assert says in error["message"], error
    assert headers["Content-Type"].startswith("application/json")


def test_body_over_max_message_bytes_is_413_and_the_server_goes_on(server, images):
    base, _ = server
    status, _, body = call(f"{base}/predictions/mnist", b"\0" * (MAX_MESSAGE_BYTES + 1))
    assert status == 413 and "--max-message-bytes" in json.loads(body)["message"]
    assert predict(base, "mnist", png_bytes(images[0])).shape == (10,)


def test_rest_oracle_counts_queries_and_names_a_missing_model(server, images):
    base, _ = server
    with remote_oracle(base, "mnist-open", 4, batch_size=3) as oracle:
        assert isinstance(oracle, RestOracle)
        answers = oracle.query(images)
        assert oracle.remaining == 0
    # two requests, of 3 inputs and 1 (a forward pass's last bits depend on its batch)
    np.testing.assert_array_equal(answers, np.concatenate([
        predict(base, "mnist-open", npy_bytes(images[:3])),
        predict(base, "mnist-open", npy_bytes(images[3:]))]))
    with RestOracle(base, "nope", 1) as oracle, pytest.raises(OracleError, match="not found"):
        oracle.query(images[:1])
    with pytest.raises(OracleError, match="cannot reach"):
        RestOracle(f"http://127.0.0.1:{free_port()}", "mnist", 1, timeout=0.5)
    with pytest.raises(OracleError, match="http://HOST:PORT"):
        RestOracle("ftp://example", "mnist", 1)


def test_bearer_token_is_required_over_rest_as_over_grpc(sidecar, tmp_path, images):
    tokens = tmp_path / "tokens"
    tokens.write_text("shop:s3cret-token-for-the-rest-test\n")
    port = free_port()
    process, address = start_modelserver(sidecar, tmp_path / "store", "--http-port", str(port),
                                         "--token-file", str(tokens))
    try:
        process.wait_healthy(address, timeout=STARTUP_TIMEOUT)
        url, data = f"http://127.0.0.1:{port}/predictions/mnist", png_bytes(images[0])
        status, headers, body = call(url, data)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token" in json.loads(body)["message"]
        status, _, body = call(url, data, headers={
            "authorization": "Bearer wrong"})
        assert status == 401
        status, _, body = call(url, data, headers={
            "authorization": "Bearer s3cret-token-for-the-rest-test"})
        assert status == 200 and np.asarray(json.loads(body)).shape == (10,)
    finally:
        assert process.stop(signal.SIGTERM) == 0, process.output()


def test_http_port_that_is_taken_is_a_one_line_error(sidecar, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process, _ = start_modelserver(sidecar, tmp_path / "store", "--http-port", str(port))
        process.popen.wait(STARTUP_TIMEOUT)
    assert process.stop() == 2, process.output()
    assert f"--http-port {port}: cannot serve REST on 127.0.0.1" in process.output()


def test_through_envoy_ext_proc_the_rest_answer_is_the_sidecars_perturbation(
        server, sidecar, tmp_path, images):
    """Real Envoy (deploy/envoy/envoy.yaml) in front of the model server's REST API, the
    sidecar as its ext_proc processor: `mnist-open`, raw at the model server, reaches the
    caller as the sidecar's perturbation under the sidecar's policy for that name; the
    REST oracle sees only that."""
    from _extproc_helpers import Envoy

    base, address = server
    upstream = base.removeprefix("http://")
    nobody = f"127.0.0.1:{free_port()}"
    envoy = Envoy(tmp_path, {"stealguard": sidecar, "torchserve_rest": upstream,
                             "kserve_v1": upstream, "torchserve_grpc": address,
                             "v2_rest": nobody, "v2_grpc": nobody})
    try:
        data = npy_bytes(images)
        raw = predict(base, "mnist-open", data)
        through = predict(envoy.url, "mnist-open", data, headers={"x-client-id": "thief"})
        with DefenseClient(sidecar, timeout=10) as defense:
            assert_protected_like(through, defense.perturb(raw, model="mnist-open"), raw)
        with remote_oracle(envoy.url, "mnist-open", 4, batch_size=4) as oracle:
            np.testing.assert_array_equal(oracle.query(images), through)
        np.testing.assert_array_equal(predict(envoy.raw_url, "mnist-open", data), raw)
    finally:
        envoy.stop()
