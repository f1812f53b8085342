"""The model server's settings: flags, else environment variables, else defaults.

Imports nothing heavy, so a bad flag is reported before torch loads. The security, limit
and metrics settings have the sidecar's names and meanings (`GrpcApp.from_config` reads
them); their environment variables are prefixed STEALGUARD_MODELSERVER_ so that a model
server and a sidecar started from one environment do not pick up each other's
certificates or tokens. The model server's side of the sidecar connection is
STEALGUARD_SIDECAR_*.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from stealguard.modelserver.training import cache_root

DEFAULT_METRICS_PORT = 8082

_SERVER_KEYS = ("metrics_port", "max_message_bytes", "max_in_flight", "grace", "tls_cert",
                "tls_key", "tls_ca", "token_file", "rate_limit", "rate_burst",
                "client_header", "json_logs")
ENV = {
    "listen": "STEALGUARD_MODELSERVER_LISTEN",
    "sidecar": "STEALGUARD_SIDECAR",
    "sidecar_timeout": "STEALGUARD_SIDECAR_TIMEOUT",
    "sidecar_transport": "STEALGUARD_SIDECAR_TRANSPORT",
    "sidecar_tls_ca": "STEALGUARD_SIDECAR_TLS_CA",
    "sidecar_tls_cert": "STEALGUARD_SIDECAR_TLS_CERT",
    "sidecar_tls_key": "STEALGUARD_SIDECAR_TLS_KEY",
    "sidecar_token_file": "STEALGUARD_SIDECAR_TOKEN_FILE",
    "model_store": "STEALGUARD_MODEL_STORE",
    **{key: "STEALGUARD_MODELSERVER_" + key.upper() for key in _SERVER_KEYS},
}

_FILES = ("tls_cert", "tls_key", "tls_ca", "token_file", "sidecar_tls_ca", "sidecar_tls_cert",
          "sidecar_tls_key", "sidecar_token_file")
_POSITIVE_INTS = ("torch_threads", "max_batch", "max_message_bytes", "max_in_flight")
_ADDRESSES = ("listen", "sidecar")
TRANSPORTS = ("stream", "unary")


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:7070"
    sidecar: str = "127.0.0.1:50051"
    # Seconds for one sidecar call, shortened to what is left of the caller's deadline;
    # then the answer is label-only (fail-closed).
    sidecar_timeout: float = 1.0
    # "stream": every protect call is a message on one long-lived PerturbStream, retried
    # as a unary Perturb if the stream breaks (stealguard.client.stream); "unary": one
    # Perturb call each.
    sidecar_transport: str = "stream"
    # TLS to the sidecar (CA to trust; client cert and key for mutual TLS) and the file
    # holding the bearer token the model server presents to it.
    sidecar_tls_ca: str = ""
    sidecar_tls_cert: str = ""
    sidecar_tls_key: str = ""
    sidecar_token_file: str = ""
    model_store: Path = field(default_factory=lambda: cache_root() / "model-store")
    torch_threads: int = 2
    max_batch: int = 1024  # samples per request; below the sidecar's max_rows (65536)
    # Prometheus /metrics. None: DEFAULT_METRICS_PORT if it is free, else off with a
    # warning (so that several model servers on one host still start); 0: off.
    metrics_port: int | None = None
    # The sidecar's security and limits, same meanings (see stealguard.server.config).
    max_message_bytes: int = 64 * 1024 * 1024  # a batch of 5,000 float64 MNIST images: 31 MB
    max_in_flight: int = 1024
    grace: float = 10.0
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    token_file: str = ""
    rate_limit: float = 0.0
    rate_burst: int = 0
    client_header: str = "x-client-id"
    json_logs: bool = False

    def read_sidecar_token(self) -> str | None:
        """The token in `sidecar_token_file` (None without one); ValueError naming the flag."""
        if not self.sidecar_token_file:
            return None
        try:
            text = Path(self.sidecar_token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"--sidecar-token-file: cannot read {self.sidecar_token_file}: "
                             f"{error}") from None
        lines = [line.strip() for line in text.splitlines()
                 if line.strip() and not line.strip().startswith("#")]
        if len(lines) != 1:
            raise ValueError(f"--sidecar-token-file: {self.sidecar_token_file} must hold "
                             f"exactly one token (found {len(lines)} non-comment lines)")
        return lines[0]


def config_from(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> ServerConfig:
    """Flags (attributes of `args`, None when not given), else environment, else defaults.

    Raises ValueError naming the flag or variable of a bad value."""
    values = {}
    for item in fields(ServerConfig):
        key = item.name
        value, source = getattr(args, key, None), "--" + key.replace("_", "-")
        if value is None and env.get(ENV.get(key, "")):
            value, source = env[ENV[key]], ENV[key]
        if value is not None:
            values[key] = _checked(key, value, source)
    config = ServerConfig(**values)
    _check_pairs(config)
    return config


def _checked(key: str, value, source: str):
    if key in ("sidecar_timeout", "grace", "rate_limit"):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{source}: expected a number, got {value!r}") from None
        if key == "sidecar_timeout" and not value > 0:
            raise ValueError(f"{source}: must be > 0 seconds, got {value}")
        if not value >= 0:
            raise ValueError(f"{source}: must be >= 0, got {value}")
    elif key in (*_POSITIVE_INTS, "metrics_port", "rate_burst"):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{source}: expected a whole number, got {value!r}") from None
        low = 1 if key in _POSITIVE_INTS else 0
        if value < low:
            raise ValueError(f"{source}: must be at least {low}, got {value}")
        if key == "metrics_port" and value > 65535:
            raise ValueError(f"{source}: not a TCP port: {value}")
    elif key == "json_logs":
        if isinstance(value, str):
            if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"{source}: expected true or false, got {value!r}")
            value = value.lower() in ("1", "true", "yes")
    elif key == "sidecar_transport":
        if value not in TRANSPORTS:
            raise ValueError(f"{source}: expected one of {', '.join(TRANSPORTS)}, got {value!r}")
    elif key == "model_store":
        value = Path(value).expanduser()
        if value.exists() and not value.is_dir():
            raise ValueError(f"{source}: {value} is not a directory")
    elif key in _FILES:
        if not os.path.isfile(value) or not os.access(value, os.R_OK):
            raise ValueError(f"{source}: {value} is not a readable file")
    elif key in _ADDRESSES and ":" not in value:
        raise ValueError(f"{source}: expected HOST:PORT, got {value!r}")
    return value


def _check_pairs(config: ServerConfig) -> None:
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if config.tls_ca and not config.tls_cert:
        raise ValueError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key too")
    if bool(config.sidecar_tls_cert) != bool(config.sidecar_tls_key):
        raise ValueError("--sidecar-tls-cert and --sidecar-tls-key go together")
