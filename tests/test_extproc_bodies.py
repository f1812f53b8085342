"""The ext_proc codecs and servicer without processes: routes, each API's body rewritten
row-block by row-block, gRPC frames and gzip, and the servicer's answers to Envoy's
messages (a fake `protect` stands in for the sidecar's)."""

from __future__ import annotations

import asyncio
import gzip
import json

import grpc
import numpy as np
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from google.protobuf import struct_pb2
from stealguard.compat.kserve import grpc_predict_v2_pb2 as v2
from stealguard.compat.torchserve import inference_pb2
from stealguard.server.errors import Unavailable
from stealguard.server.extproc import bodies
from stealguard.server.extproc.frames import FrameError, deframe, frame
from stealguard.server.extproc.servicer import (
    ATTRIBUTES,
    LABEL_ONLY_HEADER,
    NO_ROUTE,
    ExternalProcessorServicer,
)
from stealguard.server.proxy.errors import Unrecognized
from stealguard.server.proxy.options import ProxyPolicies

POLICIES = ProxyPolicies.from_config(
    {"default": {"defense": "none"}, "lenient": {"defense": "none", "on_unrecognized": "pass"}},
    b"key")


async def _reversed(rows: np.ndarray) -> np.ndarray:
    """A stand-in for the protect core whose effect is easy to see: each row reversed."""
    return np.asarray(rows)[..., ::-1].copy()


def _rewrite(answer: bodies.Answer, perturb=_reversed) -> bytes:
    return asyncio.run(answer.rewrite(perturb))


def _answer(path: str, body: bytes, model: str = "default", content_type="application/json"):
    route = bodies.route_of("POST", path, content_type)
    return bodies.Answer(route, body, POLICIES.resolve(model), max_bytes=1 << 20)


@pytest.mark.parametrize("method, path, content_type, expected", [
    ("POST", "/predictions/mnist", "", bodies.Route("torchserve", "mnist")),
    ("POST", "/predictions/mnist/2.0?x=1", "", bodies.Route("torchserve", "mnist", "2.0")),
    ("POST", "/v1/models/flowers:predict", "", bodies.Route("kserve-v1", "flowers")),
    ("POST", "/v2/models/iris/infer", "", bodies.Route("v2", "iris")),
    ("POST", "/v2/models/iris/versions/3/infer", "", bodies.Route("v2", "iris", "3")),
    ("POST", "/v2/models/my%20model/infer", "", bodies.Route("v2", "my model")),
    ("POST", "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
     "application/grpc", bodies.Route("torchserve-grpc")),
    ("POST", "/inference.GRPCInferenceService/ModelInfer", "application/grpc+proto",
     bodies.Route("v2-grpc")),
    ("GET", "/predictions/mnist", "", None),
    ("GET", "/ping", "", None),
    ("POST", "/v2/models/iris/ready", "", None),
    ("POST", "/inference.GRPCInferenceService/ModelMetadata", "application/grpc", None),
])
def test_route_names_the_api_and_model_or_none_for_calls_without_probabilities(
        method, path, content_type, expected):
    assert bodies.route_of(method, path, content_type) == expected


def test_streaming_inference_method_is_a_route_to_refuse():
    path = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/StreamPredictions2"
    assert bodies.route_of("POST", path, "application/grpc").api in bodies.STREAMING_METHODS


@pytest.mark.parametrize("prediction", [
    [0.1, 0.2, 0.7],
    [[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]],
])
def test_torchserve_list_and_list_of_lists_are_rewritten_row_for_row(prediction):
    answer = _answer("/predictions/m", json.dumps(prediction).encode())
    rewritten = json.loads(_rewrite(answer))
    np.testing.assert_array_equal(rewritten, np.array(prediction)[..., ::-1])


def test_top_k_dict_is_one_row_with_the_missing_mass_as_a_last_class_and_keeps_its_labels():
    seen = []

    async def perturb(rows):
        seen.append(rows)
        return rows[..., ::-1]

    answer = _answer("/predictions/m", b'{"tabby": 0.5, "tiger": 0.3}')
    rewritten = json.loads(_rewrite(answer, perturb))
    np.testing.assert_allclose(seen[0], [[0.5, 0.3, 0.2]])
    assert list(rewritten) == ["tabby", "tiger"]
    np.testing.assert_allclose(list(rewritten.values()), [0.2, 0.3])


def test_kserve_v1_rewrites_predictions_and_keeps_other_keys():
    body = json.dumps({"predictions": [[0.9, 0.1]], "id": "a"}).encode()
    rewritten = json.loads(_rewrite(_answer("/v1/models/m:predict", body)))
    assert rewritten == {"predictions": [[0.1, 0.9]], "id": "a"}


def test_v2_rest_rewrites_only_named_float_outputs_and_flattens_nested_data():
    body = json.dumps({"model_name": "iris", "outputs": [
        {"name": "predict", "shape": [2], "datatype": "INT64", "data": [0, 1]},
        {"name": "predict_proba", "shape": [2, 2], "datatype": "FP32",
         "data": [[0.75, 0.25], [0.5, 0.5]]}]}).encode()
    answer = _answer("/v2/models/iris/infer", body)
    assert answer.model == "iris"
    outputs = json.loads(_rewrite(answer))["outputs"]
    assert outputs[0]["data"] == [0, 1]
    assert outputs[1]["data"] == [0.25, 0.75, 0.5, 0.5]
    assert outputs[1]["datatype"] == "FP32" and outputs[1]["shape"] == [2, 2]


def test_v2_rest_without_a_named_output_is_unrecognized():
    body = json.dumps({"outputs": [{"name": "logits", "shape": [2], "datatype": "FP32",
                                    "data": [1.0, 2.0]}]}).encode()
    with pytest.raises(Unrecognized, match="none of its outputs"):
        _rewrite(_answer("/v2/models/iris/infer", body))


def test_v2_grpc_answer_is_deframed_rewritten_and_reframed_with_its_model():
    message = v2.ModelInferResponse(model_name="iris", outputs=[
        v2.ModelInferResponse.InferOutputTensor(
            name="probabilities", datatype="FP32", shape=[1, 2],
            contents=v2.InferTensorContents(fp32_contents=[0.75, 0.25]))])
    answer = _answer("/inference.GRPCInferenceService/ModelInfer",
                     frame([message.SerializeToString()]), content_type="application/grpc")
    assert answer.model == "iris"
    (out,) = deframe(_rewrite(answer), max_bytes=1 << 20)
    assert list(v2.ModelInferResponse.FromString(out).outputs[0].contents.fp32_contents) == [
        0.25, 0.75]


def test_torchserve_grpc_request_names_the_model_and_gzip_messages_are_read():
    request = inference_pb2.PredictionsRequest(model_name="mnist").SerializeToString()
    compressed = b"\x01" + len(gzip.compress(request)).to_bytes(4, "big") + gzip.compress(request)
    assert bodies.request_model(compressed, "gzip", max_bytes=1 << 20) == "mnist"
    answer = inference_pb2.PredictionResponse(prediction=b"[0.9, 0.1]").SerializeToString()
    route = bodies.Route("torchserve-grpc", "mnist")
    body = b"\x01" + len(gzip.compress(answer)).to_bytes(4, "big") + gzip.compress(answer)
    rewritten = _rewrite(bodies.Answer(route, body, POLICIES.resolve("mnist"),
                                       encoding="gzip", max_bytes=1 << 20))
    (out,) = deframe(rewritten, max_bytes=1 << 20)
    assert json.loads(inference_pb2.PredictionResponse.FromString(out).prediction) == [0.1, 0.9]


@pytest.mark.parametrize("body, encoding, message", [
    (b"\x00\x00\x00", "identity", "not a whole gRPC message prefix"),
    (b"\x00\x00\x00\x00\x09abc", "identity", "says it has 9 bytes"),
    (b"\x01\x00\x00\x00\x03abc", "snappy", "only gzip can be read"),
    (b"\x01" + len(gzip.compress(bytes(5000))).to_bytes(4, "big") + gzip.compress(bytes(5000)),
     "gzip", "decompresses to more than 4096 bytes"),
])
def test_bad_grpc_frames_are_refused_with_the_reason(body, encoding, message):
    with pytest.raises(FrameError, match=message):
        deframe(body, encoding, max_bytes=4096)


def test_unreadable_body_passes_unchanged_only_when_the_policy_says_pass():
    with pytest.raises(Unrecognized, match="is not JSON"):
        _answer("/v1/models/m:predict", b"<html>")
    lenient = _answer("/v1/models/lenient:predict", b"<html>", model="lenient")
    assert _rewrite(lenient) == b"<html>"


def test_label_only_is_the_one_hot_of_each_rows_top_class_in_its_dtype():
    rows = np.array([[0.2, 0.7, 0.1], [0.5, 0.1, 0.4]], dtype=np.float32)
    labels = asyncio.run(bodies.label_only(rows))
    assert labels.dtype == np.float32
    np.testing.assert_array_equal(labels, [[0, 1, 0], [1, 0, 0]])


# --- the servicer, fed Envoy's messages in order -------------------------------------------

def _headers(**values) -> ext.HttpHeaders:
    return ext.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k.replace("_", "-").replace("PATH", ":path")
                             .replace("METHOD", ":method").replace("STATUS", ":status"),
                             raw_value=v.encode()) for k, v in values.items()]))


def _attributes(**values) -> dict:
    """What Envoy sends for deploy/envoy/envoy.yaml's `response_attributes`."""
    struct = struct_pb2.Struct()
    struct.update(values)
    return {ATTRIBUTES: struct}


def _exchange(protect, path: str, body: bytes, *, status="200", method="POST",
              response_headers: dict | None = None,
              skip_request: bool = False) -> list[ext.ProcessingResponse]:
    """The servicer's replies to one HTTP request's messages. `skip_request`: Envoy skips
    the request headers and sends their facts as attributes of the response headers."""
    service = ExternalProcessorServicer(protect, POLICIES.resolve, principal_header="x-client-id",
                                        max_bytes=1 << 20)
    response = ext.ProcessingRequest(response_headers=_headers(
        STATUS=status, content_length=str(len(body)), **(response_headers or {})))
    messages = [response,
                ext.ProcessingRequest(response_body=ext.HttpBody(body=body, end_of_stream=True))]
    if skip_request:
        for key, value in _attributes(**{
                "request.path": path, "request.method": method, "response.code": float(status),
                "request.headers['content-type']": "application/json",
                "request.headers['X-Client-Id']": "alice"}).items():
            response.attributes[key].CopyFrom(value)
    else:
        messages.insert(0, ext.ProcessingRequest(request_headers=_headers(
            PATH=path, METHOD=method, content_type="application/json", x_client_id="alice")))

    async def run():
        async def requests():
            for message in messages:
                yield message
        return [reply async for reply in service.Process(requests(), None)]

    return asyncio.run(run())


def test_servicer_rewrites_the_body_sets_content_length_and_charges_the_principal():
    calls = []

    async def protect(rows, model, principal):
        calls.append((model, principal, rows.shape))
        return np.round(rows[..., ::-1], 3), "default"

    replies = _exchange(protect, "/predictions/mnist", b"[0.1, 0.2, 0.7]")
    assert replies[0].mode_override.response_body_mode == replies[0].mode_override.BUFFERED
    common = replies[2].response_body.response
    assert json.loads(common.body_mutation.body) == [0.7, 0.2, 0.1]
    (length,) = common.header_mutation.set_headers
    assert (length.header.key, length.header.raw_value) == (
        "content-length", str(len(common.body_mutation.body)).encode())
    assert calls == [("mnist", "alice", (1, 3))]


def test_skipped_request_headers_are_read_from_the_response_attributes():
    calls = []

    async def protect(rows, model, principal):
        calls.append((model, principal, rows.shape))
        return np.round(rows[..., ::-1], 3), "default"

    headers, body = _exchange(protect, "/predictions/mnist", b"[[0.1, 0.2, 0.7]]",
                              skip_request=True)
    assert not headers.HasField("mode_override")  # the body is asked for, as configured
    assert json.loads(body.response_body.response.body_mutation.body) == [[0.7, 0.2, 0.1]]
    assert calls == [("mnist", "alice", (1, 3))]


def test_skipped_request_headers_pass_other_calls_and_errors_without_their_body():
    async def protect(rows, model, principal):
        raise AssertionError("not called")

    for path, method, status in (("/ping", "GET", "200"), ("/predictions/m", "GET", "200"),
                                 ("/predictions/m", "POST", "503")):
        headers = _exchange(protect, path, b"{}", method=method, status=status,
                            skip_request=True)[0]
        assert headers.mode_override.response_body_mode == headers.mode_override.NONE


def test_attributes_without_the_method_are_refused_and_a_missing_content_type_is_the_answers():
    """A filter configured with fewer attributes must not make an inference answer look
    like a call without probabilities (which passes raw)."""
    async def protect(rows, model, principal):
        return rows, "default"

    service = ExternalProcessorServicer(protect, POLICIES.resolve,
                                        principal_header="x-client-id", max_bytes=1 << 20)

    async def first_reply(attributes, content_type):
        response = ext.ProcessingRequest(response_headers=_headers(
            STATUS="200", content_type=content_type))
        for key, value in _attributes(**attributes).items():
            response.attributes[key].CopyFrom(value)

        async def requests():
            yield response
        return [reply async for reply in service.Process(requests(), None)][0]

    no_method = asyncio.run(first_reply({"request.path": "/predictions/m"},
                                        "application/json"))
    assert no_method.immediate_response.status.code == 503
    grpc_call = asyncio.run(first_reply(
        {"request.path": "/inference.GRPCInferenceService/ModelInfer",
         "request.method": "POST"}, "application/grpc"))
    assert not grpc_call.HasField("mode_override")  # its body is asked for: protected
    assert not grpc_call.HasField("immediate_response")


def test_response_headers_without_request_headers_or_attributes_are_refused():
    service = ExternalProcessorServicer(None, POLICIES.resolve, principal_header="x-client-id",
                                        max_bytes=1024)

    async def run(content_type):
        async def requests():
            yield ext.ProcessingRequest(response_headers=_headers(
                STATUS="200", content_type=content_type))
        return [reply async for reply in service.Process(requests(), None)]

    (rest,) = asyncio.run(run("application/json"))
    assert rest.immediate_response.status.code == 503
    assert json.loads(rest.immediate_response.body)["error"] == NO_ROUTE
    (call,) = asyncio.run(run("application/grpc"))
    assert call.immediate_response.grpc_status.status == (
        grpc.StatusCode.FAILED_PRECONDITION.value[0])


def test_servicer_answers_label_only_while_the_sidecar_cannot_protect():
    async def protect(rows, model, principal):
        raise Unavailable("the sidecar is draining")

    reply = _exchange(protect, "/predictions/mnist", b"[[0.1, 0.2, 0.7]]")[2]
    immediate = reply.immediate_response
    assert immediate.status.code == 200
    assert json.loads(immediate.body) == [[0.0, 0.0, 1.0]]
    headers = {h.header.key: h.header.raw_value for h in immediate.headers.set_headers}
    assert headers[LABEL_ONLY_HEADER] == b"the sidecar is draining"


def test_servicer_turns_an_unexpected_error_into_label_only_never_the_raw_body():
    async def protect(rows, model, principal):
        raise RuntimeError("boom")

    reply = _exchange(protect, "/predictions/mnist", b"[0.1, 0.2, 0.7]")[2]
    assert json.loads(reply.immediate_response.body) == [0.0, 0.0, 1.0]
    assert b"boom" not in reply.immediate_response.SerializeToString()


def test_servicer_passes_error_answers_and_calls_without_probabilities():
    async def protect(rows, model, principal):
        raise AssertionError("not called")

    replies = _exchange(protect, "/predictions/mnist", b'{"code": 500}', status="500")
    assert not replies[2].response_body.HasField("response")
    replies = _exchange(protect, "/ping", b"{}")
    assert replies[0].mode_override.response_body_mode == replies[0].mode_override.NONE


def test_servicer_refuses_a_gzip_bomb_with_503_and_reads_gzip_answers():
    async def protect(rows, model, principal):
        return rows, "default"

    bomb = gzip.compress(b"[" + b"0.0, " * 400_000 + b"1.0]")
    reply = _exchange(protect, "/predictions/m", bomb,
                      response_headers={"content_encoding": "gzip"})[2]
    assert reply.immediate_response.status.code == 503
    assert b"decompresses to more than" in reply.immediate_response.body
    reply = _exchange(protect, "/predictions/m", gzip.compress(b"[0.5, 0.5]"),
                      response_headers={"content_encoding": "gzip"})[2]
    common = reply.response_body.response
    assert json.loads(common.body_mutation.body) == [0.5, 0.5]
    assert list(common.header_mutation.remove_headers) == ["content-encoding"]


def test_grpc_streaming_inference_is_refused_unimplemented():
    service = ExternalProcessorServicer(None, POLICIES.resolve, principal_header="x-client-id",
                                        max_bytes=1024)

    async def run():
        async def requests():
            yield ext.ProcessingRequest(request_headers=_headers(
                PATH="/inference.GRPCInferenceService/ModelStreamInfer", METHOD="POST",
                content_type="application/grpc"))
        return [reply async for reply in service.Process(requests(), None)]

    (reply,) = asyncio.run(run())
    assert reply.immediate_response.grpc_status.status == grpc.StatusCode.UNIMPLEMENTED.value[0]
