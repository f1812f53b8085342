"""Proxy mode, Open Inference Protocol v2: real processes on loopback ports.

upstream (a v2 server with a scikit-learn model, `_proxy_helpers`) <- `stealguard-sidecar
proxy --protocol v2` <- these tests. Expected answers come from the real sidecar.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from _proxy_helpers import digits_samples, start_proxy, start_upstream, wait_for_health
from stealguard.client import DefenseClient
from stealguard.compat.kserve import grpc_predict_v2_pb2 as v2
from stealguard.compat.kserve import grpc_predict_v2_pb2_grpc as v2_grpc

CONFIG = """
policies:
  digits: {defense: coarse_confidence, outputs: [predict_proba]}
  digits64: {defense: coarse_confidence, outputs: [predict_proba]}
  fail: {defense: reverse_sigmoid}
"""
SAMPLES = digits_samples(3)
DTYPES = {"digits": np.dtype("<f4"), "digits64": np.dtype("<f8")}


@pytest.fixture(scope="module")
def upstream():
    process, address = start_upstream("v2")
    state = {"process": process, "address": address}
    yield state
    state["process"].stop()


@pytest.fixture(scope="module")
def proxy(upstream, tmp_path_factory):
    config = tmp_path_factory.mktemp("proxy") / "proxy.yaml"
    config.write_text(CONFIG)
    process, address = start_proxy("v2", upstream["address"], str(config))
    yield address
    assert process.stop() == 0, process.output()  # drains and exits cleanly on SIGTERM


def stub(address):
    return v2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))


def infer(address, model, raw, outputs=(), **kw):
    request = v2.ModelInferRequest(model_name=model, id="req-1")
    tensor = request.inputs.add(name="input-0", datatype="FP32", shape=SAMPLES.shape)
    if raw:
        request.raw_input_contents.append(SAMPLES.tobytes())
    else:
        tensor.contents.fp32_contents.extend(SAMPLES.ravel().tolist())
    for name in outputs:
        request.outputs.add(name=name)
    return stub(address).ModelInfer(request, timeout=10, **kw)


def probabilities(response, model):
    """The predict_proba output of a response as an array, from contents or raw."""
    index = [o.name for o in response.outputs].index("predict_proba")
    output, dtype = response.outputs[index], DTYPES[model]
    if response.raw_output_contents:
        values = np.frombuffer(response.raw_output_contents[index], dtype=dtype)
    else:
        field = "fp64_contents" if dtype.itemsize == 8 else "fp32_contents"
        values = np.array(getattr(output.contents, field), dtype=dtype)
    return values.reshape(tuple(output.shape))


def without_probabilities(response):
    """The response with its predict_proba values blanked: everything the proxy leaves."""
    copy = v2.ModelInferResponse()
    copy.CopyFrom(response)
    index = [o.name for o in copy.outputs].index("predict_proba")
    copy.outputs[index].contents.Clear()
    if copy.raw_output_contents:
        copy.raw_output_contents[index] = b""
    return copy


@pytest.mark.parametrize("model", ["digits", "digits64"])
@pytest.mark.parametrize("raw", [False, True], ids=["contents", "raw_output_contents"])
def test_probability_output_is_the_sidecars_perturbation_and_the_rest_is_untouched(
    upstream, proxy, sidecar, model, raw
):
    direct = infer(upstream["address"], model, raw)
    got = infer(proxy, model, raw)
    assert bool(got.raw_output_contents) == raw
    upstream_probs = probabilities(direct, model)
    expected = DefenseClient(sidecar, timeout=10).perturb(upstream_probs)
    protected = probabilities(got, model)
    assert protected.dtype == DTYPES[model] and protected.shape == (3, 10)
    assert protected.tobytes() == expected.tobytes()
    assert (protected.argmax(axis=1) == upstream_probs.argmax(axis=1)).all()
    assert not np.allclose(protected, upstream_probs, rtol=1e-3, atol=0)
    assert without_probabilities(got) == without_probabilities(direct)  # label, ids, shapes


def test_answer_without_the_named_probability_output_is_rejected(proxy):
    with pytest.raises(grpc.RpcError) as error:
        infer(proxy, "digits", raw=False, outputs=["label"])
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "none of its outputs ['label']" in error.value.details()


def test_upstream_error_keeps_its_code_message_and_trailing_metadata(proxy):
    with pytest.raises(grpc.RpcError) as error:
        infer(proxy, "fail", raw=False)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.value.details() == "model fail: queue is full"
    assert ("x-upstream-reason", "full") in tuple(error.value.trailing_metadata())


def test_model_without_a_policy_is_not_found_and_never_forwarded(proxy):
    with pytest.raises(grpc.RpcError) as error:
        infer(proxy, "other", raw=False)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no policy for model 'other'" in error.value.details()


def test_metadata_rpcs_are_forwarded(proxy):
    s = stub(proxy)
    assert s.ServerLive(v2.ServerLiveRequest(), timeout=5).live
    assert s.ServerReady(v2.ServerReadyRequest(), timeout=5).ready
    assert s.ModelReady(v2.ModelReadyRequest(name="digits"), timeout=5).ready
    assert s.ServerMetadata(v2.ServerMetadataRequest(), timeout=5).name == "test-v2"
    meta = s.ModelMetadata(v2.ModelMetadataRequest(name="digits"), timeout=5)
    assert (meta.name, meta.platform) == ("digits", "sklearn")


def test_upstream_down_is_unavailable_and_health_follows_the_upstream(upstream, proxy):
    port = int(upstream["address"].rsplit(":", 1)[1])
    upstream["process"].stop()
    try:
        assert wait_for_health(proxy, "NOT_SERVING") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as error:
            infer(proxy, "digits", raw=True)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"upstream {upstream['address']} is unavailable" in error.value.details()
    finally:
        upstream["process"], _ = start_upstream("v2", port=port)
    assert wait_for_health(proxy, "SERVING") == "SERVING"
    assert probabilities(infer(proxy, "digits", raw=True), "digits").shape == (3, 10)
