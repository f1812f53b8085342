"""The model server as users run it: real `stealguard-sidecar` and `stealguard-modelserver`
processes on loopback ports, real MNIST test images, TorchServe's gRPC API."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
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
    start_stack,
)
from _procs import health_status
from google.protobuf import empty_pb2
from stealguard.client import DefenseClient
from stealguard.compat.torchserve import inference_pb2
from stealguard.modelserver.training import trained_model

IMAGES = 4


@pytest.fixture(scope="module")
def default_model():
    """Train the default model once per machine (cached across test sessions and CI)."""
    return trained_model()


@pytest.fixture(scope="module")
def stack(default_model, sidecar, tmp_path_factory):
    """(model server client, sidecar client): a model server calling the session's sidecar."""
    modelserver, address = start_modelserver(sidecar, tmp_path_factory.mktemp("store"))
    try:
        modelserver.wait_healthy(address, timeout=STARTUP_TIMEOUT)
        client, defense = TorchServeClient(address), DefenseClient(sidecar, timeout=10)
        yield client, defense
        client.close()
        defense.close()
    finally:
        assert modelserver.stop() == 0, modelserver.output()


@pytest.fixture(scope="module")
def images():
    return mnist_test_images(IMAGES)


def _assert_is_sidecars_perturbation(protected, raw, defense):
    assert_protected_like(protected, defense.perturb(raw, model="mnist"), raw)


def test_png_answer_of_mnist_is_the_sidecars_perturbation_of_mnist_open(stack, images):
    client, defense = stack
    data = png_bytes(images[0])
    raw = client.predict("mnist-open", data)
    protected = client.predict("mnist", data)
    assert raw.shape == (10,) and protected.shape == (10,)
    np.testing.assert_allclose(raw.sum(), 1.0, atol=1e-9)
    _assert_is_sidecars_perturbation(protected, raw, defense)


@pytest.mark.parametrize("sample", ["float32 (28, 28)", "uint8 (1, 28, 28)"])
def test_npy_sample_answer_of_mnist_is_the_sidecars_perturbation(stack, images, sample):
    client, defense = stack
    if sample.startswith("uint8"):
        array = np.round(images[1] * 255).astype(np.uint8)
    else:
        array = images[1][0]
    raw = client.predict("mnist-open", npy_bytes(array))
    protected = client.predict("mnist", npy_bytes(array))
    assert raw.shape == (10,)
    _assert_is_sidecars_perturbation(protected, raw, defense)


def test_npy_batch_gets_one_perturbed_row_per_sample(stack, images):
    client, defense = stack
    data = npy_bytes(images)
    raw = client.predict("mnist-open", data)
    protected = client.predict("mnist", data)
    assert raw.shape == (IMAGES, 10) and protected.shape == (IMAGES, 10)
    _assert_is_sidecars_perturbation(protected, raw, defense)


def test_concurrent_predictions_each_get_the_perturbation_of_their_own_input(stack, images):
    """Requests in flight together share the model server's one stream to the sidecar;
    each answer must still be its own input's perturbation."""
    client, defense = stack
    inputs = [npy_bytes(images[i]) for i in range(IMAGES)] * 3
    raws = [client.predict("mnist-open", data) for data in inputs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda data: client.predict("mnist", data), inputs))
    for raw, protected in zip(raws, answers, strict=True):
        _assert_is_sidecars_perturbation(protected, raw, defense)


def test_unary_transport_answers_like_the_stream(default_model, sidecar, tmp_path, images):
    modelserver, address = start_modelserver(sidecar, tmp_path / "store",
                                             "--sidecar-transport", "unary")
    try:
        modelserver.wait_healthy(address, timeout=STARTUP_TIMEOUT)
        client, defense = TorchServeClient(address), DefenseClient(sidecar, timeout=10)
        data = npy_bytes(images)
        _assert_is_sidecars_perturbation(client.predict("mnist", data),
                                         client.predict("mnist-open", data), defense)
        client.close()
        defense.close()
    finally:
        assert modelserver.stop() == 0, modelserver.output()


def test_yaml_config_max_in_flight_0_and_json_logs_on_configure_the_model_server(
        default_model, sidecar, tmp_path, images):
    """The divergences issue 16 named: the model server reads YAML (`--config`), takes
    `max_in_flight: 0` as "no limit" like the sidecar, and JSON_LOGS=on like the sidecar."""
    from _procs import Process, free_port, script

    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "modelserver.yaml"
    config.write_text(f"listen: {address}\nsidecar: {sidecar}\nmodel_store: {tmp_path}/store\n"
                      "max_in_flight: 0\nmetrics_port: 0\nsidecar_transport: unary\n")
    modelserver = Process([script("stealguard-modelserver"), "--config", str(config)],
                          env={"STEALGUARD_MODELSERVER_JSON_LOGS": "on"})
    try:
        modelserver.wait_healthy(address, timeout=STARTUP_TIMEOUT)
        client = TorchServeClient(address)
        assert client.predict("mnist-open", png_bytes(images[0])).shape == (10,)
        client.close()
    finally:
        assert modelserver.stop() == 0, modelserver.output()
    lines = [line for line in modelserver.output().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert any("listening on " + address in entry["message"] for entry in entries)
    assert any("(unary)" in entry["message"] for entry in entries)  # the YAML was read


def test_default_model_classifies_real_test_images(stack):
    from stealguard.modelserver.datasets import load_dataset

    dataset = load_dataset("mnist")
    client, _ = stack
    probs = client.predict("mnist-open", npy_bytes(dataset.test_x[:200]))
    assert (probs.argmax(1) == dataset.test_y[:200]).mean() >= 0.9


@pytest.mark.parametrize("model, inputs, code, message", [
    ("mnist", {"data": b"\x89PNG\r\n\x1a\nbroken"}, "INVALID_ARGUMENT", "not a decodable PNG"),
    ("mnist", {"data": b"GIF89a..."}, "INVALID_ARGUMENT", "neither a PNG image nor a .npy"),
    ("mnist", {"data": npy_bytes(np.zeros((2, 32, 32), np.float32))}, "INVALID_ARGUMENT",
     "shape (2, 32, 32)"),
    ("mnist", {"image": b"..."}, "INVALID_ARGUMENT", "input 'data' is missing"),
    ("mnist", {"data": npy_bytes(np.full((28, 28), 7.0, np.float32))}, "INVALID_ARGUMENT",
     "values must be in [0, 1]"),
    ("resnet50", {"data": b"..."}, "NOT_FOUND", "model 'resnet50' is not in the model store"),
    ("mnist", {"data": npy_bytes(np.zeros((1025, 28, 28), np.uint8))}, "INVALID_ARGUMENT",
     "the batch holds 1025 samples; this server takes at most 1024"),
])
def test_bad_input_gets_its_error_and_the_next_request_is_answered(
        stack, images, model, inputs, code, message):
    client, _ = stack
    request = client.request(model, None)
    for key, value in inputs.items():
        request.input[key] = value
    with pytest.raises(grpc.RpcError) as error:
        client.stub.Predictions(request, timeout=30)
    assert error.value.code().name == code
    assert message in error.value.details()
    assert client.predict("mnist", png_bytes(images[0])).shape == (10,)


def test_unknown_version_is_not_found(stack, images):
    client, _ = stack
    with pytest.raises(grpc.RpcError) as error:
        client.predict("mnist", png_bytes(images[0]), model_version="2.0")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no version '2.0'" in error.value.details()
    assert client.predict("mnist", png_bytes(images[0]), model_version="1.0").shape == (10,)


def test_stream_predictions2_answers_in_order_and_reports_bad_requests_in_status(stack, images):
    client, defense = stack
    requests = [
        client.request("mnist", png_bytes(images[0]), sequence_id="a"),
        client.request("mnist", b"not an image", sequence_id="b"),
        client.request("nope", png_bytes(images[0]), sequence_id="c"),
        client.request("mnist-open", png_bytes(images[0]), sequence_id="d"),
    ]
    replies = list(client.stub.StreamPredictions2(iter(requests), timeout=30))
    assert [r.sequence_id for r in replies] == ["a", "b", "c", "d"]
    assert [r.status.code for r in replies] == [
        0, grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.NOT_FOUND.value[0], 0]
    assert "neither a PNG image" in replies[1].status.message
    protected, raw = (np.array(json.loads(replies[i].prediction)) for i in (0, 3))
    _assert_is_sidecars_perturbation(protected, raw, defense)


def test_stream_predictions2_reports_bytes_that_do_not_parse_and_goes_on(stack, images):
    client, _ = stack
    good = client.request("mnist-open", png_bytes(images[0]), sequence_id="a")
    method = client.channel.stream_stream(  # bytes in, parsed replies out
        "/org.pytorch.serve.grpc.inference.InferenceAPIsService/StreamPredictions2",
        response_deserializer=inference_pb2.PredictionResponse.FromString)
    replies = list(method(iter([good.SerializeToString(), b"\xff\xff\xff",
                                good.SerializeToString()]), timeout=30))
    assert [r.status.code for r in replies] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "not a valid message" in replies[1].status.message
    assert replies[0].prediction == replies[2].prediction


def test_stream_predictions_sends_one_response(stack, images):
    client, _ = stack
    replies = list(client.stub.StreamPredictions(
        client.request("mnist-open", png_bytes(images[2])), timeout=30))
    assert len(replies) == 1
    expected = client.predict("mnist-open", png_bytes(images[2]))
    np.testing.assert_array_equal(np.array(json.loads(replies[0].prediction)), expected)


def test_ping_and_grpc_health_report_serving(stack):
    client, _ = stack
    reply = client.stub.Ping(empty_pb2.Empty(), timeout=10)
    assert json.loads(reply.health) == {"status": "Healthy"}
    address = client.address
    assert health_status(address) == "SERVING"
    assert health_status(address, "org.pytorch.serve.grpc.inference.InferenceAPIsService") == \
        "SERVING"


def test_with_the_sidecar_stopped_mnist_answers_label_only_never_raw(
        default_model, tmp_path, images):
    sidecar, _, modelserver, address = start_stack(tmp_path / "store", "--sidecar-timeout", "0.5")
    client = TorchServeClient(address)
    try:
        data = npy_bytes(images)
        raw = client.predict("mnist-open", data)
        assert not np.allclose(client.predict("mnist", data), raw, rtol=1e-3)  # protected
        sidecar.stop(signal.SIGKILL)
        label_only = client.predict("mnist", data)
        expected = np.eye(10)[raw.argmax(1)]
        np.testing.assert_array_equal(label_only, expected)
        np.testing.assert_array_equal(client.predict("mnist-open", data), raw)
    finally:
        client.close()
        modelserver.stop()
        sidecar.stop()
