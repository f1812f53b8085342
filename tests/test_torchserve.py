"""Real TorchServe 0.12 with the `stealguard.client.torchserve` handler.

A `.mar` is built with torch-model-archiver from the default model (an eager model file and
its state_dict) and our handler; TorchServe is started with token auth disabled on free
loopback ports and queried over its gRPC inference port with the stubs of TorchServe's
`inference.proto`; it is stopped with `torchserve --stop`. Needs
`pip install 'stealguard[torchserve]'` and Java 17.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from _modelserver_helpers import TorchServeClient, mnist_test_images, npy_bytes, png_bytes
from _procs import free_port
from stealguard.client import DefenseClient

pytestmark = pytest.mark.torchserve

STARTUP_TIMEOUT = 240.0


def _missing() -> str | None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "java is not installed (TorchServe's frontend needs Java 17)"
    bindir = os.path.dirname(sys.executable)
    for command in ("torchserve", "torch-model-archiver"):
        if shutil.which(command, path=bindir) is None and shutil.which(command) is None:
            return f"{command} is not installed: pip install 'stealguard[torchserve]'"
    return None


if _missing():
    pytest.skip(_missing(), allow_module_level=True)


def _command(name: str) -> str:
    return shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)


MODEL_FILE = """\
from stealguard.attacks.architectures import Simple


class MnistSimple(Simple):
    def __init__(self):
        super().__init__(({shape}), {classes})
"""


def _default_model():
    """The default model (trained once per machine, cached): (eager module, its files)."""
    import torch
    from stealguard.attacks.architectures import build_model
    from stealguard.modelserver.training import trained_model

    model = trained_model()
    module = build_model(model.recipe.architecture, model.input_shape, model.num_classes)
    module.load_state_dict(torch.load(model.weights, map_location="cpu", weights_only=True))
    return module.eval(), model


def _archive(name: str, settings: dict, work: Path, store: Path) -> None:
    """torch-model-archiver: an eager model (model file + state_dict), our handler and a
    stealguard.yaml extra file."""
    import stealguard.client.torchserve as handler

    _, model = _default_model()
    folder = work / name
    folder.mkdir()
    (folder / "model.py").write_text(MODEL_FILE.format(
        shape=", ".join(map(str, model.input_shape)), classes=model.num_classes))
    (folder / "stealguard.yaml").write_text(json.dumps(settings))
    subprocess.run(
        [_command("torch-model-archiver"), "--model-name", name, "--version", "1.0",
         "--model-file", str(folder / "model.py"), "--serialized-file", str(model.weights),
         "--handler", handler.__file__,
         "--extra-files", str(folder / "stealguard.yaml"), "--export-path", str(store)],
        check=True, cwd=folder, capture_output=True, timeout=120,
    )


def _wait_ready(management: str, models: list[str], logs: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    pending = list(models)
    while pending and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{management}/models/{pending[0]}", timeout=5) as reply:
                workers = json.loads(reply.read())[0]["workers"]
            if workers and workers[0]["status"] == "READY":
                pending.pop(0)
                continue
        except OSError:
            pass
        time.sleep(0.5)
    if pending:
        log_text = "".join(p.read_text(errors="replace")[-4000:] for p in logs.glob("*.log"))
        raise TimeoutError(f"TorchServe models {pending} not READY after {STARTUP_TIMEOUT}s:\n"
                           f"{log_text}")


@pytest.fixture(scope="module")
def torchserve(sidecar, tmp_path_factory):
    """TorchServe serving `mnist` (protected by the session's sidecar) and `mnist-nosidecar`
    (its sidecar address has nothing listening). Yields the gRPC inference address."""
    work = tmp_path_factory.mktemp("torchserve")
    store = work / "model-store"
    store.mkdir()
    common = {"policy": "mnist", "timeout": 2.0, "input_shape": [1, 28, 28]}
    _archive("mnist", {**common, "sidecar": sidecar}, work, store)
    _archive("mnist-nosidecar", {**common, "sidecar": f"127.0.0.1:{free_port()}"}, work, store)

    ports = {key: free_port() for key in ("inference", "management", "metrics", "grpc", "grpcm")}
    (work / "config.properties").write_text("\n".join([
        f"inference_address=http://127.0.0.1:{ports['inference']}",
        f"management_address=http://127.0.0.1:{ports['management']}",
        f"metrics_address=http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_address=127.0.0.1",
        f"grpc_inference_port={ports['grpc']}",
        "grpc_management_address=127.0.0.1",
        f"grpc_management_port={ports['grpcm']}",
        "disable_token_authorization=true",
        "default_workers_per_model=1",
        "install_py_dep_per_model=false",
        f"model_store={store}",
        "",
    ]))
    # TMPDIR isolates TorchServe's pid file (tempfile.gettempdir()/.model_server.pid), so
    # `torchserve --stop` stops this TorchServe and no other
    tmp = work / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEALGUARD_")}
    logs = str(work / "logs")
    env.update(TMPDIR=str(tmp), LOG_LOCATION=logs, METRICS_LOCATION=logs)
    models = ["mnist", "mnist-nosidecar"]
    start = subprocess.Popen(
        [_command("torchserve"), "--start", "--ncs", "--disable-token-auth",
         "--ts-config", str(work / "config.properties"), "--model-store", str(store),
         "--models", *(f"{m}={m}.mar" for m in models)],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{ports['management']}", models, work / "logs")
        yield f"127.0.0.1:{ports['grpc']}"
    finally:
        subprocess.run([_command("torchserve"), "--stop", "--foreground"], cwd=work, env=env,
                       capture_output=True, timeout=120)
        start.wait(timeout=30)


@pytest.fixture(scope="module")
def raw_model(torchserve):
    """The model's raw output (softmax of the same weights), computed in this process."""
    import torch

    module, _ = _default_model()

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
        np.testing.assert_allclose(batch, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(single, expected[0], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(batch.argmax(1), raw.argmax(1))
        assert np.abs(batch - raw).max() > 0.05  # perturbed, not the raw output
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
        np.testing.assert_allclose(answer, defense.perturb(raw, model="mnist")[0], atol=1e-6)


def test_torchserve_without_a_reachable_sidecar_answers_label_only(torchserve, raw_model):
    images = mnist_test_images(4)
    client = TorchServeClient(torchserve)
    try:
        answer = client.predict("mnist-nosidecar", npy_bytes(images), timeout=60)
    finally:
        client.close()
    np.testing.assert_array_equal(answer, np.eye(10)[raw_model(images).argmax(1)])
