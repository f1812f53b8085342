"""The console scripts choose gRPC's poller before grpc is imported (server/launch.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest
from stealguard.server import launch

SCRIPTS = {"stealguard-sidecar", "stealguard-modelserver", "stealguard-load",
           "stealguard-attack"}


def _fresh_python(code: str, **env: str | None) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    environ.update({k: v for k, v in env.items() if v is not None})
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout.strip()


def test_every_console_script_goes_through_the_launcher():
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")
               if e.name in SCRIPTS}
    assert set(scripts) == SCRIPTS
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module == "stealguard.server.launch", name
        assert callable(getattr(launch, function)), name


def test_the_launcher_imports_no_grpc():
    assert _fresh_python("import sys, stealguard.server.launch; "
                         "print('grpc' in sys.modules)") == "False"


@pytest.mark.skipif(not launch.CHECKED[0] <= (launch._grpcio_release() or (0, 0))
                    <= launch.CHECKED[1], reason="grpcio is not a release the launcher checked")
def test_the_poller_is_chosen_when_the_environment_says_nothing():
    code = ("import os; from stealguard.server import launch; launch.prefer_poller(); "
            "print(repr(os.environ.get('GRPC_EXPERIMENTS')))")
    assert _fresh_python(code) == repr(launch.POLLER)


@pytest.mark.parametrize("value", ["", "event_engine_client"])
def test_a_value_in_the_environment_is_kept(value):
    code = ("import os; from stealguard.server import launch; launch.prefer_poller(); "
            "print(repr(os.environ.get('GRPC_EXPERIMENTS')))")
    assert _fresh_python(code, GRPC_EXPERIMENTS=value) == repr(value)


def test_an_unchecked_grpcio_keeps_its_defaults(monkeypatch):
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    monkeypatch.setattr(launch, "_grpcio_release", lambda: (1, 99))
    launch.prefer_poller()
    assert "GRPC_EXPERIMENTS" not in os.environ
