"""Shared fixtures. Process helpers live in tests/_procs.py (importable as `_procs`)."""

from __future__ import annotations

import os

import pytest
from _defenses_helpers import TEST_SECRET
from _procs import start_sidecar


@pytest.fixture(scope="session", autouse=True)
def _torch_cache_under_tmp_path(tmp_path_factory):
    """torch makes $TMPDIR/torchinductor_$USER when an optimizer is built (here and in the
    processes tests start): under pytest's temporary directory, a run leaves nothing."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("torch")))


@pytest.fixture(scope="session")
def sidecar():
    """A real `stealguard-sidecar` on its defaults (policy `default` = coarse_confidence),
    keyed by TEST_SECRET so tests can compute its answers in process.

    Yields its address; stopped by PID at the end of the session.
    """
    process, address = start_sidecar(env={"STEALGUARD_SECRET": TEST_SECRET})
    yield address
    process.stop()
