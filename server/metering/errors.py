"""The two ways metering refuses a call, as domain errors a front end maps to a status.

`OverLimit` is RESOURCE_EXHAUSTED (with `google.rpc.QuotaFailure` and `RetryInfo`
details, see `status.py`); `StoreUnavailable` is UNAVAILABLE naming the store.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Violation:
    """One limit a call would break: `limit` is its phrase (`quota 20000/1d ...`)."""

    limit: str
    description: str


class OverLimit(Exception):
    """The principal is over a limit; `retry_after` seconds until the call could pass
    (None: never, the call is larger than the limit itself)."""

    def __init__(self, principal: str, rows: int, violations: list[Violation],
                 retry_after: float | None):
        self.principal = principal
        self.rows = rows
        self.violations = violations
        self.retry_after = retry_after
        limits = "; ".join(v.description for v in violations)
        if retry_after is None:
            when = "it can never pass: send fewer rows per call"
        else:
            when = f"retry in {retry_after:.3g} s"
        super().__init__(f"principal {principal!r} is over its limit for a call of "
                         f"{rows} rows: {limits}; {when}")


class StoreUnavailable(Exception):
    """The metering store cannot be reached and `--store-failure` is `closed`."""

    def __init__(self, store: str, reason: str):
        self.store = store
        self.reason = reason
        super().__init__(f"the metering store {store} is unavailable ({reason}); calls are "
                         "refused until it is back (--store-failure closed)")
