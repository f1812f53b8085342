"""The sidecar's and the proxy's settings: `ServerSettings` plus policies, workers, the
noise secret, max_rows and the proxy's upstream.

`load_config` is the one loader (`stealguard.server.settings.load_settings`): defaults <
YAML file < STEALGUARD_* environment < CLI flags. It checks types and names and says which
source and key were wrong. Policies are checked when they are built
(`PolicySet.from_config`).
"""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stealguard.server.settings import (
    ConfigError,
    ServerSettings,
    as_number,
    load_settings,
    setting,
)

__all__ = ["DEFAULT_POLICY", "Config", "ConfigError", "load_config"]

# The default: the label with a margin, the confidence on twelve levels (0.5, 0.7, then two
# per nine from 0.9 to 0.99999), the rest keyed (README, "The utility contract"; measured in
# attacks/results/*/contract.md).
DEFAULT_POLICY: dict[str, Any] = {
    "defense": "coarse_confidence",
    "edges": [0.5, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999, 0.9997, 0.9999, 0.99997, 0.99999],
    "margin": 0.02,
}
# Keys of the default policy that flags and environment may set.
_POLICY_OVERRIDES = ("defense", "beta", "gamma")


@dataclass
class Config(ServerSettings):
    """Everything the sidecar (and the proxy) needs to start. Field names are the YAML keys."""

    workers: int = setting(1, "int", min=1)
    # Key of the random defenses' noise. Empty: a random key is drawn at start-up (shared
    # by all workers), so answers to a repeated query change only across restarts.
    secret: str = setting("")
    max_rows: int = setting(65536, "int", min=1)  # most rows in one request
    # Proxy mode only (`stealguard-sidecar proxy`): the real model server and its API, and
    # TLS to it (the CA that signed its certificate; a client cert and key for mutual TLS).
    upstream: str = setting("")
    protocol: str = setting("torchserve")
    upstream_tls_ca: str = setting("")
    upstream_tls_cert: str = setting("")
    upstream_tls_key: str = setting("")
    # Not a plain setting: read by `_policy_keys`.
    policies: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"default": dict(DEFAULT_POLICY)})

    PAIRS = (("tls_cert", "tls_key"), ("upstream_tls_cert", "upstream_tls_key"))

    def check(self) -> None:
        super().check()
        if self.detect == "prada":
            raise ConfigError("--detect prada: PRADA needs the model's inputs, which only "
                              "stealguard-modelserver sees; use --detect classmix here")

    def secret_bytes(self) -> bytes:
        """The noise key as bytes (see `ensure_secret`)."""
        return self.secret.encode()

    def ensure_secret(self) -> None:
        """Draw a random key when none is configured (call once, before forking workers)."""
        if not self.secret:
            self.secret = secrets.token_hex(32)


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """A `Config` from defaults, then the YAML at `path` (or `STEALGUARD_CONFIG`), then
    `env` (default `os.environ`: `STEALGUARD_` + a key in capitals, e.g.
    `STEALGUARD_LISTEN`, `STEALGUARD_JSON_LOGS`, and `STEALGUARD_DEFENSE`, `_BETA`,
    `_GAMMA`), then `overrides` (CLI flags by key; None values are ignored). `defense`,
    `beta` and `gamma` change the `default` policy; a new `defense` replaces its
    parameters. The upstream TLS files are read (and checked) when the proxy starts.
    """
    return load_settings(Config, path, env=env, overrides=overrides,
                         extra=_policy_keys, extra_keys=_POLICY_OVERRIDES)


def _policy_keys(config: Config, values: Mapping[str, Any], source: str) -> None:
    """The sidecar's keys that are not plain settings: `policies` and the default policy's
    `defense`, `beta`, `gamma`."""
    for key, value in values.items():
        if key == "policies":
            config.policies = _as_policies(value, source)
        elif key not in _POLICY_OVERRIDES:
            known = sorted([*Config.__dataclass_fields__, *_POLICY_OVERRIDES])
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {known}")
    overrides = {k: values[k] for k in _POLICY_OVERRIDES if k in values}
    if overrides:
        default = copy.deepcopy(config.policies.get("default", {}))
        if "defense" in overrides and overrides["defense"] != default.get("defense"):
            default = {}
        for key, value in overrides.items():
            default[key] = value if key == "defense" else as_number(value, f"{source}: {key}")
        config.policies["default"] = default


def _as_policies(value: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: policies must be a mapping of name to policy")
    policies = {}
    for name, spec in value.items():
        if not isinstance(spec, dict) or "defense" not in spec:
            raise ConfigError(
                f"{source}: policy {name!r} must be a mapping with a 'defense' key, got {spec!r}"
            )
        policies[str(name)] = dict(spec)
    return policies
