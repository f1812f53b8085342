"""TLS credentials and bearer tokens for stealguard's servers.

Tokens are read from a file, one per line: `name:token` (the name identifies the client
in metrics and logs), `name:token:gateway` (a gateway, believed when it names the end
client in `x-client-id`: see principal.py) or a bare `token` (named `token-<line>`).
Blank lines and lines starting with `#` are skipped. Presented tokens are compared in constant time.

Both are reloadable (SIGHUP, `GrpcApp.prepare_reload`): the certificates are served
through gRPC's dynamic credentials (`Certificates`), so a new key pair or CA applies to the
next TLS handshake; new tokens apply to the next call.
"""

from __future__ import annotations

import hmac
import ssl
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
    certificates = Certificates.from_settings(config)
    return certificates.credentials() if certificates else None


class Certificates:
    """The server's key pair (and the CA of its clients, for mutual TLS), swappable while
    the server runs: gRPC asks `_fetch` for a new configuration at each handshake."""

    def __init__(self, configuration, mutual: bool):
        self._configuration = configuration
        self._fresh = False
        self.mutual = mutual

    @staticmethod
    def _configuration_of(config: ServerSettings):
        key = _read(config.tls_key, "--tls-key")
        cert = _read(config.tls_cert, "--tls-cert")
        ca = _read(config.tls_ca, "--tls-ca") if config.tls_ca else None
        try:  # a key that does not match the certificate would fail every handshake
            ssl.create_default_context().load_cert_chain(config.tls_cert, config.tls_key)
        except (ssl.SSLError, ValueError) as error:
            raise ConfigError(f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: "
                              f"not a matching PEM certificate and key: {error}") from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    @classmethod
    def from_settings(cls, config: ServerSettings) -> Certificates | None:
        if not config.tls_cert:
            return None
        return cls(cls._configuration_of(config), mutual=bool(config.tls_ca))

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration, self._fetch, require_client_authentication=self.mutual)

    def _fetch(self):
        if not self._fresh:
            return None  # keep the current one
        self._fresh = False
        return self._configuration

    def prepare(self, config: ServerSettings):
        """Read `config`'s files (`ConfigError` if they cannot be); returns `install`."""
        if not config.tls_cert or bool(config.tls_ca) != self.mutual:
            raise ConfigError("turning TLS or mutual TLS on or off needs a restart; "
                              "SIGHUP only replaces the certificate files' contents")
        configuration = self._configuration_of(config)

        def install() -> None:
            self._configuration, self._fresh = configuration, True

        return install


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

    def __len__(self) -> int:
        return len(self._named)

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
