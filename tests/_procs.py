"""Start and stop the project's real processes on loopback ports for integration tests.

Every process is started with its own console script, waited for through gRPC health,
and stopped by PID (SIGTERM, then SIGKILL if it does not exit).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_status(address: str, service: str = "", timeout: float = 1.0) -> str:
    """'SERVING', 'NOT_SERVING', ... or 'UNREACHABLE'."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def script(name: str) -> str:
    """Path of one of the project's console scripts (next to this Python)."""
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed: pip install -e '.[dev]'")
    return found


class Process:
    """A console script running in the background, its output in a log file.

    The log file is deleted when the process is stopped (its text is kept for `output()`),
    so that a test run leaves nothing in the temporary directory.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 cwd: str | None = None):
        self.args = args
        self._final_output: str | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="stealguard-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=full_env, cwd=cwd, stdin=subprocess.DEVNULL)
        self.pid = self.popen.pid
        _RUNNING.add(self)

    def output(self) -> str:
        if self._final_output is not None:
            return self._final_output
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, address: str, timeout: float = 600.0, service: str = "") -> None:
        """Wait until health reports SERVING; fail with the process's output otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.args[0]} exited with {self.popen.returncode}:\n"
                                   + self.output())
            if health_status(address, service) == "SERVING":
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.args[0]} not SERVING after {timeout}s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `sig`, wait for exit (SIGKILL after `timeout`); returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._final_output is None:
            self._log.close()
            self._final_output = self.log_path.read_text(errors="replace")
            self.log_path.unlink(missing_ok=True)
        _RUNNING.discard(self)
        return self.popen.returncode


# Processes not stopped yet: a test that forgets one still leaves no process or log behind.
_RUNNING: set[Process] = set()


@atexit.register
def _stop_leftovers() -> None:
    for process in list(_RUNNING):
        process.stop(signal.SIGKILL)


def start_sidecar(*extra: str, env: dict[str, str] | None = None,
                  port: int | None = None, wait: bool = True) -> tuple[Process, str]:
    """Start `stealguard-sidecar` on a free loopback port; returns (process, address)."""
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    # one secret for every test sidecar, so keyed answers survive a restart and can be
    # computed in process (tests/_defenses_helpers.py default_defense)
    env = {"STEALGUARD_SECRET": "stealguard-tests", **(env or {})}
    process = Process([script("stealguard-sidecar"), "--listen", address, *extra], env=env)
    if wait:
        try:
            process.wait_healthy(address)
        except Exception:
            process.stop(signal.SIGKILL)
            raise
    return process, address
