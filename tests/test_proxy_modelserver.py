"""Proxy mode in front of our own model server (TorchServe protocol), as real processes.

`stealguard-modelserver` answers `mnist-open` unprotected; `stealguard-sidecar proxy` in
front of it must answer exactly what the real sidecar makes of that answer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _modelserver_helpers import (
    TorchServeClient,
    mnist_test_images,
    npy_bytes,
    png_bytes,
    start_modelserver,
)
from _proxy_helpers import start_proxy
from stealguard.client import DefenseClient
from stealguard.modelserver.training import trained_model

CONFIG = """
policies:
  default: {defense: coarse_confidence}   # as the `sidecar` fixture, keyed alike
  mnist: {defense: none}   # the model server protects `mnist` itself
"""


@pytest.fixture(scope="module")
def stack(sidecar, tmp_path_factory):
    """(direct client, client through the proxy, sidecar client)."""
    trained_model()  # trained once per machine, cached
    store = tmp_path_factory.mktemp("store")
    modelserver, upstream = start_modelserver(sidecar, store)
    config = tmp_path_factory.mktemp("proxy") / "proxy.yaml"
    config.write_text(CONFIG)
    proxy, address = start_proxy("torchserve", upstream, str(config))
    clients = TorchServeClient(upstream), TorchServeClient(address)
    defense = DefenseClient(sidecar, timeout=10)
    yield (*clients, defense)
    for client in clients:
        client.close()
    defense.close()
    proxy.stop()
    modelserver.stop()


@pytest.fixture(scope="module")
def images():
    return mnist_test_images(3)


@pytest.mark.parametrize("encoding", ["png", "npy-sample", "npy-batch"])
def test_mnist_open_through_the_proxy_is_the_sidecars_perturbation_of_its_answer(
    stack, images, encoding
):
    direct, proxied, defense = stack
    data = {"png": lambda: png_bytes(images[0]),
            "npy-sample": lambda: npy_bytes(images[1]),
            "npy-batch": lambda: npy_bytes(images)}[encoding]()
    raw = direct.predict("mnist-open", data)
    got = proxied.predict("mnist-open", data)
    assert got.shape == raw.shape == ((3, 10) if encoding == "npy-batch" else (10,))
    assert got.tolist() == defense.perturb(raw).tolist()
    np.testing.assert_array_equal(got.argmax(-1), raw.argmax(-1))
    assert not np.allclose(got, raw, rtol=1e-3, atol=0)  # protected, not raw


def test_a_model_with_policy_none_passes_the_model_servers_answer_unchanged(stack, images):
    direct, proxied, _ = stack
    request = direct.request("mnist", npy_bytes(images[0]))
    raw = direct.stub.Predictions(request, timeout=30).prediction
    assert json.loads(proxied.stub.Predictions(request, timeout=30).prediction) == json.loads(raw)


def test_the_proxy_reaches_a_model_server_that_requires_mutual_tls(sidecar, tmp_path, images):
    """--upstream-tls-ca/-cert/-key: the upstream takes only clients with a certificate its
    CA signed, so the proxy can only become SERVING (its upstream answers Ping) and answer
    over mutual TLS."""
    import grpc
    from _certs import make_pki
    from _procs import Process, free_port, script
    from stealguard.client import channel_credentials
    from stealguard.compat.torchserve import inference_pb2, inference_pb2_grpc

    pki = make_pki(tmp_path / "pki")
    modelserver, upstream = start_modelserver(
        sidecar, tmp_path / "store", "--tls-cert", pki.path("server.pem"),
        "--tls-key", pki.path("server.key"), "--tls-ca", pki.path("ca.pem"))
    config = tmp_path / "proxy.yaml"
    config.write_text(CONFIG)
    address = f"127.0.0.1:{free_port()}"
    proxy = Process([script("stealguard-sidecar"), "proxy", "--listen", address,
                     "--upstream", upstream, "--config", str(config), "--health-interval",
                     "0.2", "--upstream-tls-ca", pki.path("ca.pem"),
                     "--upstream-tls-cert", pki.path("client.pem"),
                     "--upstream-tls-key", pki.path("client.key")],
                    env={"STEALGUARD_SECRET": "stealguard-tests"})  # as the test sidecars
    try:
        proxy.wait_healthy(address, timeout=300)
        data = npy_bytes(images[0])
        request = inference_pb2.PredictionsRequest(model_name="mnist-open", input={"data": data})
        mtls = channel_credentials(pki.path("ca.pem"), pki.path("client.pem"),
                                   pki.path("client.key"))
        with grpc.secure_channel(upstream, mtls) as channel:
            raw = json.loads(inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
                request, timeout=30).prediction)
        proxied = TorchServeClient(address)
        got = proxied.predict("mnist-open", data)
        proxied.close()
        with DefenseClient(sidecar, timeout=10) as defense:
            assert got.tolist() == defense.perturb(np.array(raw)).tolist()
    finally:
        proxy.stop()
        modelserver.stop()
