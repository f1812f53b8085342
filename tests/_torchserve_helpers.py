"""Real TorchServe 0.12 for the tests: the default model archived with a handler, started
with token auth disabled on free loopback ports, stopped with `torchserve --stop`.

Needs `pip install 'stealguard[torchserve]'` and Java 17 (`missing()` says what is absent).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from _procs import free_port

STARTUP_TIMEOUT = 240.0

MODEL_FILE = """\
from stealguard.modelserver.architectures import Simple


class MnistSimple(Simple):
    def __init__(self):
        super().__init__(({shape}), {classes})
"""


def missing() -> str | None:
    """Why TorchServe cannot run here, or None."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "java is not installed (TorchServe's frontend needs Java 17)"
    bindir = os.path.dirname(sys.executable)
    for name in ("torchserve", "torch-model-archiver"):
        if shutil.which(name, path=bindir) is None and shutil.which(name) is None:
            return f"{name} is not installed: pip install 'stealguard[torchserve]'"
    return None


def command(name: str) -> str:
    return shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)


def default_model():
    """The default model (trained once per machine, cached): (eager module, its files)."""
    import torch
    from stealguard.modelserver.architectures import build_model
    from stealguard.modelserver.training import trained_model

    model = trained_model()
    module = build_model(model.recipe.architecture, model.input_shape, model.num_classes)
    module.load_state_dict(torch.load(model.weights, map_location="cpu", weights_only=True))
    return module.eval(), model


def archive(name: str, handler: str, work: Path, store: Path,
            extra_files: dict[str, str] | None = None) -> None:
    """torch-model-archiver: the default model (model file + state_dict), `handler` (a
    file) and `extra_files` ({file name: text})."""
    _, model = default_model()
    folder = work / name
    folder.mkdir()
    (folder / "model.py").write_text(MODEL_FILE.format(
        shape=", ".join(map(str, model.input_shape)), classes=model.num_classes))
    extras = []
    for file_name, text in (extra_files or {}).items():
        (folder / file_name).write_text(text)
        extras.append(str(folder / file_name))
    # the archiver stages its files in $TMPDIR/<model name>, which it removes after: a
    # folder of this test's own, so that runs on one machine cannot remove each other's
    staging = work / f".archiver-{name}"
    staging.mkdir()
    subprocess.run(
        [command("torch-model-archiver"), "--model-name", name, "--version", "1.0",
         "--model-file", str(folder / "model.py"), "--serialized-file", str(model.weights),
         "--handler", handler, *(["--extra-files", ",".join(extras)] if extras else []),
         "--export-path", str(store)],
        check=True, cwd=folder, capture_output=True, timeout=120,
        env={**os.environ, "TMPDIR": str(staging)},
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


@contextlib.contextmanager
def running_torchserve(work: Path, store: Path, models: list[str]) -> Iterator[dict[str, int]]:
    """TorchServe serving `models` (`{name}.mar` in `store`) until the block ends; yields its
    ports: `inference` (REST), `grpc` (gRPC inference), `management`."""
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
        # the JVM's temporary folder (TorchServe unpacks models into tmpdir/models) and no
        # /tmp/hsperfdata_$USER: a run leaves nothing in /tmp
        f"vmargs=-Xmx1g -XX:+ExitOnOutOfMemoryError -XX:-UsePerfData "
        f"-Djava.io.tmpdir={work / 'tmp'}",
        "",
    ]))
    # TMPDIR isolates TorchServe's pid file (tempfile.gettempdir()/.model_server.pid), so
    # `torchserve --stop` stops this TorchServe and no other
    tmp = work / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEALGUARD_")}
    logs = str(work / "logs")
    env.update(TMPDIR=str(tmp), LOG_LOCATION=logs, METRICS_LOCATION=logs)
    start = subprocess.Popen(
        [command("torchserve"), "--start", "--ncs", "--disable-token-auth",
         "--ts-config", str(work / "config.properties"), "--model-store", str(store),
         "--models", *(f"{m}={m}.mar" for m in models)],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{ports['management']}", models, work / "logs")
        yield ports
    finally:
        subprocess.run([command("torchserve"), "--stop", "--foreground"], cwd=work, env=env,
                       capture_output=True, timeout=120)
        start.wait(timeout=30)
