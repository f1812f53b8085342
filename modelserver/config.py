"""The model server's settings: `ServerSettings` (the sidecar's listener, TLS, tokens,
limits, metrics and logging, same meanings) plus the sidecar connection and the models.

Imports nothing heavy, so a bad flag is reported before torch loads. One loader for
every command (`stealguard.server.settings.load_settings`): defaults < YAML (`--config`,
or STEALGUARD_MODELSERVER_CONFIG) < environment < flags. Environment variables are
STEALGUARD_MODELSERVER_<KEY>, so that a model server and a sidecar started from one
environment do not pick up each other's certificates or tokens; the model server's side of
the sidecar connection is STEALGUARD_SIDECAR_*, the store STEALGUARD_MODEL_STORE.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from stealguard.client.defense import read_token_file
from stealguard.modelserver.training import cache_root
from stealguard.server.settings import ConfigError, ServerSettings, load_settings, setting

DEFAULT_METRICS_PORT = 8082
DEFAULT_HTTP_PORT = 8080  # TorchServe's inference_address
PREFIX = "STEALGUARD_MODELSERVER_"
TRANSPORTS = ("stream", "unary")


@dataclass
class ServerConfig(ServerSettings):
    listen: str = setting("127.0.0.1:7070", "address")
    # Prometheus /metrics. None: DEFAULT_METRICS_PORT if it is free, else off with a
    # warning (so that several model servers on one host still start); 0: off.
    metrics_port: int | None = setting(None, "port")
    # TorchServe's REST inference API (`stealguard.modelserver.rest`) on the --listen host.
    # None: DEFAULT_HTTP_PORT if it is free, else off with a warning; 0: off.
    http_port: int | None = setting(None, "port")
    sidecar: str = setting("127.0.0.1:50051", "address", env="STEALGUARD_SIDECAR")
    # Seconds for one sidecar call, shortened to what is left of the caller's deadline;
    # then the answer is label-only (fail-closed).
    sidecar_timeout: float = setting(1.0, "duration", positive=True,
                                     env="STEALGUARD_SIDECAR_TIMEOUT")
    # "stream": every protect call is a message on one long-lived PerturbStream, retried
    # as a unary Perturb if the stream breaks (stealguard.client.stream); "unary": one
    # Perturb call each.
    sidecar_transport: str = setting("stream", "choice", choices=TRANSPORTS,
                                     env="STEALGUARD_SIDECAR_TRANSPORT")
    # TLS to the sidecar (CA to trust; client cert and key for mutual TLS) and the file
    # holding the bearer token the model server presents to it.
    sidecar_tls_ca: str = setting("", "file", env="STEALGUARD_SIDECAR_TLS_CA")
    sidecar_tls_cert: str = setting("", "file", env="STEALGUARD_SIDECAR_TLS_CERT")
    sidecar_tls_key: str = setting("", "file", env="STEALGUARD_SIDECAR_TLS_KEY")
    sidecar_token_file: str = setting("", "file", env="STEALGUARD_SIDECAR_TOKEN_FILE")
    model_store: Path = setting(kind="path", env="STEALGUARD_MODEL_STORE",
                                factory=lambda: cache_root() / "model-store")
    torch_threads: int = setting(2, "int", min=1)
    max_batch: int = setting(1024, "int", min=1)  # samples per request; below max_rows

    PAIRS = (("tls_cert", "tls_key"), ("sidecar_tls_cert", "sidecar_tls_key"))

    def read_sidecar_token(self) -> str | None:
        """The token in `sidecar_token_file` (None without one); ValueError naming the flag."""
        if not self.sidecar_token_file:
            return None
        try:
            return read_token_file(self.sidecar_token_file, "--sidecar-token-file")
        except ValueError as error:
            raise ConfigError(str(error)) from None


def load_modelserver_config(path: str | None = None, env: Mapping[str, str] | None = None,
                            overrides: Mapping[str, object] | None = None) -> ServerConfig:
    """The model server's settings (see the module docstring); ConfigError naming the
    flag, file key or variable of a bad value."""
    return load_settings(ServerConfig, path, env=env, overrides=overrides, prefix=PREFIX)


def config_from(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> ServerConfig:
    """The settings for parsed flags `args` (attributes None when not given)."""
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "prepare")}
    return load_modelserver_config(getattr(args, "config", None), env, flags)
