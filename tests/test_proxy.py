"""Proxy mode, TorchServe protocol: real processes on loopback ports.

upstream (a TorchServe-API server with a scikit-learn model) <- `stealguard-sidecar proxy`
<- these tests; the expected answers come from the real sidecar (`sidecar` fixture).
"""

from __future__ import annotations

import json
import signal
import time

import grpc
import numpy as np
import pytest
from _procs import health_status
from _proxy_helpers import (
    digits_samples,
    npy,
    start_proxy,
    start_upstream,
    wait_for_health,
)
from google.protobuf import empty_pb2
from stealguard.client import DefenseClient
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc

CONFIG = """
policies:
  default: {defense: coarse_confidence}   # as the `sidecar` fixture, keyed alike
  digits-label-pass: {defense: reverse_sigmoid, on_unrecognized: pass}
  echo-metadata: {defense: none, on_unrecognized: pass}
"""
SAMPLES = digits_samples(4)


@pytest.fixture(scope="module")
def upstream():
    process, address = start_upstream("torchserve")
    state = {"process": process, "address": address}
    yield state
    state["process"].stop()


@pytest.fixture(scope="module")
def proxy_process(upstream, tmp_path_factory):
    """(process, address, config path) of the proxy in front of `upstream`."""
    config = tmp_path_factory.mktemp("proxy") / "proxy.yaml"
    config.write_text(CONFIG)
    process, address = start_proxy("torchserve", upstream["address"], str(config))
    yield process, address, config
    assert process.stop() == 0, process.output()  # drains and exits cleanly on SIGTERM


@pytest.fixture(scope="module")
def proxy(proxy_process):
    return proxy_process[1]


def stub(address):
    return inference_pb2_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(address))


def request(model, data):
    return inference_pb2.PredictionsRequest(model_name=model, input={"data": npy(data)})


def predict(address, model, data, **kw):
    reply = stub(address).Predictions(request(model, data), timeout=10, **kw)
    return reply.prediction


def sidecar_perturbation(sidecar, rows):
    """The real sidecar's answer for `rows` (float64, the default policy)."""
    return DefenseClient(sidecar, timeout=10).perturb(np.array(rows, dtype=np.float64))


def test_vector_equals_the_sidecars_perturbation_of_the_upstream_answer(
    upstream, proxy, sidecar
):
    raw = json.loads(predict(upstream["address"], "digits", SAMPLES[0]))
    got = json.loads(predict(proxy, "digits", SAMPLES[0]))
    assert got == sidecar_perturbation(sidecar, raw).tolist()
    assert np.argmax(got) == np.argmax(raw) and not np.allclose(got, raw, rtol=1e-3, atol=0)


def test_batch_equals_the_sidecars_perturbation_row_by_row(upstream, proxy, sidecar):
    raw = json.loads(predict(upstream["address"], "digits", SAMPLES))
    got = json.loads(predict(proxy, "digits", SAMPLES))
    assert len(got) == 4 and got == sidecar_perturbation(sidecar, raw).tolist()
    assert (np.argmax(got, axis=1) == np.argmax(raw, axis=1)).all()


def test_top_k_dict_keeps_labels_and_order_and_equals_the_sidecars_perturbation(
    upstream, proxy, sidecar
):
    raw = json.loads(predict(upstream["address"], "digits-topk", SAMPLES[2]))
    got = json.loads(predict(proxy, "digits-topk", SAMPLES[2]))
    values = list(raw.values())
    other = 1.0 - np.sum(values)  # the mass of the classes the top-k left out
    expected = sidecar_perturbation(sidecar, [[*values, other]])[0, :-1]
    assert list(got) == list(raw) and list(got.values()) == expected.tolist()


def test_stream_predictions_protects_every_message(upstream, proxy, sidecar):
    replies = list(stub(proxy).StreamPredictions(request("digits", SAMPLES[:3]), timeout=10))
    # the upstream streams one message per row, each predicted as a single sample
    raw = [json.loads(predict(upstream["address"], "digits", row)) for row in SAMPLES[:3]]
    expected = sidecar_perturbation(sidecar, raw).tolist()
    assert [json.loads(r.prediction) for r in replies] == expected


def test_stream_predictions2_answers_each_request_in_order_protected(proxy, sidecar, upstream):
    models = ["digits", "digits-topk", "digits"]
    requests = [request(m, SAMPLES[i]) for i, m in enumerate(models)]
    for i, r in enumerate(requests):
        r.sequence_id = f"seq-{i}"
    replies = list(stub(proxy).StreamPredictions2(iter(requests), timeout=10))
    assert [r.sequence_id for r in replies] == ["seq-0", "seq-1", "seq-2"]
    for i, (model, reply) in enumerate(zip(models, replies, strict=True)):
        assert reply.prediction == predict(proxy, model, SAMPLES[i])


def test_request_metadata_and_deadline_are_forwarded(proxy):
    metadata = (("authorization", "Bearer secret-token"), ("x-request-id", "req-42"))
    reply = stub(proxy).Predictions(request("echo-metadata", SAMPLES[0]), timeout=7.0,
                                    metadata=metadata)
    echoed = json.loads(reply.prediction)
    assert echoed["metadata"]["authorization"] == "Bearer secret-token"
    assert echoed["metadata"]["x-request-id"] == "req-42"
    # gRPC carries deadlines as a coarse timeout header, so a few percent either way
    assert 5.0 < echoed["time_remaining"] <= 7.0 * 1.05
    no_deadline = stub(proxy).Predictions(request("echo-metadata", SAMPLES[0]))
    assert json.loads(no_deadline.prediction)["time_remaining"] is None


def test_the_upstreams_initial_and_trailing_metadata_come_back(proxy):
    _, call = stub(proxy).Predictions.with_call(request("echo-metadata", SAMPLES[0]),
                                                timeout=10)
    assert ("x-upstream-initial", "yes") in tuple(call.initial_metadata())
    assert ("x-upstream-trailing", "yes") in tuple(call.trailing_metadata())
    replies = stub(proxy).StreamPredictions2(iter([request("digits", SAMPLES[0])]), timeout=10)
    assert len(list(replies)) == 1
    assert ("x-upstream-initial", "yes") in tuple(replies.initial_metadata())
    assert ("x-upstream-trailing", "yes") in tuple(replies.trailing_metadata())


def test_unrecognized_answer_is_rejected_by_default(proxy):
    with pytest.raises(grpc.RpcError) as error:
        predict(proxy, "digits-label", SAMPLES[0])
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model 'digits-label'" in error.value.details()
    assert "on_unrecognized: reject" in error.value.details()


def test_stream_ends_with_the_error_at_the_first_unrecognized_message(proxy):
    replies = stub(proxy).StreamPredictions(request("digits-label", SAMPLES[:2]), timeout=10)
    with pytest.raises(grpc.RpcError) as error:
        list(replies)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.value.details().startswith("stream message 0: model 'digits-label'")


def test_unrecognized_answer_is_unchanged_with_pass(upstream, proxy):
    raw = predict(upstream["address"], "digits-label-pass", SAMPLES[3])
    assert json.loads(raw) == {"label": 3}
    assert predict(proxy, "digits-label-pass", SAMPLES[3]) == raw


def test_upstream_error_keeps_its_code_message_and_trailing_metadata(proxy):
    with pytest.raises(grpc.RpcError) as error:
        predict(proxy, "fail", SAMPLES[0])
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.value.details() == "model fail: queue is full"
    assert ("x-upstream-reason", "full") in tuple(error.value.trailing_metadata())


def test_ping_is_the_upstreams(proxy):
    assert stub(proxy).Ping(empty_pb2.Empty(), timeout=5).health == '{"status": "Healthy"}'


def test_upstream_down_is_unavailable_and_health_follows_the_upstream(upstream, proxy):
    port = int(upstream["address"].rsplit(":", 1)[1])
    upstream["process"].stop()
    try:
        assert wait_for_health(proxy, "NOT_SERVING") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as error:
            predict(proxy, "digits", SAMPLES[0])
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"upstream {upstream['address']} is unavailable" in error.value.details()
    finally:
        upstream["process"], _ = start_upstream("torchserve", port=port)
    assert wait_for_health(proxy, "SERVING") == "SERVING"
    assert json.loads(predict(proxy, "digits", SAMPLES[0]))
    assert health_status(proxy, "org.pytorch.serve.grpc.inference.InferenceAPIsService") == (
        "SERVING"
    )


def test_sighup_reloads_the_policies_between_calls(proxy_process):
    process, address, config = proxy_process

    def answer():
        try:
            return json.loads(predict(address, "digits-label", SAMPLES[1]))
        except grpc.RpcError as error:
            return error.code()

    def reload(text, expected):
        config.write_text(text)
        process.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while (got := answer()) != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        return got

    lenient = CONFIG + "  digits-label: {defense: reverse_sigmoid, on_unrecognized: pass}\n"
    assert answer() == grpc.StatusCode.FAILED_PRECONDITION
    try:
        assert reload(lenient, {"label": 1}) == {"label": 1}
    finally:
        assert reload(CONFIG, grpc.StatusCode.FAILED_PRECONDITION) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
