"""The model server's settings: flags, else STEALGUARD_* environment, else defaults.

Imports nothing heavy, so a bad flag is reported before torch loads.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from stealguard.modelserver.training import cache_root

ENV = {
    "listen": "STEALGUARD_MODELSERVER_LISTEN",
    "sidecar": "STEALGUARD_SIDECAR",
    "sidecar_timeout": "STEALGUARD_SIDECAR_TIMEOUT",
    "model_store": "STEALGUARD_MODEL_STORE",
}


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:7070"
    sidecar: str = "127.0.0.1:50051"
    sidecar_timeout: float = 1.0  # then the answer is label-only (fail-closed)
    model_store: Path = field(default_factory=lambda: cache_root() / "model-store")
    torch_threads: int = 2
    max_batch: int = 1024  # samples per request; below the sidecar's max_rows (65536)


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
    return ServerConfig(**values)


def _checked(key: str, value, source: str):
    if key == "sidecar_timeout":
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{source}: expected seconds, got {value!r}") from None
        if not value > 0:
            raise ValueError(f"{source}: must be > 0 seconds, got {value}")
    elif key in ("torch_threads", "max_batch"):
        if int(value) < 1:
            raise ValueError(f"{source}: must be at least 1, got {value}")
        value = int(value)
    elif key == "model_store":
        value = Path(value).expanduser()
        if value.exists() and not value.is_dir():
            raise ValueError(f"{source}: {value} is not a directory")
    elif ":" not in value:
        raise ValueError(f"{source}: expected HOST:PORT, got {value!r}")
    return value
