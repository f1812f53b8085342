"""Shared fixtures. Process helpers live in tests/_procs.py (importable as `_procs`)."""

from __future__ import annotations

import pytest
from _procs import start_sidecar


@pytest.fixture(scope="session")
def sidecar():
    """A real `stealguard-sidecar` on its defaults (policy `default` = reverse_sigmoid).

    Yields its address; stopped by PID at the end of the session.
    """
    process, address = start_sidecar()
    yield address
    process.stop()
