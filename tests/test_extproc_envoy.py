"""Envoy ext_proc with real Envoy in front of real MLServer (v2 REST and gRPC) and a
scripted HTTP upstream (KServe v1, compressed, malformed and oversized answers), the
sidecar as the external processor. Everything on loopback, stopped by PID."""

from __future__ import annotations

import gzip
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest
from _extproc_helpers import MLSERVER_MODEL, Envoy, MLServer, post_json
from _procs import free_port, health_status, start_sidecar
from stealguard.client import DefenseClient
from stealguard.compat.kserve import grpc_predict_v2_pb2 as v2
from stealguard.compat.kserve import grpc_predict_v2_pb2_grpc as v2_grpc

MAX_ROWS = 64
POLICIES = """\
policies:
  default: {defense: reverse_sigmoid, beta: 1.5, gamma: 0.3}
  lenient: {defense: reverse_sigmoid, beta: 1.5, gamma: 0.3, on_unrecognized: pass}
"""
IRIS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


def v2_request(rows) -> dict:
    return {"inputs": [{"name": "x", "shape": [len(rows), 4], "datatype": "FP64",
                        "data": [v for row in rows for v in row]}],
            "outputs": [{"name": "predict_proba"}]}


class Scripted(BaseHTTPRequestHandler):
    """Answers POST {path} with what the test put in `server.answers[path]`."""

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length") or 0))
        status, headers, body = self.server.answers[self.path]
        self.send_response(status)
        for key, value in {"content-type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.answers = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, scripted):
    """(sidecar address, MLServer, Envoy, sidecar metrics URL)."""
    work = tmp_path_factory.mktemp("extproc")
    (work / "stealguard.yaml").write_text(POLICIES)
    metrics_port = free_port()
    sidecar, address = start_sidecar("--config", str(work / "stealguard.yaml"),
                                     "--max-rows", str(MAX_ROWS),
                                     "--metrics-port", str(metrics_port),
                                     "--metrics-per-client")
    mlserver = envoy = None
    try:
        mlserver = MLServer(work)
        upstream = f"127.0.0.1:{scripted.server_address[1]}"
        envoy = Envoy(work, {"stealguard": address, "torchserve_rest": upstream,
                             "kserve_v1": upstream, "torchserve_grpc": upstream,
                             "v2_rest": mlserver.rest.removeprefix("http://"),
                             "v2_grpc": mlserver.grpc})
        yield address, mlserver, envoy, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        for process in (envoy, mlserver):
            if process is not None:
                process.stop()
        sidecar.stop()


def _outputs(body: bytes) -> np.ndarray:
    output = json.loads(body)["outputs"][0]
    return np.array(output["data"], dtype=np.float64).reshape(output["shape"])


def test_v2_rest_answer_through_envoy_is_the_sidecars_perturbation_of_mlservers(stack):
    sidecar, _, envoy, _ = stack
    url = f"/v2/models/{MLSERVER_MODEL}/infer"
    status, _, raw_body = post_json(envoy.raw_url + url, v2_request(IRIS))
    assert status == 200
    status, headers, body = post_json(envoy.url + url, v2_request(IRIS))
    assert status == 200
    assert int(headers["content-length"]) == len(body)
    raw = _outputs(raw_body)
    with DefenseClient(sidecar, timeout=10) as defense:
        expected = defense.perturb(raw, model=MLSERVER_MODEL)
    np.testing.assert_array_equal(_outputs(body), expected)
    assert np.abs(_outputs(body) - raw).max() > 0.05
    document = json.loads(body)
    assert document["model_name"] == MLSERVER_MODEL
    assert document["outputs"][0]["shape"] == [3, 3]


def test_calls_without_probabilities_pass_through_envoy_unchanged(stack):
    """Envoy skips the request headers (deploy/envoy/envoy.yaml): the processor learns the
    route from the response attributes and turns body processing off for these."""
    _, mlserver, envoy, _ = stack

    def get(base: str, path: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(base + path, timeout=10) as reply:
            return reply.status, reply.read()

    for path in (f"/v2/models/{MLSERVER_MODEL}", "/v2/health/ready"):
        assert get(envoy.url, path) == get(envoy.raw_url, path)
    with grpc.insecure_channel(envoy.url.removeprefix("http://")) as channel:
        metadata = v2_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            v2.ModelMetadataRequest(name=MLSERVER_MODEL), timeout=20)
    assert metadata.name == MLSERVER_MODEL


def test_v2_grpc_model_infer_through_envoy_is_the_sidecars_perturbation(stack):
    sidecar, mlserver, envoy, _ = stack
    request = v2.ModelInferRequest(
        model_name=MLSERVER_MODEL,
        inputs=[v2.ModelInferRequest.InferInputTensor(
            name="x", datatype="FP64", shape=[3, 4],
            contents=v2.InferTensorContents(fp64_contents=[v for r in IRIS for v in r]))],
        outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="predict_proba")])

    def infer(address: str) -> np.ndarray:
        with grpc.insecure_channel(address) as channel:
            reply = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=20)
        output = reply.outputs[0]
        if reply.raw_output_contents:
            values = np.frombuffer(reply.raw_output_contents[0], dtype="<f8")
        else:
            values = np.array(output.contents.fp64_contents)
        return values.reshape(list(output.shape))

    raw = infer(mlserver.grpc)
    protected = infer(envoy.url.removeprefix("http://"))
    with DefenseClient(sidecar, timeout=10) as defense:
        np.testing.assert_array_equal(protected, defense.perturb(raw, model=MLSERVER_MODEL))
    assert np.abs(protected - raw).max() > 0.05


def test_kserve_v1_predictions_are_protected_and_other_keys_kept(stack, scripted):
    sidecar, _, envoy, _ = stack
    raw = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]
    scripted.answers["/v1/models/flowers:predict"] = (
        200, {}, json.dumps({"predictions": raw, "model": "flowers"}).encode())
    status, _, body = post_json(envoy.url + "/v1/models/flowers:predict", {"instances": []})
    assert status == 200
    document = json.loads(body)
    with DefenseClient(sidecar, timeout=10) as defense:
        expected = defense.perturb(np.array(raw), model="flowers")
    np.testing.assert_array_equal(np.array(document["predictions"]), expected)
    assert document["model"] == "flowers"


def test_gzip_answer_is_decompressed_protected_and_sent_plain(stack, scripted):
    sidecar, _, envoy, _ = stack
    raw = [0.6, 0.3, 0.1]
    scripted.answers["/predictions/zipped"] = (
        200, {"content-encoding": "gzip"}, gzip.compress(json.dumps(raw).encode()))
    status, headers, body = post_json(envoy.url + "/predictions/zipped", {},
                                      headers={"accept-encoding": "identity"})
    assert status == 200 and "content-encoding" not in headers
    with DefenseClient(sidecar, timeout=10) as defense:
        np.testing.assert_array_equal(json.loads(body), defense.perturb(np.array(raw)))


@pytest.mark.parametrize("body, reason", [
    (b"<html>oops</html>", "is not JSON"),
    (b'{"label": "cat"}', "not {label: probability}"),
    (b"[1, 2, 3]", "list of integers"),
    (b"[0.5, 0.7]", "not probabilities"),
])
def test_malformed_answer_is_a_503_json_error_and_the_sidecar_stays_up(
        stack, scripted, body, reason):
    sidecar, _, envoy, _ = stack
    scripted.answers["/predictions/broken"] = (200, {}, body)
    status, headers, answer = post_json(envoy.url + "/predictions/broken", {})
    assert status == 503
    assert headers["content-type"] == "application/json"
    error = json.loads(answer)
    assert reason in error["error"] and error["kind"] == "invalid"
    assert "on_unrecognized: pass" in error["error"]
    assert health_status(sidecar) == "SERVING"


def test_oversized_answer_is_refused_with_the_row_limit(stack, scripted):
    sidecar, _, envoy, _ = stack
    rows = np.full((MAX_ROWS + 1, 4), 0.25).tolist()
    scripted.answers["/predictions/huge"] = (200, {}, json.dumps(rows).encode())
    status, _, answer = post_json(envoy.url + "/predictions/huge", {})
    assert status == 429
    assert f"at most {MAX_ROWS} per request" in json.loads(answer)["error"]
    assert health_status(sidecar) == "SERVING"


def test_unrecognized_answer_passes_unchanged_only_under_on_unrecognized_pass(
        stack, scripted):
    _, _, envoy, _ = stack
    scripted.answers["/predictions/lenient"] = (200, {}, b'{"label": "cat"}')
    status, _, body = post_json(envoy.url + "/predictions/lenient", {})
    assert (status, body) == (200, b'{"label": "cat"}')


def test_upstream_error_passes_unchanged(stack, scripted):
    _, _, envoy, _ = stack
    scripted.answers["/predictions/down"] = (503, {}, b'{"code": 503, "message": "busy"}')
    status, _, body = post_json(envoy.url + "/predictions/down", {})
    assert (status, json.loads(body)) == (503, {"code": 503, "message": "busy"})


def test_end_principal_is_the_gateways_client_header_and_is_metered_in_rows(stack, scripted):
    _, _, envoy, metrics = stack
    scripted.answers["/predictions/metered"] = (
        200, {}, json.dumps([[0.7, 0.2, 0.1]] * 3).encode())
    status, _, _ = post_json(envoy.url + "/predictions/metered", {},
                             headers={"x-client-id": "tenant-7"})
    assert status == 200
    with urllib.request.urlopen(metrics, timeout=5) as reply:
        text = reply.read().decode()
    assert 'stealguard_client_rows_total{client="tenant-7"} 3.0' in text


def test_processor_down_is_an_error_never_the_raw_answer(tmp_path, scripted):
    upstream = f"127.0.0.1:{scripted.server_address[1]}"
    raw = [0.6, 0.3, 0.1]
    scripted.answers["/predictions/unguarded"] = (200, {}, json.dumps(raw).encode())
    nobody = f"127.0.0.1:{free_port()}"
    envoy = Envoy(tmp_path, {"stealguard": nobody, "torchserve_rest": upstream,
                             "kserve_v1": upstream, "torchserve_grpc": upstream,
                             "v2_rest": upstream, "v2_grpc": upstream})
    try:
        status, _, body = post_json(envoy.url + "/predictions/unguarded", {})
        raw_status, _, raw_body = post_json(envoy.raw_url + "/predictions/unguarded", {})
    finally:
        envoy.stop()
    assert (raw_status, json.loads(raw_body)) == (200, raw)
    assert status >= 500
    assert b"0.6" not in body


def test_shipped_configs_fail_closed_with_a_message_timeout_and_envoy_accepts_them(tmp_path):
    import subprocess

    import yaml
    from _extproc_helpers import ENVOY_YAML, envoy_binary

    envoy = yaml.safe_load(ENVOY_YAML.read_text())
    manager = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = manager["typed_config"]["http_filters"]
    assert [f["name"] for f in filters] == ["envoy.filters.http.ext_proc",
                                            "envoy.filters.http.router"]
    ext_proc = filters[0]["typed_config"]
    istio = yaml.safe_load((ENVOY_YAML.parent / "istio-envoyfilter.yaml").read_text())
    (patch,) = istio["spec"]["configPatches"]
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == (
        "envoy.filters.http.router")
    istio_ext_proc = patch["patch"]["value"]["typed_config"]
    gateway = yaml.safe_load((ENVOY_YAML.parent / "envoy-gateway.yaml").read_text())
    (gateway_ext_proc,) = gateway["spec"]["extProc"]
    for config in (ext_proc, istio_ext_proc):
        assert config["failure_mode_allow"] is False and config["message_timeout"]
        assert config["processing_mode"]["response_body_mode"] == "BUFFERED"
    assert gateway_ext_proc["failOpen"] is False and gateway_ext_proc["messageTimeout"]
    assert gateway_ext_proc["processingMode"]["response"]["body"] == "Buffered"
    # real Envoy validates the shipped config, and the Istio filter in its place
    istio_ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"] = "stealguard"
    filters[0]["typed_config"] = istio_ext_proc
    for name, config in (("envoy.yaml", ENVOY_YAML.read_text()), ("istio.yaml",
                                                                  yaml.safe_dump(envoy))):
        (tmp_path / name).write_text(config)
        done = subprocess.run([str(envoy_binary()), "--mode", "validate", "-c",
                               str(tmp_path / name)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


def test_answer_above_envoys_buffer_limit_is_an_error_not_the_raw_answer(stack, scripted):
    sidecar, _, envoy, _ = stack
    row = [0.5, 0.25, 0.25]
    body = json.dumps([row] * 600_000).encode()  # about 10 MB, over envoy.yaml's 8 MiB
    scripted.answers["/predictions/enormous"] = (200, {}, body)
    status, _, answer = post_json(envoy.url + "/predictions/enormous", {}, timeout=60)
    assert status >= 500
    assert len(answer) < 1000
    assert health_status(sidecar) == "SERVING"


def test_rate_limit_charges_the_end_principal_not_envoy(tmp_path, scripted):
    upstream = f"127.0.0.1:{scripted.server_address[1]}"
    scripted.answers["/predictions/limited"] = (200, {}, json.dumps([[0.7, 0.3]] * 2).encode())
    sidecar, address = start_sidecar("--rate-limit", "0.001", "--rate-burst", "4")  # rows
    envoy = None
    try:
        envoy = Envoy(tmp_path, {"stealguard": address, "torchserve_rest": upstream,
                                 "kserve_v1": upstream, "torchserve_grpc": upstream,
                                 "v2_rest": upstream, "v2_grpc": upstream})
        url = envoy.url + "/predictions/limited"
        alice = [post_json(url, {}, headers={"x-client-id": "alice"}) for _ in range(3)]
        bob = post_json(url, {}, headers={"x-client-id": "bob"})
    finally:
        if envoy is not None:
            envoy.stop()
        sidecar.stop()
    assert [status for status, _, _ in alice] == [200, 200, 429]  # 4 rows: 2 answers of 2
    status, headers, body = alice[2]
    assert json.loads(body)["kind"] == "exhausted" and "retry-after" in headers
    assert bob[0] == 200
