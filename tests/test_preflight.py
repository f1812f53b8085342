"""deploy/preflight and deploy/build-images without what they need: a message naming the
fix, before any slow step. Fake `docker` commands stand in for the states of a machine."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFLIGHT = ROOT / "deploy" / "preflight"


def fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


ENGINE_UP = 'if [[ "$1" == version ]]; then echo 24.0.5; exit 0; fi\n'
NO_PLUGIN = ('if [[ "$1" == compose ]]; then\n'
             '  echo "unknown flag: --abort-on-container-exit" >&2; exit 1\nfi\n')


def run(command: list[str], bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    path = f"{bin_dir}:{os.environ['PATH']}" if "PATH" not in env else env.pop("PATH")
    return subprocess.run(command, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env={**os.environ, "PATH": path, **env})


def test_without_a_docker_command_it_says_how_to_install_docker(tmp_path):
    done = run(["/bin/bash", str(PREFLIGHT)], tmp_path, PATH=str(tmp_path))
    assert done.returncode == 1
    assert "no docker command" in done.stderr
    assert "apt-get install -y docker.io docker-compose" in done.stderr


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker command here")
def test_with_no_engine_running_it_says_how_to_start_one(tmp_path):
    socket = f"unix://{tmp_path}/docker.sock"
    done = run([str(PREFLIGHT)], tmp_path, DOCKER_HOST=socket)
    assert done.returncode == 1
    assert f"no Docker engine answers at {socket}" in done.stderr
    assert "sudo systemctl start docker" in done.stderr and "dockerd" in done.stderr


def test_permission_denied_names_the_docker_group(tmp_path):
    fake(tmp_path, "docker", 'echo "permission denied while trying to connect to the Docker '
                             'daemon socket" >&2; exit 1\n')
    done = run([str(PREFLIGHT)], tmp_path)
    assert done.returncode == 1
    assert "usermod -aG docker" in done.stderr


def test_compose_v1_only_is_found_and_named(tmp_path):
    fake(tmp_path, "docker", ENGINE_UP + NO_PLUGIN)
    fake(tmp_path, "docker-compose", 'echo 1.29.2\n')
    done = run([str(PREFLIGHT)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "use 'docker-compose'" in done.stdout
    printed = run([str(PREFLIGHT), "--print-compose"], tmp_path)
    assert printed.stdout == "docker-compose\n"


def test_compose_v2_is_preferred(tmp_path):
    fake(tmp_path, "docker", ENGINE_UP + 'exit 0\n')
    fake(tmp_path, "docker-compose", 'echo 1.29.2\n')
    assert run([str(PREFLIGHT), "--print-compose"], tmp_path).stdout == "docker compose\n"


def test_no_compose_at_all_names_both_packages(tmp_path):
    fake(tmp_path, "docker", ENGINE_UP + NO_PLUGIN)
    fake(tmp_path, "docker-compose", 'exit 127\n')
    done = run([str(PREFLIGHT)], tmp_path)
    assert done.returncode == 1
    assert "docker-compose-plugin" in done.stderr and "install -y docker-compose" in done.stderr


def test_build_images_without_an_engine_stops_before_debootstrap(tmp_path):
    fake(tmp_path, "docker", 'echo "Cannot connect to the Docker daemon at '
                             'unix:///var/run/docker.sock." >&2; exit 1\n')
    before = set(glob.glob("/tmp/stealguard-*"))
    done = run([str(ROOT / "deploy" / "build-images")], tmp_path)
    assert done.returncode == 1
    assert "no Docker engine answers" in done.stderr
    assert "debootstrap" not in done.stdout + done.stderr
    assert set(glob.glob("/tmp/stealguard-*")) == before
