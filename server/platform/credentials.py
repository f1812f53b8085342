"""TLS credentials and bearer tokens for stealguard's servers.

Tokens are read from a file, one per line: `name:token` (the name identifies the client
in metrics and logs), `name:token:gateway` (a gateway, believed when it names the end
client in `x-client-id`: see principal.py) or a bare `token` (named `token-<line>`).
Blank lines and lines starting with `#` are skipped. Presented tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc
from stealguard.server.principal import split_gateway_mark
from stealguard.server.settings import ConfigError, ServerSettings


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read {what} {path}: {error.strerror}") from None


def server_credentials(config: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from `tls_cert`/`tls_key`; with `tls_ca`, client certs are required."""
    if not config.tls_cert:
        return None
    key = _read(config.tls_key, "--tls-key")
    cert = _read(config.tls_cert, "--tls-cert")
    ca = _read(config.tls_ca, "--tls-ca") if config.tls_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


class Tokens:
    """The accepted bearer tokens and the client name each one stands for."""

    def __init__(self, named: dict[str, str], gateways: frozenset[str] = frozenset()):
        self._named = [(name, token.encode()) for name, token in named.items()]
        self.gateways = gateways  # names whose `x-client-id` is believed

    @classmethod
    def from_file(cls, path: str) -> Tokens:
        named: dict[str, str] = {}
        gateways = set()
        text = _read(path, "--token-file").decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, token = line.partition(":")
            if not sep:
                name, token = f"token-{number}", line
            token, gateway = split_gateway_mark(token.strip())
            if not token.strip():
                raise ConfigError(f"{path}:{number}: empty token")
            named[name.strip()] = token.strip()
            if gateway:
                gateways.add(name.strip())
        if not named:
            raise ConfigError(f"{path}: no token in the file; every call would be refused")
        return cls(named, frozenset(gateways))

    def client_of(self, authorization: str | None) -> str | None:
        """The client name for an `authorization: Bearer <token>` value, or None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        presented = authorization[len("Bearer "):].strip().encode()
        found = None
        for name, token in self._named:  # no early exit: same work for every token
            if hmac.compare_digest(presented, token):
                found = name
        return found
