"""Real Envoy in front of real TorchServe 0.12 (REST and gRPC), the sidecar as its ext_proc
processor. TorchServe answers the model's raw probabilities (tests/_torchserve_raw_handler.py)
as a list, a list of lists (a batch in one request) or TorchServe's top-5 dict; through Envoy
each answer is the sidecar's perturbation of exactly that raw answer."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from _defenses_helpers import assert_protected_like
from _extproc_helpers import Envoy
from _modelserver_helpers import TorchServeClient, mnist_test_images, npy_bytes
from _procs import free_port, start_sidecar
from _torchserve_helpers import archive, missing, running_torchserve
from stealguard.client import DefenseClient

pytestmark = pytest.mark.torchserve

if missing():
    pytest.skip(missing(), allow_module_level=True)

HANDLER = Path(__file__).with_name("_torchserve_raw_handler.py")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(sidecar address, Envoy, TorchServe gRPC address)."""
    work = tmp_path_factory.mktemp("extproc-torchserve")
    store = work / "model-store"
    store.mkdir()
    for name in ("mnist", "mnist-topk", "mnist-grpc"):
        archive(name, str(HANDLER), work, store)
    # "mnist" gets its own policy, so an answer protected under the default instead (the
    # model not learned from a TorchServe gRPC request) shows
    (work / "stealguard.yaml").write_text(
        "policies:\n  default: {defense: coarse_confidence}\n"
        "  mnist-grpc: {defense: reverse_sigmoid, beta: 1.5, gamma: 0.3}\n")
    sidecar, address = start_sidecar("--config", str(work / "stealguard.yaml"))
    envoy = None
    try:
        with running_torchserve(work, store, ["mnist", "mnist-topk", "mnist-grpc"]) as ports:
            rest, grpc_address = f"127.0.0.1:{ports['inference']}", f"127.0.0.1:{ports['grpc']}"
            nobody = f"127.0.0.1:{free_port()}"
            envoy = Envoy(work, {"stealguard": address, "torchserve_rest": rest,
                                 "kserve_v1": rest, "torchserve_grpc": grpc_address,
                                 "v2_rest": nobody, "v2_grpc": nobody})
            yield address, envoy, grpc_address
    finally:
        if envoy is not None:
            envoy.stop()
        sidecar.stop()


def _predict(url: str, data: bytes):
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"content-type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        body = reply.read()
        assert int(reply.headers["content-length"]) == len(body)
        return json.loads(body)


def test_rest_list_and_batch_through_envoy_are_the_sidecars_perturbation_of_the_raw_answer(
        stack):
    sidecar, envoy, _ = stack
    images = mnist_test_images(4)
    raw_one = np.array(_predict(f"{envoy.raw_url}/predictions/mnist", npy_bytes(images[0])))
    raw_batch = np.array(_predict(f"{envoy.raw_url}/predictions/mnist", npy_bytes(images)))
    one = np.array(_predict(f"{envoy.url}/predictions/mnist", npy_bytes(images[0])))
    batch = np.array(_predict(f"{envoy.url}/predictions/mnist/1.0", npy_bytes(images)))
    assert one.shape == (10,) and batch.shape == (4, 10)
    with DefenseClient(sidecar, timeout=10) as defense:
        # the default's keyed rest follows the exact bytes the sidecar saw; TorchServe's JSON
        # may round differently on the two paths, so compare what the policy discloses
        assert_protected_like(one, defense.perturb(raw_one, model="mnist"), raw_one)
        assert_protected_like(batch, defense.perturb(raw_batch, model="mnist"), raw_batch)


def test_rest_top_k_dict_keeps_its_labels_and_order_and_is_perturbed_with_the_rest(stack):
    sidecar, envoy, _ = stack
    image = npy_bytes(mnist_test_images(1)[0])
    raw = _predict(f"{envoy.raw_url}/predictions/mnist-topk", image)
    answer = _predict(f"{envoy.url}/predictions/mnist-topk", image)
    assert isinstance(raw, dict) and len(raw) == 5
    assert list(answer) == list(raw)
    values = list(raw.values())
    with DefenseClient(sidecar, timeout=10) as defense:
        expected = defense.perturb(np.array([*values, 1 - sum(values)]), model="mnist-topk")
    np.testing.assert_array_equal(list(answer.values()), expected[:-1])


def test_grpc_predictions_through_envoy_are_the_sidecars_perturbation(stack):
    """The model comes from the request message (Envoy sends the request on this route
    only, deploy/envoy/envoy.yaml): its own policy protects the answer, not the default."""
    sidecar, envoy, torchserve = stack
    images = npy_bytes(mnist_test_images(3))
    direct, proxied = TorchServeClient(torchserve), TorchServeClient(
        envoy.url.removeprefix("http://"))
    try:
        raw = direct.predict("mnist-grpc", images, timeout=60)
        answer = proxied.predict("mnist-grpc", images, timeout=60)
    finally:
        direct.close()
        proxied.close()
    assert answer.shape == (3, 10)
    with DefenseClient(sidecar, timeout=10) as defense:
        expected = defense.perturb(raw, model="mnist-grpc")
        under_default = defense.perturb(raw, model="")
    np.testing.assert_allclose(answer, expected, rtol=0, atol=1e-6)
    assert not np.allclose(answer, under_default, rtol=0, atol=1e-3)
    assert not np.allclose(answer, raw, rtol=0, atol=1e-3)
