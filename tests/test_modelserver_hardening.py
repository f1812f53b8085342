"""Production hardening of the model server: mTLS and tokens on its own port, mTLS and a
token to the sidecar, fail-closed when the sidecar refuses it, deadlines, metrics.

Real `stealguard-sidecar` and `stealguard-modelserver` processes on loopback ports.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request

import grpc
import numpy as np
import pytest
from _certs import make_pki
from _modelserver_helpers import (
    STARTUP_TIMEOUT,
    mnist_test_images,
    png_bytes,
    start_modelserver,
)
from _procs import free_port, start_sidecar
from prometheus_client.parser import text_string_to_metric_families
from stealguard.client import DefenseClient, channel_credentials, label_only
from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc
from stealguard.modelserver.cli import main as modelserver_main
from test_hardening import wait_tls_healthy

APP_TOKEN = "app-s3cret"  # the model server's caller
SIDECAR_TOKEN = "modelserver-s3cret"  # the model server, calling the sidecar


def predict(address, model, data, credentials=None, token=None, timeout=30.0):
    """The decoded `prediction` of one Predictions call; raises grpc.RpcError."""
    channel = (grpc.secure_channel(address, credentials) if credentials
               else grpc.insecure_channel(address))
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with channel:
        reply = inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
            inference_pb2.PredictionsRequest(model_name=model, input={"data": data}),
            timeout=timeout, metadata=metadata)
    return np.array(json.loads(reply.prediction), dtype=np.float64)


def scrape(port):
    """{(metric sample name, sorted labels): value} from a /metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stack(pki, tmp_path_factory):
    """A sidecar with mTLS + tokens; model server `guarded` (mTLS + tokens on its port, mTLS
    + the right token to the sidecar) and `wrong` (the wrong token to the sidecar)."""
    files = tmp_path_factory.mktemp("tokens")
    (files / "sidecar-tokens").write_text(f"modelserver:{SIDECAR_TOKEN}\n")
    (files / "modelserver-tokens").write_text(f"app:{APP_TOKEN}\n")
    (files / "right").write_text(f"# the model server's token\n{SIDECAR_TOKEN}\n")
    (files / "wrong").write_text("not-the-token\n")
    port = free_port()
    sidecar_address = f"127.0.0.1:{port}"
    sidecar, _ = start_sidecar(
        "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key"),
        "--tls-ca", pki.path("ca.pem"), "--token-file", str(files / "sidecar-tokens"),
        port=port, wait=False)
    to_sidecar = ("--sidecar-tls-ca", pki.path("ca.pem"),
                  "--sidecar-tls-cert", pki.path("client.pem"),
                  "--sidecar-tls-key", pki.path("client.key"))
    metrics_guarded, metrics_wrong = free_port(), free_port()
    guarded, guarded_address = start_modelserver(
        sidecar_address, tmp_path_factory.mktemp("store"), *to_sidecar,
        "--sidecar-token-file", str(files / "right"), "--sidecar-timeout", "10",
        "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key"),
        "--tls-ca", pki.path("ca.pem"), "--token-file", str(files / "modelserver-tokens"),
        "--metrics-port", str(metrics_guarded), "--metrics-per-client")
    wrong, wrong_address = start_modelserver(
        sidecar_address, tmp_path_factory.mktemp("store"), *to_sidecar,
        "--sidecar-token-file", str(files / "wrong"), "--sidecar-timeout", "10",
        "--metrics-port", str(metrics_wrong))
    mtls = channel_credentials(pki.path("ca.pem"), pki.path("client.pem"),
                               pki.path("client.key"))
    processes = (sidecar, guarded, wrong)
    try:
        wait_tls_healthy(sidecar, sidecar_address, mtls, timeout=STARTUP_TIMEOUT)
        wait_tls_healthy(guarded, guarded_address, mtls, timeout=STARTUP_TIMEOUT)
        wrong.wait_healthy(wrong_address, timeout=STARTUP_TIMEOUT)
        yield {"sidecar": sidecar_address, "guarded": guarded_address,
               "wrong": wrong_address, "mtls": mtls, "metrics_guarded": metrics_guarded,
               "metrics_wrong": metrics_wrong, "processes": processes}
    finally:
        codes = [process.stop() for process in processes]
        assert codes == [0, 0, 0], "\n".join(p.output() for p in processes)


@pytest.fixture(scope="module")
def image():
    return png_bytes(mnist_test_images(1)[0])


def test_mtls_call_with_token_is_answered_with_the_sidecars_perturbation(stack, image):
    address, mtls = stack["guarded"], stack["mtls"]
    raw = predict(address, "mnist-open", image, mtls, APP_TOKEN)
    protected = predict(address, "mnist", image, mtls, APP_TOKEN)
    sidecar = DefenseClient(stack["sidecar"], timeout=10, credentials=mtls, token=SIDECAR_TOKEN)
    np.testing.assert_allclose(protected, sidecar.perturb(raw, model="mnist"), rtol=0,
                               atol=1e-12)
    assert protected.argmax() == raw.argmax()
    assert not np.allclose(protected, raw, rtol=1e-3)  # perturbed, not raw


def test_plaintext_call_to_the_tls_model_server_fails(stack, image):
    with pytest.raises(grpc.RpcError) as error:
        predict(stack["guarded"], "mnist", image, token=APP_TOKEN, timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("who", ["client cert from another CA", "server not trusted",
                                 "no client cert"])
def test_wrong_ca_or_missing_client_certificate_is_refused(stack, pki, image, who):
    credentials = {
        "client cert from another CA": channel_credentials(
            pki.path("ca.pem"), pki.path("rogue.pem"), pki.path("rogue.key")),
        "server not trusted": channel_credentials(
            pki.path("rogue-ca.pem"), pki.path("client.pem"), pki.path("client.key")),
        "no client cert": channel_credentials(pki.path("ca.pem")),
    }[who]
    with pytest.raises(grpc.RpcError) as error:
        predict(stack["guarded"], "mnist", image, credentials, APP_TOKEN, timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_unauthenticated(stack, image, token):
    with pytest.raises(grpc.RpcError) as error:
        predict(stack["guarded"], "mnist", image, stack["mtls"], token)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in error.value.details()


def test_wrong_sidecar_token_gives_label_only_answers_never_raw(stack, image):
    raw = predict(stack["wrong"], "mnist-open", image)
    answer = predict(stack["wrong"], "mnist", image)
    np.testing.assert_array_equal(answer, label_only(raw))
    assert not np.allclose(answer, raw)
    counts = scrape(stack["metrics_wrong"])
    key = ("stealguard_modelserver_fail_closed_total",
           (("code", "UNAUTHENTICATED"), ("model", "mnist")))
    assert counts[key] >= 1
    assert "UNAUTHENTICATED" in stack["processes"][2].output()


def test_metrics_count_requests_clients_rows_and_distortion(stack, image):
    address, mtls = stack["guarded"], stack["mtls"]
    before = scrape(stack["metrics_guarded"])
    raw = predict(address, "mnist-open", image, mtls, APP_TOKEN)
    protected = predict(address, "mnist", image, mtls, APP_TOKEN)
    with pytest.raises(grpc.RpcError):
        predict(address, "no-such-model", image, mtls, APP_TOKEN)
    after = scrape(stack["metrics_guarded"])

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("stealguard_modelserver_requests_total", model="mnist", code="OK") == 1
    assert grew("stealguard_modelserver_requests_total", model="mnist-open", code="OK") == 1
    assert grew("stealguard_modelserver_requests_total", model="unknown", code="NOT_FOUND") == 1
    assert grew("stealguard_modelserver_rows_total", model="mnist") == 1
    assert grew("stealguard_client_queries_total", client="app") == 3
    assert grew("stealguard_client_rows_total", client="app") == 2
    np.testing.assert_allclose(
        grew("stealguard_modelserver_l1_distortion_total", model="mnist"),
        np.abs(protected - raw).sum(), rtol=1e-9)
    assert grew("stealguard_modelserver_top1_changes_total", model="mnist") == 0
    assert grew("stealguard_modelserver_request_seconds_count", model="mnist") == 1
    assert ("stealguard_modelserver_in_flight", ()) in after
    assert ("stealguard_modelserver_l1_distortion_total",
            (("model", "mnist-open"),)) not in after  # unprotected: no distortion series


def test_each_stream_predictions2_message_is_one_client_query(stack, image):
    address, mtls = stack["guarded"], stack["mtls"]
    before = scrape(stack["metrics_guarded"])
    request = inference_pb2.PredictionsRequest(model_name="mnist", input={"data": image})
    with grpc.secure_channel(address, mtls) as channel:
        replies = list(inference_pb2_grpc.InferenceAPIsServiceStub(channel).StreamPredictions2(
            iter([request] * 3), metadata=(("authorization", f"Bearer {APP_TOKEN}"),),
            timeout=30))
    after = scrape(stack["metrics_guarded"])
    key = ("stealguard_client_queries_total", (("client", "app"),))
    assert [r.status.code for r in replies] == [0, 0, 0]
    assert after[key] - before.get(key, 0.0) == 3


def test_sidecar_call_gets_only_what_is_left_of_the_callers_deadline(tmp_path):
    """A sidecar that never answers (a socket nobody serves) with --sidecar-timeout 30:
    the caller's 0.5 s deadline ends the wait, the answer is label-only and counted."""
    from stealguard.client import AsyncDefenseClient
    from stealguard.modelserver.handler import Handler
    from stealguard.modelserver.metrics import Recorder
    from stealguard.modelserver.store import ModelSpec
    from stealguard.server.metrics import REGISTRY

    spec = ModelSpec(name="slow", version="1.0", architecture="simple",
                     weights=tmp_path / "unused.pt", input_shape=(3,),
                     labels=("a", "b", "c"), policy="slow")
    probs = np.array([[0.2, 0.7, 0.1]])
    sample = ("stealguard_modelserver_fail_closed_total",
              {"model": "slow", "code": "DEADLINE_EXCEEDED"})

    async def protect(address):
        client = AsyncDefenseClient(address, timeout=30)
        handler = Handler(spec, None, client, recorder=Recorder(True, ["slow"]))
        start = time.monotonic()
        try:
            return await handler.protect(probs, deadline=start + 0.5), time.monotonic() - start
        finally:
            await client.close()

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        before = REGISTRY.get_sample_value(*sample) or 0.0
        answer, waited = asyncio.run(protect(f"127.0.0.1:{silent.getsockname()[1]}"))
    np.testing.assert_array_equal(answer, [[0.0, 1.0, 0.0]])
    assert waited < 10  # the caller's 0.5 s, not the sidecar timeout's 30 s
    assert REGISTRY.get_sample_value(*sample) == before + 1


@pytest.mark.parametrize("argv, message", [
    (["--sidecar-token-file", "/nonexistent"],
     "--sidecar-token-file: /nonexistent is not a readable file"),
    (["--tls-cert", __file__], "--tls-cert and --tls-key go together"),
    (["--metrics-port", "70000"], "--metrics-port: not a TCP port: 70000"),
])
def test_bad_security_flag_is_one_line_naming_it(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        modelserver_main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_environment_names_configure_the_model_server(tmp_path):
    import argparse

    from stealguard.modelserver.config import config_from

    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    config = config_from(argparse.Namespace(), env={
        "STEALGUARD_MODELSERVER_METRICS_PORT": "0",
        "STEALGUARD_MODELSERVER_MAX_IN_FLIGHT": "8",
        "STEALGUARD_MODELSERVER_RATE_LIMIT": "2.5",
        "STEALGUARD_SIDECAR_TOKEN_FILE": str(token),
        "STEALGUARD_LISTEN": "0.0.0.0:1",  # the sidecar's: not read by the model server
    })
    assert (config.metrics_port, config.max_in_flight, config.rate_limit) == (0, 8, 2.5)
    assert config.read_sidecar_token() == "t0k3n"
    assert config.listen == "127.0.0.1:7070"
    assert config.max_message_bytes == 64 * 1024 * 1024



def test_metrics_port_asked_for_must_be_free_the_default_one_is_skipped(caplog):
    from stealguard.modelserver.config import DEFAULT_METRICS_PORT, ServerConfig
    from stealguard.modelserver.server import serve_metrics

    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"--metrics-port {port}: cannot serve metrics"):
            serve_metrics(ServerConfig(metrics_port=port))
    with socket.socket() as default:
        try:  # hold the default port; if another process holds it, it is taken all the same
            default.bind(("", DEFAULT_METRICS_PORT))
            default.listen()
        except OSError:
            pass
        assert serve_metrics(ServerConfig()) == 0
    assert f"metrics off: default port {DEFAULT_METRICS_PORT} is taken" in caplog.text


def test_model_server_predictions_go_through_the_protect_core_limits_and_observers(
        tmp_path, monkeypatch):
    """In process: the handler's protect step is the core, so the rate limit and the
    metrics observer apply to an unprotected model's answers too."""
    import io

    import torch
    from stealguard.modelserver.handler import Handler
    from stealguard.modelserver.metrics import Recorder
    from stealguard.modelserver.store import ModelSpec
    from stealguard.server.core import ProtectCore
    from stealguard.server.errors import Exhausted
    from stealguard.server.limits import TokenBucket
    from stealguard.server.platform import metrics as platform_metrics
    from stealguard.server.platform.metrics import REGISTRY

    monkeypatch.setattr(platform_metrics, "per_client", True)  # --metrics-per-client
    spec = ModelSpec(name="tiny", version="1.0", architecture="mlp",
                     weights=tmp_path / "unused.pt", input_shape=(3,), labels=("a", "b", "c"),
                     policy="none")
    recorder = Recorder(True, ["tiny"], protected=[])
    core = ProtectCore(None, limiter=TokenBucket(rate=0.001, burst=1), observers=[recorder])
    handler = Handler(spec, torch.nn.Linear(3, 3).eval(), None, recorder=recorder, core=core)
    buffer = io.BytesIO()
    np.save(buffer, np.full((2, 3), 0.5, np.float32))
    inputs = {"data": buffer.getvalue()}
    rows = ("stealguard_modelserver_rows_total", {"model": "tiny"})
    limited = ("stealguard_rate_limited_total", {"client": "core-test"})
    before = [REGISTRY.get_sample_value(*key) or 0.0 for key in (rows, limited)]

    async def twice():
        first = await handler.handle(inputs, client="core-test")
        with pytest.raises(Exhausted, match="client 'core-test' is over its rate limit"):
            await handler.handle(inputs, client="core-test")
        return first

    answer = np.array(json.loads(asyncio.run(twice())))
    assert answer.shape == (2, 3) and np.allclose(answer.sum(axis=1), 1.0)
    assert REGISTRY.get_sample_value(*rows) == before[0] + 2
    assert REGISTRY.get_sample_value(*limited) == before[1] + 1


def test_sighup_revokes_a_token_on_the_model_server_and_a_bad_file_keeps_the_old(
        sidecar, tmp_path, image):
    import signal

    def code(token):
        try:
            predict(address, "mnist", image, token=token)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    def until(predicate, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not (value := predicate()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return value

    tokens = tmp_path / "tokens"
    tokens.write_text("app:app-secret\nbob:bob-secret\n")
    process, address = start_modelserver(sidecar, tmp_path / "store", "--token-file",
                                         str(tokens))
    try:
        process.wait_healthy(address, timeout=STARTUP_TIMEOUT)
        assert code("bob-secret") == grpc.StatusCode.OK
        tokens.write_text("app:app-secret\n")  # bob revoked
        process.popen.send_signal(signal.SIGHUP)
        assert until(lambda: code("bob-secret") == grpc.StatusCode.UNAUTHENTICATED)
        assert code("app-secret") == grpc.StatusCode.OK
        tokens.write_text("# nobody\n")  # a file that would refuse every call: rejected
        process.popen.send_signal(signal.SIGHUP)
        assert until(lambda: "no token in the file" in process.output())
        assert code("app-secret") == grpc.StatusCode.OK
        assert code("bob-secret") == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert process.stop() == 0, process.output()
