"""Generated protobuf code: committed, reproducible, and importable on protobuf 6 and 7."""

from __future__ import annotations

import filecmp
import os
import subprocess
import venv
from pathlib import Path

import pytest
from _procs import start_sidecar

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stealguard"


def test_generated_code_matches_the_protos(tmp_path):
    subprocess.run([str(ROOT / "proto" / "generate"), str(tmp_path)], check=True,
                   capture_output=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    committed = sorted(p.relative_to(ROOT / "proto") for p in (ROOT / "proto").rglob("*_pb2*.py*"))
    assert generated == committed
    stale = [str(p) for p in generated
             if not filecmp.cmp(tmp_path / p, ROOT / "proto" / p, shallow=False)]
    assert stale == [], f"run proto/generate: stale generated files {stale}"


PROTOBUF6_CALL = """
import numpy as np, google.protobuf
from stealguard.client import DefenseClient
assert google.protobuf.__version__.startswith("6."), google.protobuf.__version__
rows = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)
out = DefenseClient("{address}", timeout=30).perturb(rows, model="mnist")
assert out.shape == (1, 3) and out.argmax() == 0 and abs(out.sum() - 1) < 1e-6
print("protobuf", google.protobuf.__version__, "ok", out.tolist())
"""


@pytest.mark.timeout(600)
def test_client_works_with_protobuf_6_against_the_sidecar_on_protobuf_7(tmp_path):
    import google.protobuf

    assert google.protobuf.__version__.startswith("7."), "the main environment runs protobuf 7"
    env_dir = CACHE / "protobuf6-client"
    python = env_dir / "bin" / "python"
    if not python.exists():
        venv.create(env_dir, with_pip=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "protobuf==6.31.1", "grpcio==1.74.0", "googleapis-common-protos==1.70.0",
                    "numpy", "PyYAML", "setuptools>=69"],
                   check=True)
    # the package itself, no dependencies: only what the client needs is in this venv
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "--no-build-isolation", "-e", str(ROOT)],
                   check=True, capture_output=True)
    process, address = start_sidecar()
    try:
        result = subprocess.run(
            [str(python), "-c", PROTOBUF6_CALL.format(address=address)],
            capture_output=True, text=True, cwd=tmp_path, timeout=120,
        )
    finally:
        process.stop()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("protobuf 6.31.1 ok")
