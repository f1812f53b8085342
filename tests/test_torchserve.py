"""Real TorchServe 0.12 with the `stealguard.client.torchserve` handler.

A `.mar` is built with torch-model-archiver from the default model (an eager model file and
its state_dict) and our handler; TorchServe is started with token auth disabled on free
loopback ports and queried over its gRPC inference port with the stubs of TorchServe's
`inference.proto`; it is stopped with `torchserve --stop`. Needs
`pip install 'stealguard[torchserve]'` and Java 17.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _defenses_helpers import assert_protected_like
from _modelserver_helpers import TorchServeClient, mnist_test_images, npy_bytes, png_bytes
from _procs import free_port, start_sidecar
from _torchserve_helpers import archive, default_model, missing, running_torchserve
from stealguard.client import DefenseClient

pytestmark = pytest.mark.torchserve

if missing():
    pytest.skip(missing(), allow_module_level=True)


QUOTA = 3  # rows per end client per hour on the metered sidecar


@pytest.fixture(scope="module")
def stack(sidecar, tmp_path_factory):
    """TorchServe serving `mnist` (protected by the session's sidecar), `mnist-nosidecar`
    (its sidecar address has nothing listening) and `mnist-metered` (a sidecar with a
    per-principal quota, reached with a gateway token, end client from `x-client-id`).
    Yields TorchServe's ports."""
    import stealguard.client.torchserve as handler

    work = tmp_path_factory.mktemp("torchserve")
    store = work / "model-store"
    store.mkdir()
    (work / "tokens").write_text("torchserve:ts-gateway-secret:gateway\n")
    (work / "token").write_text("ts-gateway-secret\n")
    metered, metered_address = start_sidecar("--token-file", str(work / "tokens"),
                                             "--quota", f"{QUOTA}/1h")
    common = {"policy": "mnist", "timeout": 2.0, "input_shape": [1, 28, 28]}
    nobody = f"127.0.0.1:{free_port()}"
    models = {"mnist": {"sidecar": sidecar}, "mnist-nosidecar": {"sidecar": nobody},
              "mnist-metered": {"sidecar": metered_address, "token_file": str(work / "token"),
                                "principal_header": "X-Client-Id"}}
    try:
        for name, settings in models.items():
            archive(name, handler.__file__, work, store,
                    {"stealguard.yaml": json.dumps({**common, **settings})})
        with running_torchserve(work, store, list(models)) as ports:
            yield ports
    finally:
        metered.stop()


@pytest.fixture(scope="module")
def torchserve(stack):
    """TorchServe's gRPC inference address."""
    return f"127.0.0.1:{stack['grpc']}"


@pytest.fixture(scope="module")
def raw_model(torchserve):
    """The model's raw output (softmax of the same weights), computed in this process."""
    import torch

    module, _ = default_model()

    def probabilities(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(module(torch.from_numpy(batch)).double(), dim=1).numpy()

    return probabilities


def test_torchserve_answer_is_the_sidecars_perturbation_of_the_raw_output(
        torchserve, raw_model, sidecar):
    images = mnist_test_images(4)
    client = TorchServeClient(torchserve)
    try:
        with DefenseClient(sidecar, timeout=10) as defense:
            single = client.predict("mnist", npy_bytes(images[0]), timeout=60)
            batch = client.predict("mnist", npy_bytes(images), timeout=60)
            raw = raw_model(images)
            expected = defense.perturb(raw, model="mnist")
        assert single.shape == (10,) and batch.shape == (4, 10)
        assert_protected_like(batch, expected, raw)
        assert_protected_like(single, expected[0], raw[0])
    finally:
        client.close()


def test_torchserve_png_input_is_protected_too(torchserve, raw_model, sidecar):
    from stealguard.client.inputs import decode_input

    data = png_bytes(mnist_test_images(1)[0])
    client = TorchServeClient(torchserve)
    try:
        answer = client.predict("mnist", data, timeout=60)
    finally:
        client.close()
    raw = raw_model(decode_input(data, (1, 28, 28))[0])
    with DefenseClient(sidecar, timeout=10) as defense:
        assert_protected_like(answer, defense.perturb(raw, model="mnist")[0], raw)


def test_torchserve_without_a_reachable_sidecar_answers_label_only(torchserve, raw_model):
    images = mnist_test_images(4)
    client = TorchServeClient(torchserve)
    try:
        answer = client.predict("mnist-nosidecar", npy_bytes(images), timeout=60)
    finally:
        client.close()
    np.testing.assert_array_equal(answer, np.eye(10)[raw_model(images).argmax(1)])


def _rest_predict(port: int, model: str, body: bytes, client: str) -> np.ndarray:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/predictions/{model}", data=body,
                                     headers={"X-Client-Id": client,
                                              "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return np.array(json.loads(reply.read()))


def test_the_handler_charges_each_end_client_for_its_own_rows(stack, raw_model):
    """Through real TorchServe REST with x-client-id: the metered sidecar (a quota of 3 rows
    an hour per principal) charges alice and bob separately. Charged to the handler's token,
    bob's first answer would already be over the quota."""
    image = mnist_test_images(1)[0]
    body = npy_bytes(image)
    label = raw_model(image[None]).argmax(1)[0]

    def one_hot(answer: np.ndarray) -> bool:
        return bool(np.array_equal(answer, np.eye(10)[label]))

    alice = [_rest_predict(stack["inference"], "mnist-metered", body, "alice")
             for _ in range(QUOTA + 1)]
    bob = _rest_predict(stack["inference"], "mnist-metered", body, "bob")
    assert [one_hot(a) for a in alice] == [False] * QUOTA + [True]  # over: label-only
    assert all(a.argmax() == label and a.max() < 1 for a in alice[:QUOTA])
    assert not one_hot(bob) and bob.argmax() == label
