"""The one config loader: defaults < YAML file < STEALGUARD_* environment < CLI flags.

`load_config` returns a plain `Config`; it checks types and names and says which source
and key were wrong. Policies are checked when they are built (`PolicySet.from_config`).
"""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

DEFAULT_POLICY: dict[str, Any] = {
    "defense": "reverse_sigmoid",
    "beta": 1.5,
    "gamma": 0.3,
    "preserve_top1": True,
}


class ConfigError(ValueError):
    """A configuration value a person has to fix (message names the source and key)."""


@dataclass
class Config:
    """Everything the sidecar needs to start. Field names are the YAML keys."""

    listen: str = "127.0.0.1:50051"
    workers: int = 1
    log_level: str = "info"
    # Key of the random defenses' noise. Empty: a random key is drawn at start-up (shared
    # by all workers), so answers to a repeated query change only across restarts.
    secret: str = ""
    metrics_port: int = 0
    json_logs: bool = False
    # Limits: a message above max_message_bytes, more than max_rows rows, or a call beyond
    # max_in_flight concurrent calls is refused at once with RESOURCE_EXHAUSTED
    # (max_in_flight 0: no limit on concurrent calls).
    max_message_bytes: int = 64 * 1024 * 1024
    max_rows: int = 65536
    max_in_flight: int = 1024
    # Seconds that calls in flight get to finish after SIGTERM.
    grace: float = 10.0
    # Security: TLS (cert + key), mutual TLS (+ ca: clients must present a cert it signed),
    # bearer tokens (one `name:token` or `token` per line; compared in constant time).
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    token_file: str = ""
    # Per-client accounting: the client is the token's name, else the mTLS subject, else
    # this metadata key's value, else "anonymous". rate_limit > 0 gives each client a token
    # bucket of that many requests per second (burst rate_burst, default = rate_limit).
    client_header: str = "x-client-id"
    rate_limit: float = 0.0
    rate_burst: int = 0
    # Proxy mode only (`stealguard-sidecar proxy`): the real model server and its API, and
    # TLS to it (the CA that signed its certificate; a client cert and key for mutual TLS).
    upstream: str = ""
    protocol: str = "torchserve"
    upstream_tls_ca: str = ""
    upstream_tls_cert: str = ""
    upstream_tls_key: str = ""
    policies: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"default": dict(DEFAULT_POLICY)}
    )

    def secret_bytes(self) -> bytes:
        """The noise key as bytes (see `ensure_secret`)."""
        return self.secret.encode()

    def ensure_secret(self) -> None:
        """Draw a random key when none is configured (call once, before forking workers)."""
        if not self.secret:
            self.secret = secrets.token_hex(32)


_INT_KEYS = {"workers", "metrics_port", "max_message_bytes", "max_rows", "max_in_flight",
             "rate_burst"}
_FLOAT_KEYS = {"grace", "rate_limit"}
_BOOL_KEYS = {"json_logs"}
_STR_KEYS = {"listen", "log_level", "secret", "upstream", "protocol", "tls_cert", "tls_key",
             "tls_ca", "token_file", "client_header", "upstream_tls_ca", "upstream_tls_cert",
             "upstream_tls_key"}
_LOG_LEVELS = ("debug", "info", "warning", "error")
# Keys of the default policy that flags and environment may set.
_POLICY_OVERRIDES = ("defense", "beta", "gamma")


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build a `Config` from defaults, then the YAML at `path`, then `env`, then `overrides`.

    `env` defaults to `os.environ` (keys `STEALGUARD_LISTEN`, `STEALGUARD_WORKERS`,
    `STEALGUARD_LOG_LEVEL`, `STEALGUARD_SECRET`, `STEALGUARD_METRICS_PORT`,
    `STEALGUARD_MAX_ROWS`, `STEALGUARD_MAX_MESSAGE_BYTES`, `STEALGUARD_DEFENSE`,
    `STEALGUARD_BETA`, `STEALGUARD_GAMMA`, and for proxy mode `STEALGUARD_UPSTREAM`,
    `STEALGUARD_PROTOCOL`, `STEALGUARD_UPSTREAM_TLS_CA` / `_CERT` / `_KEY`;
    `STEALGUARD_CONFIG` names the file when `path` is None). `overrides` holds CLI flags by
    key; None values are ignored. `defense`, `beta` and `gamma` change the `default`
    policy; a new `defense` replaces its parameters.
    """
    env = os.environ if env is None else env
    config = Config()
    path = path or env.get("STEALGUARD_CONFIG") or None
    if path:
        _apply(config, _read_yaml(path), source=str(path))
    from_env = {}
    for key in (*_INT_KEYS, *_FLOAT_KEYS, *_BOOL_KEYS, *_STR_KEYS, *_POLICY_OVERRIDES):
        value = env.get("STEALGUARD_" + key.upper())
        if value not in (None, ""):
            from_env[key] = value
    _apply(config, from_env, source="environment (STEALGUARD_*)")
    _apply(
        config,
        {k: v for k, v in (overrides or {}).items() if v is not None},
        source="command line",
    )
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("tls_cert and tls_key go together (--tls-cert, --tls-key)")
    if config.tls_ca and not config.tls_cert:
        raise ConfigError("tls_ca (mutual TLS) needs tls_cert and tls_key too")
    if bool(config.upstream_tls_cert) != bool(config.upstream_tls_key):
        raise ConfigError("upstream_tls_cert and upstream_tls_key go together "
                          "(--upstream-tls-cert, --upstream-tls-key)")
    return config


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"config file {path} must be a mapping of keys, got {kind}")
    return data


def _apply(config: Config, values: Mapping[str, Any], *, source: str) -> None:
    known = _INT_KEYS | _FLOAT_KEYS | _BOOL_KEYS | _STR_KEYS | {"policies"}
    known |= set(_POLICY_OVERRIDES)
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {sorted(known)}")
        if key in _INT_KEYS:
            setattr(config, key, _as_int(value, key, source))
        elif key in _FLOAT_KEYS:
            setattr(config, key, _as_number(value, key, source))
        elif key in _BOOL_KEYS:
            setattr(config, key, _as_bool(value, key, source))
        elif key in _STR_KEYS:
            if not isinstance(value, str):
                raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
            setattr(config, key, value)
        elif key == "policies":
            config.policies = _as_policies(value, source)
    if config.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(
            f"{source}: log_level must be one of {_LOG_LEVELS}, got {config.log_level!r}"
        )
    config.log_level = config.log_level.lower()
    for key in ("workers", "max_rows", "max_message_bytes"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{source}: {key} must be at least 1, got {getattr(config, key)}")
    for key in ("max_in_flight", "grace", "rate_limit", "rate_burst"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{source}: {key} must be 0 or more, got {getattr(config, key)}")

    overrides = {k: values[k] for k in _POLICY_OVERRIDES if k in values}
    if overrides:
        default = copy.deepcopy(config.policies.get("default", {}))
        if "defense" in overrides and overrides["defense"] != default.get("defense"):
            default = {}
        for key, value in overrides.items():
            default[key] = _as_number(value, key, source) if key != "defense" else value
        config.policies["default"] = default


def _as_int(value: Any, key: str, source: str) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}") from None


def _as_bool(value: Any, key: str, source: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")


def _as_number(value: Any, key: str, source: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}") from None


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
