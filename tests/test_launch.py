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


def test_numba_starts_without_scipy_and_scipy_imports_afterwards():
    code = ("import sys; from stealguard.server import launch; launch.start_numba(); "
            "print('scipy' in sys.modules, 'scipy.linalg' in sys.modules, "
            "'cffi' in sys.modules); "
            "import numpy as np; from stealguard.server.policies import PolicySet; "
            "policy = PolicySet.from_config({'default': {'defense': 'reverse_sigmoid', "
            "'beta': 1.5, 'gamma': 0.3}}, b'key').resolve('default'); "
            "rows = np.array([[0.7, 0.2, 0.1]], dtype=np.float32); "
            "print(policy.perturb(rows).argmax(axis=1).tolist()); "
            "import scipy.stats; print(round(float(scipy.stats.shapiro([1, 2, 3, 4.5])"
            ".statistic), 3))")
    assert _fresh_python(code).splitlines() == ["False False False", "[0]", "0.989"]


def test_numba_started_by_another_thread_hides_nothing_from_this_one():
    finder = launch._HiddenFromThisThread("scipy")
    import threading

    seen = []
    thread = threading.Thread(target=lambda: seen.append(finder.find_spec("scipy.linalg")))
    thread.start()
    thread.join()
    assert seen == [None]
    with pytest.raises(ModuleNotFoundError, match="while numba starts"):
        finder.find_spec("scipy.linalg")
    assert finder.find_spec("scipyx") is None
