"""scripts/install-torch: the CPU build of torch wherever it runs, never a CUDA download.

The resolution is checked the honest way: the script runs its own pip command with
`--dry-run --report`, so what is checked is what it would install.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _procs import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install-torch"
CUDA_PREFIXES = ("nvidia-", "cuda-", "triton")


def install_torch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def resolved(done: subprocess.CompletedProcess) -> dict[str, str]:
    """{name: version} of the dry run's pip report."""
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    return {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in report["install"]}


def reachable(host: str, port: int = 443) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def test_resolution_with_this_machines_pip_config_is_the_cpu_build_without_cuda():
    done = install_torch("--dry-run")
    if "no source of the CPU build" in done.stderr:
        pytest.skip("pip's configuration here has no CPU torch and PyTorch's index is away")
    packages = resolved(done)
    assert packages["torch"] == "2.13.0+cpu"
    assert [name for name in packages if name.startswith(CUDA_PREFIXES)] == []


@pytest.mark.skipif(not reachable("download.pytorch.org"),
                    reason="PyTorch's CPU index is not reachable from here")
def test_isolated_resolution_from_pytorchs_cpu_index_has_no_cuda_packages():
    # --isolated: no pip.conf, no PIP_* variables, as on a newcomer's machine
    packages = resolved(install_torch("--dry-run", "--", "--isolated"))
    assert packages["torch"] == "2.13.0+cpu"
    assert [name for name in packages if name.startswith(CUDA_PREFIXES)] == []


def test_without_a_cpu_source_it_stops_with_what_to_do_instead_of_downloading_cuda():
    # isolated (PyPI only, whose torch 2.13.0 is the CUDA build) and a CPU index that is down
    done = install_torch("--check", "--", "--isolated",
                         env={"TORCH_INDEX_URL": f"http://127.0.0.1:{free_port()}/"})
    assert done.returncode == 1
    assert "no source of the CPU build of torch 2.13.0 (torch==2.13.0+cpu)" in done.stderr
    assert "TORCH_WHEEL=" in done.stderr and "PIP_FIND_LINKS=" in done.stderr
    assert done.stdout == ""


def test_an_installed_torch_2_13_is_left_alone():
    done = install_torch()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("install-torch: torch 2.13.0")
    assert done.stdout.rstrip().endswith("is installed already")


def test_torch_wheel_that_is_not_torch_2_13_is_refused(tmp_path):
    wheel = tmp_path / "torch-2.2.0+cpu-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"")
    done = install_torch("--check", env={"TORCH_WHEEL": str(wheel)})
    assert done.returncode == 1
    assert "is not a torch 2.13.0 wheel" in done.stderr


def test_the_test_command_the_dockerfile_and_build_images_all_use_it():
    root = SCRIPT.parents[1]
    assert "bash scripts/install-torch" in (root / "scripts" / "test").read_text()
    assert "install-torch" in (root / "deploy" / "Dockerfile").read_text()
    assert "scripts/install-torch\" --download" in (root / "deploy" / "build-images").read_text()
    assert "torch" not in " ".join(_sidecar_dependencies(root))


def _sidecar_dependencies(root: Path) -> list[str]:
    import tomllib

    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
