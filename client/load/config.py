"""What a load run is asked to do: one validated, picklable plan shared by every process."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

METHODS = ("perturb", "perturb-stream", "predictions")
ARRIVALS = ("constant", "poisson")
DISTRIBUTIONS = ("dirichlet", "softmax")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``"30s"``, ``"2m"``, ``"250ms"``, ``"1.5"`` (seconds) -> seconds as a float.

    Raises ValueError naming the accepted units when the text is not a duration.
    """
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration (use e.g. 500ms, 30s, 2m)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


@dataclass(frozen=True)
class Security:
    """Channel security. Plaintext unless a CA or token is given (flags of the hardening issue)."""

    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token_file: str | None = None


@dataclass(frozen=True)
class LoadConfig:
    """One load run. ``rps`` None is a closed loop; otherwise an open loop in which
    ``concurrency`` is the most calls in flight (ghz's ``-c`` with ``--rps``)."""

    target: str
    method: str = "perturb"
    model: str = ""
    concurrency: int = 10
    rps: float | None = None
    arrival: str = "constant"
    duration: float | None = 10.0
    total: int | None = None
    warmup: float = 0.0
    connections: int = 1
    procs: int = 1
    batch: int = 1
    classes: int = 10
    dtype: str = "float32"
    distribution: str = "dirichlet"
    alpha: float = 0.3
    logits: bool = False
    payload: str | None = None
    input_shape: tuple[int, ...] = (1, 28, 28)
    timeout: float = 10.0
    connect_timeout: float = 5.0
    seed: int = 0
    phase: float = 0.0  # seconds the first scheduled call is offset by (interleaves procs)
    responses: str | None = None  # JSON-lines file of every measured call's reply
    server_pids: tuple[int, ...] = ()  # same host: measure these processes' CPU (and children)
    security: Security = field(default_factory=Security)

    @property
    def open_loop(self) -> bool:
        return self.rps is not None

    def share(self, index: int) -> LoadConfig:
        """The part of this plan that worker process ``index`` of ``procs`` runs."""
        n = self.procs

        def split(value: int) -> int:
            return value // n + (1 if index < value % n else 0)

        return replace(
            self,
            procs=1,
            concurrency=split(self.concurrency),
            connections=split(self.connections),
            rps=None if self.rps is None else self.rps / n,
            total=None if self.total is None else split(self.total),
            seed=self.seed + 7919 * index,
            phase=0.0 if self.rps is None else index / self.rps,
            server_pids=self.server_pids if index == 0 else (),  # measured once, by worker 0
        )


def check(cfg: LoadConfig) -> list[tuple[str, str]]:
    """Contradictions and bad values as (flag, reason) pairs; empty when the plan is valid."""
    problems: list[tuple[str, str]] = []
    if cfg.method not in METHODS:
        problems.append(("--method", f"must be one of {', '.join(METHODS)}"))
    if cfg.method == "predictions" and not cfg.model:
        problems.append(("--model", "--method predictions needs the model name"))
    if cfg.rps is not None and not cfg.rps > 0:
        problems.append(("--rps", "must be > 0"))
    if cfg.arrival not in ARRIVALS:
        problems.append(("--arrival", f"must be one of {', '.join(ARRIVALS)}"))
    if cfg.concurrency < 1:
        problems.append(("--concurrency", "must be at least 1"))
    if cfg.procs < 1:
        problems.append(("--procs", "must be at least 1"))
    if cfg.connections < 1:
        problems.append(("--connections", "must be at least 1"))
    if cfg.procs > 1 and cfg.concurrency < cfg.procs:
        problems.append(("--concurrency", f"must be at least --procs ({cfg.procs})"))
    if cfg.procs > 1 and cfg.connections < cfg.procs:
        problems.append(("--connections", f"must be at least --procs ({cfg.procs})"))
    if cfg.connections > cfg.concurrency:
        problems.append(("--connections", "must not exceed --concurrency"))
    if cfg.total is not None and cfg.total < 1:
        problems.append(("--total", "must be at least 1"))
    if cfg.duration is not None and not cfg.duration > 0:
        problems.append(("--duration", "must be > 0"))
    if cfg.warmup < 0:
        problems.append(("--warmup", "must be >= 0"))
    if cfg.batch < 1:
        problems.append(("--batch", "must be at least 1"))
    if cfg.classes < 1:
        problems.append(("--classes", "must be at least 1"))
    if cfg.dtype not in ("float32", "float64"):
        problems.append(("--dtype", "must be float32 or float64"))
    if cfg.distribution not in DISTRIBUTIONS:
        problems.append(("--distribution", f"must be one of {', '.join(DISTRIBUTIONS)}"))
    if not cfg.alpha > 0:
        problems.append(("--alpha", "must be > 0"))
    if not cfg.timeout > 0:
        problems.append(("--timeout", "must be > 0"))
    if any(d < 1 for d in cfg.input_shape):
        problems.append(("--input-shape", "every dimension must be at least 1"))
    if cfg.responses and cfg.procs > 1:
        problems.append(("--responses", "needs --procs 1 (one process writes the file)"))
    sec = cfg.security
    if (sec.tls_cert is None) != (sec.tls_key is None):
        problems.append(("--tls-cert/--tls-key", "give both for mutual TLS, or neither"))
    if sec.tls_cert is not None and sec.tls_ca is None:
        problems.append(("--tls-cert", "mutual TLS needs --tls-ca too"))
    return problems
