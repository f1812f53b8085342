"""One settings model for every stealguard server, and one loader.

`ServerSettings` declares what every server has — listener, TLS, tokens, limits, metrics,
logging — once; the sidecar and proxy (`stealguard.server.config.Config`) and the model
server (`stealguard.modelserver.config.ServerConfig`) extend it with their own fields. Each
field says its kind (`setting(...)`), so every command reads it with the same meaning:

    integers  whole numbers; `min` is the least allowed (limits: 0 = no limit)
    numbers   seconds and rates; durations also take "500ms", "10s", "2m"
    booleans  true/false, yes/no, on/off, 1/0
    files     must be readable (checked after every source is applied)
    choices   one of a list

`load_settings` applies, in increasing priority: the defaults, a YAML file (keys are field
names), the environment (`PREFIX` + the field name in capitals, unless the field names its
own variable), and the command line (flags by field name; None means not given). A bad
value is a `ConfigError` naming where it came from: `--flag`, `FILE: key` or `VARIABLE`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration value a person has to fix (message names the source and key)."""


def setting(default: Any = None, kind: str = "str", *, min: float | None = None,
            positive: bool = False, choices: tuple[str, ...] = (), env: str | None = None,
            factory: Callable[[], Any] | None = None) -> Any:
    """A settings field: its default, kind (str, int, float, duration, bool, file,
    address, path, choice, port, list), least value (or `positive`: above 0), choices and own
    environment variable."""
    metadata = {"kind": kind, "min": min, "positive": positive, "choices": choices,
                "env": env}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


#: The extraction detectors (`--detect`).
DETECTORS = ("off", "classmix", "prada")


@dataclass
class ServerSettings:
    """What every stealguard server has. Field names are the YAML keys."""

    listen: str = setting("127.0.0.1:50051", "address")
    log_level: str = setting("info", "choice", choices=LOG_LEVELS)
    json_logs: bool = setting(False, "bool")
    # Prometheus /metrics on this port; 0: off.
    metrics_port: int | None = setting(0, "port")
    # Exposure (issue 19). /metrics binds to the host of `listen` (loopback when the server
    # listens on loopback) unless metrics_listen HOST:PORT says where (its port is then
    # the metrics port). metrics_token_file: /metrics wants `Authorization: Bearer <token>`
    # with a token of that file. metrics_per_client: a series per client (token name, mTLS
    # subject or x-client-id header); off, all clients count as client="_all".
    # reflection: gRPC server reflection (the schema, for grpcurl); with tokens it needs
    # one. max_request_bytes: bytes of requests held at once; a call beyond it is refused
    # with RESOURCE_EXHAUSTED before its message is read; 0: no bound; default: a quarter
    # of the machine's memory (`default_request_bytes`).
    metrics_listen: str = setting("")
    metrics_token_file: str = setting("", "file")
    metrics_per_client: bool = setting(False, "bool")
    reflection: bool = setting(True, "bool")
    max_request_bytes: int = setting(kind="int", min=0, factory=lambda: default_request_bytes())
    # Limits: a message above max_message_bytes or a call beyond max_in_flight concurrent
    # calls is refused at once with RESOURCE_EXHAUSTED (max_in_flight 0: no limit).
    max_message_bytes: int = setting(64 * 1024 * 1024, "int", min=1)
    max_in_flight: int = setting(1024, "int", min=0)
    # Seconds that calls in flight get to finish after SIGTERM.
    grace: float = setting(10.0, "duration", min=0)
    # Security: TLS (cert + key), mutual TLS (+ ca: clients must present a cert it signed),
    # bearer tokens (one `name:token` or `token` per line; compared in constant time).
    tls_cert: str = setting("", "file")
    tls_key: str = setting("", "file")
    tls_ca: str = setting("", "file")
    token_file: str = setting("", "file")
    # Who the principal is: see stealguard.server.principal; the client header is believed
    # only from gateway tokens, or from anyone with trust_client_header.
    client_header: str = setting("x-client-id")
    trust_client_header: bool = setting(False, "bool")
    # Metering, in rows (stealguard.server.metering): rate_limit rows/s per principal
    # (burst rate_burst rows, default = rate_limit; 0: no limit), quotas "N/PERIOD" over
    # rolling windows, counted in `store` (memory, or redis:// shared by every process);
    # store_failure: what happens while the store is down.
    rate_limit: float = setting(0.0, "float", min=0)
    rate_burst: int = setting(0, "int", min=0)
    quota: list = setting(kind="list", factory=list)
    store: str = setting("memory")
    store_failure: str = setting("closed", "choice", choices=("closed", "open"))
    # Slots per principal (0: no cap), and how long a request stream may stay silent.
    max_calls_per_principal: int = setting(64, "int", min=0)
    max_streams_per_principal: int = setting(16, "int", min=0)
    stream_idle_timeout: float = setting(300.0, "duration", min=0)
    # Extraction detection (stealguard.server.detection), off by default: `classmix` on the
    # classes each principal is answered (every server), `prada` on the protected models'
    # inputs (the model server only). An alarm is G above detect_threshold (classmix, against
    # the detect_prior class mix, uniform when empty) or W below detect_delta (prada). The
    # escalation ladder (default: watch only) climbs at the first alarm and a step per
    # escalate_after more; a step down per detect_cooldown seconds without one (0: never);
    # detect_allow never escalates; detect_dry_run logs and counts, changes nothing;
    # detect_principals: the principals each detector keeps.
    detect: str = setting("off", "choice", choices=DETECTORS)
    detect_threshold: float = setting(23.0, "float", positive=True)
    detect_prior: list = setting(kind="list", factory=list)
    detect_delta: float = setting(0.94, "float", positive=True)
    escalate: list = setting(kind="list", factory=list)
    escalate_after: int = setting(100, "int", min=1)
    detect_cooldown: float = setting(600.0, "duration", min=0)
    detect_allow: list = setting(kind="list", factory=list)
    detect_dry_run: bool = setting(False, "bool")
    detect_principals: int = setting(10_000, "int", min=1)

    #: Fields that must be given together (flag names in the message).
    PAIRS = (("tls_cert", "tls_key"),)

    def check(self) -> None:
        """Checks across fields, after every source (ConfigError)."""
        for first, second in self.PAIRS:
            if bool(getattr(self, first)) != bool(getattr(self, second)):
                raise ConfigError(f"{_flag(first)} and {_flag(second)} go together "
                                  f"({first}, {second})")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key too")
        if self.metrics_listen:
            host, _, port = self.metrics_listen.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ConfigError(f"--metrics-listen {self.metrics_listen!r}: expected "
                                  "HOST:PORT")
            self.metrics_port = int(port)
        self._check_detection()

    def _check_detection(self) -> None:
        if self.detect_delta > 1:
            raise ConfigError(f"--detect-delta: must be in (0, 1], got {self.detect_delta}")
        if self.escalate and self.detect == "off":
            raise ConfigError("--escalate needs a detector: add --detect classmix")
        if self.escalate:
            from stealguard.server.detection.escalation import parse_steps

            try:
                parse_steps(self.escalate)
            except ValueError as error:
                raise ConfigError(f"--escalate: {error}") from None
        try:
            prior = [float(x) for v in self.detect_prior for x in str(v).split(",")
                     if x.strip()]
        except ValueError:
            raise ConfigError(f"--detect-prior: must be numbers (the class mix, one per "
                              f"class), got {self.detect_prior}") from None
        if prior and (len(prior) < 2 or min(prior) < 0 or not 0 < sum(prior) < math.inf):
            raise ConfigError(f"--detect-prior: must be at least 2 non-negative numbers, not "
                              f"all 0, got {self.detect_prior}")
        self.detect_prior = prior

    @property
    def metrics_host(self) -> str:
        """Where /metrics binds: metrics_listen's host, else the host of `listen`."""
        host = (self.metrics_listen or self.listen).rpartition(":")[0]
        return host.strip("[]")


def default_request_bytes() -> int:
    """A quarter of the machine's physical memory (at least 256 MiB): the default bound on
    request bytes held at once."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 4 << 30
    return max(256 << 20, total // 4)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("kind")}


def env_name(item: dataclasses.Field, prefix: str) -> str:
    """The environment variable of a settings field."""
    return item.metadata.get("env") or prefix + item.name.upper()


def load_settings(cls: type, path: str | os.PathLike[str] | None = None, *,
                  env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Any] | None = None, prefix: str = "STEALGUARD_",
                  extra: Callable[[Any, Mapping[str, Any], str], None] | None = None,
                  extra_keys: tuple[str, ...] = ()) -> Any:
    """`cls` (a `ServerSettings` dataclass) from defaults < YAML at `path` (or the file
    named by `PREFIX`CONFIG) < environment < `overrides` (see the module docstring).

    `extra(settings, values, source)` gets, from each source, the keys that are not fields
    (the sidecar's `policies`, `defense`, `beta`, `gamma`); without it they are unknown.
    From the environment it gets only `extra_keys` (as `PREFIX` + KEY).
    """
    env = os.environ if env is None else env
    known = fields_of(cls)
    settings = cls()
    origins: dict[str, str] = {}
    path = path or env.get(prefix + "CONFIG") or None
    if path:
        data = read_yaml(path)
        _apply(settings, known, data, origins, lambda key: f"{path}: {key}", extra,
               source=str(path))
    from_env = {}
    for name, item in known.items():
        variable = env_name(item, prefix)
        if env.get(variable) not in (None, ""):
            from_env[name] = env[variable]
    _apply(settings, known, from_env, origins, lambda key: env_name(known[key], prefix), None,
           source=f"environment ({prefix}*)")
    from_env = {key: env[prefix + key.upper()] for key in extra_keys
                if env.get(prefix + key.upper()) not in (None, "")}
    if extra is not None and from_env:
        extra(settings, from_env, f"environment ({prefix}*)")
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    _apply(settings, known, {k: v for k, v in flags.items() if k in known}, origins, _flag,
           None, source="command line")
    if extra is not None:
        extra(settings, {k: v for k, v in flags.items() if k not in known}, "command line")
    settings.check()
    for name, item in known.items():
        value = getattr(settings, name)
        if item.metadata["kind"] == "file" and value:
            if not os.path.isfile(value) or not os.access(value, os.R_OK):
                raise ConfigError(f"{origins.get(name, _flag(name))}: {value} is not a "
                                  "readable file")
    return settings


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in the YAML file at `path` ({} for an empty file)."""
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


def _apply(settings: Any, known: Mapping[str, dataclasses.Field], values: Mapping[str, Any],
           origins: dict[str, str], where: Callable[[str], str], extra, *,
           source: str) -> None:
    rest = {}
    for key, value in values.items():
        item = known.get(key)
        if item is None:
            rest[key] = value
            continue
        setattr(settings, key, parse(item, value, where(key)))
        origins[key] = where(key)
    if rest:
        if extra is None:
            raise ConfigError(f"{source}: unknown key {next(iter(rest))!r}; known keys: "
                              f"{sorted(known)}")
        extra(settings, rest, source)


_DURATION = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m)?\s*$")


def parse(item: dataclasses.Field, value: Any, where: str) -> Any:
    """`value` read as the kind of settings field `item`; ConfigError naming `where`."""
    kind, low = item.metadata["kind"], item.metadata["min"]
    if kind == "list":  # a YAML list, a list of flags, or "a,b" from the environment
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: must be a list, got {value!r}")
        return [str(v).strip() for v in items if str(v).strip()]
    if kind in ("int", "port"):
        value = _as_int(value, where)
        if kind == "port" and not 0 <= value <= 65535:
            raise ConfigError(f"{where}: not a TCP port: {value}")
    elif kind == "float":
        value = as_number(value, where)
    elif kind == "duration":
        value = as_seconds(value, where)
    elif kind == "bool":
        value = as_bool(value, where)
    elif kind == "path":
        value = Path(str(value)).expanduser()
        if value.exists() and not value.is_dir():
            raise ConfigError(f"{where}: {value} is not a directory")
        return value
    else:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {value!r}")
        if kind == "choice":
            value = value.lower() if item.name == "log_level" else value
            if value not in item.metadata["choices"]:
                raise ConfigError(f"{where}: expected one of "
                                  f"{', '.join(item.metadata['choices'])}, got {value!r}")
        elif kind == "address" and ":" not in value:
            raise ConfigError(f"{where}: expected HOST:PORT, got {value!r}")
    if item.metadata["positive"] and not value > 0:
        unit = " seconds" if kind == "duration" else ""
        raise ConfigError(f"{where}: must be > 0{unit}, got {value}")
    if low is not None and value < low:
        if low == 0:
            raise ConfigError(f"{where}: must be 0 or more, got {value}")
        raise ConfigError(f"{where}: must be at least {low:g}, got {value}")
    return value


def _as_int(value: Any, where: str) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: must be an integer, got {value!r}") from None


def as_number(value: Any, where: str) -> float:
    """A number (not a boolean); ConfigError naming `where`."""
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: must be a number, got {value!r}") from None


def as_seconds(value: Any, where: str) -> float:
    """A duration in seconds: a number, or text such as "500ms", "10s", "2m"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ConfigError(f"{where}: must be seconds (10, 10s, 500ms, 2m), got {value!r}")
    number, unit = float(match.group(1)), match.group(2) or "s"
    return number * {"ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def as_bool(value: Any, where: str) -> bool:
    """true/false, yes/no, on/off or 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{where}: must be true or false (yes/no, on/off, 1/0), got {value!r}")
