"""The ways metering refuses a call, as the protect core's domain errors
(`stealguard.server.errors`); `stealguard.server.platform.status` maps them to gRPC once.

`OverLimit` is `Exhausted` (RESOURCE_EXHAUSTED, with `google.rpc.QuotaFailure` — one
violation per limit, subject `principal:<name>` — and `google.rpc.RetryInfo` when the call
can pass later); `StoreUnavailable` is `Unavailable` naming the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from stealguard.server.errors import Exhausted, Unavailable


@dataclass(frozen=True)
class Violation:
    """One limit a call would break: `limit` is `rate` or a quota's window (`1d`),
    `description` its phrase (`quota 20000 rows per rolling 1d`)."""

    limit: str
    description: str


class OverLimit(Exhausted):
    """The principal is over a limit; `retry_after` seconds until the call could pass
    (None: never, the call is larger than the limit itself)."""

    def __init__(self, principal: str, rows: int, violations: list[Violation],
                 retry_after: float | None):
        self.principal = principal
        self.rows = rows
        self.violations = violations
        limits = "; ".join(v.description for v in violations)
        if retry_after is None:
            when = "it can never pass: send fewer rows per call"
        else:
            when = f"retry in {retry_after:.3g} s"
        super().__init__(f"principal {principal!r} is over its limit for a call of "
                         f"{rows} rows: {limits}; {when}", retry_after=retry_after,
                         quota={f"principal:{principal}": limits})


class StoreUnavailable(Unavailable):
    """The metering store cannot be reached and `--store-failure` is `closed`."""

    def __init__(self, store: str, reason: str):
        self.store = store
        self.reason = reason
        super().__init__(f"the metering store {store} is unavailable ({reason}); calls are "
                         "refused until it is back (--store-failure closed)")
