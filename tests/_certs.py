"""Throw-away PKI for TLS tests: a CA, a server cert for 127.0.0.1/localhost, a client cert,
and a second CA nobody trusts. Made with the openssl command line."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             cwd=directory)


def _leaf(directory: Path, name: str, ca: str, san: str | None, cn: str = "") -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn or name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)
    extra = []
    if san:
        (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *extra, cwd=directory)


@dataclass
class Pki:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()


def make_pki(directory: Path) -> Pki:
    """ca.pem signs server.pem (127.0.0.1, localhost) and client.pem (CN=alice-app);
    rogue-ca.pem signs rogue.pem, which no server trusts."""
    directory.mkdir(parents=True, exist_ok=True)
    _ca(directory, "ca")
    _ca(directory, "rogue-ca")
    _leaf(directory, "server", "ca", "IP:127.0.0.1,DNS:localhost")
    # the client cert's CN names the client in per-client accounting
    _leaf(directory, "client", "ca", None, cn="alice-app")
    _leaf(directory, "rogue", "rogue-ca", None)
    return Pki(directory)
