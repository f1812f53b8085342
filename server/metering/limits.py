"""What a principal may spend: a row rate with a burst, and rolling-window quotas.

A query is a row: every limit is in rows. `--rate-limit R --rate-burst B` is a GCRA (the
generic cell rate algorithm, a token bucket without a refill timer): R rows per second,
at most B rows at once. `--quota N/PERIOD` (e.g. `20000/1d`, `2000/1h`; several allowed)
is a rolling window counted in `SLOTS` slots of PERIOD/SLOTS each: the rows of the
current slot and of the SLOTS slots before it count, so no span of length PERIOD ever
admits more than N rows, and a row's budget comes back between PERIOD and
PERIOD·(SLOTS+1)/SLOTS after it was spent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

#: Slots per quota window (a quota forgets its rows in steps of PERIOD/SLOTS).
SLOTS = 60

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_QUOTA = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([smhdw])\s*$")


@dataclass(frozen=True)
class Quota:
    """At most `rows` rows in any rolling window of `period` seconds."""

    rows: int
    period: int  # seconds

    @property
    def name(self) -> str:
        """The spec it was written as, normalised: `20000/1d`."""
        for unit in ("w", "d", "h", "m"):
            if self.period % _UNITS[unit] == 0:
                return f"{self.rows}/{self.period // _UNITS[unit]}{unit}"
        return f"{self.rows}/{self.period}s"

    @property
    def slot_us(self) -> int:
        """Length of one counting slot in microseconds."""
        return self.period * 1_000_000 // SLOTS


def parse_quota(spec: str) -> Quota:
    """`N/PERIOD` with PERIOD a count and a unit s, m, h, d or w (`20000/1d`, `500/30m`;
    `100/h` means `100/1h`). Raises ValueError naming what is wrong."""
    match = _QUOTA.match(str(spec))
    if not match:
        raise ValueError(f"quota {spec!r} must be ROWS/PERIOD, e.g. 20000/1d or 2000/1h "
                         "(units s, m, h, d, w)")
    rows, count, unit = int(match[1]), int(match[2] or 1), match[3]
    period = count * _UNITS[unit]
    if rows < 1 or period < 1:
        raise ValueError(f"quota {spec!r}: rows and period must be at least 1")
    if period < 60:
        raise ValueError(f"quota {spec!r}: the period must be at least 1m "
                         "(use --rate-limit for shorter spans)")
    return Quota(rows, period)


@dataclass(frozen=True)
class Limits:
    """Every limit of one principal: `rate` rows/s with `burst` rows, and quotas."""

    rate: float = 0.0
    burst: int = 0
    quotas: tuple[Quota, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.rate < 0 or self.burst < 0:
            raise ValueError("rate_limit and rate_burst must be 0 or more")
        if self.rate and not self.burst:
            object.__setattr__(self, "burst", max(1, math.ceil(self.rate)))
        periods = [q.period for q in self.quotas]
        if len(set(periods)) != len(periods):
            raise ValueError("two quotas with the same period: keep the smaller one")

    @classmethod
    def of(cls, rate: float = 0.0, burst: int = 0, quotas=()) -> Limits:
        """Limits from flag values: `quotas` as specs (`"20000/1d"`) or `Quota`s."""
        parsed = tuple(q if isinstance(q, Quota) else parse_quota(q) for q in quotas)
        return cls(float(rate or 0.0), int(burst or 0), parsed)

    @property
    def active(self) -> bool:
        """Whether anything is limited at all."""
        return bool(self.rate or self.quotas)

    @property
    def emission_us(self) -> int:
        """GCRA emission interval: microseconds one row costs (0: no rate limit)."""
        return round(1_000_000 / self.rate) if self.rate else 0

    def describe(self) -> list[str]:
        """One phrase per limit, for messages and QuotaFailure descriptions."""
        out = []
        if self.rate:
            out.append(f"rate {self.rate:g} rows/s (burst {self.burst})")
        out += [f"quota {q.rows} rows per rolling {q.name.split('/')[1]}" for q in self.quotas]
        return out
